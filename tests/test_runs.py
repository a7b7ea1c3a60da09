"""`scratchgpt runs`: table, sorting, filtering, CSV, --compare (with its PNG) and --lineage, on a real MLflow store.

The runs are made with the stages' own tracking code (pipeline.core.tracking.stage_run, the tags each stage sets),
the workdir files with the stages' own writers (dataprep.shards manifest, pipeline.core.stages markers), in a
sqlite store under tmp_path. `build_store` is shared with tests/test_runs_server.py, which serves the same
runs over HTTP.
"""

from __future__ import annotations

import csv
import io
import json
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import Config, load_config

TOKENS_PER_STEP = 4 * 2 * 1 * 32  # micro_batch_size x grad_accum x world_size x block_size of every pretrain run
# (lr, n_embd, final val_bpb): three finished pretraining runs of one sweep.
SWEEP = [(0.001, 32, 2.5), (0.003, 32, 2.1), (0.003, 64, 1.9)]
STEPS = 30
EVAL_EVERY = 10


@dataclass
class Built:
    uri: str
    workdir: Path
    config: Path  # a config file whose tracking section names the store
    pretrain: list[str] = field(default_factory=list)  # run ids, in SWEEP order
    failed: str = ""
    other_experiment: str = ""
    prep: str = ""
    tokenizer: str = ""
    shard: str = ""
    finetune: str = ""
    finetune_task: str = ""
    transfer_task: str = ""  # a fine-tuning run in another workdir, from this workdir's export (finetune.init_from)
    tokenizer_sha256: str = ""
    manifest_sha256: str = ""
    raw_input: Path = Path()


def _cfg(workdir: Path, uri: str, experiment: str, *overrides: str) -> Config:
    return load_config(None, [f"workdir={workdir}", f"tracking.uri={uri}", f"tracking.experiment={experiment}",
                              "model.n_layer=2", "model.n_head=2", "model.block_size=32", "train.micro_batch_size=4",
                              "train.grad_accum=2", f"train.max_steps={STEPS}", *overrides])


def _val_bpb(final: float, step: int) -> float:
    return final + 0.1 * (STEPS - step)  # falls to `final` at the last step


def _pretrain_run(cfg: Config, manifest: str, tokenizer: str, final_bpb: float | None, fail: bool = False) -> str:
    """A pretrain run tagged and logged as pipeline.stages.pretrain does (tags, params, metrics by step)."""
    import mlflow
    from mlflow.entities import Metric

    from pipeline.core.tracking import stage_run, tracking_uri

    tags = {"config_hash": cfg.section_hash("model", "train"), "shard_manifest_sha256": manifest,
            "tokenizer_sha256": tokenizer}
    run_id = ""
    try:
        with stage_run(cfg, "pretrain", sections=("model", "train"), tags=tags) as run:
            run_id = run.info.run_id
            mlflow.log_params({"world_size": 1, "n_params": cfg.model.n_embd * 1000, "precision": "fp32"})
            now = int(time.time() * 1000)
            metrics = [Metric("train_loss", 6.0 - 0.05 * s, now, s) for s in range(1, STEPS + 1)]
            metrics += [Metric("tokens_per_sec", 1000.0 + s, now, s) for s in range(1, STEPS + 1)]
            if final_bpb is not None:
                metrics += [Metric("val_bpb", _val_bpb(final_bpb, s), now, s)
                            for s in range(EVAL_EVERY, STEPS + 1, EVAL_EVERY)]
                metrics += [Metric("val_loss", _val_bpb(final_bpb, s) * 0.9, now, s)
                            for s in range(EVAL_EVERY, STEPS + 1, EVAL_EVERY)]
            mlflow.MlflowClient(tracking_uri(cfg)).log_batch(run_id, metrics=metrics)
            if fail:
                raise RuntimeError("the run dies")
    except RuntimeError:
        pass
    return run_id


