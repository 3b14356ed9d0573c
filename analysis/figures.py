"""The pictures papers in this field show, beyond the tables (PROTOCOL section 10). This module
only draws: what it plots comes computed from the callers.

- ``training_curves_figure``: a run's loss terms and validation accuracy per epoch.
- ``sweep_curves_figure``: robustness curves, one panel per sweep and one curve per run.
- ``confusion_matrix_figure``: a heatmap of one run's confusion matrix, class names on both axes.
- ``adversarial_example_figure``: one record of a split, clean and under L-inf PGD, for
  several runs side by side (same record, same eps), as evaluate.adversarial_example computes it.
- ``certified_accuracy_figure``: certified accuracy against the L2 radius (randomized smoothing),
  one curve per run or sigma, as certify.py computes it.

harness.py draws a run's curves.png; evaluate.py robustness_<split>.png and
confusion_<split>.png for each run it evaluates, and adversarial_example.png in the folder of
``python evaluate.py compare``; analysis/compare.py the sweep figures there; analysis/selection.py
the validation curves of the coefficient study; certify.py a run's certify_<sigma>.png and
analysis/report.py the report's certified-accuracy figure.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

from analysis.metrics import SWEEP_METRICS
from config import SWEEPS
from databases.cpsc2018 import CLASSES
from plumbing.safe_writes import atomic_path

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402 (after the backend is chosen)
from matplotlib.ticker import MaxNLocator  # noqa: E402

STRIP_SECONDS = 10  # a standard ECG strip: longer records are plotted over their first 10 s


def save_figure(fig: plt.Figure, path: Path) -> None:
    """Write ``fig`` to ``path`` as the results are written (safe_writes.atomic_path: a link at
    ``path`` is replaced, never written through; a failed write leaves the previous figure) and
    close it. The format is the suffix's: the temporary file's name ends in .tmp."""
    try:
        with atomic_path(path) as temporary:
            fig.savefig(temporary, format=Path(path).suffix.lstrip("."), dpi=100)
    finally:
        plt.close(fig)


def training_curves_figure(history: list[dict], path: Path, title: str) -> None:
    """Training loss terms (epoch means) and validation accuracy per epoch: a run's curves.png.
    A guarded run's (fast_adv) guard accuracy per epoch joins the accuracy panel, so a
    catastrophic-overfitting stop shows where it happened."""
    epochs = [h["epoch"] for h in history]
    loss_keys = dict.fromkeys(k for h in history for k in h if k.startswith("loss"))  # terms may start late
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for key in loss_keys:
        ax_loss.plot(epochs, [h.get(key, float("nan")) for h in history], marker="o", label=key)
    ax_loss.set(xlabel="epoch", ylabel="training loss (epoch mean)", yscale="symlog")
    ax_loss.legend()
    ax_acc.plot(epochs, [h["val_accuracy"] for h in history], marker="o", label="validation")
    if any(h.get("guard_accuracy") is not None for h in history):
        guard = [h.get("guard_accuracy") for h in history]
        ax_acc.plot(epochs, [float("nan") if a is None else a for a in guard], marker="s",
                    label="guard: PGD accuracy, validation batch")
    ax_acc.set(xlabel="epoch", ylabel="class-balanced accuracy", ylim=(0, 1))
    ax_acc.legend()
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def sweep_curves_figure(curves: dict[str, dict[str, dict]], path: Path, title: str,
                        metric: str = "accuracy") -> None:
    """One panel per sweep, one curve per run: curves[run][sweep] = evaluate.robustness_sweep(...);
    ``metric``: a key of SWEEP_METRICS."""
    auc_key, label = SWEEP_METRICS[metric]
    sweeps = list(dict.fromkeys(s for run in curves.values() for s in run))
    columns = min(3, len(sweeps))
    rows = -(-len(sweeps) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.8 * rows), squeeze=False)
    for ax, sweep in zip(axes.flat, sweeps):
        for run, results in curves.items():
            if sweep in results:
                r = results[sweep]
                ax.plot(r["axis_levels"], r[metric], marker="o",
                        label=f"{run} (AUC {r[auc_key]:.3f}, {r['level_list']} levels)")
        ax.set(title=sweep, xlabel=SWEEPS[sweep].axis, ylabel=label, ylim=(0, 1))
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(sweeps):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def confusion_matrix_figure(cm: np.ndarray, path: Path, title: str) -> None:
    """A heatmap of ``cm`` (rows: true class, columns: predicted class), counts written in the cells."""
    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    image = ax.imshow(cm, cmap="Blues", vmin=0)
    fig.colorbar(image, ax=ax, label="records", ticks=MaxNLocator(integer=True))
    ticks = np.arange(len(CLASSES))
    ax.set_xticks(ticks, CLASSES, rotation=45, ha="right")
    ax.set_yticks(ticks, CLASSES)
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    dark = cm.max() / 2 if cm.max() else 1
    for (row, column), count in np.ndenumerate(cm):
        ax.text(column, row, str(count), ha="center", va="center", fontsize=8,
                color="white" if count > dark else "black")
    fig.tight_layout()
    save_figure(fig, path)


def adversarial_example_figure(example: dict, path: Path) -> None:
    """One record, clean and under L-inf PGD, one column per run, drawn from ``example``
    (evaluate.adversarial_example: the plotted leads of the record, clean and each run's
    adversarial, its mask and the runs' predictions).

    Rows: each lead (clean and adversarial overlaid), then the perturbation. Only the signal is
    plotted (the mask's span, its first STRIP_SECONDS).
    """
    leads, eps, unit, fs = example["leads"], example["eps"], example["unit"], example["fs"]
    clean, runs = example["clean"], example["runs"]
    signal = np.flatnonzero(example["mask"])
    length = len(signal)
    shown = min(length, STRIP_SECONDS * fs)
    span = slice(int(signal[0]), int(signal[0]) + shown)
    seconds = np.arange(shown) / fs
    fig, axes = plt.subplots(len(leads) + 1, len(runs), figsize=(5.5 * len(runs), 2.4 * (len(leads) + 1)),
                             squeeze=False, sharex=True)
    for column, (run, result) in enumerate(runs.items()):
        before, after, adversarial = result["predicted_clean"], result["predicted_adversarial"], result["adversarial"]
        # pgd_attack leaves a record the model gets wrong unattacked, as the sweeps count it.
        outcome = ("misclassified clean: not attacked" if before != example["true_class"]
                   else "unchanged" if before == after else "fooled")
        axes[0, column].set_title(f"{run} (PGD {result['steps']} steps, {result['restarts']} "
                                  f"start{'s' * (result['restarts'] > 1)})\n"
                                  f"predicted: {before} clean, {after} under attack\n({outcome})", fontsize=9)
        for row, lead in enumerate(leads):
            ax = axes[row, column]
            ax.plot(seconds, clean[row, span], color="black", linewidth=0.7, label="clean")
            ax.plot(seconds, adversarial[row, span], color="tab:red", linewidth=0.7, alpha=0.7,
                    label=f"PGD, eps {eps:g}")
            ax.set_ylabel(f"lead {lead}\n({unit})", fontsize=8)
            ax.legend(fontsize=7, loc="upper right")
        ax = axes[-1, column]
        for row, lead in enumerate(leads):
            ax.plot(seconds, (adversarial - clean)[row, span], linewidth=0.6, label=f"lead {lead}")
        for bound in (-eps, eps):
            ax.axhline(bound, color="grey", linestyle="--", linewidth=0.8)
        ax.set_ylabel(f"perturbation\n({unit})", fontsize=8)
        ax.set_xlabel("time (s)")
        ax.legend(fontsize=7, loc="upper right", title=f"dashed: +/- eps {eps:g}", title_fontsize=7)
    strip = f"first {STRIP_SECONDS} s of {length / fs:.1f} s" if shown < length else f"{length / fs:.1f} s"
    fig.suptitle(f"Record {example['record']} (true class {example['true_class']}, {example['split']} split, "
                 f"{strip}): L-inf PGD at eps {eps:g}; {example['selection']}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def certified_accuracy_figure(panels: dict[str, dict[str, tuple]], path: Path, title: str) -> None:
    """Certified accuracy against the L2 radius: one panel per entry of ``panels`` ({panel title:
    {curve label: (radii, certified accuracy at each)}}, analysis.metrics.certified_curve)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, (panel, curves) in zip(axes.flat, panels.items()):
        for label, (radii, accuracy) in curves.items():
            ax.plot(radii, accuracy, label=label)
        ax.set(title=panel, xlabel="L2 radius (model input units, signal only)", ylabel="certified accuracy",
               ylim=(0, 1), xlim=(0, None))
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
