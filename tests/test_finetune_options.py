"""Fine-tuning options: a separate head rate, layer-wise decay, mean pooling and its export, the epoch budget, and
--vs-scratch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from test_finetune import _config, pretrained  # noqa: F401  (the module-scoped tiny export fixture)
from tokenizers import Tokenizer
from train_helpers import cli_env

from pipeline.core.runner import run_stage
from training.classifier import load_classifier
from training.config import TaskConfig
from training.finetune import Budget, plan_budget, task_lr_ratio

TEXTS = ["a gorgeous , witty , seductive movie .", "the plot is nothing but boilerplate clichés", "fine", ""]


def _batch(folder: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids of TEXTS, their lengths and the attention mask, with the export's own tokenizer."""
    _, _, pad = load_classifier(folder)
    rows = [e.ids for e in Tokenizer.from_file(str(folder / "tokenizer.json")).encode_batch(TEXTS)]
    width = max(map(len, rows))
    rows = [r or [pad] for r in rows]  # an empty text is one pad id, as training encodes it
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    lengths = torch.tensor([len(r) for r in rows])
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return ids, lengths, mask


def test_lr_ratio_gives_the_head_its_rate_and_decays_by_depth() -> None:
    task = TaskConfig(name="t", train="a.tsv", eval="b.tsv", lr=1e-4, head_lr=1e-2, layer_lr_decay=0.5)
    ratio = task_lr_ratio(task, n_layer=3)
    assert ratio("score.weight") == pytest.approx(100)
    assert [ratio(f"gpt.h.{i}.mlp.c_fc.weight") for i in range(3)] == [0.25, 0.5, 1.0]
    assert ratio("gpt.wte.weight") == ratio("gpt.wpe.weight") == 0.125
    assert ratio("gpt.ln_f.weight") == 1.0
    assert ratio("h.2.attn.c_attn.weight") == 1.0  # SFT trains the GPT bare, without the .gpt prefix


def test_head_lr_and_layer_decay_reach_the_optimizer_under_zero3() -> None:
    """One AdamW step moves each weight by about its rate: the head at head_lr, block i at lr x decay^(n-1-i)."""
    import deepspeed

    from training.classifier import GPTClassifier
    from training.config import TrainConfig
    from training.engine import build_engine, init_distributed
    from training.finetune import task_train_config
    from training.model import GPTConfig

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=64, block_size=16, n_layer=3, n_head=2, n_embd=16)
    task = TaskConfig(name="t", train="a.tsv", eval="b.tsv", lr=1e-4, head_lr=1e-2, layer_lr_decay=0.5)
    train = task_train_config(TrainConfig(weight_decay=0.0), task)
    assert train.zero_stage == 3
    eng = build_engine(GPTClassifier(config, 2), train, init_distributed(), lr_ratio=task_lr_ratio(task, 3))
    eng.set_lr(task.lr)
    module = eng.engine.module
    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        before = {n: p.detach().clone() for n, p in module.named_parameters()}
    _, loss = eng.engine(torch.randint(1, 64, (4, 8)), torch.tensor([8, 5, 3, 8]), torch.tensor([0, 1, 0, 1]))
    eng.engine.backward(loss)
    eng.engine.step()
    expected = {"score.weight": 1e-2, "gpt.h.2.mlp.c_fc.weight": 1e-4, "gpt.h.1.mlp.c_fc.weight": 5e-5,
                "gpt.h.0.mlp.c_fc.weight": 2.5e-5, "gpt.wte.weight": 1.25e-5}
    with deepspeed.zero.GatheredParameters(list(module.parameters())):
        moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in module.named_parameters()
                 if n in expected}
    for name, rate in expected.items():
        assert moved[name] == pytest.approx(rate, rel=0.05), name


