"""The stage runner as users meet it: inputs in a stage's identity, empty results, the workdir lock, one error path.

Real stages throughout (datatrove prep, the tokenizer, DeepSpeed pretraining); commands run in-process through
`pipeline.cli.main` or as the installed `scratchgpt` in a subprocess where two processes must race.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from train_helpers import (
    SHAKESPEARE,
    TINY,
    build_workdir,
    cli_env,
    copy_inputs,
    tiny_config,
    torchrun_cli,
    write_yaml,
)

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.core.runner import is_done, run_stage
from pipeline.slurm.submit import main as slurm_main
from training.schedule import ScheduleError

VENV_BIN = Path(sys.executable).parent


def speeches(n: int, lines: int = 40, start: int = 0) -> list[str]:
    text = SHAKESPEARE.read_text(encoding="utf-8").splitlines(keepends=True)
    return ["".join(text[(start + i) * lines:(start + i + 1) * lines]) for i in range(n)]


def write_jsonl(path: Path, texts: list[str], prefix: str) -> Path:
    path.write_text("".join(json.dumps({"id": f"{prefix}{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    return path


def data_config(tmp: Path, inputs: list[str], **extra) -> Path:
    tree = {"workdir": str(tmp / "w"), "data": {"inputs": inputs},
            "prep": {"tasks": 1, "workers": 1, "filters": {"language": False}, "dedup": {"minhash": False}},
            "tokenizer": {"vocab_size": 300}, "shards": {"tasks": 1, "workers": 1, "val_fraction": 0.3},
            "tracking": {"experiment": "runner"}, **extra}
    path = tmp / "c.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def complete(config: Path) -> dict[str, bool]:
    cfg = load_config(config)
    return {name: is_done(cfg, name) for name in ("prep", "tokenizer", "shard")}


@pytest.fixture(autouse=True)
def own_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


# ---------------------------------------------------------------- inputs are part of the identity


def test_changed_added_and_removed_inputs_rerun_prep_and_what_follows(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", speeches(6), "a")
    write_jsonl(folder / "b.jsonl", speeches(6, start=6), "b")
    config = data_config(tmp_path, [f"{folder}/*.jsonl"])
    for stage in ("prep", "tokenizer", "shard"):
        assert main([stage, str(config)]) == 0
    assert complete(config) == {"prep": True, "tokenizer": True, "shard": True}
    docs = json.loads((tmp_path / "w" / "prep" / "stats.json").read_text())["docs_in"]

    # an unchanged rerun redoes nothing, and touching a file (same content) is no change
    os.utime(folder / "a.jsonl")
    capsys.readouterr()
    for stage in ("prep", "tokenizer", "shard"):
        assert main([stage, str(config)]) == 0
    assert capsys.readouterr().out.count("complete, skipped") == 3

    # an edited input: prep is stale, and so is everything after it, until each reruns
    write_jsonl(folder / "a.jsonl", speeches(7), "a")
    assert complete(config) == {"prep": False, "tokenizer": False, "shard": False}
    assert main(["prep", str(config)]) == 0
    assert "running again: 1 input file changed since the last run (a.jsonl)" in capsys.readouterr().out
    assert json.loads((tmp_path / "w" / "prep" / "stats.json").read_text())["docs_in"] == docs + 1
    assert complete(config) == {"prep": True, "tokenizer": False, "shard": False}
    # the tokenizer will not build on a stale prep: it says which stage to run first
    assert main(["shard", str(config)]) == 2
    assert "the tokenizer stage is out of date" in capsys.readouterr().err
    assert main(["tokenizer", str(config)]) == 0 and main(["shard", str(config)]) == 0
    assert all(complete(config).values())

    # an added file, then a removed one
    write_jsonl(folder / "c.jsonl", speeches(3, start=20), "c")
    assert complete(config)["prep"] is False
    assert main(["prep", str(config)]) == 0
    assert "1 input file added since the last run (c.jsonl)" in capsys.readouterr().out
    (folder / "b.jsonl").unlink()
    assert complete(config)["prep"] is False
    assert main(["prep", str(config)]) == 0
    assert "1 input file removed since the last run (b.jsonl)" in capsys.readouterr().out
    stats = json.loads((tmp_path / "w" / "prep" / "stats.json").read_text())
    assert stats["docs_in"] == 7 + 3 and sorted(Path(p).name for p in stats["inputs"]) == ["a.jsonl", "c.jsonl"]


def test_an_input_moved_to_another_folder_is_named_by_its_paths(tmp_path: Path, capsys) -> None:
    """Same file name, new folder: "added (a.jsonl); removed (a.jsonl)" would say nothing, so the paths show."""
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    write_jsonl(old / "a.jsonl", speeches(6), "a")
    write_jsonl(new / "a.jsonl", speeches(7), "a")
    assert main(["prep", str(data_config(tmp_path, [str(old / "a.jsonl")]))]) == 0
    capsys.readouterr()
    assert main(["prep", str(data_config(tmp_path, [str(new / "a.jsonl")]))]) == 0
    out = capsys.readouterr().out
    assert f"1 input file added since the last run ({new / 'a.jsonl'})" in out
    assert f"1 input file removed since the last run ({old / 'a.jsonl'})" in out


def test_a_changed_key_is_named_with_its_old_and_new_value(tmp_path: Path, capsys) -> None:
    config = data_config(tmp_path, [str(write_jsonl(tmp_path / "d.jsonl", speeches(6), "d"))])
    for stage in ("prep", "tokenizer"):
        assert main([stage, str(config)]) == 0
    capsys.readouterr()
    assert main(["tokenizer", str(config), "tokenizer.vocab_size=290"]) == 0
    assert "[tokenizer] running again: the config changed: tokenizer.vocab_size 300 -> 290" in capsys.readouterr().out


# ---------------------------------------------------------------- refusals leave a finished stage whole


def test_an_unknown_input_suffix_is_refused_before_a_finished_prep_is_removed(tmp_path: Path, capsys) -> None:
    """A glob that also catches a README.md: the earlier prep stays complete and usable."""
    data = write_jsonl(tmp_path / "d.jsonl", speeches(6), "d")
    config = data_config(tmp_path, [str(data)])
    assert main(["prep", str(config)]) == 0
    notes = tmp_path / "notes.md"
    notes.write_text("# notes\n")
    capsys.readouterr()
    assert main(["prep", str(config), f"data.inputs=[{data}, {notes}]"]) == 2
    err = capsys.readouterr().err
    assert f"`data.inputs`: {notes}: unknown input format" in err and "Traceback" not in err
    assert (tmp_path / "w" / "prep" / "stats.json").is_file() and list((tmp_path / "w" / "prep" / "output").iterdir())
    assert main(["prep", str(config)]) == 0
    assert "[prep] complete, skipped" in capsys.readouterr().out


def test_a_refused_schedule_change_keeps_a_finished_pretrain_and_watch_keys_continue_it(tmp_path: Path,
                                                                                      capsys) -> None:
    workdir = tmp_path / "w"
    build_workdir(workdir)
    wsd = ["train.schedule=wsd", "train.decay_fraction=0.5", "train.sample_tokens=0"]
    cfg = tiny_config(workdir, *wsd)
    run_stage(cfg, "pretrain")
    # 6 steps would decay from step 3, and no checkpoint before it is in the stable phase
    with pytest.raises(ScheduleError, match="max_steps changed from 8 to 6"):
        run_stage(tiny_config(workdir, *wsd, "train.max_steps=6"), "pretrain")
    assert is_done(cfg, "pretrain")
    capsys.readouterr()
    assert run_stage(cfg, "pretrain") is None  # complete, skipped

    # how often it logs is no reason to train again: the finished run re-evaluates and exports
    run_stage(tiny_config(workdir, *wsd, "train.log_every=4"), "pretrain")
    out = capsys.readouterr().out
    assert "[pretrain] continuing: the config changed: train.log_every 1 -> 4" in out
    assert "resumed from" in out and "step_00000008 at step 8" in out


def test_a_tracking_server_that_does_not_answer_stops_before_anything_is_removed(tmp_path: Path, capsys) -> None:
    config = data_config(tmp_path, [str(write_jsonl(tmp_path / "d.jsonl", speeches(6), "d"))])
    assert main(["prep", str(config)]) == 0
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    assert main(["prep", str(config), "--force", f"tracking.uri=http://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert time.monotonic() - started < 30 and f"cannot reach the MLflow server at http://127.0.0.1:{port}" in err
    assert "Traceback" not in err and complete(config)["prep"]


def test_outputs_deleted_after_a_stage_finished_are_made_again(tmp_path: Path, capsys) -> None:
    config = data_config(tmp_path, [str(write_jsonl(tmp_path / "d.jsonl", speeches(12), "d"))])
    for stage in ("prep", "tokenizer", "shard"):
        assert main([stage, str(config)]) == 0
    shards = tmp_path / "w" / "shards"
    manifest = (shards / "manifest.json").read_bytes()
    notes = tmp_path / "notes.md"
    notes.write_text("# notes\n")
    prep_stats = (tmp_path / "w" / "prep" / "stats.json").read_bytes()
    assert main(["prep", str(config), f"data.val_inputs=[{notes}]"]) == 2  # refused while prep and shards stay
    assert "`data.val_inputs`" in capsys.readouterr().err and (shards / "manifest.json").read_bytes() == manifest
    assert (tmp_path / "w" / "prep" / "stats.json").read_bytes() == prep_stats
    victim = sorted(shards.glob("val/*.arrow"))[0]
    victim.unlink()
    assert slurm_main(["complete", str(config), "shard"]) == 1  # a Slurm job would run the stage too
    capsys.readouterr()
    assert main(["shard", str(config)]) == 0
    assert f"[shard] running again: {shards / 'manifest.json'} lists shard val/{victim.name}, but {victim} is missing" \
        in capsys.readouterr().out
    assert victim.is_file() and (shards / "manifest.json").read_bytes() == manifest  # the same shards again

    for out in (tmp_path / "w" / "prep" / "output").iterdir():
        out.unlink()
    assert main(["prep", str(config)]) == 0
    assert "[prep] running again: its outputs in" in capsys.readouterr().out
    assert list((tmp_path / "w" / "prep" / "output").iterdir())


def test_a_child_left_by_a_killed_run_does_not_keep_the_workdir_locked(tmp_path: Path, capsys) -> None:
    """datatrove's worker pool and Manager are forked children: one that outlives a kill -9 of the run must not
    hold the lock (the kernel keeps a flock while any inherited descriptor is open)."""
    from pipeline.core.lock import workdir_lock

    lock, child_pid = tmp_path / "scratchgpt.lock", tmp_path / "child.pid"
    script = (f"import os, signal, time\nfrom pipeline.core.lock import workdir_lock\n"
              f"with workdir_lock({str(lock)!r}, 'prep'):\n"
              f"    pid = os.fork()\n"
              f"    if pid == 0:\n        time.sleep(120)\n        os._exit(0)\n"
              f"    open({str(child_pid)!r}, 'w').write(str(pid))\n"
              f"    os.kill(os.getpid(), signal.SIGKILL)\n")
    killed = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1], timeout=60)
    assert killed.returncode == -9
    orphan = int(child_pid.read_text())
    try:
        with workdir_lock(lock, "prep"):
            pass
        assert "took over a stale workdir lock" in capsys.readouterr().err
    finally:
        os.kill(orphan, 9)


# ---------------------------------------------------------------- empty and suspicious outcomes


def test_a_prep_that_keeps_nothing_fails_and_names_the_reasons(tmp_path: Path, capsys) -> None:
    src = write_jsonl(tmp_path / "short.jsonl", ["too short to keep"] * 3 + ["also short"], "s")
    config = data_config(tmp_path, [str(src)])
    assert main(["prep", str(config)]) == 2
    err = capsys.readouterr().err
    line = [ln for ln in err.splitlines() if ln.startswith("scratchgpt prep:")]
    assert len(line) == 1 and "no document was kept: 4 in, dropped by length 4" in line[0]
    assert "shorter than 200 chars" in line[0] and str(tmp_path / "w" / "prep" / "removed") in line[0]
    assert "prep.filters.length.min_chars" in err and "Traceback" not in err
    assert not (tmp_path / "w" / "prep" / "_COMPLETE.json").exists()
    # the same for records that all lack the text key
    src.write_text("".join(json.dumps({"id": str(i), "body": t}) + "\n" for i, t in enumerate(speeches(3))))
    assert main(["prep", str(config)]) == 2
    assert "dropped by malformed 3" in capsys.readouterr().err


def test_a_filter_that_drops_most_documents_warns_with_its_keys(tmp_path: Path, capsys) -> None:
    texts = speeches(2) + ["x" * 50 + " short" for _ in range(6)]
    config = data_config(tmp_path, [str(write_jsonl(tmp_path / "m.jsonl", texts, "m"))])
    assert main(["prep", str(config)]) == 0
    out = capsys.readouterr()
    assert "warning: length dropped 6 of the 8 documents that reached it (75%)" in out.err
    assert "prep.filters.length.min_chars / prep.filters.length.max_chars" in out.err  # the keys that tune it
    marker = json.loads((tmp_path / "w" / "prep" / "_COMPLETE.json").read_text())
    assert any("length dropped 6" in w for w in marker["warnings"])


def test_a_file_in_another_encoding_is_set_aside_with_a_warning_that_names_it(tmp_path: Path, capsys) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", speeches(6), "g")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("\n\n".join(speeches(3, start=10)).replace("a", "\u00e9", 1).encode("latin-1"))
    config = data_config(tmp_path, [str(good), str(latin)])
    assert main(["prep", str(config)]) == 0
    err = capsys.readouterr().err
    assert "warning: 1 malformed record set aside, e.g. latin.txt:" in err and "invalid UTF-8" in err
    assert "iconv" in err and str(tmp_path / "w" / "prep" / "removed" / "malformed") in err


# ---------------------------------------------------------------- the workdir lock


def test_a_second_run_on_a_busy_workdir_refuses_and_the_first_finishes(tmp_path: Path) -> None:
    config = data_config(tmp_path, [str(write_jsonl(tmp_path / "d.jsonl", speeches(20), "d"))])
    env = cli_env()
    first = subprocess.Popen([str(VENV_BIN / "scratchgpt"), "prep", str(config)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    lock = tmp_path / "w" / "scratchgpt.lock"
    deadline = time.time() + 120
    while time.time() < deadline and not (lock.is_file() and lock.read_text()):
        time.sleep(0.05)
    second = subprocess.run([str(VENV_BIN / "scratchgpt"), "prep", str(config)], capture_output=True, text=True,
                            env=env, timeout=120)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert second.returncode == 2, second.stderr
    refusal = [ln for ln in second.stderr.splitlines() if ln.startswith("scratchgpt prep:")]
    assert len(refusal) == 1 and f"pid {first.pid} on {socket.gethostname()}" in refusal[0]
    assert "scratchgpt prep" in refusal[0] and "Traceback" not in second.stderr
    # the first run's outputs are whole
    stats = json.loads((tmp_path / "w" / "prep" / "stats.json").read_text())
    assert stats["docs_in"] == 20 and json.loads((tmp_path / "w" / "prep" / "_COMPLETE.json").read_text())
    assert lock.read_text() == ""  # released


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path: Path, capsys) -> None:
    config = data_config(tmp_path, [str(write_jsonl(tmp_path / "d.jsonl", speeches(4), "d"))])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / "w" / "scratchgpt.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "command": "scratchgpt prep old.yaml",
                                "stage": "prep", "since": time.time() - 3600}))
    assert main(["prep", str(config)]) == 0
    err = capsys.readouterr().err
    assert f"took over a stale workdir lock left by pid {dead.pid}" in err and "scratchgpt prep old.yaml" in err


# ---------------------------------------------------------------- config errors


def test_a_key_given_twice_in_the_yaml_file_is_an_error(tmp_path: Path, capsys) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(f"workdir: {tmp_path / 'w'}\ntrain:\n  lr: 0.1\n  max_steps: 3\n  lr: 0.2\n")
    assert main(["pretrain", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"scratchgpt pretrain: {path}: key `train.lr` is given twice, on lines 3 and 5; keep one"


def test_a_bad_filter_value_names_the_users_key_only(tmp_path: Path, capsys) -> None:
    config = data_config(tmp_path, [str(write_jsonl(tmp_path / "d.jsonl", speeches(2), "d"))])
    assert main(["prep", str(config), "prep.filters.gopher_quality.min_doc_words=many"]) == 2
    err = capsys.readouterr().err
    assert "`prep.filters.gopher_quality.min_doc_words`" in err and "(got 'many')" in err
    assert "GopherQualityFilter" not in err and "Input should be False" not in err
    assert len(err.strip().splitlines()) == 1
    assert main(["prep", str(config), "prep.filters.length=3"]) == 2
    assert "`prep.filters.length`: expected false, true or a mapping of its keys (got 3)" in capsys.readouterr().err


# ---------------------------------------------------------------- one line and exit 2 for every error class


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workdir with a tokenizer and shards (built through the real stages)."""
    workdir = tmp_path_factory.mktemp("base")
    build_workdir(workdir)
    return workdir


