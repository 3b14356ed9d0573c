"""The metrics of PROTOCOL section 7 on plain numpy arrays: confusion matrix, class-balanced
accuracy, per-class sensitivity, precision and F1, the CPSC2018 sub-scores, robustness AUC,
and Markdown tables of them."""
from __future__ import annotations

import numpy as np
import pandas as pd

from databases.cpsc2018 import CLASSES

NUM_CLASSES = len(CLASSES)

# What a sweep reports per level and how the tables name it: {result key: (its AUC's key, label)}.
SWEEP_METRICS = {"accuracy": ("auc", "class-balanced accuracy"), "mean_f1": ("auc_f1", "mean F1")}
# CPSC2018 sub-scores: groups of class indices (0-based) scored together.
SUBSCORE_GROUPS = {"Faf": (1,), "Fblock": (2, 3, 4), "Fpc": (5, 6), "Fst": (7, 8)}


def confusion_matrix(y_true, y_pred, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """N[i, j] = number of samples of true class i predicted as j."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes ** 2).reshape(
        num_classes, num_classes)


def ratio(numerator, denominator) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0."""
    numerator, denominator = np.asarray(numerator, float), np.asarray(denominator, float)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def class_balanced_accuracy(cm: np.ndarray) -> float:
    """Mean per-class recall over the classes present in the true labels."""
    rows = cm.sum(axis=1)
    present = rows > 0
    return float((np.diag(cm)[present] / rows[present]).mean()) if present.any() else 0.0


def f1_per_class(cm: np.ndarray) -> np.ndarray:
    """F1_i = 2 N_ii / (row sum_i + column sum_i); 0 for a class neither present nor predicted
    (scikit-learn's zero_division=0). A class present but never predicted gets 0 as well."""
    return ratio(2 * np.diag(cm), cm.sum(axis=1) + cm.sum(axis=0))


def mean_f1(cm: np.ndarray) -> float:
    """The mean of the 9 per-class F1 scores (the paper's F1)."""
    return float(f1_per_class(cm).mean())


def classification_scores(cm: np.ndarray) -> dict:
    """All clean metrics of PROTOCOL section 7 from a confusion matrix (rows true, columns predicted).

    Precision of class i is N_ii / (column sum i): of the records predicted as i, the share
    that is i (scikit-learn's precision_score, 0 for a class never predicted). The original
    code divides each row of N by its row sum first; with equal row sums (the balanced test
    split, 50 per class) both are the same number.
    """
    diag, rows, cols = np.diag(cm), cm.sum(axis=1), cm.sum(axis=0)
    f1 = f1_per_class(cm)
    scores = {
        "accuracy": class_balanced_accuracy(cm),
        "mean_f1": float(f1.mean()),
        "sensitivity": ratio(diag, rows).tolist(),
        "precision": ratio(diag, cols).tolist(),
        "f1": f1.tolist(),
        "n": int(cm.sum()),
        "confusion_matrix": cm.tolist(),
    }
    for name, group in SUBSCORE_GROUPS.items():
        group = list(group)
        scores[name] = float(ratio(2 * diag[group].sum(), rows[group].sum() + cols[group].sum()))
    return scores


def robustness_auc(levels, values) -> float:
    """Trapezoid area under a score (accuracy or mean F1) against the level, from 0 to the
    largest level, over that level.

    ``levels`` must start at 0 (the clean input) and increase.
    """
    levels, values = np.asarray(levels, float), np.asarray(values, float)
    if len(levels) < 2 or levels[0] != 0 or np.any(np.diff(levels) <= 0):
        raise ValueError("levels must start at 0 and increase")
    return float(np.trapezoid(values, levels) / levels[-1])


def to_markdown(table) -> str:
    """A DataFrame as a Markdown table, floats to 3 decimals (no optional dependency)."""
    header = [table.index.name or ""] + [str(c) for c in table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for index, *row in table.itertuples(name=None):  # itertuples keeps integer columns integer
        cells = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join([str(index), *cells]) + " |")
    return "\n".join(lines)


def scores_table(scores: dict) -> str:
    """The clean metrics as Markdown: one row per class, then the summary scores."""
    per_class = pd.DataFrame({k: scores[k] for k in ("sensitivity", "precision", "f1")},
                             index=pd.Index(CLASSES, name="class"))
    summary = pd.DataFrame([{k: scores[k] for k in ("accuracy", "mean_f1", "Faf", "Fblock", "Fpc", "Fst")}],
                           index=pd.Index([scores["n"]], name="records"))
    return to_markdown(per_class) + "\n\n" + to_markdown(summary)


def certified_accuracy(radius, correct, radii) -> list[float]:
    """Certified accuracy at each of ``radii`` (Cohen, Rosenfeld and Kolter 2019): the fraction of
    records that the smoothed classifier gets right (``correct``) with a certified L2 ``radius`` of
    at least r; an abstention counts as wrong. 0 at every radius when there are no records."""
    radius, correct = np.asarray(radius, float), np.asarray(correct, bool)
    return [float(np.mean(correct & (radius >= r))) if len(radius) else 0.0 for r in radii]


def certified_curve(radius, correct, points: int = 200) -> tuple[np.ndarray, list[float]]:
    """(radii, certified accuracy at each): ``points`` radii from 0 to 5 % past the largest
    certified radius, or past 2 when none is larger."""
    radii = np.linspace(0.0, 1.05 * max([2.0, *np.asarray(radius, float)]), points)
    return radii, certified_accuracy(radius, correct, radii)