def test_mean_pooling_trains_and_exports_with_the_same_logits(tmp_path: Path, pretrained: Path) -> None:  # noqa: F811
    """(pooling "last" exports to GPT2ForSequenceClassification with the same logits: tests/test_finetune.py.)"""
    cfg = _config(tmp_path, pretrained, steps=6)
    cfg.finetune.tasks[0] = cfg.finetune.tasks[0].model_copy(
        update={"pooling": "mean", "head_lr": 1e-2, "layer_lr_decay": 0.8, "eval_every": 3})
    summary = run_stage(cfg, "finetune", force=True)
    assert 0.0 <= summary["sst2"]["eval_accuracy"] <= 1.0
    folder = tmp_path / "work" / "finetune" / "sst2" / "export"
    model, _, _ = load_classifier(folder)
    assert model.pooling == "mean"
    ids, lengths, mask = _batch(folder)
    with torch.no_grad():
        ours, _ = model(ids, lengths)
    from transformers import AutoModelForSequenceClassification, GPT2ForSequenceClassification

    # transformers has no mean-pooling GPT-2: the export carries its own head class, named in auto_map.
    assert json.loads((folder / "config.json").read_text())["architectures"] == [
        "GPT2MeanPoolForSequenceClassification"]
    hf = AutoModelForSequenceClassification.from_pretrained(folder, local_files_only=True,
                                                            trust_remote_code=True).eval()
    # Loaded as the last-token class, the load report says its head is missing.
    _, info = GPT2ForSequenceClassification.from_pretrained(folder, local_files_only=True, output_loading_info=True)
    assert "score.weight" in info["missing_keys"]
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits
        unmasked = hf(input_ids=ids).logits  # the pad id tells where each text ends, as in training
    assert torch.allclose(ours, theirs, atol=1e-4)
    assert torch.allclose(ours, unmasked, atol=1e-4)


def test_mean_and_last_pooling_score_differently() -> None:
    """The option changes what the head reads (a no-op would pass the export test above)."""
    from training.classifier import GPTClassifier, pool

    hidden = torch.randn(2, 5, 4)
    lengths = torch.tensor([5, 2])
    assert torch.allclose(pool(hidden, lengths, "last")[1], hidden[1, 1])
    assert torch.allclose(pool(hidden, lengths, "mean")[1], hidden[1, :2].mean(0))
    with pytest.raises(ValueError, match="pooling 'max'"):
        GPTClassifier(load_classifier.__globals__["GPTConfig"](vocab_size=8, block_size=8, n_layer=1, n_head=1,
                                                                n_embd=4), 2, pooling="max")


