"""Where the fine-tuned models go wrong on a task's dev split, and how much room is left.

    .venv/bin/python bench/finetune_errors.py [--tasks shop] [--root runs/bench-finetune] [--show 20]

Reads the exports that the last bench/finetune.py (or sweep) run left in <root>/<task>/finetune
(its first seed, both arms), scores the dev split with each and with TF-IDF + logistic regression, and prints:
- each model's dev error rate;
- the rows all three get wrong: their label is most likely wrong or the text says both things, so
  this rate is a rough floor that no model of this kind gets under;
- the rows only one arm gets wrong, which is what pretraining can still win or lose.
Writes every row that a model gets wrong to <root>/<task>/dev_errors.tsv (label, each model's
answer, text) and prints the first `--show` rows that all three get wrong, to read.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.finetune import BENCHES, emit, read_dev, tfidf_predictions  # noqa: E402
from pipeline.commands.predict import predict  # noqa: E402
from pipeline.core.workdir import Workdir  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="shop", help=f"comma-separated, of {sorted(BENCHES)}")
    parser.add_argument("--root", type=Path, default=Path("runs/bench-finetune"))
    parser.add_argument("--show", type=int, default=20, help="rows all three models get wrong, printed to read")
    args = parser.parse_args()
    for name in args.tasks.split(","):
        bench = BENCHES[name]
        dev = read_dev(bench)
        gold = [str(e.label) for e in dev]
        texts = [e.text for e in dev]
        results = Workdir(args.root / name)
        exports = {arm: results.task(name, scratch=arm == "scratch") / "export" for arm in ("pretrained", "scratch")}
        for export in exports.values():
            if not export.is_dir():
                print(f"error: {export} not found: run bench/finetune.py --tasks {name} --root {args.root} first",
                      file=sys.stderr)
                return 2
        answers = {"tfidf": [str(p) for p in tfidf_predictions(bench, dev)]}
        answers.update({arm: [str(r["label"]) for r in predict(export, texts)] for arm, export in exports.items()})
        wrong = {model: {i for i, (a, g) in enumerate(zip(labels, gold, strict=True)) if a != g}
                 for model, labels in answers.items()}
        for model, rows in wrong.items():
            emit(figure=f"{name}_dev_error_rate", model=model, value=round(len(rows) / len(dev), 4))
        every = wrong["tfidf"] & wrong["pretrained"] & wrong["scratch"]
        emit(figure=f"{name}_dev_wrong_by_all_three", rows=len(every), rate=round(len(every) / len(dev), 4))
        emit(figure=f"{name}_dev_wrong_by_one_arm_only", pretrained=len(wrong["pretrained"] - wrong["scratch"]),
             scratch=len(wrong["scratch"] - wrong["pretrained"]), rows=len(dev))
        emit(figure=f"{name}_dev_best_of_two_arms_accuracy",
             value=round(1 - len(wrong["pretrained"] & wrong["scratch"]) / len(dev), 4))
        out = args.root / name / "dev_errors.tsv"
        with out.open("w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, delimiter="\t")
            writer.writerow(["row", "label", "tfidf", "pretrained", "scratch", "text"])
            for i in sorted(set().union(*wrong.values())):
                writer.writerow([i, gold[i], answers["tfidf"][i], answers["pretrained"][i], answers["scratch"][i],
                                 texts[i]])
        print(f"every dev row some model gets wrong: {out}")
        for i in sorted(every)[:args.show]:
            print(f"  row {i} label {gold[i]}: {texts[i][:120]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
