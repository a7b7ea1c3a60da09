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