def test_vs_scratch_runs_both_arms_per_seed_and_logs_them_under_one_parent(tmp_path: Path,
                                                                           pretrained: Path) -> None:  # noqa: F811
    cfg = _config(tmp_path, pretrained, steps=4)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(json.dumps(json.loads(cfg.model_dump_json(exclude={"source"}))))
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "finetune", str(config_file), "--vs-scratch",
                          "--seeds", "2", "model.n_layer=2", "model.n_embd=32", "model.n_head=2",
                          "model.block_size=64"], capture_output=True, text=True, timeout=600, env=cli_env())
    assert out.returncode == 0, out.stderr[-3000:]
    assert "sst2: pretrained" in out.stdout and "pretraining gains" in out.stdout and "over 2 seeds" in out.stdout

    folder = tmp_path / "work" / "finetune"
    for name in ("sst2", "sst2-scratch", "sst2-seed1338", "sst2-scratch-seed1338"):
        assert (folder / name / "export" / "config.json").is_file(), name
    comparison = json.loads((folder / "sst2-comparison.json").read_text())
    assert sorted((r["arm"], r["seed"]) for r in comparison["runs"]) == [
        ("pretrained", 1337), ("pretrained", 1338), ("scratch", 1337), ("scratch", 1338)]
    assert all(r["planned_steps"] == r["steps"] == 4 for r in comparison["runs"])  # each arm's budget, and what ran
    gains = [100 * (a["eval_accuracy"] - b["eval_accuracy"])
             for a in comparison["runs"] if a["arm"] == "pretrained"
             for b in comparison["runs"] if b["arm"] == "scratch" and b["seed"] == a["seed"]]
    assert comparison["gain"] == pytest.approx(sum(gains) / 2)
    assert comparison["gain_min"] == pytest.approx(min(gains))

    client = mlflow.MlflowClient(f"sqlite:///{(tmp_path / 'work' / 'mlflow.db').resolve()}")
    runs = client.search_runs([client.get_experiment_by_name("scratchgpt").experiment_id])
    parent = next(r for r in runs if r.data.tags["stage"] == "finetune")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted((r.data.tags["arm"], r.data.tags["seed"]) for r in children) == [
        ("pretrained", "1337"), ("pretrained", "1338"), ("scratch", "1337"), ("scratch", "1338")]
    for child in children:
        assert child.data.params["task.from_scratch"] == str(child.data.tags["arm"] == "scratch")
    assert parent.data.metrics["sst2.gain"] == pytest.approx(comparison["gain"])

    # Lineage tells the arms apart, from the run and from each folder.
    scratch_run = next(r for r in children if r.data.tags["arm"] == "scratch")
    lineage_cli = subprocess.run([sys.executable, "-m", "pipeline.cli", "runs", str(config_file), "--lineage",
                                  scratch_run.info.run_id], capture_output=True, text=True, timeout=120, env=cli_env())
    assert lineage_cli.returncode == 0, lineage_cli.stderr
    assert "random weights" in lineage_cli.stdout
    from pipeline.runs.lineage import lineage
    from pipeline.runs.store import open_store

    store = open_store(f"sqlite:///{(tmp_path / 'work' / 'mlflow.db').resolve()}", None)
    for name, arm, seed in (("sst2", "pretrained", "1337"), ("sst2-scratch", "scratch", "1337"),
                            ("sst2-seed1338", "pretrained", "1338"), ("sst2-scratch-seed1338", "scratch", "1338")):
        lin = lineage(str(folder / name / "export"), store)
        run = client.get_run(lin.model["finetune_run"]["run_id"])
        assert (run.data.tags["arm"], run.data.tags["seed"]) == (arm, seed), name
        assert (lin.model.get("finetuned_from") == "random weights") == (arm == "scratch"), name
        if arm == "scratch":  # by run too: its own folder, not the first seed's
            assert lineage(run.info.run_id, store).model["path"] == str((folder / name).resolve())


def test_epochs_of_the_examples_set_a_pretrained_runs_steps_up_to_max_steps() -> None:
    task = TaskConfig(name="t", train="a.tsv", eval="b.tsv", max_steps=2000)  # epochs 3, the default
    assert plan_budget(task, 1000, 32, pretrained=True) == Budget(
        93, "3 epochs of 1,000 training examples in batches of 32")  # 31 full batches an epoch: the tail is cut
    assert plan_budget(task, 36_029, 32, pretrained=True) == Budget(
        2000, "max_steps, reached before 3 epochs of 36,029 training examples in batches of 32 (3,375 steps)")
    assert plan_budget(task, 1000, 64, pretrained=True).steps == 45  # two processes of 32: the global batch counts
    assert plan_budget(task, 1000, 32, pretrained=False) == Budget(
        2000, "max_steps; from random weights, epochs does not apply")
    assert plan_budget(task.model_copy(update={"epochs": None}), 1000, 32, pretrained=True) == Budget(2000, "max_steps")
    one = plan_budget(task.model_copy(update={"epochs": 1.0}), 3200, 32, pretrained=True)
    assert one == Budget(100, "1 epoch of 3,200 training examples in batches of 32")
    assert plan_budget(task.model_copy(update={"epochs": 1.1}), 3200, 32, pretrained=True).steps == 110  # not 111
    assert plan_budget(task.model_copy(update={"epochs": 1e-9}), 40, 32, pretrained=True).steps == 1  # never 0