def pretrain_config(trained: Path, workdir: Path, *overrides: str) -> Path:
    copy_inputs(trained, workdir)
    return write_yaml(workdir.parent / f"{workdir.name}.yaml",
                      [f"workdir={workdir}", "tokenizer.vocab_size=300", "tracking.experiment=t", *TINY, *overrides])


def one_error_line(err: str, stage: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith(f"scratchgpt {stage}:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def break_manifest(workdir: Path) -> None:
    manifest = json.loads((workdir / "shards" / "manifest.json").read_text())
    first = manifest["splits"]["train"]["shards"][0]["path"]
    (workdir / "shards" / first).unlink()


def break_checkpoint(config: Path, workdir: Path) -> None:
    """An interrupted run (its start record says so) whose `latest` names a checkpoint that is not there."""
    from pipeline.core.identity import compute

    ident = compute(load_config(config), "pretrain")
    (workdir / "pretrain").mkdir(parents=True)
    (workdir / "pretrain" / "_STARTED.json").write_text(json.dumps({"hash": ident.hash, "resume": ident.resume}))
    ckpt = workdir / "pretrain" / "checkpoints"
    ckpt.mkdir()
    (ckpt / "latest").write_text("step_00000004")


@pytest.mark.parametrize(("case", "expected"), [
    ("shard", "is missing"),
    ("vocab", "model.vocab_size is 100: ids 100 and up would have no embedding"),
    ("checkpoint", "step_00000004"),
    ("nan", "loss"),
    ("upstream", "no token shards"),
])
def test_every_error_class_is_one_line_and_exit_2(trained: Path, tmp_path: Path, capsys, case: str,
                                                   expected: str) -> None:
    workdir = tmp_path / "w"
    overrides = {"vocab": ["model.vocab_size=100"], "nan": ["train.lr=1e30", "train.warmup_steps=0",
                                                            "train.grad_clip=0"]}.get(case, [])
    config = pretrain_config(trained, workdir, *overrides)
    if case == "shard":
        break_manifest(workdir)
    elif case == "checkpoint":
        break_checkpoint(config, workdir)
    elif case == "upstream":
        (workdir / "shards" / "manifest.json").unlink()
    assert main(["pretrain", str(config)]) == 2
    assert expected in one_error_line(capsys.readouterr().err, "pretrain")
    assert not (workdir / "pretrain" / "_COMPLETE.json").exists()


@pytest.mark.slow
def test_an_error_under_torchrun_is_one_line_from_rank_0(trained: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "w"
    config = pretrain_config(trained, workdir)
    break_manifest(workdir)
    out = subprocess.run(torchrun_cli("pretrain", str(config)), capture_output=True, text=True, timeout=240,
                         env=cli_env())
    assert out.returncode != 0
    ours = [ln for ln in out.stderr.splitlines() if ln.startswith("scratchgpt pretrain:")]
    assert len(ours) == 1 and "is missing" in ours[0], out.stderr[-3000:]
    assert "raise LoaderError" not in out.stderr  # no traceback of ours from either rank


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_is_one_line_and_a_rerun_with_space_resumes(tmp_path: Path, capsys) -> None:
    mount = tmp_path / "small"
    mount.mkdir()
    size_kb = 256
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mount)]).returncode:
        pytest.skip("this machine cannot mount a tmpfs (no CAP_SYS_ADMIN)")
    try:
        src = write_jsonl(tmp_path / "d.jsonl", speeches(90, lines=400), "d")  # ~1 MB: more than the disk holds
        tree = yaml.safe_load(data_config(tmp_path, [str(src)]).read_text())
        tree["workdir"] = str(mount / "w")
        tree["tracking"]["uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"  # the store elsewhere: the data fills it
        config = tmp_path / "full.yaml"
        config.write_text(yaml.safe_dump(tree))
        assert main(["prep", str(config)]) == 2
        line = one_error_line(capsys.readouterr().err, "prep")
        assert "disk full: cannot write" in line and str(mount) in line
        subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)
        assert main(["prep", str(config)]) == 0
        stats = json.loads((mount / "w" / "prep" / "stats.json").read_text())
        assert stats["docs_in"] == 90 and stats["docs_out"] + sum(
            v for k, v in stats.items() if k.startswith("dropped_")) == 90
    finally:
        subprocess.run(["umount", "-l", str(mount)])