def build_store(root: Path, uri: str) -> Built:
    """Every stage's runs for one workdir (a 3-run pretraining sweep, a failed run, a fine-tuning task) and
    a second experiment; the workdir holds the files the stages leave (stats, tokenizer, manifest, markers)."""
    import mlflow

    from dataprep.shards import build_manifest, manifest_sha256, shard_metadata, write_manifest
    from dataprep.tokenizer import tokenizer_sha256
    from pipeline.core.runner import write_marker
    from pipeline.core.tracking import stage_run

    workdir = root / "work"
    raw = root / "raw" / "docs.jsonl"
    raw.parent.mkdir(parents=True)
    raw.write_text("".join(json.dumps({"id": str(i), "text": f"document {i}"}) + "\n" for i in range(120)))
    config = root / "runs.yaml"
    config.write_text(f"workdir: {workdir}\ndata:\n  inputs: [{raw}]\n"
                      f"tracking:\n  uri: {uri}\n  experiment: sweep\n")
    built = Built(uri=uri, workdir=workdir, config=config, raw_input=raw)
    cfg = _cfg(workdir, uri, "sweep", f"data.inputs=[{raw}]")
    started = time.time()

    with stage_run(cfg, "prep", sections=("data", "prep")) as run:
        counts = {"docs_in": 120, "docs_out": 90, "bytes_in": 5000, "bytes_out": 3800,
                  "dropped_malformed": 0, "dropped_length": 20, "dropped_exact_dedup": 10}
        mlflow.log_metrics({k: float(v) for k, v in counts.items()})
        (workdir / "prep").mkdir(parents=True, exist_ok=True)
        (workdir / "prep" / "stats.json").write_text(json.dumps(
            {**counts, "inputs": [str(raw)], "mlflow_run_id": run.info.run_id}))
        built.prep = run.info.run_id
    write_marker(cfg, "prep", {}, started)

    tok_file = workdir / "tokenizer" / "tokenizer.json"
    tok_file.parent.mkdir(parents=True)
    tok_file.write_text(json.dumps({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}}}))
    built.tokenizer_sha256 = tokenizer_sha256(tok_file)
    with stage_run(cfg, "tokenizer", sections=("tokenizer",)) as run:
        mlflow.log_metrics({"vocab_size": 300.0, "bytes_per_token": 1.5})
        mlflow.set_tags({"tokenizer_sha256": built.tokenizer_sha256})
        built.tokenizer = run.info.run_id
    write_marker(cfg, "tokenizer", {}, started)

    shards = workdir / "shards"
    shards.mkdir()
    entries = {split: [{"path": f"{split}/docs-00000-0000.arrow", "sha256": "0" * 64, "docs": docs, "tokens": tokens,
                        "bytes": tokens * 2, "file_bytes": tokens * 3}]
               for split, docs, tokens in (("train", 80, 4000), ("val", 10, 500))}
    write_manifest(shards, build_manifest(shard_metadata(built.tokenizer_sha256, 300, 0), entries))
    built.manifest_sha256 = manifest_sha256(shards)
    with stage_run(cfg, "shard", sections=("data", "shards"), tags={"tokenizer_sha256": built.tokenizer_sha256}) as run:
        mlflow.log_metrics({"train_tokens": 4000.0, "val_tokens": 500.0, "train_docs": 80.0, "val_docs": 10.0,
                            "train_bytes": 8000.0, "val_bytes": 1000.0, "train_shards": 1.0, "val_shards": 1.0})
        mlflow.set_tags({"manifest_sha256": built.manifest_sha256, "dtype": "uint16"})
        built.shard = run.info.run_id
    write_marker(cfg, "shard", {}, started)

    for lr, n_embd, final in SWEEP:
        run_cfg = _cfg(workdir, uri, "sweep", f"data.inputs=[{raw}]", f"train.lr={lr}", f"model.n_embd={n_embd}")
        built.pretrain.append(_pretrain_run(run_cfg, built.manifest_sha256, built.tokenizer_sha256, final))
    built.failed = _pretrain_run(_cfg(workdir, uri, "sweep", "train.lr=0.1"), built.manifest_sha256,
                                 built.tokenizer_sha256, None, fail=True)
    last = built.pretrain[-1]
    (workdir / "pretrain").mkdir(exist_ok=True)
    (workdir / "pretrain" / "mlflow_run_id").write_text(last)
    checkpoint = workdir / "pretrain" / "checkpoints" / f"step_{STEPS:08d}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "scratchgpt.json").write_text(json.dumps(
        {"step": STEPS, "tag": checkpoint.name, "manifest_sha256": built.manifest_sha256,
         "tokenizer_sha256": built.tokenizer_sha256}))
    export = workdir / "pretrain" / "export"
    export.mkdir()
    (export / "config.json").write_text("{}")
    (export / "tokenizer.json").write_bytes(tok_file.read_bytes())
    (export / "scratchgpt_checkpoint.json").write_text(json.dumps({"checkpoint": str(checkpoint), "step": STEPS}))
    write_marker(cfg, "pretrain", {}, started)

    with stage_run(cfg, "finetune", sections=("finetune",)) as parent:
        with stage_run(cfg, "finetune/sst2", parent_run_id=parent.info.run_id,
                       tags={"task": "sst2", "kind": "classification"}) as child:
            for step, acc in ((10, 0.6), (20, 0.7)):
                mlflow.log_metrics({"eval_accuracy": acc, "eval_loss": 1.0 - acc}, step=step)
            built.finetune_task = child.info.run_id
        built.finetune = parent.info.run_id

    transfer = _cfg(root / "transfer", uri, "transfer", f"finetune.init_from={export}")
    with stage_run(transfer, "finetune", sections=("finetune",)) as parent:
        with stage_run(transfer, "finetune/sst2", parent_run_id=parent.info.run_id, tags={"task": "sst2"}) as child:
            built.transfer_task = child.info.run_id

    built.other_experiment = _pretrain_run(_cfg(root / "elsewhere", uri, "other"), "f" * 64, "e" * 64, 3.0)
    return built


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Built:
    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow.set_tracking_uri sets it; keep it to this fixture
        (root / "work").mkdir()  # the store where the stages put it by default: <workdir>/mlflow.db
        return build_store(root, f"sqlite:///{root / 'work' / 'mlflow.db'}")


