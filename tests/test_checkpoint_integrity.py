"""Checkpoints on real DeepSpeed ZeRO-3 (one process, gloo): every file's sha256 recorded, a damaged `latest`
skipped for the newest intact checkpoint, a non-finite loss never saved as good, no zero_to_fp32.py left behind,
and no checkpoint engine that would unpickle freely."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_helpers import build_workdir, copy_inputs, copy_workdir, tiny_config

from pipeline.stages.pretrain import build
from training import checkpoint
from training.checkpoint import CheckpointError
from training.checkpoint_integrity import RECOVERY_README
from training.loop import NonFiniteLoss


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("ckpt-base")
    build_workdir(workdir)
    return workdir


@pytest.fixture(scope="module")
def trained(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workdir with checkpoints at steps 2 and 4 (latest: 4); tests copy it before damaging anything."""
    workdir = tmp_path_factory.mktemp("ckpt-trained") / "w"
    copy_inputs(base, workdir)
    build(tiny_config(workdir, "train.max_steps=4", "train.checkpoint_every=2")).trainer.run()
    return workdir


def flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_every_file_is_hashed_and_no_recovery_script_is_left(trained: Path) -> None:
    ckpts = trained / "pretrain" / "checkpoints"
    for tag in ("step_00000002", "step_00000004"):
        meta = json.loads((ckpts / tag / "scratchgpt.json").read_text())
        assert set(meta["sha256"]) == set(meta["files"]) and len(meta["files"]) >= 2
        assert any(name.endswith("optim_states.pt") for name in meta["sha256"])
    assert not (ckpts / "zero_to_fp32.py").exists()  # it loads with weights_only=False
    assert "scratchgpt export" in (ckpts / RECOVERY_README).read_text()