# ---------------------------------------------------------------- a user's own task kind


CUSTOM_KIND = '''
from training.tasks import Example, read_rows, register_task


@register_task("shouting")
class Shouting:
    """Is the line in capitals? The labels come from the text itself, not from a column."""

    objective = "classification"

    def load(self, task):
        def examples(path):
            return [Example(text=row["text"], label="loud" if row["text"].isupper() else "quiet")
                    for _, row in read_rows(path)]
        return examples(task.train), examples(task.eval)
'''


def test_a_task_kind_from_a_users_module_trains_from_the_cli(trained: Path, tmp_path: Path) -> None:
    module = tmp_path / "elsewhere" / "my_kinds.py"
    module.parent.mkdir()
    module.write_text(CUSTOM_KIND)
    lines = SHAKESPEARE.read_text(encoding="utf-8").splitlines()[:400]
    rows = [ln for ln in lines if ln.strip()]
    for name, part in (("train", rows[:200]), ("eval", rows[200:260])):
        body = "text\n" + "".join(f"{(r.upper() if i % 2 else r)}\n" for i, r in enumerate(part))
        (tmp_path / f"{name}.tsv").write_text(body)
    workdir = tmp_path / "w"
    task = {"name": "loud", "kind": "shouting", "train": str(tmp_path / "train.tsv"),
            "eval": str(tmp_path / "eval.tsv"), "max_steps": 6, "eval_every": 3, "micro_batch_size": 8, "lr": 1e-3}
    config = pretrain_config(trained, workdir, f"custom_import=[{module}]")
    tree = yaml.safe_load(config.read_text())
    tree["finetune"] = {"tasks": [task]}
    config.write_text(yaml.safe_dump(tree))
    out = subprocess.run([str(VENV_BIN / "scratchgpt"), "finetune", str(config), "--from-scratch"],
                         capture_output=True, text=True, timeout=300, env=cli_env())
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[finetune loud (from scratch)] step 6/6 (100%)" in out.stdout and "ETA" in out.stdout
    labels = json.loads((workdir / "finetune" / "loud-scratch" / "export" / "labels.json").read_text())["labels"]
    assert labels == ["loud", "quiet"]
    # without the import the kind is unknown, and the error says which kinds there are
    tree.pop("custom_import")
    config.write_text(yaml.safe_dump(tree))
    bad = subprocess.run([str(VENV_BIN / "scratchgpt"), "finetune", str(config), "--from-scratch"],
                         capture_output=True, text=True, timeout=300, env=cli_env())
    assert bad.returncode == 2 and "task kind 'shouting' is not registered" in bad.stderr
