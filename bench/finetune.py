"""Does pretraining help? SST-2 dev accuracy of a pretrained GPT, the same GPT from scratch, and TF-IDF.

    .venv/bin/python bench/finetune.py [--seeds 3] [--pretrain-minutes 15] [--finetune-steps 600] [--sst2-only]
                                       [--workdir runs/bench-finetune] [--fresh] [KEY.PATH=VALUE ...]

1. Pretrains (prep -> tokenizer -> shard -> pretrain, the real stages) on a corpus of
   unlabelled text: the sentences of SST-2's *train* split without their labels
   (task-adaptive pretraining, as Gururangan et al. 2020; dev text is never seen)
   plus the shared news and web pages (not with `--sst2-only`: on SST-2 alone the
   model memorises the phrases and fine-tunes worse), within `--pretrain-minutes`
   of wall time (the learning rate anneals over that budget).
2. Fine-tunes on SST-2 train and scores SST-2 dev with the same budget (steps, lr,
   fp32): from the pretrained export, and from random weights (`--from-scratch`),
   once per seed.
3. Fits TF-IDF unigrams + logistic regression on the same split (81.9% known here).

Prints one JSON line per figure, and the differences in points. A rerun with the
same workdir and settings reuses the finished pretraining and fine-tunes again.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_config  # noqa: E402
from pipeline.core.runner import run_stage  # noqa: E402
from pipeline.stages.finetune import task_dir  # noqa: E402
from training.tasks import read_classification  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SST2 = SHARED / "sst2"
WEB = ["web/l3s_gn1_googlenews.jsonl", "web/cleaneval_dev.jsonl", "web/cleanportaleval.jsonl"]


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def write_sst2_corpus(path: Path, sentences_per_doc: int = 50) -> int:
    """SST-2 train text without labels, a document per `sentences_per_doc` rows."""
    texts = [e.text for e in read_classification(SST2 / "train.tsv", "sentence", "label")]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i in range(0, len(texts), sentences_per_doc):
            f.write(json.dumps({"id": f"sst2-train/{i}", "text": "\n".join(texts[i:i + sentences_per_doc])}) + "\n")
    return len(texts)


def tfidf_baseline() -> float:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    train = read_classification(SST2 / "train.tsv", "sentence", "label")
    dev = read_classification(SST2 / "dev.tsv", "content", "label")
    vec = TfidfVectorizer()
    x_train = vec.fit_transform([e.text for e in train])
    clf = LogisticRegression(max_iter=1000).fit(x_train, [e.label for e in train])
    pred = clf.predict(vec.transform([e.text for e in dev]))
    return sum(p == e.label for p, e in zip(pred, dev, strict=True)) / len(dev)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-finetune"))
    parser.add_argument("--pretrain-minutes", type=float, default=15.0)
    parser.add_argument("--finetune-steps", type=int, default=600)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--lm-loss-weight", type=float, default=0.5, help="GPT-1's auxiliary LM loss in fine-tuning")
    parser.add_argument("--finetune-precision", choices=["auto", "bf16", "fp32"], default="fp32",
                        help="fine-tuning engine precision (bf16 made both arms' dev curves noisier here)")
    parser.add_argument("--seeds", type=int, default=1, help="fine-tune each arm this many times (seeds 1337, ...)")
    parser.add_argument("--sst2-only", action="store_true", help="pretrain on SST-2 train text alone")
    parser.add_argument("--fresh", action="store_true", help="delete the workdir first")
    parser.add_argument("overrides", nargs="*", metavar="KEY.PATH=VALUE", help="config overrides (model, train, ...)")
    args = parser.parse_args()
    if args.fresh and args.workdir.exists():
        shutil.rmtree(args.workdir)
    corpus = args.workdir / "corpus" / "sst2_train_text.jsonl"
    rows = write_sst2_corpus(corpus)
    task = {"name": "sst2", "kind": "classification", "train": str(SST2 / "train.tsv"),
            "eval": str(SST2 / "dev.tsv"), "text_key": "sentence", "eval_text_key": "content",
            "label_key": "label", "max_steps": args.finetune_steps, "micro_batch_size": 32, "lr": args.finetune_lr,
            "eval_every": max(25, args.finetune_steps // 8), "patience": 4, "lm_loss_weight": args.lm_loss_weight,
            "precision": args.finetune_precision}
    overrides = [
        f"workdir={args.workdir}",
        f"data.inputs={json.dumps([str(corpus)] + ([] if args.sst2_only else [str(SHARED / w) for w in WEB]))}",
        # SST-2 rows are short lowercase phrases: the web quality filters would drop every document.
        "prep.filters.gopher_quality=false", "prep.filters.c4_quality=false", "prep.filters.fineweb_quality=false",
        "prep.filters.gopher_repetition=false", "prep.filters.length.min_chars=100",
        # Small and fast (≈8k tokens/s on 2 cores): tokens seen matter more here than width. SST-2 sentences
        # fit in 64 tokens (dev: 10 of 872 are cut).
        "tokenizer.vocab_size=4096", "shards.val_fraction=0.02",
        "model.n_layer=4", "model.n_head=6", "model.n_embd=192", "model.block_size=64",
        "train.micro_batch_size=64", "train.lr=3e-3", "train.min_lr=3e-4", "train.warmup_steps=100",
        "train.max_steps=100000", f"train.max_minutes={args.pretrain_minutes}", "train.eval_every=250",
        "train.checkpoint_every=1000", "train.precision=auto",
        f"finetune.tasks=[{json.dumps(task)}]", "tracking.experiment=bench-finetune",
        *args.overrides,
    ]
    cfg = load_config(None, overrides)
    emit(figure="corpus", sst2_train_sentences=rows, web_files=0 if args.sst2_only else len(WEB))
    started = time.time()
    reused = []
    for stage in ("prep", "tokenizer", "shard", "pretrain"):
        summary = run_stage(cfg, stage)
        if summary is None:  # complete already for this config: its recorded summary stands
            reused.append(stage)
            summary = json.loads((args.workdir / stage / "_COMPLETE.json").read_text())["summary"]
        emit(figure=f"{stage}_summary", **{k: v for k, v in summary.items() if not isinstance(v, dict)})
    emit(figure="data_and_pretrain_wall_s", value=round(time.time() - started, 1), reused_stages=reused)

    results: dict[str, list[float]] = {"pretrained": [], "from_scratch": []}
    last: dict[str, list[float]] = {"pretrained": [], "from_scratch": []}
    for seed in range(1337, 1337 + args.seeds):  # each seed: a new head and batch order, in both arms alike
        for scratch in (False, True):
            run_task = {**task, "seed": seed}
            run_cfg = load_config(None, [*overrides, f"finetune.tasks=[{json.dumps(run_task)}]",
                                         f"finetune.from_scratch={str(scratch).lower()}"])
            t0 = time.time()
            summary = run_stage(run_cfg, "finetune", force=True)["sst2"]
            name = "from_scratch" if scratch else "pretrained"
            # The stage keeps the best evaluation (early stopping on dev, as for both arms alike); the last one
            # is printed beside it, so a lucky evaluation cannot pass unnoticed.
            folder = task_dir(run_cfg, run_cfg.finetune.tasks[0], scratch)
            history = json.loads((folder / "metrics.json").read_text())["history"]
            results[name].append(summary["eval_accuracy"])
            last[name].append(history[-1]["eval_accuracy"])
            emit(figure=f"sst2_dev_accuracy_{name}", seed=seed, value=round(summary["eval_accuracy"], 4),
                 last_eval=round(history[-1]["eval_accuracy"], 4),
                 curve=[round(h["eval_accuracy"], 4) for h in history], steps=summary["steps"],
                 seconds=round(time.time() - t0, 1))
    mean = {name: statistics.fmean(values) for name, values in results.items()}
    mean_last = {name: statistics.fmean(values) for name, values in last.items()}
    for name in results:
        emit(figure=f"sst2_dev_accuracy_{name}_mean", value=round(mean[name], 4), last_eval=round(mean_last[name], 4),
             seeds=args.seeds, spread=round(max(results[name]) - min(results[name]), 4))
    tfidf = tfidf_baseline()
    emit(figure="sst2_dev_accuracy_tfidf_logreg", value=round(tfidf, 4), reference=0.819)
    emit(figure="pretrained_minus_scratch_points", value=round(100 * (mean["pretrained"] - mean["from_scratch"]), 1),
         last_eval=round(100 * (mean_last["pretrained"] - mean_last["from_scratch"]), 1), target=">= 2")
    emit(figure="pretrained_minus_tfidf_points", value=round(100 * (mean["pretrained"] - tfidf), 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
