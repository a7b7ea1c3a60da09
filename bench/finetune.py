"""Does pretraining help? Dev accuracy of a pretrained GPT, the same GPT from scratch, and TF-IDF, on every
classification task in ../shared/data: SST-2 (English) and online_shopping (Chinese reviews).

    .venv/bin/python bench/finetune.py [--tasks sst2,shop] [--seeds 3] [--root runs/bench-finetune]
                                       [--task-set KEY=VALUE ...] [--arms both|pretrained|scratch] [--fresh]
                                       [--labelled ROWS] [KEY.PATH=VALUE ...]

Per task, in <root>/<task>:
1. Pretrains (prep -> tokenizer -> shard -> pretrain, the real stages) on unlabelled text: the
   task's *train* texts without labels (task-adaptive pretraining, Gururangan et al. 2020; dev is
   never seen), a document per 50 rows, plus general text in the task's language (the shared web
   pages for SST-2; three classical novels for the reviews, with `prep.language: zh`). A fixed
   number of steps, so the model is the same however loaded the machine is. `--weighted-mix`
   pretrains on weighted `data.sources` instead: for the reviews, 0.6 of the tokens from the
   reviews, 0.25 from the modern Chinese (Wikipedia paragraphs, Sohu news), 0.15 from the novels.
2. Fine-tunes with the task defaults only (nothing below sets lr, steps, precision or pooling;
   `--task-set` is for sweeps) through `finetune.vs_scratch` and `finetune.seeds`: from the
   pretrained export and from random weights, paired by seed. The stage prints the gain.
3. Fits TF-IDF + logistic regression on the same split: word unigrams for SST-2, character
   unigrams+bigrams for the reviews (no segmenter needed).

`--labelled ROWS` fine-tunes (and fits TF-IDF) on ROWS train rows drawn at random, as task
`<task>-<ROWS>`, while pretraining still reads every train text without its label: the setting
GPT-1 was made for, few labels beside much unlabelled text of the same kind. The rows are the
same for every `--seeds` (their draw has its own seed, 0), so seeds vary the head and the order.

Prints one JSON line per figure. A rerun with the same root reuses the finished pretraining.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.core.runner import run_stage  # noqa: E402
from pipeline.stages.finetune import result_dir  # noqa: E402
from pipeline.stages.finetune import seeds as seeds_of  # noqa: E402
from training.tasks import read_classification  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

# The pretraining both tasks share: small and fast (about 5-8k tokens/s on 2 cores), Muon on the blocks.
PRETRAIN = [
    "tokenizer.vocab_size={vocab}", "shards.val_fraction=0.02",
    "model.n_layer=4", "model.n_head=6", "model.n_embd=192", "model.block_size={ctx}",
    "train.micro_batch_size={batch}", "train.optimizer=muon", "train.muon_lr=0.04", "train.lr=3e-3",
    "train.min_lr=3e-4", "train.warmup_steps={warmup}", "train.max_steps={steps}", "train.eval_every={eval_every}",
    "train.checkpoint_every={checkpoint_every}", "train.precision=auto",
]


@dataclass
class Bench:
    """One classification task and what its model is pretrained on."""

    name: str
    folder: Path
    text_key: str
    eval_text_key: str
    general: list[Path]  # unlabelled text in the task's language, beside the task's own train texts
    pretrain: dict[str, Any]
    data: list[str] = field(default_factory=list)  # prep overrides for this corpus
    tfidf: dict[str, Any] = field(default_factory=dict)
    reference: str = ""
    # With --weighted-mix: token shares of a mixed pretraining (`data.sources`), "task" (its train texts) and
    # names in `sources`. Without: one source, the task texts and `general` together, in proportion to their sizes.
    weights: dict[str, float] = field(default_factory=dict)
    sources: dict[str, list[Path]] = field(default_factory=dict)

    def task(self, train: Path | None = None, name: str | None = None) -> dict[str, Any]:
        """The task as a user writes it: files and columns, no hyperparameters."""
        return {"name": name or self.name, "kind": "classification", "train": str(train or self.folder / "train.tsv"),
                "eval": str(self.folder / "dev.tsv"), "text_key": self.text_key, "eval_text_key": self.eval_text_key,
                "label_key": "label"}


NOVELS = [SHARED / "chinese" / "novels" / n for n in ("xiyou_ji.txt", "shuihu_zhuan.txt", "sanguo_yanyi.txt")]

BENCHES = {
    "sst2": Bench(
        "sst2", SHARED / "sst2", "sentence", "content",
        [SHARED / "web" / n for n in ("l3s_gn1_googlenews.jsonl", "cleaneval_dev.jsonl", "cleanportaleval.jsonl")],
        {"vocab": 4096, "ctx": 64, "batch": 64, "warmup": 100, "steps": 2000, "eval_every": 250,
         "checkpoint_every": 500},
        # SST-2 rows are short lowercase phrases: the web page-quality rules would drop every document.
        ["prep.filters.gopher_quality=false", "prep.filters.c4_quality=false", "prep.filters.fineweb_quality=false",
         "prep.filters.gopher_repetition=false", "prep.filters.length.min_chars=100"],
        {}, "TF-IDF word unigrams + logistic regression: 82.3% known"),
    "shop": Bench(
        "shop", SHARED / "chinese" / "online_shopping", "content", "content",
        NOVELS,
        {"vocab": 8192, "ctx": 128, "batch": 32, "warmup": 50, "steps": 1500, "eval_every": 200,
         "checkpoint_every": 1000},
        # Review lists are short lines with no sentence ends: the page-quality rules would drop them all.
        ["prep.language=zh", "prep.filters.fineweb_quality=false", "prep.filters.gopher_quality=false"],
        {"analyzer": "char", "ngram_range": (1, 2), "sublinear_tf": True, "min_df": 2, "C": 4.0},
        "the shared README's naive Bayes on character 1-2-grams: 92.2%",
        # Most tokens from the reviews (several epochs: task-adaptive pretraining pays with repetition), then the
        # only modern Chinese here (Wikipedia paragraphs, Sohu news), then the classical novels.
        {"task": 0.6, "modern": 0.25, "novels": 0.15},
        {"modern": [SHARED / "chinese" / "web" / n for n in ("cmrc2018_wiki_paragraphs.jsonl", "sogoucs_sample.jsonl")],
         "novels": NOVELS}),
}


def emit(**fields: Any) -> None:
    print(json.dumps(fields, ensure_ascii=False), flush=True)


def write_task_text(bench: Bench, path: Path, per_doc: int = 50) -> int:
    """The task's train texts without labels, a document per `per_doc` rows."""
    texts = [e.text for e in read_classification(bench.folder / "train.tsv", bench.text_key, "label")]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i in range(0, len(texts), per_doc):
            row = {"id": f"{bench.name}-train/{i}", "text": "\n".join(texts[i:i + per_doc])}
            f.write(json.dumps(row) + "\n")
    return len(texts)


