"""`scratchgpt run`: the whole chain once, nothing redone the second time, only what a changed key affects."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import pytest

from pipeline.cli import main

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def small_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("run")
    lines = (SHARED / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:120_000].splitlines()
    docs = ["\n".join(lines[i:i + 40]) for i in range(0, len(lines), 40)]
    (root / "plays.jsonl").write_text("".join(json.dumps({"id": f"play/{i}", "text": t}) + "\n"
                                              for i, t in enumerate(docs)))
    sst = (SHARED / "sst2" / "dev.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    (root / "train.tsv").write_text("".join(sst[:201]))
    (root / "dev.tsv").write_text("".join(sst[:1] + sst[201:301]))
    config = f"""
workdir: {root / 'work'}
data: {{inputs: ["{root / 'plays.jsonl'}"]}}
prep:
  tasks: 1
  workers: 1
  filters: {{gopher_quality: false, c4_quality: false, fineweb_quality: false, gopher_repetition: false,
            language: false, length: {{min_chars: 50}}}}
  dedup: {{exact: true, minhash: false}}
tokenizer: {{vocab_size: 300}}
shards: {{val_fraction: 0.15, tasks: 1, workers: 1}}
model: {{n_layer: 1, n_head: 2, n_embd: 32, block_size: 32}}
train: {{micro_batch_size: 4, max_steps: 4, warmup_steps: 1, eval_every: 2, eval_batches: 1, checkpoint_every: 4,
        precision: fp32, sample_tokens: 4}}
finetune:
  tasks:
    - {{name: sst2, kind: classification, train: "{root / 'train.tsv'}", eval: "{root / 'dev.tsv'}",
       text_key: content, max_steps: 4, eval_every: 2, micro_batch_size: 8}}
tracking: {{experiment: run-test}}
"""
    path = root / "small.yaml"
    path.write_text(config)
    return path


def started_stages(output: str) -> list[str]:
    return re.findall(r"^\[(\w+)\] starting", output, flags=re.M)


def test_run_skips_what_is_done_and_redoes_only_what_a_key_changes(small_config: Path, capsys) -> None:
    assert main(["run", str(small_config)]) == 0
    out = capsys.readouterr().out
    assert started_stages(out) == ["prep", "tokenizer", "shard", "pretrain", "finetune"]
    work = small_config.parent / "work"
    assert "Model:" in out and str(work / "pretrain" / "export") in out
    assert "mlflow ui --backend-store-uri sqlite:///" in out
    assert "Sample (prompt" in out

    assert main(["run", str(small_config)]) == 0
    assert started_stages(capsys.readouterr().out) == []

    assert main(["run", str(small_config), "train.lr=0.001"]) == 0
    out = capsys.readouterr().out
    assert started_stages(out) == ["pretrain", "finetune"]
    assert "resumed from" not in out  # the old config's checkpoints were removed, not resumed
    assert "[prep] complete, skipped" in out and "[shard] complete, skipped" in out

    # One parent run per pipeline run that did work, each stage a child of it.
    client = mlflow.MlflowClient(f"sqlite:///{work.resolve() / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("run-test").experiment_id])
    parents = [r for r in runs if r.data.tags["stage"] == "pipeline"]
    assert len(parents) == 2
    first, second = sorted(parents, key=lambda r: r.info.start_time)
    children = {p.info.run_id: sorted(r.data.tags["stage"] for r in runs
                                      if r.data.tags.get("mlflow.parentRunId") == p.info.run_id)
                for p in parents}
    assert children[first.info.run_id] == ["finetune", "prep", "pretrain", "shard", "tokenizer"]
    assert children[second.info.run_id] == ["finetune", "pretrain"]
