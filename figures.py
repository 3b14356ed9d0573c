"""The pictures papers in this field show, beyond the tables (PROTOCOL section 10).

- ``training_curves_figure``: a run's loss terms and validation accuracy per epoch.
- ``sweep_curves_figure``: robustness curves, one panel per sweep and one curve per run.
- ``confusion_matrix_figure``: a heatmap of one run's confusion matrix, class names on both axes.
- ``adversarial_example_figure``: one record of a split (test by default), clean and under
  L-inf PGD, for several runs side by side (same record, same eps), with the data it plots
  written as JSON next to it.

harness.py draws a run's curves.png; evaluate.py robustness_<split>.png and
confusion_<split>.png for each run it evaluates, and the sweep figures and
adversarial_example.png/.json in the folder of ``python evaluate.py compare``; selection.py
the validation curves of the coefficient study.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np
import torch

import attacks
from config import SWEEPS
from cpsc2018 import CLASSES, FS, LEAD_NAMES, LEADS
from ECG_Dataset import get_dataloaders
from metrics import SWEEP_METRICS
from plumbing.distributed import choose_device
from plumbing.safe_writes import atomic_path, write_text_atomic

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402 (after the backend is chosen)
from matplotlib.ticker import MaxNLocator  # noqa: E402

# 0.03 is in the paper's L-inf list and large enough to see next to the clean trace
# (3 % of each lead's peak); the perturbation panel shows it at any eps.
EXAMPLE_EPS = 0.03
EXAMPLE_LEADS = ("II", "V1")  # a limb lead and a precordial lead
STRIP_SECONDS = 10  # a standard ECG strip: longer records are plotted over their first 10 s
# Model inputs are each lead divided by its peak |mV| (ECG_Dataset.scale_leads); PGD clips to [-1, 1].
INPUT_UNIT = "scaled: mV / lead's peak |mV|"
JSON_DECIMALS = 6  # float32 carries about 7 significant digits; rounding keeps the JSON small


class ExampleUnavailable(Exception):
    """The runs cannot share one adversarial example; the message says why."""


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
    """Training loss terms (epoch means) and validation accuracy per epoch: a run's curves.png."""
    epochs = [h["epoch"] for h in history]
    loss_keys = dict.fromkeys(k for h in history for k in h if k.startswith("loss"))  # terms may start late
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for key in loss_keys:
        ax_loss.plot(epochs, [h.get(key, float("nan")) for h in history], marker="o", label=key)
    ax_loss.set(xlabel="epoch", ylabel="training loss (epoch mean)", yscale="symlog")
    ax_loss.legend()
    ax_acc.plot(epochs, [h["val_accuracy"] for h in history], marker="o", label="validation")
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


def _shared_input(configs: dict[str, dict]) -> dict:
    """The data settings every run was evaluated with; ExampleUnavailable if they differ."""
    keys = ("data_dir", "max_length", "random_pad")
    settings = {run: {key: config[key] for key in keys} for run, config in configs.items()}
    first, *others = settings.values()
    different = [run for run, setting in settings.items() if setting != first]
    if different:
        raise ExampleUnavailable(f"the runs differ in {', '.join(keys)} ({different[0]}: "
                                 f"{settings[different[0]]}, {next(iter(settings))}: {first})")
    return first