def test_the_pretrained_arm_trains_its_epochs_and_the_scratch_arm_max_steps(tmp_path: Path, pretrained: Path,  # noqa: F811
                                                                           capsys) -> None:
    """600 examples in batches of 16 are 37 steps an epoch: half an epoch is 19 steps, under max_steps 30."""
    cfg = _config(tmp_path, pretrained, "finetune.vs_scratch=true", "finetune.tasks.0.epochs=0.5",
                  "model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=64", steps=30)
    run_stage(cfg, "finetune", force=True)
    out = capsys.readouterr().out
    assert "[finetune sst2] 19 steps: 0.5 epochs of 600 training examples in batches of 16" in out
    # max_steps 30 was asked for, and epochs ends the pretrained arm before it: said once, with the way out.
    assert out.count("max_steps 30, but 0.5 epochs end the pretrained arm at 19 steps; set epochs: null") == 1
    assert "[finetune sst2 (from scratch)] 30 steps: max_steps; from random weights, epochs does not apply" in out
    folder = tmp_path / "work" / "finetune"
    for name, steps in (("sst2", 19), ("sst2-scratch", 30)):
        metrics = json.loads((folder / name / "metrics.json").read_text())
        assert metrics["summary"]["planned_steps"] == steps, name
        assert metrics["history"][-1]["step"] == steps, name  # the last evaluation ends the run
    client = mlflow.MlflowClient(f"sqlite:///{(tmp_path / 'work' / 'mlflow.db').resolve()}")
    runs = client.search_runs([client.get_experiment_by_name("scratchgpt").experiment_id])
    steps = {r.data.tags["arm"]: r.data.params["task.planned_steps"] for r in runs if "arm" in r.data.tags}
    assert steps == {"pretrained": "19", "scratch": "30"}


def test_vs_scratch_and_from_scratch_together_is_one_clear_error(tmp_path: Path) -> None:
    from pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="finetune.vs_scratch"):
        load_config(None, [f"workdir={tmp_path}", "finetune.vs_scratch=true", "finetune.from_scratch=true"])
    task = {"name": "a", "train": "x.tsv", "eval": "y.tsv", "from_scratch": True}
    with pytest.raises(ConfigError, match=r"finetune\.tasks\.0\.from_scratch"):
        load_config(None, [f"workdir={tmp_path}", "finetune.vs_scratch=true", f"finetune.tasks=[{json.dumps(task)}]"])


def test_keys_an_sft_task_would_ignore_are_refused(tmp_path: Path, pretrained: Path, capsys) -> None:  # noqa: F811
    from pipeline.cli import main

    rows = [{"prompt": "q: hi", "response": "a: hello"}] * 4
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for key, value in (("head_lr", 0.05), ("pooling", "last")):
        task = {"name": "qa", "kind": "sft", "train": str(tmp_path / "qa.jsonl"), "eval": str(tmp_path / "qa.jsonl"),
                key: value}
        config = tmp_path / "sft.yaml"
        config.write_text(json.dumps({"workdir": str(tmp_path / "w"), "finetune": {
            "init_from": str(pretrained / "export"), "tasks": [task]}}))
        code = main(["finetune", str(config)])
        err = capsys.readouterr().err
        assert code == 2 and f"finetune.tasks.0.{key}" in err and "Traceback" not in err, err


@pytest.mark.parametrize("tasks, key", [
    ([{"name": "a"}, {"name": "a"}], "finetune.tasks.1.name"),
    ([{"name": "a-scratch"}], "finetune.tasks.0.name"),
    ([{"name": "a-seed7"}], "finetune.tasks.0.name"),
])
def test_task_names_that_would_share_a_folder_are_refused(tmp_path: Path, tasks: list, key: str) -> None:
    from pipeline.config import ConfigError, load_config

    full = [{**t, "train": "x.tsv", "eval": "y.tsv"} for t in tasks]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [f"workdir={tmp_path}", f"finetune.tasks={json.dumps(full)}"])


def test_the_comparison_line_of_a_loss_scored_task_speaks_of_loss() -> None:
    from training.task_metrics import arm_comparison, comparison_line

    result = arm_comparison({1: 2.5, 2: 2.7}, {1: 3.0, 2: 2.9}, "eval_loss")
    assert result["gain"] == pytest.approx(0.35) and result["gain_min"] == pytest.approx(0.2)
    line = comparison_line("qa", "eval_loss", result)
    assert "lowers it by +0.3500" in line and "%" not in line and "points" not in line


