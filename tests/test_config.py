"""The config contract: one YAML file plus overrides, validated before any work starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_defaults_and_overrides_parse_yaml_scalars(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "workdir: runs/x\ntrain:\n  lr: 0.001\n"),
                      ["train.max_steps=7", "prep.filters.c4_quality=false", "model.position=sinusoidal"])
    assert cfg.train.lr == 0.001
    assert cfg.train.max_steps == 7
    assert cfg.prep.filters.c4_quality is False
    assert cfg.model.position == "sinusoidal"
    assert cfg.prep.dedup.minhash.buckets == 14  # FineWeb's defaults
    assert cfg.prep.dedup.minhash.hashes_per_bucket == 8


def test_true_turns_a_filter_on_with_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "prep:\n  filters:\n    length: true\n"), ["prep.dedup.minhash=true"])
    assert cfg.prep.filters.length.min_chars == 200
    assert cfg.prep.dedup.minhash.ngram == 5


def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  lr: 0.1\n  learning_rate: 0.2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "train.learning_rate" in str(err.value)
    assert str(path) in str(err.value)


def test_wrong_type_names_key_and_expected_type(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "model:\n  n_layer: four\n"))
    msg = str(err.value)
    assert "model.n_layer" in msg and "integer" in msg and "'four'" in msg


def test_unknown_override_key_fails(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="trian"):
        load_config(write(tmp_path, "{}\n"), ["trian.lr=1"])


def test_heads_must_divide_width(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="divisible"):
        load_config(write(tmp_path, "model: {n_embd: 130, n_head: 4}\n"))


def test_glob_matching_nothing_is_named(tmp_path: Path) -> None:
    pattern = str(tmp_path / "nothing" / "*.jsonl")
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, f"data:\n  inputs: ['{pattern}']\n"))
    assert "data.inputs" in str(err.value) and pattern in str(err.value)


def test_missing_config_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [1, 2\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_missing_finetune_file_is_named(tmp_path: Path) -> None:
    text = "finetune:\n  tasks:\n    - {name: t, train: /no/train.tsv, eval: /no/dev.tsv}\n"
    with pytest.raises(ConfigError, match=r"finetune\.tasks\.0\.train.*/no/train\.tsv"):
        load_config(write(tmp_path, text))


def test_a_second_workdir_in_one_process_gets_its_own_store(tmp_path: Path, monkeypatch) -> None:
    """mlflow.set_tracking_uri exports $MLFLOW_TRACKING_URI; that must not send the next config's runs there."""
    from pipeline.core.tracking import tracking_uri, use_tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = load_config(None, [f"workdir={tmp_path / 'a'}"])
    second = load_config(None, [f"workdir={tmp_path / 'b'}"])
    use_tracking(first)
    assert tracking_uri(second) == f"sqlite:///{(tmp_path / 'b').resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")  # set by the user: it wins
    assert tracking_uri(second) == "http://127.0.0.1:5999"


def test_a_config_in_another_encoding_is_one_line_naming_its_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                                  ) -> None:
    from pipeline.cli import main

    path = tmp_path / "cfg.yaml"
    path.write_bytes("workdir: runs/x\n# 中文语料\n".encode("gb18030"))
    assert main(["prep", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{path}:2: not UTF-8" in err


def test_a_yaml_error_says_file_line_and_column(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cfg\.yaml:3:8: not valid YAML: mapping values are not allowed"):
        load_config(write(tmp_path, "workdir: runs/x\ntrain:\n  lr: 1: 2\n"))


def test_a_control_character_in_the_config_names_its_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cfg\.yaml:3: not valid YAML: special characters are not allowed "
                                          r"\(U\+0007\)"):
        load_config(write(tmp_path, "workdir: runs/x\ntrain:\n  optimizer: adam\x07w\n"))


def test_an_empty_config_file_is_refused_rather_than_running_the_demo(tmp_path: Path) -> None:
    for text in ("", "# only a comment\n"):
        with pytest.raises(ConfigError, match="is empty"):
            load_config(write(tmp_path, text))
    assert load_config(None).workdir == Path("runs/demo")  # no file at all still gives the defaults


def test_a_floor_above_the_peak_learning_rate_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.min_lr \(0\.0003\) is above train\.lr \(0\.0001\)"):
        load_config(write(tmp_path, "workdir: runs/x\n"), ["train.lr=1e-4"])
    cfg = load_config(write(tmp_path, "workdir: runs/x\n"), ["train.lr=1.0e-4", "train.min_lr=1.0e-5"])
    assert cfg.train.lr == 1e-4


@pytest.mark.parametrize("override", ["train.lr=.nan", "train.max_minutes=.inf", "prep.workers=true",
                                      "train.max_steps=false", "train.zero_stage=true", "train.betas=[true, 0.9]"])
def test_non_finite_floats_and_booleans_for_numbers_are_refused(tmp_path: Path, override: str) -> None:
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"`{key}`"):
        load_config(write(tmp_path, "workdir: runs/x\n"), [override])


def test_switches_still_take_booleans(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "workdir: runs/x\n"), ["prep.dedup.minhash=false", "data.strict=true"])
    assert cfg.prep.dedup.minhash is False and cfg.data.strict is True


def test_an_override_names_a_list_item_by_its_position(tmp_path: Path) -> None:
    for name in ("a.txt", "b.txt", "t.tsv"):
        (tmp_path / name).write_text("text\tlabel\nsome words\tx\n")
    path = write(tmp_path, f"""workdir: {tmp_path / 'w'}
data:
  sources:
    - {{name: a, inputs: [{tmp_path / 'a.txt'}]}}
    - {{name: b, inputs: [{tmp_path / 'b.txt'}]}}
finetune:
  tasks:
    - {{name: t, train: {tmp_path / 't.tsv'}, eval: {tmp_path / 't.tsv'}}}
""")
    cfg = load_config(path, ["data.sources.1.weight=0.5", "finetune.tasks.0.max_steps=5"])
    assert cfg.data.sources[1].weight == 0.5 and cfg.data.sources[0].weight == 1.0
    assert cfg.finetune.tasks[0].max_steps == 5
    with pytest.raises(ConfigError, match=r"`data\.sources` has 2 item\(s\), numbered from 0"):
        load_config(path, ["data.sources.2.weight=0.5"])
    with pytest.raises(ConfigError, match=r"`data\.sources` is a list; name an item by its position"):
        load_config(path, ["data.sources.a.weight=0.5"])
    with pytest.raises(ConfigError, match=r"`finetune\.tasks` is not in the config, so it has no item 0"):
        load_config(write(tmp_path, "workdir: runs/x\n"), ["finetune.tasks.0.max_steps=5"])