@torch.no_grad()
def _predict(model: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The predicted classes, on the CPU."""
    return model(x, mask).argmax(dim=1).cpu()


def choose_record(models: dict[str, torch.nn.Module], loader,
                  device: torch.device = torch.device("cpu")) -> tuple[int, str]:
    """(index in the split, why it was chosen): the first record every model classifies
    correctly; else the first the first model does; else the first record."""
    first_model = next(iter(models))
    fallback, seen = None, 0
    for x, y, mask in loader:
        x, mask = x.to(device), mask.to(device)
        correct = torch.stack([_predict(model, x, mask) == y for model in models.values()])
        shared = torch.nonzero(correct.all(dim=0)).flatten()
        if len(shared):
            return seen + int(shared[0]), "correctly classified by every run"
        own = torch.nonzero(correct[0]).flatten()
        if fallback is None and len(own):
            fallback = seen + int(own[0])
        seen += len(y)
    if fallback is not None:
        return fallback, f"no record is correctly classified by every run: the first correct for {first_model}"
    return 0, f"no record is correctly classified by {first_model}: the first record"


def adversarial_example_figure(runs: dict[str, tuple[torch.nn.Module, dict]], path: Path,
                               eps: float = EXAMPLE_EPS, split: str = "test",
                               leads: Sequence[str] = EXAMPLE_LEADS) -> dict:
    """One record of ``split``, clean and under L-inf PGD at ``eps``, one column per run.

    ``runs``: {run name: (model, its config)}, as evaluate.load_model returns them; the runs
    must share their data settings. The record is chosen by ``choose_record`` (the first run
    stands in for CE). Each run is attacked as its pgd_linf sweep does: attacks.pgd_attack
    with the run's sweep_steps and sweep_restarts, a generator seeded with the run's seed,
    on CUDA when available (choose_device("auto")).
    Rows: each lead in ``leads`` (clean and adversarial overlaid), then the perturbation.
    Only the signal is plotted (the mask's span, its first STRIP_SECONDS); the JSON written
    next to ``path`` holds the full padded arrays of those leads and the mask. Returns that
    JSON's content.
    """
    configs = {run: config for run, (_, config) in runs.items()}
    device = choose_device("auto")
    models = {run: model.to(device).eval() for run, (model, _) in runs.items()}
    data = _shared_input(configs)
    first_config = next(iter(configs.values()))
    loader = get_dataloaders(data["data_dir"], eval_batch_size=first_config["eval_batch_size"],
                             max_length=data["max_length"], random_pad=data["random_pad"],
                             splits=(split,))[split]
    index, selection = choose_record(models, loader, device)
    x, y, mask = (t.unsqueeze(0) for t in loader.dataset[index])
    x_device, y_device, mask_device = (t.to(device) for t in (x, y, mask))
    channels = [LEADS.index(LEAD_NAMES.index(lead)) for lead in leads]
    signal = mask[0, 0].nonzero().flatten()
    length = len(signal)
    shown = min(length, STRIP_SECONDS * FS)
    span = slice(int(signal[0]), int(signal[0]) + shown)
    seconds = np.arange(shown) / FS

    def rounded(t: torch.Tensor) -> list:
        return np.round(t.numpy().astype(np.float64), JSON_DECIMALS).tolist()

    name, true_class = loader.dataset.names[index], CLASSES[int(y)]
    content = {"record": name, "split": split, "true_class": true_class, "selection": selection,
               "eps": eps, "norm": "inf", "fs": FS, "unit": INPUT_UNIT, "leads": list(leads),
               "lead_channels": channels, "mask": mask[0, 0].int().tolist(),
               "clean": rounded(x[0, channels]), "runs": {}}
    fig, axes = plt.subplots(len(leads) + 1, len(runs), figsize=(5.5 * len(runs), 2.4 * (len(leads) + 1)),
                             squeeze=False, sharex=True)
    for column, (run, model) in enumerate(models.items()):
        config = configs[run]
        generator = torch.Generator(device=device).manual_seed(config["seed"])
        x_adv = attacks.pgd_attack(model, x_device, y_device, mask_device, eps, "inf",
                                   steps=config["sweep_steps"], restarts=config["sweep_restarts"],
                                   generator=generator)
        before, after = (CLASSES[int(_predict(model, inputs, mask_device))] for inputs in (x_device, x_adv))
        x_adv = x_adv.cpu()
        content["runs"][run] = {"steps": config["sweep_steps"], "restarts": config["sweep_restarts"],
                                "seed": config["seed"], "predicted_clean": before,
                                "predicted_adversarial": after, "adversarial": rounded(x_adv[0, channels])}
        # pgd_attack leaves a record the model gets wrong unattacked, as the sweeps count it.
        outcome = ("misclassified clean: not attacked" if before != true_class
                   else "unchanged" if before == after else "fooled")
        axes[0, column].set_title(f"{run} (PGD {config['sweep_steps']} steps, {config['sweep_restarts']} "
                                  f"start{'s' * (config['sweep_restarts'] > 1)})\n"
                                  f"predicted: {before} clean, {after} under attack\n({outcome})", fontsize=9)
        for row, (lead, channel) in enumerate(zip(leads, channels)):
            ax = axes[row, column]
            ax.plot(seconds, x[0, channel, span], color="black", linewidth=0.7, label="clean")
            ax.plot(seconds, x_adv[0, channel, span], color="tab:red", linewidth=0.7, alpha=0.7,
                    label=f"PGD, eps {eps:g}")
            ax.set_ylabel(f"lead {lead}\n({INPUT_UNIT})", fontsize=8)
            ax.legend(fontsize=7, loc="upper right")
        ax = axes[-1, column]
        for lead, channel in zip(leads, channels):
            ax.plot(seconds, (x_adv - x)[0, channel, span], linewidth=0.6, label=f"lead {lead}")
        for bound in (-eps, eps):
            ax.axhline(bound, color="grey", linestyle="--", linewidth=0.8)
        ax.set_ylabel(f"perturbation\n({INPUT_UNIT})", fontsize=8)
        ax.set_xlabel("time (s)")
        ax.legend(fontsize=7, loc="upper right", title=f"dashed: +/- eps {eps:g}", title_fontsize=7)
    strip = f"first {STRIP_SECONDS} s of {length / FS:.1f} s" if shown < length else f"{length / FS:.1f} s"
    fig.suptitle(f"Record {name} (true class {true_class}, {split} split, {strip}): "
                 f"L-inf PGD at eps {eps:g}; {selection}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    write_text_atomic(Path(path).with_suffix(".json"), json.dumps(content))
    return content