def write_labelled_sample(bench: Bench, rows: int, path: Path, seed: int = 0) -> Path:
    """`rows` labelled train rows drawn at random (`seed`), in file order, header kept: a task with fewer labels.

    Rows are taken as lines, so the sample is exactly the file's own rows (TSV with one row per line)."""
    header, *lines = (bench.folder / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    if not 0 < rows <= len(lines):
        print(f"bench/finetune.py: --labelled {rows}: {bench.folder / 'train.tsv'} has {len(lines)} rows; give 1 to "
              f"{len(lines)}", file=sys.stderr)
        sys.exit(2)
    keep = sorted(random.Random(seed).sample(range(len(lines)), rows))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + "".join(lines[i] for i in keep), encoding="utf-8")
    return path


def read_dev(bench: Bench) -> list[Any]:
    return read_classification(bench.folder / "dev.tsv", bench.eval_text_key, "label")


def tfidf_predictions(bench: Bench, dev: list[Any], train_file: Path | None = None) -> list[Any]:
    """TF-IDF + logistic regression fitted on train (or `train_file`): its label for each `dev` example, in order."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    train = read_classification(train_file or bench.folder / "train.tsv", bench.text_key, "label")
    options = dict(bench.tfidf)
    strength = options.pop("C", 1.0)
    vec = TfidfVectorizer(**options)
    clf = LogisticRegression(max_iter=2000, C=strength).fit(vec.fit_transform([e.text for e in train]),
                                                            [e.label for e in train])
    return list(clf.predict(vec.transform([e.text for e in dev])))


def tfidf_baseline(bench: Bench, train_file: Path | None = None) -> float:
    dev = read_dev(bench)
    pred = tfidf_predictions(bench, dev, train_file)
    return sum(p == e.label for p, e in zip(pred, dev, strict=True)) / len(dev)


def overrides_for(bench: Bench, workdir: Path, extra: list[str], weighted_mix: bool = False) -> list[str]:
    corpus = workdir / "corpus" / f"{bench.name}_train_text.jsonl"
    write_task_text(bench, corpus)
    if weighted_mix and bench.weights:
        files = {"task": [corpus], **bench.sources}
        mix = [{"name": name, "inputs": [str(p) for p in files[name]], "weight": weight}
               for name, weight in bench.weights.items()]
        data = f"data.sources={json.dumps(mix, ensure_ascii=False)}"
    else:
        data = f"data.inputs={json.dumps([str(p) for p in [corpus, *bench.general]], ensure_ascii=False)}"
    return [f"workdir={workdir}", data, *bench.data,
            *[o.format(**bench.pretrain) for o in PRETRAIN], f"tracking.experiment=bench-finetune-{bench.name}",
            *extra]


def pretrain(cfg: Any, workdir: Path) -> None:
    started = time.time()
    reused = []
    for stage in ("prep", "tokenizer", "shard", "pretrain"):
        summary = run_stage(cfg, stage)
        if summary is None:  # complete already for this config: its recorded summary stands
            reused.append(stage)
            summary = json.loads((workdir / stage / "_COMPLETE.json").read_text())["summary"]
        emit(figure=f"{stage}_summary", **{k: v for k, v in summary.items() if not isinstance(v, dict | list)})
    emit(figure="data_and_pretrain_wall_s", value=round(time.time() - started, 1), reused_stages=reused)


def finetune(bench: Bench, overrides: list[str], task_set: dict[str, Any], seeds: int, arms: str,
             train: Path | None = None, name: str | None = None) -> dict:
    """Both arms (or one) over `seeds` seeds through the finetune stage; the comparison it wrote.

    `train` and `name`: another labelled train file (a sample of the task's), under another task name."""
    name = name or bench.name
    task = {**bench.task(train, name), **task_set}
    arm_keys = {"both": ["finetune.vs_scratch=true"], "pretrained": [], "scratch": ["finetune.from_scratch=true"]}
    cfg = load_config(None, [*overrides, f"finetune.tasks=[{json.dumps(task, ensure_ascii=False)}]",
                             f"finetune.seeds={seeds}", *arm_keys[arms]])
    started = time.time()
    run_stage(cfg, "finetune", force=True)
    spec = cfg.finetune.tasks[0]
    result = (json.loads((Path(cfg.workdir) / "finetune" / f"{name}-comparison.json").read_text())
              if arms == "both" else {"runs": []})
    if arms != "both":
        for seed in seeds_of(cfg, spec):
            summary = json.loads((result_dir(cfg, spec, arms == "scratch", seed) / "metrics.json").read_text())
            result["runs"].append({"arm": arms, **summary["summary"]})
    result["seconds"] = round(time.time() - started, 1)
    result["task"] = {k: v for k, v in cfg.finetune.tasks[0].model_dump().items()
                      if k not in ("name", "kind", "train", "eval", "text_key", "eval_text_key", "label_key")}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="sst2,shop", help=f"comma-separated, of {sorted(BENCHES)}")
    parser.add_argument("--root", type=Path, default=Path("runs/bench-finetune"), help="a workdir per task under it")
    parser.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds per arm (1337, 1338, ...)")
    parser.add_argument("--task-set", action="append", default=[], metavar="KEY=VALUE",
                        help="set a task key (lr, pooling, ...) for a sweep; the benchmark itself uses none")
    parser.add_argument("--tfidf-only", action="store_true", help="only the TF-IDF baselines (seconds)")
    parser.add_argument("--pretrain-only", action="store_true", help="stop after pretraining")
    parser.add_argument("--fresh", action="store_true", help="delete the task's workdir first")
    parser.add_argument("--weighted-mix", action="store_true",
                        help="pretrain on the task's weighted sources (the reviews: 0.6 reviews, 0.25 modern Chinese, "
                             "0.15 novels) instead of one source")
    parser.add_argument("--arms", choices=("both", "pretrained", "scratch"), default="both",
                        help="both (the benchmark); one arm alone, e.g. the pretrained one after a change to "
                             "pretraining (the scratch arm does not depend on it)")
    parser.add_argument("--labelled", type=int, metavar="ROWS",
                        help="fine-tune on ROWS labelled train rows drawn at random (pretraining still reads every "
                             "train text, unlabelled): how the gain grows when labels are few")
    parser.add_argument("overrides", nargs="*", metavar="KEY.PATH=VALUE", help="config overrides (model, train, ...)")
    args = parser.parse_args()
    task_set = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.task_set)}
    for name in args.tasks.split(","):
        bench = BENCHES[name]
        workdir = args.root / name
        if args.fresh and not args.tfidf_only and workdir.exists():
            shutil.rmtree(workdir)
        train, task_name = None, name
        if args.labelled is not None:  # fewer labels; pretraining below still reads every train text, unlabelled
            train = write_labelled_sample(bench, args.labelled, workdir / "labelled" / f"train-{args.labelled}.tsv")
            task_name = f"{name}-{args.labelled}"
        tfidf = tfidf_baseline(bench, train)
        emit(figure=f"{task_name}_dev_accuracy_tfidf_logreg", value=round(tfidf, 4),
             reference=bench.reference if train is None else f"fitted on the same {args.labelled} rows")
        if args.tfidf_only:
            continue
        overrides = overrides_for(bench, workdir, args.overrides, args.weighted_mix)
        pretrain(load_config(None, overrides), workdir)
        if args.pretrain_only:
            continue
        result = finetune(bench, overrides, task_set, args.seeds, args.arms, train, task_name)
        for run in result["runs"]:
            emit(figure=f"{task_name}_dev_accuracy", arm=run["arm"], seed=run["seed"],
                 value=round(run["eval_accuracy"], 4), planned_steps=run["planned_steps"], steps=run["steps"])
        if args.arms != "both":
            continue
        emit(figure=f"{task_name}_pretrained_vs_scratch", pretrained=round(result["pretrained_mean"], 4),
             scratch=round(result["scratch_mean"], 4), gain_points=round(result["gain"], 2),
             gain_min_points=round(result["gain_min"], 2), gain_max_points=round(result["gain_max"], 2),
             seeds=args.seeds, seconds=result["seconds"], target="pretrained >= scratch + 2 points on every seed")
        emit(figure=f"{task_name}_pretrained_minus_tfidf_points",
             value=round(100 * (result["pretrained_mean"] - tfidf), 1))
        emit(figure=f"{task_name}_task_settings", **result["task"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