@pytest.fixture(autouse=True)
def _no_tracking_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def scratchgpt(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["runs", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def parse_tables(text: str) -> dict[str, list[dict[str, str]]]:
    """`== title (n runs) ==` sections of the table output -> rows as {header: cell}, using the dashes for spans."""
    tables: dict[str, list[dict[str, str]]] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("== "):
            continue
        title = line[3:].split(" (")[0]
        header, dashes = lines[i + 1], lines[i + 2]
        spans, pos = [], 0
        for chunk in dashes.split("  "):
            spans.append((pos, pos + len(chunk)))
            pos += len(chunk) + 2
        names = [header[a:b].strip() for a, b in spans]
        rows = []
        for row in lines[i + 3:]:
            if not row.strip() or row.startswith("==") or row.startswith("("):
                break
            rows.append({n: row[a:b].strip() for n, (a, b) in zip(names, spans, strict=True)})
        tables[title] = rows
    return tables


def test_table_groups_runs_by_stage_with_key_params_metrics_and_manifest(store: Built, capsys) -> None:
    rc, out, _ = scratchgpt(capsys, str(store.config))
    assert rc == 0, out
    tables = parse_tables(out)
    assert set(tables) == {"prep", "tokenizer", "shard", "pretrain", "finetune", "finetune tasks"}
    pretrain = {row["run"]: row for row in tables["pretrain"]}
    assert set(pretrain) == {r[:8] for r in [*store.pretrain, store.failed]}  # not the other experiment's run
    for run_id, (lr, n_embd, final) in zip(store.pretrain, SWEEP, strict=True):
        row = pretrain[run_id[:8]]
        assert (row["lr"], row["n_embd"], row["n_layer"], row["status"]) == (str(lr), str(n_embd), "2", "FINISHED")
        assert float(row["val_bpb"]) == pytest.approx(final, abs=5e-4)  # the last value, not the first (final+2)
        assert row["manifest"] == store.manifest_sha256[:8]
        assert row["duration"].endswith("s")
    assert pretrain[store.failed[:8]]["status"] == "FAILED"
    assert pretrain[store.failed[:8]]["val_bpb"] == "-"
    assert tables["prep"][0]["docs_out"] == "90"
    assert tables["shard"][0]["manifest"] == store.manifest_sha256[:8]
    task = tables["finetune tasks"][0]
    assert (task["stage"], task["eval_accuracy"]) == ("finetune/sst2", "0.7")


def test_stage_sort_and_limit(store: Built, capsys) -> None:
    by_bpb = [store.pretrain[i][:8] for i in (2, 1, 0)]  # val_bpb 1.9, 2.1, 2.5
    rc, out, _ = scratchgpt(capsys, str(store.config), "--stage", "pretrain", "--sort", "metrics.val_bpb")
    assert rc == 0
    assert set(parse_tables(out)) == {"pretrain"}
    assert [r["run"] for r in parse_tables(out)["pretrain"]] == [*by_bpb, store.failed[:8]]  # no val_bpb: last
    for spelling in ("--sort=-metrics.val_bpb", "--sort=-val_bpb", "--sort=metrics.val_bpb DESC"):
        rc, out, _ = scratchgpt(capsys, str(store.config), "--stage", "pretrain", spelling)
        assert [r["run"] for r in parse_tables(out)["pretrain"]][:3] == by_bpb[::-1], spelling
    rc, out, _ = scratchgpt(capsys, str(store.config), "--stage", "pretrain", "--sort", "train.lr", "--sort", "val_bpb")
    assert [r["run"] for r in parse_tables(out)["pretrain"]] == [  # a config key sorts as a param; ties by val_bpb
        store.pretrain[0][:8], store.pretrain[2][:8], store.pretrain[1][:8], store.failed[:8]]
    rc, out, _ = scratchgpt(capsys, str(store.config), "--stage", "pretrain", "--sort", "val_bpb", "--limit", "1")
    assert [r["run"] for r in parse_tables(out)["pretrain"]] == by_bpb[:1]
    assert "more runs match" in out
    rc, out, _ = scratchgpt(capsys, str(store.config), "--stage", "finetune")
    assert set(parse_tables(out)) == {"finetune", "finetune tasks"}


def test_mlflow_filter_and_experiment(store: Built, capsys) -> None:
    rc, out, _ = scratchgpt(capsys, str(store.config), "--filter", "params.train.lr = '0.003' and metrics.val_bpb < 2")
    assert [r["run"] for r in parse_tables(out)["pretrain"]] == [store.pretrain[2][:8]]
    rc, out, _ = scratchgpt(capsys, "--tracking-uri", store.uri, "--experiment", "other")
    assert [r["run"] for r in parse_tables(out)["pretrain"]] == [store.other_experiment[:8]]
    rc, out, _ = scratchgpt(capsys, "--tracking-uri", store.uri, "--stage", "pretrain")  # no experiment: all of them
    assert len(parse_tables(out)["pretrain"]) == 5
    rc, out, _ = scratchgpt(capsys, str(store.config), "--filter", "metrics.val_bpb < 0")
    assert "no runs match" in out


def test_csv_has_every_param_and_final_metric(store: Built, capsys, tmp_path: Path) -> None:
    rc, out, _ = scratchgpt(capsys, str(store.config), "--stage", "pretrain", "--csv", "--sort", "val_bpb")
    assert rc == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["run_id"] for r in rows] == [store.pretrain[i] for i in (2, 1, 0)] + [store.failed]
    best = rows[0]
    assert float(best["metrics.val_bpb"]) == _val_bpb(1.9, STEPS)  # exact: written with repr
    assert float(best["metrics.train_loss"]) == 6.0 - 0.05 * STEPS
    assert (best["params.model.n_embd"], best["params.train.lr"], best["params.world_size"]) == ("64", "0.003", "1")
    assert best["manifest_sha256"] == store.manifest_sha256 and best["tokenizer_sha256"] == store.tokenizer_sha256
    assert best["experiment"] == "sweep" and best["stage"] == "pretrain" and float(best["duration_s"]) >= 0
    assert rows[-1]["status"] == "FAILED" and rows[-1]["metrics.val_bpb"] == ""


def _blue_pixels(image) -> int:
    """Pixels of matplotlib's first colour (C0, #1f77b4): the first run's curve and its legend line."""
    import numpy as np

    rgb = image[..., :3]
    return int((np.abs(rgb - np.array([0x1F, 0x77, 0xB4]) / 255).max(axis=-1) < 0.05).sum())


def test_compare_prints_differing_params_metrics_and_writes_png(store: Built, capsys, tmp_path: Path) -> None:
    import matplotlib.image

    a, c = store.pretrain[0], store.pretrain[2]
    out_png = tmp_path / "plots" / "cmp.png"
    rc, out, _ = scratchgpt(capsys, str(store.config), "--compare", a[:8], c, "--out", str(out_png))
    assert rc == 0, out
    differ = out.split("Params that differ")[1].split("\n\n")[0]
    keys = {line.split()[0] for line in differ.splitlines()[3:]}
    assert keys == {"train.lr", "model.n_embd", "n_params"}  # n_params follows from n_embd; the rest is the same
    metrics = out.split("Final metrics")[1]
    bpb_row = next(line for line in metrics.splitlines() if line.startswith("val_bpb "))
    assert bpb_row.split()[1:] == ["2.5", "1.9"]
    assert "config_hash" in out.split("Tags that differ")[1]
    assert f"Loss curves written to {out_png.resolve()}" in out
    image = matplotlib.image.imread(out_png)
    assert image.shape == (500, 1200, 4)
    assert _blue_pixels(image) > 200  # the curves were drawn, not only the axes
    assert "x axis is the optimizer step" not in out  # tokens per step derived from the params


def test_compare_errors(store: Built, capsys, tmp_path: Path) -> None:
    rc, _, err = scratchgpt(capsys, str(store.config), "--compare", store.pretrain[0], "zzzz")
    assert rc == 2 and "no run 'zzzz'" in err
    rc, _, err = scratchgpt(capsys, str(store.config), "--compare", "pretrain", store.pretrain[0])
    assert rc == 2 and "ambiguous" in err
    rc, _, err = scratchgpt(capsys, str(store.config), "--compare", store.pretrain[0])
    assert rc == 2 and "at least two" in err


def test_plot_x_axis_is_tokens_seen_or_steps(store: Built, tmp_path: Path) -> None:
    from pipeline.runs.compare import compare, plot_curves, tokens_per_step
    from pipeline.runs.store import open_store

    st = open_store(store.uri, None)
    chosen = [st.client.get_run(r) for r in store.pretrain[:2]]
    assert [tokens_per_step(r) for r in chosen] == [TOKENS_PER_STEP] * 2
    finetune = st.client.get_run(store.finetune_task)
    assert tokens_per_step(finetune) is None
    path, notes = plot_curves(st, compare([chosen[0], finetune]), tmp_path / "mixed.png")
    assert any("x axis is the optimizer step" in n and store.finetune_task[:8] in n for n in notes)
    assert any(f"no val_bpb history in {store.finetune_task[:8]}" in n for n in notes)
    assert path.is_file()


def test_lineage_of_a_pretrain_run(store: Built, capsys) -> None:
    rc, out, _ = scratchgpt(capsys, str(store.config), "--lineage", store.pretrain[2][:8], "--json")
    assert rc == 0, out
    lin = json.loads(out)
    assert lin["origin"]["run_id"] == store.pretrain[2]
    assert lin["tokenizer"]["path"] == str(store.workdir / "tokenizer" / "tokenizer.json")
    assert lin["tokenizer"]["sha256"] == lin["tokenizer"]["recorded_sha256"] == store.tokenizer_sha256
    assert lin["tokenizer"]["run"]["run_id"] == store.tokenizer
    assert lin["shards"]["sha256"] == store.manifest_sha256 and lin["shards"]["run"]["run_id"] == store.shard
    assert lin["shards"]["splits"]["train"] == {"tokens": 4000, "docs": 80, "bytes": 8000, "shards": 1}
    assert lin["prep"]["run"]["run_id"] == store.prep
    assert (lin["prep"]["docs_in"], lin["prep"]["docs_out"]) == (120, 90)
    assert lin["prep"]["dropped"] == {"malformed": 0, "length": 20, "exact_dedup": 10}
    assert lin["inputs"]["data.inputs"] == f"['{store.raw_input}']"
    assert lin["inputs"]["files"] == [{"path": str(store.raw_input), "exists": True,
                                       "bytes": store.raw_input.stat().st_size}]
    assert list(lin["markers"]) == ["prep", "tokenizer", "shard", "pretrain"]
    assert lin["warnings"] == []
    rc, text, _ = scratchgpt(capsys, str(store.config), "--lineage", store.pretrain[2])
    assert f"sha256 {store.manifest_sha256} (matches the run's record)" in text
    assert "train: 4,000 tokens, 80 docs" in text
    assert "dropped: malformed 0, length 20, exact_dedup 10" in text
    assert str(store.raw_input) in text


def test_lineage_of_an_export_folder_and_a_finetune_run(store: Built, capsys) -> None:
    export = store.workdir / "pretrain" / "export"
    rc, out, _ = scratchgpt(capsys, "--lineage", str(export), "--json")  # the store is found in the workdir
    assert rc == 0, out
    lin = json.loads(out)
    assert lin["model"]["step"] == STEPS and lin["model"]["pretrain_run"]["run_id"] == store.pretrain[-1]
    assert lin["model"]["tokenizer_sha256"] == store.tokenizer_sha256
    assert lin["shards"]["recorded_sha256"] == store.manifest_sha256  # from the checkpoint's own metadata
    assert lin["prep"]["docs_in"] == 120 and lin["warnings"] == []
    rc, out, _ = scratchgpt(capsys, str(store.config), "--lineage", store.finetune_task, "--json")
    lin = json.loads(out)
    assert lin["model"]["kind"] == "finetune" and lin["model"]["task"] == "sst2"
    assert lin["model"]["pretrain_run"]["run_id"] == store.pretrain[-1]
    assert lin["shards"]["sha256"] == store.manifest_sha256
    rc, out, _ = scratchgpt(capsys, "--tracking-uri", store.uri, "--lineage", store.transfer_task[:8], "--json")
    lin = json.loads(out)  # fine-tuned from another workdir's export: that export's lineage
    assert lin["origin"]["run_id"] == store.transfer_task
    assert lin["model"]["finetuned_from"] == str(store.workdir / "pretrain" / "export")
    assert lin["model"]["pretrain_run"]["run_id"] == store.pretrain[-1]
    assert lin["tokenizer"]["sha256"] == store.tokenizer_sha256 and lin["prep"]["docs_in"] == 120


def test_lineage_says_when_the_shards_were_rebuilt(store: Built, capsys) -> None:
    manifest = store.workdir / "shards" / "manifest.json"
    original = manifest.read_text()
    try:
        body = json.loads(original)
        body["splits"]["train"]["tokens"] = 1
        manifest.write_text(json.dumps(body))
        rc, out, _ = scratchgpt(capsys, str(store.config), "--lineage", store.pretrain[0], "--json")
    finally:
        manifest.write_text(original)
    lin = json.loads(out)
    assert any("not the manifest the model was trained on" in w for w in lin["warnings"])
    assert lin["shards"]["splits"]["train"]["tokens"] == 4000  # from the shard run that wrote the recorded one


def test_clear_errors(store: Built, capsys, tmp_path: Path) -> None:
    rc, _, err = scratchgpt(capsys, str(store.config), "--experiment", "nope")
    assert rc == 2 and "no experiment named 'nope'" in err and "sweep" in err
    rc, _, err = scratchgpt(capsys, "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}")
    assert rc == 2 and "no MLflow store at" in err and not (tmp_path / "none.db").exists()
    rc, _, err = scratchgpt(capsys)
    assert rc == 2 and "MLFLOW_TRACKING_URI" in err
    rc, _, err = scratchgpt(capsys, str(store.config), "--filter", "metrics.val_bpb <<< 2")
    assert rc == 2 and "MLflow could not search runs" in err
    rc, _, err = scratchgpt(capsys, "--lineage", str(tmp_path))
    assert rc == 2 and "not an export folder" in err
    rc, out, _ = scratchgpt(capsys, str(store.config), "--stage", "pretrian")
    assert rc == 0 and "no runs match" in out and "finetune, prep, pretrain, shard, tokenizer" in out
    with socket.socket() as sock:  # a port nothing listens on: refused at once, not after MLflow's retries
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    rc, _, err = scratchgpt(capsys, "--tracking-uri", f"http://127.0.0.1:{port}")
    assert rc == 2 and "cannot reach the MLflow server" in err and time.monotonic() - started < 30


@pytest.mark.slow
def test_runs_and_lineage_of_the_real_stages(tmp_path: Path, capsys) -> None:
    """prep, tokenizer, shard and two pretraining runs through the stage code itself (~40 s): the tags,
    params and files `runs` relies on are the ones the stages really write."""
    import matplotlib.image
    from train_helpers import SHAKESPEARE, TINY

    from dataprep.shards import manifest_sha256
    from dataprep.tokenizer import tokenizer_sha256
    from pipeline.core.runner import run_stage

    lines = SHAKESPEARE.read_text(encoding="utf-8")[:100_000].splitlines(keepends=True)
    docs = ["".join(lines[i:i + 40]) for i in range(0, len(lines), 40)]
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps({"id": f"s/{i}", "text": t}) + "\n" for i, t in enumerate(docs + docs[:3])))
    config = tmp_path / "real.yaml"
    config.write_text(f"workdir: {tmp_path / 'work'}\ndata:\n  inputs: [{raw}]\ntracking:\n  experiment: real\n")
    settings = ["prep.tasks=1", "prep.workers=1", "prep.filters.language=false", "prep.dedup.minhash=false",
                "tokenizer.vocab_size=300", "shards.val_fraction=0.15", "shards.tasks=1", "shards.workers=1", *TINY,
                "train.max_steps=4", "train.eval_every=2", "train.sample_tokens=0"]
    cfg = load_config(config, settings)
    for stage in ("prep", "tokenizer", "shard", "pretrain"):
        run_stage(cfg, stage)
    first = (tmp_path / "work" / "pretrain" / "mlflow_run_id").read_text().strip()
    import shutil

    shutil.rmtree(tmp_path / "work" / "pretrain")  # a second run of the sweep, from scratch
    run_stage(load_config(config, [*settings, "train.lr=0.01"]), "pretrain")
    second = (tmp_path / "work" / "pretrain" / "mlflow_run_id").read_text().strip()

    rc, out, _ = scratchgpt(capsys, str(config))
    assert rc == 0, out
    tables = parse_tables(out)
    assert set(tables) == {"prep", "tokenizer", "shard", "pretrain"}
    work = tmp_path / "work"
    manifest = manifest_sha256(work / "shards")
    assert {r["manifest"] for r in tables["pretrain"]} == {manifest[:8]}
    assert {r["run"] for r in tables["pretrain"]} == {first[:8], second[:8]}
    assert all(r["val_bpb"] not in ("", "-") and r["world"] == "1" for r in tables["pretrain"])

    png = tmp_path / "real.png"
    rc, out, _ = scratchgpt(capsys, str(config), "--compare", first, second, "--out", str(png))
    assert rc == 0, out
    differ = out.split("Params that differ")[1].split("\n\n")[0]
    assert "train.lr" in {line.split()[0] for line in differ.splitlines()[3:]}
    assert "x axis is the optimizer step" not in out  # tokens per step derived from the params pretrain logs
    assert matplotlib.image.imread(png).shape == (500, 1200, 4)

    rc, out, _ = scratchgpt(capsys, "--lineage", str(work / "pretrain" / "export"), "--json")
    lin = json.loads(out)
    stats = json.loads((work / "prep" / "stats.json").read_text())
    assert lin["model"]["pretrain_run"]["run_id"] == second
    assert lin["tokenizer"]["sha256"] == lin["tokenizer"]["recorded_sha256"] == tokenizer_sha256(work / "tokenizer")
    assert lin["shards"]["sha256"] == lin["shards"]["recorded_sha256"] == manifest
    assert lin["shards"]["run"]["stage"] == "shard" and lin["tokenizer"]["run"]["stage"] == "tokenizer"
    assert lin["prep"]["run"]["run_id"] == stats["mlflow_run_id"]
    assert lin["prep"]["docs_in"] == stats["docs_in"] == len(docs) + 3
    assert lin["prep"]["dropped"]["exact_dedup"] == 3
    assert lin["inputs"]["files"][0]["path"] == str(raw)
    assert list(lin["markers"]) == ["prep", "tokenizer", "shard", "pretrain"] and lin["warnings"] == []

    rc, out, _ = scratchgpt(capsys, str(config), "--lineage", first, "--json")
    lin = json.loads(out)
    assert lin["shards"]["sha256"] == lin["shards"]["recorded_sha256"] == manifest
    assert any("now holds the model of run" in w for w in lin["warnings"])


def test_runs_needs_the_store_not_the_raw_data(tmp_path: Path) -> None:
    """Raw inputs deleted (or on another machine) after the runs: `scratchgpt runs CONFIG` still finds the store."""
    from pipeline.runs.store import resolve_tracking_uri

    config = tmp_path / "cfg.yaml"
    config.write_text(f"workdir: {tmp_path / 'w'}\ndata:\n  inputs: [{tmp_path / 'gone.jsonl'}]\n"
                      f"tracking:\n  experiment: mine\n")
    with pytest.raises(Exception, match="gone.jsonl"):
        load_config(config)  # the stages still refuse it
    uri, experiment = resolve_tracking_uri(config, [], None)
    assert uri == f"sqlite:///{(tmp_path / 'w' / 'mlflow.db').resolve()}" and experiment == "mine"
