"""Several sources mixed by weight (`data.sources`): English web pages and Chinese prose at 0.7/0.3.

One real run (datatrove prep per source, tokenizer, shards, DeepSpeed ZeRO-3 pretraining on CPU,
MLflow sqlite store) is built once; the loader tests read its real shards.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import numpy as np
import pytest
from train_helpers import SHARED, TINY

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.core.runner import is_done, run_stage
from training.mixed_loader import MixedLoader

WEB = SHARED / "web" / "ccnet" / "*.jsonl"  # 20 English web pages (CCNet)
NOVEL = SHARED / "chinese" / "novels" / "xiyou_ji.txt"
WEIGHTS = {"web": 0.7, "zh": 0.3}
CJK = re.compile(r"[\u4e00-\u9fff]")


def sources(zh: Path, web_weight: float = 0.7) -> str:
    return (f"[{{name: web, inputs: ['{WEB}'], weight: {web_weight}}}, "
            f"{{name: zh, inputs: ['{zh}'], language: zh, weight: 0.3}}]")


def overrides(workdir: Path, zh: Path, web_weight: float = 0.7) -> list[str]:
    return [f"workdir={workdir}", f"data.sources={sources(zh, web_weight)}", "prep.tasks=1", "prep.workers=1",
            "tokenizer.vocab_size=300", "shards.val_fraction=0.15", "shards.tasks=1", "shards.workers=1",
            "tracking.experiment=sources", *TINY]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("sources")
    zh = tmp / "xiyou_ji_head.txt"  # the first 120,000 characters: six chapters' worth, prepped in seconds
    zh.write_text(NOVEL.read_text(encoding="utf-8")[:120_000], encoding="utf-8")
    workdir = tmp / "work"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)  # this run's own sqlite store
        cfg = load_config(None, overrides(workdir, zh))
        summaries = {stage: run_stage(cfg, stage) for stage in ("prep", "tokenizer", "shard", "pretrain")}
    manifest = json.loads((workdir / "shards" / "manifest.json").read_text())
    return {"cfg": cfg, "zh": zh, "workdir": workdir, "manifest": manifest, **summaries,
            "stats": json.loads((workdir / "prep" / "stats.json").read_text())}


def _metrics(workdir: Path, stage: str) -> dict[str, float]:
    client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sources")
    (found,) = client.search_runs([exp.experiment_id], f"tags.stage = '{stage}'")
    return found.data.metrics


def test_each_source_is_prepped_in_its_own_language_and_counted_on_its_own(run: dict) -> None:
    per = run["stats"]["sources"]
    assert set(per) == {"web", "zh"}
    for key in ("docs_in", "docs_out", "bytes_in", "bytes_out"):
        assert run["stats"][key] == per["web"][key] + per["zh"][key] > 0
    # zh runs with Chinese settings: the English language filter would drop every chapter, C4 is off for it
    assert per["zh"]["docs_out"] >= 0.9 * per["zh"]["docs_in"] and per["zh"]["dropped_language"] == 0
    assert "dropped_c4_quality" in per["web"] and "dropped_c4_quality" not in per["zh"]
    out = sorted(p.name for p in (run["workdir"] / "prep" / "output").iterdir())
    assert out == ["web@00000.jsonl.zst", "zh@00000.jsonl.zst"]
    assert run["prep"]["sources"]["zh"]["docs_kept"] == per["zh"]["docs_out"]
    metrics = _metrics(run["workdir"], "prep")
    assert metrics["source.web.docs_kept"] == per["web"]["docs_out"]
    assert metrics["source.zh.docs_kept"] == per["zh"]["docs_out"]
    assert metrics["docs_out"] == run["stats"]["docs_out"]


def test_the_manifest_records_tokens_and_bytes_per_source_with_its_own_train_and_val(run: dict) -> None:
    manifest = run["manifest"]
    for split in ("train", "val"):
        shards = manifest["splits"][split]["shards"]
        assert {s["source"] for s in shards} == {"web", "zh"}  # every source has its own shards in both splits
        for key in ("docs", "tokens", "bytes"):
            per = [manifest["sources"][name][split][key] for name in ("web", "zh")]
            assert min(per) > 0 and sum(per) == manifest["splits"][split][key]
            assert manifest["sources"]["zh"][split][key] == sum(s[key] for s in shards if s["source"] == "zh")
    assert run["shard"]["sources"] == manifest["sources"]
    assert _metrics(run["workdir"], "shard")["source.zh.val_tokens"] == manifest["sources"]["zh"]["val"]["tokens"]


def _loader(run: dict, micro: int, rank: int = 0, world: int = 1, seed: int = 3) -> MixedLoader:
    return MixedLoader(run["workdir"] / "shards", "train", WEIGHTS, block_size=32, micro_batch_size=micro,
                       rank=rank, world_size=world, seed=seed)


def test_token_shares_follow_the_weights_over_1000_batches_and_a_small_source_repeats(run: dict) -> None:
    from dataprep.tokenizer import load_tokenizer

    tok = load_tokenizer(run["workdir"] / "tokenizer")
    loader = _loader(run, micro=8)
    chinese = tokens = 0
    for _ in range(1000):
        x, _ = loader.next_batch()
        for row in x.tolist():  # which source a row came from, read from its text: Chinese or not
            chinese += len(row) if len(CJK.findall(tok.decode(row))) > 4 else 0
            tokens += len(row)
    assert abs(chinese / tokens - 0.3) < 0.02
    picked = np.bincount([s for s, _ in _loader(run, micro=8).picks(0, 8000)], minlength=2) / 8000
    assert abs(picked[0] - 0.7) < 0.02 and abs(picked[1] - 0.3) < 0.02
    epochs = loader.epochs_seen()  # web holds fewer samples than 0.7 of 8,000 draws: seen more than once
    assert epochs["web"] > 1 > epochs["zh"] > 0
    assert epochs["web"] == pytest.approx(picked[0] * 8000 / loader.samples[0], abs=1e-3)


def _stream(loaders: list[MixedLoader], steps: int) -> list[list[int]]:
    rows: list[list[int]] = []
    for _ in range(steps):
        for loader in loaders:  # rank order: the global batch
            rows += loader.next_batch()[0].tolist()
    return rows


@pytest.mark.parametrize("world_after", [1, 2, 3])
def test_resume_and_another_rank_count_keep_the_same_order(run: dict, world_after: int) -> None:
    whole = _stream([_loader(run, micro=6)], 10)
    before = [_loader(run, micro=3, rank=r, world=2) for r in range(2)]
    head = _stream(before, 4)
    state = before[1].state_dict()  # what a checkpoint saves: every rank has the same consumed_samples
    after = [_loader(run, micro=6 // world_after, rank=r, world=world_after) for r in range(world_after)]
    for loader in after:
        loader.load_state_dict(state)
    assert head + _stream(after, 6) == whole
    assert _stream([_loader(run, micro=6, seed=4)], 10) != whole
    other = MixedLoader(run["workdir"] / "shards", "train", {"web": 0.5, "zh": 0.5}, 32, 6, seed=3)
    with pytest.raises(ValueError, match="weights"):
        other.load_state_dict(state)


def test_a_checkpoint_restores_the_mixed_order(run: dict) -> None:
    """Through DeepSpeed: the checkpoint at step 8 holds the mixed loader's state, and a resumed run goes on
    with the very samples an uninterrupted one would draw next."""
    from pipeline.stages.pretrain import build

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        trainer = build(run["cfg"]).trainer
    assert trainer.resume() == "step_00000008"
    assert trainer.loader.state_dict()["weights"] == [0.7, 0.3] and trainer.loader.consumed_samples == 32
    fresh = MixedLoader(run["workdir"] / "shards", "train", WEIGHTS, 32, 4, seed=run["cfg"].train.seed)
    _stream([fresh], 8)
    assert _stream([trainer.loader], 3) == _stream([fresh], 3)


def test_val_bpb_per_source_in_mlflow_and_the_summary_says_the_epochs(run: dict) -> None:
    summary = run["pretrain"]
    metrics = _metrics(run["workdir"], "pretrain")
    for name in ("web", "zh"):
        assert 0 < metrics[f"val_bpb.{name}"] == pytest.approx(summary[f"val_bpb.{name}"])
    mix = 0.7 * metrics["val_bpb.web"] + 0.3 * metrics["val_bpb.zh"]  # the overall value is the mix's
    assert metrics["val_bpb"] == pytest.approx(mix)
    loader = MixedLoader(run["workdir"] / "shards", "train", WEIGHTS, 32, 4, seed=run["cfg"].train.seed)
    loader.consumed_samples = summary["steps"] * 4  # micro_batch_size 4, one rank
    assert summary["epochs"] == loader.epochs_seen() and 0 < summary["epochs"]["zh"] < summary["epochs"]["web"]
    for name in ("web", "zh"):  # and MLflow says it too
        assert metrics[f"epochs.{name}"] == pytest.approx(summary["epochs"][name])


def test_editing_a_source_reruns_prep_and_new_weights_only_pretraining(run: dict) -> None:
    cfg, zh = run["cfg"], run["zh"]
    assert all(is_done(cfg, s) for s in ("prep", "tokenizer", "shard", "pretrain"))
    reweighted = load_config(None, overrides(run["workdir"], zh, web_weight=0.5))
    assert [is_done(reweighted, s) for s in ("prep", "tokenizer", "shard", "pretrain")] == \
        [True, True, True, False]
    text = zh.read_text(encoding="utf-8")
    try:
        zh.write_text(text + "\n第一百回　径回东土　五圣成真\n", encoding="utf-8")
        assert not is_done(cfg, "prep")
    finally:
        zh.write_text(text, encoding="utf-8")
    assert is_done(cfg, "prep")


@pytest.mark.parametrize(("data", "key"), [
    ({"inputs": ["a.txt"], "sources": [{"name": "a", "inputs": ["a.txt"]}]}, "data.inputs (one source) or "
     "data.sources"),
    ({"sources": [{"name": "a", "inputs": ["a.txt"]}, {"name": "a", "inputs": ["a.txt"]}]}, "`data.sources`"),
    ({"sources": [{"name": "a", "inputs": ["a.txt"], "weight": 0}]}, "`data.sources.0.weight`"),
])
def test_config_errors_are_one_line_naming_the_key(tmp_path: Path, capsys, monkeypatch, data: dict,
                                                   key: str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("some text\n")
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps({"workdir": str(tmp_path / "w"), "data": data}))
    assert main(["prep", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0], err
    assert not (tmp_path / "w").exists()


def test_the_sources_config_of_the_readme_is_valid() -> None:
    import yaml

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "sources.yaml")  # its globs match files: inputs are checked at load
    assert [(s.name, s.weight, s.language) for s in cfg.data.sources] == [("web", 0.7, None), ("zh", 0.3, "zh")]
    readme = (root / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### Several sources"):]
    start = section.index("```yaml") + len("```yaml")
    shown = yaml.safe_load(section[start:section.index("```", start)])
    assert shown == yaml.safe_load((root / "configs" / "sources.yaml").read_text(encoding="utf-8"))


def test_a_source_that_keeps_nothing_is_named(tmp_path: Path, capsys, monkeypatch) -> None:
    """Chinese prose prepped as English (no `language` on the source, prep.language en): the language filter
    drops every document, and the stage stops naming that source, not the run as a whole."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    chapters = NOVEL.read_text(encoding="utf-8")[:30_000]
    zh = tmp_path / "zh.jsonl"
    zh.write_text("".join(json.dumps({"id": f"c{i}", "text": chapters[i * 3000:(i + 1) * 3000]}, ensure_ascii=False)
                          + "\n" for i in range(5)), encoding="utf-8")
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps({"workdir": str(tmp_path / "w"), "prep": {"tasks": 1, "workers": 1},
                                "data": {"sources": [{"name": "web", "inputs": [str(WEB)]},
                                                     {"name": "zh", "inputs": [str(zh)]}]}}))
    assert main(["prep", str(path)]) == 2
    err = capsys.readouterr().err
    assert "source 'zh': no document was kept: 5 in, dropped by language 5" in err
    stats = json.loads((tmp_path / "w" / "prep" / "stats.json").read_text())
    assert stats["sources"]["web"]["docs_out"] > 0 and stats["sources"]["zh"]["dropped_language"] == 5


def test_lineage_of_the_export_names_the_sources(run: dict) -> None:
    """A sources run's lineage shows data.sources, not data.inputs' unused default."""
    from pipeline.runs.lineage import format_lineage, lineage
    from pipeline.runs.store import open_store

    store = open_store(f"sqlite:///{(run['workdir'] / 'mlflow.db').resolve()}", None)
    text = format_lineage(lineage(str(run["workdir"] / "pretrain" / "export"), store))
    assert "data.sources" in text and "builtin:python-docs" not in text
    assert "xiyou_ji" in text  # the zh source's file is among the inputs
