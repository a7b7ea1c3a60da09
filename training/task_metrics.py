"""Classification scores: accuracy, macro-F1 and the confusion matrix."""

from __future__ import annotations


def confusion_matrix(gold: list[int], pred: list[int], n_classes: int) -> list[list[int]]:
    """matrix[g][p] counts examples of class g predicted as p."""
    matrix = [[0] * n_classes for _ in range(n_classes)]
    for g, p in zip(gold, pred, strict=True):
        matrix[g][p] += 1
    return matrix


def accuracy(gold: list[int], pred: list[int]) -> float:
    return sum(g == p for g, p in zip(gold, pred, strict=True)) / max(len(gold), 1)


def macro_f1(gold: list[int], pred: list[int], n_classes: int) -> float:
    """Unweighted mean of per-class F1; a class never gold nor predicted is left out."""
    matrix = confusion_matrix(gold, pred, n_classes)
    scores = []
    for c in range(n_classes):
        tp = matrix[c][c]
        gold_c = sum(matrix[c])
        pred_c = sum(row[c] for row in matrix)
        if gold_c == 0 and pred_c == 0:
            continue
        scores.append(2 * tp / (gold_c + pred_c))
    return sum(scores) / max(len(scores), 1)


def arm_comparison(pretrained: dict[int, float], scratch: dict[int, float], metric: str = "eval_accuracy"
                   ) -> dict[str, float]:
    """Pretrained vs from-scratch scores, paired by seed: the means, and the gain with its spread over seeds.

    The gain is positive when pretraining helped: accuracy points (100 x the difference) for eval_accuracy, the
    drop in loss for eval_loss."""
    import statistics

    seeds = sorted(pretrained.keys() & scratch.keys())
    if not seeds:
        raise ValueError("no seed was run in both arms")
    if metric == "eval_loss":
        gains = [scratch[s] - pretrained[s] for s in seeds]
    else:
        gains = [100 * (pretrained[s] - scratch[s]) for s in seeds]
    return {
        "seeds": float(len(seeds)),
        "pretrained_mean": statistics.fmean(pretrained[s] for s in seeds),
        "scratch_mean": statistics.fmean(scratch[s] for s in seeds),
        "gain": statistics.fmean(gains),
        "gain_min": min(gains),
        "gain_max": max(gains),
        "gain_stdev": statistics.stdev(gains) if len(gains) > 1 else 0.0,
    }


def comparison_line(task: str, metric: str, result: dict[str, float]) -> str:
    """One line a user reads to judge the pretrained model."""
    n = int(result["seeds"])
    mean_of = f"mean of {n} seed{'s' if n > 1 else ''}"
    if metric == "eval_loss":
        figures = f"eval loss {result['pretrained_mean']:.4f} pretrained, {result['scratch_mean']:.4f} from scratch"
        gain = f"pretraining lowers it by {result['gain']:+.4f}"
        spread = f", {result['gain_min']:+.4f} to {result['gain_max']:+.4f} over {n} seeds"
    else:
        figures = (f"pretrained {100 * result['pretrained_mean']:.2f}%, from scratch "
                   f"{100 * result['scratch_mean']:.2f}% ({metric})")
        gain = f"pretraining gains {result['gain']:+.1f} points"
        spread = f", {result['gain_min']:+.1f} to {result['gain_max']:+.1f} over {n} seeds"
    return f"{task}: {figures}, {mean_of}: {gain}{spread if n > 1 else ''}"
