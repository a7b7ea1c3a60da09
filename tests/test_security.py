"""What a shared cluster needs: files that may hold credentials are private, names stay inside the workdir,
secrets stay out of MLflow and the terminal, and text input that is not UTF-8 is a one-line error."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from pipeline.config import load_config


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "in.jsonl").write_text('{"id": "1", "text": "hello"}\n')
    return tmp_path


def test_the_mlflow_store_and_the_slurm_snapshot_are_created_owner_only(inputs: Path) -> None:
    import os

    from pipeline.core.tracking import stage_run
    from pipeline.slurm.submit import prepare

    old = os.umask(0o022)  # the usual umask: files would be world-readable
    try:
        cfg = load_config(None, [f"workdir={inputs / 'w'}", "data.inputs=[in.jsonl]", "slurm.partition=debug"])
        with stage_run(cfg, "tokenizer", sections=("tokenizer",)):
            pass
        snapshot = prepare(cfg) / "config.yaml"
    finally:
        os.umask(old)
    assert mode_of(inputs / "w" / "mlflow.db") == 0o600
    assert (inputs / "w" / "mlflow.db").stat().st_size > 0  # MLflow made its tables in the file we created
    assert mode_of(snapshot) == 0o600


# ---- Slurm values: checked when the config loads, whichever writer would use them


@pytest.mark.parametrize(("key", "value"), [("mem", "4G\ntouch x"), ("time", "1:00:00 && id"), ("account", "a b"),
                                            ("partition", "debug\n#SBATCH --wrap=id")])
def test_slurm_values_for_the_datatrove_executor_are_refused_at_load(inputs: Path, key: str, value: str) -> None:
    import json

    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=rf"`slurm\.{key}`: .* is not allowed in a batch script"):
        load_config(None, [f"workdir={inputs / 'w'}", "data.inputs=[in.jsonl]", "executor=slurm",
                           f"slurm.{key}={json.dumps(value)}"])


def test_a_setup_line_with_a_line_break_is_refused_at_load(inputs: Path) -> None:
    from pipeline.config import ConfigError

    (inputs / "c.yaml").write_text("data: {inputs: [in.jsonl]}\nexecutor: slurm\nslurm:\n  partition: debug\n"
                                   "  setup: |\n    module load python\n    touch /tmp/x\n")
    with pytest.raises(ConfigError, match=r"`slurm\.setup`: must be one line"):
        load_config(inputs / "c.yaml")


@pytest.mark.parametrize(("option", "owned"), [
    ("--dep=afterok:1", "dependency"), ("--outp=/tmp/x", "output"), ("--ch=/tmp", "chdir"), ("--arr=1-9", "array"),
    ("--job=x", "job-name"), ("--open=truncate", "open-mode"), ("--workdir=/tmp", "workdir"),
    ("-o/tmp/x", "output"), ("-J", "job-name"), ("-HJname", "job-name"), ("-d", "dependency"),
    ("-N2", "nodes"), ("-kDx", "chdir"),
])
def test_extra_sbatch_options_are_read_as_sbatch_reads_them(inputs: Path, option: str, owned: str) -> None:
    import json

    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=rf"`slurm\.extra_sbatch\.1`: --{owned}\b.* is set by scratchgpt itself"):
        load_config(None, ["data.inputs=[in.jsonl]", f"slurm.extra_sbatch={json.dumps(['--exclusive', option])}"])


def test_extra_sbatch_options_of_the_users_own_pass(inputs: Path) -> None:
    options = ["--exclusive", "--export=ALL", "--nodelist=n1", "--ntasks-per-gpu=1", "-pdebug", "-Hv",
               "--constraint=avx512", "--qos=high", "--gres=gpu:2"]
    assert load_config(None, ["data.inputs=[in.jsonl]", f"slurm.extra_sbatch={options}"]).slurm.extra_sbatch == options


# ---- names that become path components


@pytest.mark.parametrize("name", ["../../../escaped", "/tmp/anywhere", "a/b", ".hidden", "a b", "", "-rf"])
def test_a_task_name_that_is_not_a_plain_name_is_refused(inputs: Path, name: str) -> None:
    import json

    from pipeline.config import ConfigError

    (inputs / "t.tsv").write_text("text\tlabel\na\tb\n")
    task = {"name": name, "train": "t.tsv", "eval": "t.tsv"}
    with pytest.raises(ConfigError, match=r"`finetune\.tasks\.0\.name`: .* is not a plain name") as err:
        load_config(None, [f"workdir={inputs / 'w'}", "data.inputs=[in.jsonl]", f"finetune.tasks=[{json.dumps(task)}]"])
    assert "[A-Za-z0-9][A-Za-z0-9._-]*" in str(err.value)
    assert not (inputs / "w").exists()  # refused before anything is written


def test_an_experiment_name_that_is_not_a_plain_name_is_refused(inputs: Path) -> None:
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=r"`tracking\.experiment`: '\.\./x' is not a plain name"):
        load_config(None, ["data.inputs=[in.jsonl]", "tracking.experiment=../x"])
    assert load_config(None, ["data.inputs=[in.jsonl]", "tracking.experiment=sweep-2.v1_a"]).tracking.experiment


# ---- secrets: planted in the config, looked for in the real MLflow store and in everything printed

SECRETS = ("planted-pw-1", "planted-tok-2", "planted-key-3")


def test_planted_secrets_reach_neither_the_mlflow_store_nor_the_terminal(
        inputs: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    import mlflow
    from test_runs_server import mlflow_server

    from pipeline.commands.run import closing_report
    from pipeline.config import Config
    from pipeline.core.tracking import stage_run
    from pipeline.slurm.submit import submit

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)  # undone after the test: the URI's credentials land here
    with mlflow_server(inputs) as uri:
        cfg = load_config(None, [
            f"workdir={inputs / 'w'}", "data.inputs=[in.jsonl]", "tracking.experiment=secrets",
            f"tracking.uri={uri.replace('http://', 'http://scratch:planted-pw-1@')}",
            'slurm.setup="export HF_TOKEN=planted-tok-2 && module load python"', "slurm.partition=debug",
            'slurm.extra_sbatch=["--export=ALL,WANDB_API_KEY=planted-key-3"]',
        ])
        # What `scratchgpt run` logs: every section of the config as params of the pipeline run.
        with stage_run(cfg, "pipeline", sections=tuple(Config.model_fields)) as run:
            run_id = run.info.run_id
        print(closing_report(cfg))
        submit(cfg, dry_run=True)  # prints every batch script
        params = mlflow.MlflowClient(uri).get_run(run_id).data.params
    assert params["tracking.uri"] == uri.replace("http://", "http://scratch:****@")
    assert params["slurm.setup"] == "export HF_TOKEN=**** && module load python"
    assert "WANDB_API_KEY=****" in params["slurm.extra_sbatch"]
    printed = capfd.readouterr()
    assert "View run" in printed.out and "#SBATCH" in printed.out  # the output looked for is really there
    stored = b"".join(p.read_bytes() for p in inputs.rglob("*")  # the server's store, journal and artifacts
                      if p.is_file() and ("server.db" in p.name or "artifacts" in p.parts))
    assert b"slurm.setup" in stored  # the server's sqlite store holds the params
    for secret in SECRETS:
        assert secret not in printed.out + printed.err
        assert secret.encode() not in stored


# ---- text in: not UTF-8, or nothing at all


def scratchgpt_cli(args: list[str | bytes], stdin: bytes = b"") -> tuple[int, str]:
    import subprocess
    import sys

    from train_helpers import cli_env

    done = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], input=stdin, capture_output=True,
                          env={**cli_env(), "LC_ALL": "C"}, timeout=120)  # C locale: stdin with surrogateescape
    return done.returncode, done.stderr.decode("utf-8", errors="replace")


def test_a_prompt_that_is_not_utf8_is_one_line_naming_it(tmp_path: Path) -> None:
    rc, err = scratchgpt_cli(["generate", "--model", str(tmp_path), "--prompt", b"first line\nsecond \xff line"])
    assert rc == 2 and err.strip() == \
        "scratchgpt generate: --prompt: line 2 is not valid UTF-8 (byte 0xff at character 8)"


def test_predict_input_that_is_not_utf8_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_bytes(b"a fine line\n\nbad \xc3\x28 byte\n")
    for args, stdin, name in ((["--file", str(tmp_path / "in.txt")], b"", str(tmp_path / "in.txt")),
                              ([], (tmp_path / "in.txt").read_bytes(), "stdin")):
        rc, err = scratchgpt_cli(["predict", "--model", str(tmp_path), *args], stdin)
        assert rc == 2 and err.strip() == \
            f"scratchgpt predict: {name}:3: not valid UTF-8 (byte 0xc3 at byte 5 of the line)"


def test_empty_predict_input_says_so(tmp_path: Path) -> None:
    rc, err = scratchgpt_cli(["predict", "--model", str(tmp_path)], b"\n  \n")
    assert rc == 2 and "stdin: no text to label: the input is empty" in err and len(err.strip().splitlines()) == 1
