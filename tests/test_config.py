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