def test_length_grouped_batches_cover_the_epoch_once_and_pad_far_less() -> None:
    """Each epoch's batches are a partition of the shuffled set (the tail waits), the same for the same seed, and
    pad to far fewer tokens than random batches of the same set."""
    import random

    from training.finetune import epoch_batches

    rng = random.Random(0)
    lengths = [min(64, int(rng.expovariate(1 / 14)) + 1) for _ in range(5_000)]  # SST-2-like: short, long tail
    grouped = epoch_batches(lengths, 32, seed=7, epoch=0, group_by_length=True)
    plain = epoch_batches(lengths, 32, seed=7, epoch=0, group_by_length=False)
    for batches in (grouped, plain):
        flat = [i for b in batches for i in b]
        assert all(len(b) == 32 for b in batches) and len(flat) == len(set(flat)) == 5_000 // 32 * 32
    assert grouped == epoch_batches(lengths, 32, seed=7, epoch=0, group_by_length=True)
    assert grouped != epoch_batches(lengths, 32, seed=7, epoch=1, group_by_length=True)

    def padded(batches: list[list[int]]) -> int:
        return sum(32 * max(lengths[i] for i in b) for b in batches)

    assert padded(grouped) < 0.5 * padded(plain)
    # Shuffled batch order: the first tenth of the epoch is not all short (pools are sorted, the epoch is not).
    first = [lengths[i] for b in grouped[: len(grouped) // 10] for i in b]
    assert sum(first) / len(first) > 0.7 * sum(lengths) / len(lengths)

    # The tail that fills no batch is a random handful, not the longest texts: on a set smaller than one pool,
    # every example is trained on within a few epochs.
    small = list(range(100))  # 100 examples, lengths 0..99: 3 batches of 32 and a tail of 4 each epoch
    seen = {i for epoch in range(20) for b in epoch_batches(small, 32, 7, epoch, True) for i in b}
    assert seen == set(range(100))


def test_the_lm_term_is_the_masked_next_token_loss_of_the_real_tokens() -> None:
    """Skipping the padding's vocabulary projection changes no figure: the loss equals cross-entropy over every
    position with the padding masked out, and a batch of one-token texts adds nothing (not NaN)."""
    import torch.nn.functional as F

    from training.classifier import GPTClassifier
    from training.model import GPTConfig

    torch.manual_seed(0)
    model = GPTClassifier(GPTConfig(vocab_size=50, block_size=12, n_layer=2, n_head=2, n_embd=16), 2, "mean")
    ids = torch.randint(0, 50, (3, 9))
    lengths = torch.tensor([9, 4, 1])
    labels = torch.tensor([0, 1, 1])
    logits, loss = model(ids, lengths, labels, lm_weight=0.5)
    hidden = model.gpt.hidden_states(ids)
    positions = torch.arange(8)
    targets = ids[:, 1:].masked_fill(positions[None, :] >= (lengths[:, None] - 1), -100)
    lm = F.cross_entropy(model.gpt.lm_head(hidden[:, :-1]).reshape(-1, 50), targets.reshape(-1), ignore_index=-100)
    assert float(loss) == pytest.approx(float(F.cross_entropy(logits, labels) + 0.5 * lm), rel=1e-5)
    _, single = model(ids[:, :1], torch.ones(3, dtype=torch.long), labels, lm_weight=0.5)
    assert torch.isfinite(single)


def test_a_task_smaller_than_one_batch_is_one_clear_error() -> None:
    """Fewer examples than one global batch used to loop forever looking for a full batch."""
    from types import SimpleNamespace

    from training.engine import Dist
    from training.finetune import Finetuner
    from training.objectives import Encoded, Prepared
    from training.tasks import TaskDataError

    task = TaskConfig(name="t", train="few.tsv", eval="b.tsv", micro_batch_size=4)
    rows = Encoded(ids=[[1, 2]] * 7, targets=[0] * 7)
    eng = SimpleNamespace(dist=Dist(rank=0, world_size=2, local_rank=0, device="cpu"))
    with pytest.raises(TaskDataError, match=r"few.tsv: 7 training examples, fewer than one batch of 8 .*"
                                            r"finetune.tasks\[\].micro_batch_size"):
        Finetuner(None, eng, task, Prepared(train=rows, evaluation=rows), 0, None, seed=1)
    Finetuner(None, eng, task.model_copy(update={"micro_batch_size": 3}), Prepared(train=rows, evaluation=rows),
              0, None, seed=1)