def test_a_same_size_flip_under_latest_resumes_from_the_older_intact_checkpoint(
        trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    workdir = copy_workdir(trained, tmp_path)
    ckpts = workdir / "pretrain" / "checkpoints"
    damaged = next((ckpts / "step_00000004").glob("*optim_states.pt"))
    size = damaged.stat().st_size
    flip_one_byte(damaged)
    assert damaged.stat().st_size == size
    trainer = build(tiny_config(workdir, "train.max_steps=6", "train.checkpoint_every=2")).trainer
    assert trainer.resume() == "step_00000002" and trainer.step == 2
    said = capsys.readouterr().out
    assert f"checkpoint file {damaged} is damaged" in said and str(ckpts / "step_00000002") in said
    assert checkpoint.latest_tag(ckpts) == "step_00000002"  # `latest` follows, so export reads a good one
    assert trainer.run().step == 6  # and training goes on past the damaged step, rewriting it


def test_a_truncated_file_under_latest_is_skipped_too(trained: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    workdir = copy_workdir(trained, tmp_path)
    ckpts = workdir / "pretrain" / "checkpoints"
    model = next((ckpts / "step_00000004").glob("*model_states.pt"))
    model.write_bytes(model.read_bytes()[:100])
    trainer = build(tiny_config(workdir, "train.max_steps=4")).trainer
    assert trainer.resume() == "step_00000002"
    assert f"checkpoint file {model} is corrupt" in capsys.readouterr().out


def test_no_intact_checkpoint_is_one_error_naming_each_damaged_file(trained: Path, tmp_path: Path) -> None:
    workdir = copy_workdir(trained, tmp_path)
    ckpts = workdir / "pretrain" / "checkpoints"
    flipped = [next((ckpts / tag).glob("*optim_states.pt")) for tag in ("step_00000004", "step_00000002")]
    for path in flipped:
        flip_one_byte(path)
    trainer = build(tiny_config(workdir, "train.max_steps=4")).trainer
    with pytest.raises(CheckpointError, match=f"no intact checkpoint in {ckpts}") as err:
        trainer.resume()
    assert all(str(path) in str(err.value) for path in flipped)
    assert "move" in err.value.hint and trainer.step == 0


def test_a_nonfinite_loss_marks_the_state_it_came_from_bad(trained: Path, tmp_path: Path) -> None:
    workdir = copy_workdir(trained, tmp_path)
    ckpts = workdir / "pretrain" / "checkpoints"
    # From the good step 4 a huge rate makes step 5's update blow the weights up; step 6's loss is not finite.
    cfg = tiny_config(workdir, "train.max_steps=50", "train.lr=1.0e+30", "train.warmup_steps=0",
                      "train.grad_clip=0", "train.checkpoint_every=1")
    trainer = build(cfg).trainer
    assert trainer.resume() == "step_00000004"
    with pytest.raises(NonFiniteLoss) as err:
        trainer.run()
    bad_state = checkpoint.tag_for(trainer.step)  # saved at the end of the last finite step
    assert trainer.step > 4 and (ckpts / bad_state).is_dir()
    assert f"at step {trainer.step + 1}" in str(err.value)
    previous = checkpoint.tag_for(trainer.step - 1)
    assert f"the last good state is checkpoint {ckpts / previous}" in str(err.value)
    assert checkpoint.latest_tag(ckpts) == previous
    assert "bad" in json.loads((ckpts / bad_state / "scratchgpt.json").read_text())
    again = build(tiny_config(workdir, "train.max_steps=50")).trainer
    assert again.resume() == previous  # the rerun starts from the good state, never the one that gave NaN


def test_a_checkpoint_engine_not_made_safe_is_refused(trained: Path, tmp_path: Path) -> None:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class PluginEngine(TorchCheckpointEngine):  # e.g. brought in by a DeepSpeed plug-in: full pickle
        pass

    workdir = copy_workdir(trained, tmp_path)
    trainer = build(tiny_config(workdir, "train.max_steps=4")).trainer
    trainer.eng.engine.checkpoint_engine.__class__ = PluginEngine
    with pytest.raises(CheckpointError, match="PluginEngine would load checkpoints with unrestricted pickle"):
        trainer.resume()


@pytest.mark.slow
def test_two_ranks_agree_on_the_intact_checkpoint_to_resume_from(base: Path, tmp_path: Path) -> None:
    """Rank 0 checks the hashes and decides for both (a broadcast): rank 1's own file is the damaged one."""
    import subprocess

    from train_helpers import TINY, cli_env, torchrun_cli, write_yaml

    workdir = tmp_path / "two"
    copy_inputs(base, workdir)
    config = write_yaml(tmp_path / "two.yaml", [f"workdir={workdir}", "tokenizer.vocab_size=300",
                                                "tracking.experiment=t", *TINY, "train.max_steps=4",
                                                "train.checkpoint_every=2", "train.eval_every=100"])

    def torchrun() -> subprocess.CompletedProcess:
        return subprocess.run(torchrun_cli("pretrain", str(config)), capture_output=True, text=True, timeout=300,
                              env=cli_env())

    first = torchrun()
    assert first.returncode == 0, first.stderr[-3000:]
    ckpts = workdir / "pretrain" / "checkpoints"
    # as if the job had died before the stage was marked done: its start record, no marker
    (workdir / "pretrain" / "_COMPLETE.json").rename(workdir / "pretrain" / "_STARTED.json")
    damaged = next((ckpts / "step_00000004").glob("*zero_pp_rank_1_*optim_states.pt"))
    flip_one_byte(damaged)
    second = torchrun()
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"checkpoint file {damaged} is damaged" in second.stdout
    assert f"resumed from {ckpts / 'step_00000002'} at step 2" in second.stdout
    assert checkpoint.read_meta(ckpts, "step_00000004")["step"] == 4  # rewritten whole by the resumed run
    from training.checkpoint_integrity import verify

    verify(ckpts, "step_00000004")


def test_export_refuses_a_damaged_checkpoint_naming_the_file(trained: Path, tmp_path: Path) -> None:
    workdir = copy_workdir(trained, tmp_path)
    ckpts = workdir / "pretrain" / "checkpoints"
    damaged = next((ckpts / "step_00000004").glob("*optim_states.pt"))
    flip_one_byte(damaged)
    with pytest.raises(CheckpointError, match=f"checkpoint file {damaged} is damaged"):
        checkpoint.full_state_dict(ckpts)
    weights, meta = checkpoint.full_state_dict(ckpts, "step_00000002")  # the intact one still exports
    assert meta["step"] == 2 and weights
