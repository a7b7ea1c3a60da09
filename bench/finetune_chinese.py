"""Chinese downstream: online_shopping review sentiment, pretrained GPT vs the same GPT from scratch vs TF-IDF.

    .venv/bin/python bench/finetune_chinese.py [--pretrain-minutes 3] [--finetune-steps 200] [--seeds 1]
                                               [--workdir runs/bench-finetune-zh] [--fresh] [KEY.PATH=VALUE ...]

1. Pretrains (prep -> tokenizer -> shard -> pretrain, the real stages, `prep.language: zh`) on
   three of the shared classical novels (not the variant copy) and the review texts of
   online_shopping *train* without their labels (a document per 50 reviews; dev is never seen),
   within `--pretrain-minutes`. The tokenizer's bytes_per_token on held-back Chinese is printed.
2. Fine-tunes on online_shopping train and scores dev, from the pretrained export and from
   random weights, with the same budget. Reviews are characters as they are: no word
   segmentation, the byte-level BPE unchanged.
3. Fits character unigram+bigram TF-IDF + logistic regression on the same split (the shared
   README's naive Bayes on the same features: 92.2% on dev).

The defaults are a short smoke run (a few minutes on 2 cores); raise the minutes and steps for figures.
Prints one JSON line per figure.
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
from training.tasks import read_classification  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SHOP = SHARED / "chinese" / "online_shopping"
NOVELS = [SHARED / "chinese" / "novels" / n for n in ("xiyou_ji.txt", "shuihu_zhuan.txt", "sanguo_yanyi.txt")]


def emit(**fields) -> None:
    print(json.dumps(fields, ensure_ascii=False), flush=True)


def write_review_corpus(path: Path, per_doc: int = 50) -> int:
    """online_shopping train reviews without labels, one per line, a document per `per_doc` reviews."""
    texts = [e.text for e in read_classification(SHOP / "train.tsv", "content", "label")]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i in range(0, len(texts), per_doc):
            row = {"id": f"shop-train/{i}", "text": "\n".join(texts[i:i + per_doc])}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(texts)


def tfidf_baseline() -> float:
    """Character unigrams and bigrams (Chinese needs no segmenter for this), logistic regression."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    train = read_classification(SHOP / "train.tsv", "content", "label")
    dev = read_classification(SHOP / "dev.tsv", "content", "label")
    vec = TfidfVectorizer(analyzer="char", ngram_range=(1, 2), sublinear_tf=True, min_df=2)
    clf = LogisticRegression(max_iter=2000, C=4.0).fit(vec.fit_transform([e.text for e in train]),
                                                       [e.label for e in train])
    pred = clf.predict(vec.transform([e.text for e in dev]))
    return sum(p == e.label for p, e in zip(pred, dev, strict=True)) / len(dev)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-finetune-zh"))
    parser.add_argument("--pretrain-minutes", type=float, default=3.0)
    parser.add_argument("--finetune-steps", type=int, default=200)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--tfidf-only", action="store_true", help="only the TF-IDF baseline (seconds)")
    parser.add_argument("--fresh", action="store_true", help="delete the workdir first")
    parser.add_argument("overrides", nargs="*", metavar="KEY.PATH=VALUE", help="config overrides (model, train, ...)")
    args = parser.parse_args()
    tfidf = tfidf_baseline()
    emit(figure="shop_dev_accuracy_tfidf_char12_logreg", value=round(tfidf, 4), naive_bayes_reference=0.922)
    if args.tfidf_only:
        return 0
    if args.fresh and args.workdir.exists():
        shutil.rmtree(args.workdir)
    corpus = args.workdir / "corpus" / "shop_train_text.jsonl"
    rows = write_review_corpus(corpus)
    task = {"name": "shop", "kind": "classification", "train": str(SHOP / "train.tsv"), "eval": str(SHOP / "dev.tsv"),
            "text_key": "content", "label_key": "label", "max_steps": args.finetune_steps, "micro_batch_size": 32,
            "lr": args.finetune_lr, "eval_every": max(25, args.finetune_steps // 4), "patience": 4,
            "precision": "fp32"}
    overrides = [
        f"workdir={args.workdir}",
        f"data.inputs={json.dumps([str(p) for p in [*NOVELS, corpus]], ensure_ascii=False)}",
        "prep.language=zh",
        # Review lists are short lines with no sentence ends: the page-quality rules would drop them all.
        "prep.filters.fineweb_quality=false", "prep.filters.gopher_quality=false",
        "tokenizer.vocab_size=8192", "shards.val_fraction=0.02",
        "model.n_layer=4", "model.n_head=6", "model.n_embd=192", "model.block_size=128",
        "train.micro_batch_size=32", "train.lr=3e-3", "train.min_lr=3e-4", "train.warmup_steps=50",
        "train.max_steps=100000", f"train.max_minutes={args.pretrain_minutes}", "train.eval_every=200",
        "train.checkpoint_every=1000", "train.precision=auto",
        f"finetune.tasks=[{json.dumps(task, ensure_ascii=False)}]", "tracking.experiment=bench-finetune-zh",
        *args.overrides,
    ]
    cfg = load_config(None, overrides)
    emit(figure="corpus", shop_train_reviews=rows, novels=[p.name for p in NOVELS])
    started = time.time()
    for stage in ("prep", "tokenizer", "shard", "pretrain"):
        summary = run_stage(cfg, stage)
        if summary is None:  # complete already for this config
            summary = json.loads((args.workdir / stage / "_COMPLETE.json").read_text())["summary"]
        emit(figure=f"{stage}_summary", **{k: v for k, v in summary.items() if not isinstance(v, dict | list)})
    emit(figure="data_and_pretrain_wall_s", value=round(time.time() - started, 1))

    results: dict[str, list[float]] = {"pretrained": [], "from_scratch": []}
    for seed in range(1337, 1337 + args.seeds):
        for scratch in (False, True):
            run_cfg = load_config(None, [*overrides, f"finetune.tasks=[{json.dumps({**task, 'seed': seed})}]",
                                         f"finetune.from_scratch={str(scratch).lower()}"])
            t0 = time.time()
            summary = run_stage(run_cfg, "finetune", force=True)["shop"]
            name = "from_scratch" if scratch else "pretrained"
            results[name].append(summary["eval_accuracy"])
            emit(figure=f"shop_dev_accuracy_{name}", seed=seed, value=round(summary["eval_accuracy"], 4),
                 steps=summary["steps"], seconds=round(time.time() - t0, 1))
    mean = {name: statistics.fmean(values) for name, values in results.items()}
    emit(figure="pretrained_minus_scratch_points", value=round(100 * (mean["pretrained"] - mean["from_scratch"]), 1))
    emit(figure="pretrained_minus_tfidf_points", value=round(100 * (mean["pretrained"] - tfidf), 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
