"""Clean metrics and robustness evaluation of trained models (PROTOCOL sections 6 and 7).

    python evaluate.py result/CE                     # clean metrics + the run's sweeps, test split
    python evaluate.py result/CE --split val --sweeps ""
    python evaluate.py result/NSR/model.pt --sweeps pgd_linf --sweep_max_batches 2
    python evaluate.py result/NSR --sweeps pgd_linf,autoattack,square --sweep_max_records 90
    python evaluate.py compare result/CE result/NSR  # the paper's tables and figures

The metrics themselves (confusion matrix, accuracy, F1, AUC) are in metrics.py.
"""
from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import figures
from config import (GRADIENT_SWEEPS, LEVEL_LISTS, SWEEPS, check_device, check_levels, check_sweep_settings,
                    noise_levels, parse_sweeps, value_type)
from cpsc2018 import CLASSES, DataError
from ECG_CNN import build_model, check_length
from ECG_Dataset import BucketBatchSampler, crop_collate, get_dataloaders
from metrics import (NUM_CLASSES, class_balanced_accuracy, classification_scores, confusion_matrix,
                     SWEEP_METRICS, mean_f1, ratio, robustness_auc, scores_table, to_markdown)
from plumbing.distributed import (all_reduce, distributed, init_distributed, is_main_process, on_main_process,
                                  process_device, rank, shutdown_distributed, world_size)
from plumbing.flags import ConfigError, OneLineParser, folder
from plumbing.safe_writes import FolderInUseError, lock_folder, read_json, write_json, write_text_atomic


MASKING_GAP = 0.02  # ensemble accuracy this far below PGD's (2 points) flags gradient masking
ACCURACY_SLACK = 1e-9  # accuracies read back from JSON: float noise is no difference


class EvaluationError(Exception):
    """A run, checkpoint or evaluation setting that cannot be used; the message names it."""


# --- predictions -------------------------------------------------------------------------

@torch.no_grad()
def predict(model: torch.nn.Module, loader, device: torch.device, max_batches: int = 0,
            desc: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(true labels, predicted labels) over a loader, the model in eval mode."""
    was_training = model.training
    model.eval()
    truths, predictions = [], []
    total = min(len(loader), max_batches) if max_batches else len(loader)
    for index, (x, y, mask) in enumerate(tqdm(loader, total=total, desc=desc, leave=False,
                                              disable=desc is None)):
        if max_batches and index >= max_batches:
            break
        logits = model(x.to(device, non_blocking=True), mask.to(device, non_blocking=True))
        truths.append(y)
        predictions.append(logits.argmax(dim=1).cpu())
    model.train(was_training)
    if not truths:  # an empty share of a sharded evaluation
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return torch.cat(truths).numpy(), torch.cat(predictions).numpy()


def shard_loader(loader, rank: int, world_size: int, max_batches: int = 0):
    """One process's share of an evaluation loader, for evaluating with several processes.

    The records that ``loader`` yields in its first ``max_batches`` batches (all when 0) are
    dealt out in turn (the i-th to rank i mod world_size) and batched as ``loader`` batches
    (by length when bucketed), so the shares partition exactly the records one process
    evaluates and the sum of their confusion matrices is its confusion matrix.
    """
    batches = list(loader.batch_sampler)[:max_batches or None]
    return loader_over(loader, np.concatenate(batches)[rank::world_size].tolist() if batches else [])


def loader_over(loader, indices: list[int]):
    """A loader like ``loader`` (same dataset, batching and workers) over ``indices`` only."""


    if isinstance(loader.batch_sampler, BucketBatchSampler):
        batching: dict = dict(batch_sampler=BucketBatchSampler(
            indices, loader.dataset.lengths, loader.batch_sampler.batch_size, chunk_batches=None,
            shuffle=False), collate_fn=crop_collate)
    else:
        batching = dict(batch_size=loader.batch_size, sampler=indices)
    return DataLoader(loader.dataset, **batching, num_workers=loader.num_workers,
                      pin_memory=loader.pin_memory)


# --- robustness sweeps (PROTOCOL sections 6 and 7) --------------------------------------------

def balanced_records(labels, max_records: int) -> list[int]:
    """At most ``max_records`` record indices, class-balanced and deterministic (no RNG).

    The classes take turns in class order, each giving its next record in split order,
    until ``max_records`` are taken (a class that runs out drops out of the turns); the
    indices come back sorted. 0 means every record.
    """
    labels = np.asarray(labels)
    if not max_records or max_records >= len(labels):
        return list(range(len(labels)))
    members = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    turns = [m[i] for i in range(max(map(len, members))) for m in members if i < len(m)]
    return sorted(int(i) for i in turns[:max_records])


def sweep_levels(sweep: str, levels: str = "paper") -> tuple[list[float], list[float]]:
    """(the levels as given to the noise, the levels on the curve's axis), clean first, from
    the level list ``levels`` (config.LEVEL_LISTS)."""
    chosen = noise_levels(sweep, levels)
    if SWEEPS[sweep].snr_db:
        return [float("inf"), *chosen], [0.0, *(10 ** (-snr / 20) for snr in chosen)]
    return [0.0, *chosen], [0.0, *chosen]


def robustness_sweep(model: torch.nn.Module, loader, sweep: str, device: torch.device,
                     steps: int = 100, restarts: int = 2, max_batches: int = 0,
                     seed: int = 0, sharded: bool = False, levels: str = "paper") -> dict:
    """Class-balanced accuracy, mean F1, per-class sensitivity and the confusion matrix at
    every level of one sweep (the level list ``levels``), and the AUC of accuracy and of F1.

    A record misclassified on the clean input keeps its clean prediction at every level, as
    in the original evaluation: noise never counts a wrong record right (the attacks leave
    such records unperturbed anyway, PROTOCOL section 6).

    ``sharded``: under torchrun, ``loader`` is this process's share (``shard_loader``); the
    counts are summed over the processes and rank r draws its noise from seed + r.
    """

    started = time.perf_counter()
    was_training = model.training
    model.eval()
    noise, axis = sweep_levels(sweep, levels)
    generator = torch.Generator(device=device).manual_seed(seed + (rank() if sharded else 0))
    total = min(len(loader), max_batches) if max_batches else len(loader)
    matrices = np.zeros((len(noise), NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    with tqdm(total=total * len(noise), desc=sweep, leave=False, mininterval=1.0,
              disable=not is_main_process()) as bar:
        for index, (x, y, mask) in enumerate(loader):
            if index >= total:
                break
            x, y, mask = x.to(device), y.to(device), mask.to(device)
            with torch.no_grad():
                clean = model(x, mask).argmax(dim=1)
            for i, level in enumerate(noise):
                predicted = clean
                if i:
                    x_noisy = SWEEPS[sweep].perturb(model, x, y, mask, level, steps, restarts, generator)
                    with torch.no_grad():
                        predicted = torch.where(clean == y, model(x_noisy, mask).argmax(dim=1), clean)
                matrices[i] += confusion_matrix(y.cpu().numpy(), predicted.cpu().numpy())
                bar.update()
    model.train(was_training)
    if sharded:
        matrices = all_reduce(torch.from_numpy(matrices)).numpy()
    accuracy = [class_balanced_accuracy(cm) for cm in matrices]
    f1 = [mean_f1(cm) for cm in matrices]
    return {"sweep": sweep, "axis": SWEEPS[sweep].axis, "level_list": levels,
            "levels": [None if np.isinf(v) else v for v in noise], "axis_levels": axis,
            "accuracy": accuracy, "mean_f1": f1,
            "sensitivity": [ratio(np.diag(cm), cm.sum(axis=1)).tolist() for cm in matrices],
            "confusion_matrix": matrices.tolist(),
            "auc": robustness_auc(axis, accuracy), "auc_f1": robustness_auc(axis, f1),
            "n": int(matrices[0].sum()),
            "settings": {"steps": steps, "restarts": restarts, "max_batches": max_batches,
                         "seed": seed},
            "seconds": round(time.perf_counter() - started, 3)}


def sweep_rows(run: str, result: dict) -> list[dict]:
    """Long-format CSV rows of one sweep: one row per level."""
    rows = []
    for level, axis, acc, f1, sens in zip(result["levels"], result["axis_levels"], result["accuracy"],
                                          result["mean_f1"], result["sensitivity"]):
        rows.append({"run": run, "sweep": result["sweep"], "level_list": result["level_list"], "level": level,
                     "axis_level": axis, "accuracy": acc, "mean_f1": f1,
                     **{f"sensitivity_{c}": s for c, s in zip(CLASSES, sens)}})
    return rows


# --- gradient-masking check -------------------------------------------------------------

def _accuracy_by_level(result: dict) -> dict[float, float]:
    """{level: accuracy} of one sweep, the clean level left out."""
    return dict(zip(result["levels"][1:], result["accuracy"][1:]))


def masking_check(sweeps: dict[str, dict], pgd: str = "pgd_linf", ensemble: str = "autoattack"
                  ) -> dict | None:
    """Does PGD overstate one run's robustness? None unless the run has both sweeps.

    ``sweeps`` is a run's robustness results ({sweep name: ``robustness_sweep`` result}).
    For each level both sweeps share: the accuracy under PGD, under the ensemble, the gap
    (PGD minus ensemble) and, when the run has a Square sweep, Square's accuracy next to
    the strongest gradient attack's (the lowest accuracy among GRADIENT_SWEEPS it has). The
    run is flagged when the gap exceeds MASKING_GAP at some level, or when Square, which
    uses no gradients, ends below the gradient attacks at some level: both say that the
    gradients mislead the gradient attacks (gradient masking). Sweeps run on other records
    than PGD's (a different --sweep_max_records) are not compared.

    Returns {"rows": [{"eps", "pgd", "ensemble", "gap", "square", "gradient"}], "flagged",
    "verdict"} with the verdict in plain words; "square" and "gradient" are None without Square.
    """
    if pgd not in sweeps or ensemble not in sweeps:
        return None
    reference = sweeps[pgd]

    def comparable(name: str) -> bool:
        other = sweeps[name]
        return other["n"] == reference["n"] and other.get("records") == reference.get("records")

    if not comparable(ensemble):
        return {"rows": [], "flagged": False,
                "verdict": f"Not compared: {pgd} ran on {reference['n']} records and {ensemble} on "
                           f"{sweeps[ensemble]['n']} (run both with the same --sweep_max_records)."}
    accuracy = {name: _accuracy_by_level(sweeps[name])
                for name in dict.fromkeys((pgd, ensemble, "square", *GRADIENT_SWEEPS))
                if name in sweeps and comparable(name)}
    gradient_sweeps = [name for name in GRADIENT_SWEEPS if name in accuracy]
    rows = []
    for level in (lv for lv in accuracy[pgd] if lv in accuracy[ensemble]):
        square = accuracy.get("square", {}).get(level)
        rows.append({"eps": level, "pgd": accuracy[pgd][level], "ensemble": accuracy[ensemble][level],
                     "gap": accuracy[pgd][level] - accuracy[ensemble][level], "square": square,
                     "gradient": None if square is None else
                     min(accuracy[g][level] for g in gradient_sweeps if level in accuracy[g])})

    reasons = []
    overstated = [row for row in rows if row["gap"] > MASKING_GAP + ACCURACY_SLACK]
    if overstated:
        worst = max(overstated, key=lambda row: row["gap"])
        reasons.append(f"PGD overstates this model's robustness by {100 * worst['gap']:.1f} points at "
                       f"eps={worst['eps']:g} (accuracy {worst['pgd']:.3f} under PGD, "
                       f"{worst['ensemble']:.3f} under the ensemble); the ensemble is more than "
                       f"{100 * MASKING_GAP:g} points below PGD at eps="
                       + ", ".join(f"{row['eps']:g}" for row in overstated) + ".")
    square_wins = [row for row in rows if row["square"] is not None
                   and row["square"] < row["gradient"] - ACCURACY_SLACK]
    if square_wins:
        reasons.append("Square, which uses no gradients, does better than the gradient attacks at eps="
                       + ", ".join(f"{row['eps']:g} ({row['square']:.3f} against {row['gradient']:.3f})"
                                   for row in square_wins)
                       + ": the gradients mislead the gradient attacks.")
    verdict = " ".join(reasons) or (
        f"No sign of gradient masking: the ensemble is within {100 * MASKING_GAP:g} points of PGD at "
        "every level" + (" and Square never does better than the gradient attacks."
                         if "square" in accuracy else "."))
    return {"rows": rows, "flagged": bool(reasons), "verdict": verdict}


def masking_check_markdown(checks: dict[str, dict]) -> str:
    """The checks of several runs ({run: ``masking_check`` result}) as one Markdown table
    (class-balanced accuracy; gap in points) followed by each run's verdict."""
    def cell(value):
        return "" if value is None else f"{value:.3f}"

    lines = ["| run | eps | PGD | ensemble | gap (points) | Square | best gradient attack |",
             "|---|---|---|---|---|---|---|"]
    for run, check in checks.items():
        lines += [f"| {run} | {row['eps']:g} | {row['pgd']:.3f} | {row['ensemble']:.3f} | "
                  f"{100 * row['gap']:.1f} | {cell(row['square'])} | {cell(row['gradient'])} |"
                  for row in check["rows"]]
    lines.append("")
    lines += [f"- **{run}**: {'FLAGGED. ' if check['flagged'] else ''}{check['verdict']}"
              for run, check in checks.items()]
    return "\n".join(lines)


# --- runs --------------------------------------------------------------------------------

# The settings of a run that its evaluation reads (a run saved without "levels" swept the paper's).
RUN_SETTINGS = ("run_name", "device", "data_dir", "max_length", "random_pad", "batch_size", "eval_batch_size",
                "bucket", "seed", "sweeps", "sweep_steps", "sweep_restarts", "sweep_max_batches")
# The least value of each whole-number setting that a training saves (config.validate_config).
SAVED_MINIMUM = {"batch_size": 1, "eval_batch_size": 1, "max_length": 1, "random_pad": 0, "seed": 0,
                 "sweep_steps": 0, "sweep_restarts": 1, "sweep_max_batches": 0}
TYPE_NAMES = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}


def checkpoint_file(run: str | Path) -> Path:
    """The checkpoint a run folder stands for (its model.pt), or ``run`` itself when it is a file."""
    return Path(run) / "model.pt" if Path(run).is_dir() else Path(run)


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict]:
    """The model of a run folder (its model.pt) or of a checkpoint file, with its settings."""

    path = checkpoint_file(path)
    if not path.is_file():
        raise EvaluationError(f"{path}: no such checkpoint (train the run first)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = build_model(state["model_name"])
        model.load_state_dict(state["model"])
        config = state["config"]
    except Exception as error:  # truncated, foreign or mismatched file: one clear line
        # load_state_dict's message is a header line, then one line per mismatch: the first says which
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise EvaluationError(f"{path}: not a checkpoint of this project "
                              f"({type(error).__name__}: {' '.join(lines[:2])})") from None
    if not isinstance(config, dict):
        raise EvaluationError(f"{path}: not a checkpoint of this project (its config is not a dict)")
    missing = [key for key in RUN_SETTINGS if key not in config]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise EvaluationError(f"{path}: not a checkpoint of this project (its config lacks "
                              f"{', '.join(missing[:3])}{more})")
    check_saved_settings(path, config)
    return model.to(device), config


def wrong_setting_type(key: str, value, whole_numbers: tuple[str, ...] = ()) -> str | None:
    """What is wrong with a saved ``value`` of the setting ``key`` ("<value>, not <type>") when it
    is not of its type (config.value_type, with the method's ``whole_numbers``; a whole number is a
    number too); None when it is."""
    kind = value_type(key, whole_numbers)
    fits = isinstance(value, (int, float) if kind is float else kind) and (kind is bool) == isinstance(value, bool)
    return None if fits else f"{value!r}, not {TYPE_NAMES[kind]}"


def check_saved_settings(path: Path, config: dict) -> None:
    """Refuse settings in a checkpoint's config that no training of this project saves (a damaged
    or altered file), naming the file and the setting, before the evaluation fails on them."""
    saved = {**{key: config[key] for key in RUN_SETTINGS}, "levels": config.get("levels", "paper")}
    for key, value in saved.items():
        if wrong := wrong_setting_type(key, value):
            raise EvaluationError(f"{path}: its saved {key} is {wrong}")
        if key in SAVED_MINIMUM and value < SAVED_MINIMUM[key]:
            raise EvaluationError(f"{path}: its saved {key} is {value}, below the least a training saves "
                                  f"({SAVED_MINIMUM[key]})")
    try:
        check_length(saved["max_length"] + saved["random_pad"])
        parse_sweeps(saved["sweeps"])
        check_levels(saved["levels"])
    except (ValueError, ConfigError) as error:
        raise EvaluationError(f"{path}: its saved settings cannot be evaluated ({error})") from None


def results_folder(checkpoint: Path) -> Path:
    """Where the evaluation of ``checkpoint`` goes: a run's model.pt into its run folder; any other
    checkpoint into a folder of its own beside it, named after it without its suffix
    (checkpoints/epoch_010.pt: checkpoints/epoch_010/), so that evaluations of several
    checkpoints never overwrite each other."""
    if checkpoint.name == "model.pt":
        return checkpoint.parent
    if not checkpoint.suffix:
        raise EvaluationError(f"{checkpoint}: a checkpoint file without a suffix: its results would go into a "
                              "folder of the same name (the file's name without its suffix); rename it to end in .pt")
    out_dir = checkpoint.with_suffix("")
    if out_dir.exists() and not out_dir.is_dir():
        raise EvaluationError(f"{out_dir}: a file, in the way of the folder that the results of {checkpoint.name} "
                              "go into: move it away")
    return out_dir


def evaluate_clean(model: torch.nn.Module, loader, device: torch.device, max_batches: int = 0,
                   sharded: bool = False) -> dict:
    """Clean metrics over a loader; ``sharded`` as in ``robustness_sweep`` (counts summed over
    the processes)."""

    counts = confusion_matrix(*predict(model, loader, device, max_batches,
                                       desc="clean" if is_main_process() else None))
    if sharded:
        counts = all_reduce(torch.from_numpy(counts)).numpy()
    return classification_scores(counts)


def evaluate_run(run_dir: Path, model: torch.nn.Module, cfg: SimpleNamespace, split: str = "test",
                 max_batches: int = 0, checkpoint: Path | None = None) -> dict:
    """Clean metrics of ``model`` on ``split`` (run_dir/eval_<split>.json and .md), then the
    sweeps named by cfg.sweeps (run_dir/robustness_<split>.json, .csv and .png). The results
    name ``checkpoint``, the file the model came from (default: run_dir/model.pt).

    Under torchrun every process calls this: each evaluates its share of the records
    (``shard_loader``), the confusion matrices are summed, and rank 0 writes and prints.
    """

    device = process_device(cfg.device)
    model = model.to(device)
    loader = get_dataloaders(cfg.data_dir, cfg.batch_size, cfg.eval_batch_size, cfg.max_length,
                             cfg.random_pad, splits=(split,), bucket=cfg.bucket)[split]
    sharded, main = distributed(), is_main_process()

    def share(limit: int):
        return shard_loader(loader, rank(), world_size(), limit) if sharded else loader

    scores = evaluate_clean(model, share(max_batches), device, max_batches, sharded)
    result = {"run": str(run_dir), "split": split, "checkpoint": str(checkpoint or Path(run_dir) / "model.pt"),
              "settings": vars(cfg), "clean": scores}
    table = scores_table(scores)
    if main:
        write_json(result, Path(run_dir) / f"eval_{split}.json")
        write_text_atomic(Path(run_dir) / f"eval_{split}.md",
                          f"# {cfg.run_name}: clean metrics on the {split} split ({scores['n']} records)\n\n{table}\n")
        print(f"\n{cfg.run_name}: clean metrics on the {split} split ({scores['n']} records)\n{table}")
        figures.confusion_matrix_figure(scores["confusion_matrix"], Path(run_dir) / f"confusion_{split}.png",
                                        f"{cfg.run_name}: {split} split, clean ({scores['n']} records)")

    sweeps = parse_sweeps(cfg.sweeps)
    if sweeps:

        # The attacks may run on a fixed class-balanced subset (--sweep_max_records); the
        # noises are cheap and always see every record.
        max_records = getattr(cfg, "sweep_max_records", 0)
        subset = balanced_records(loader.dataset.labels, max_records)
        attack_loader = loader_over(loader, subset) if max_records else loader

        def sweep_loader(chosen):
            return shard_loader(chosen, rank(), world_size(), cfg.sweep_max_batches) if sharded else chosen

        curves = {}
        for name in tqdm(sweeps, desc="robustness sweeps", disable=not main):
            attacked = SWEEPS[name].attacks_model
            curves[name] = robustness_sweep(model, sweep_loader(attack_loader if attacked else loader),
                                            name, device, cfg.sweep_steps, cfg.sweep_restarts,
                                            cfg.sweep_max_batches, cfg.seed, sharded, cfg.levels)
            if attacked and max_records:
                curves[name]["settings"]["max_records"] = max_records
                curves[name]["records"] = [loader.dataset.names[i] for i in subset]
        result["robustness"] = curves
        if not main:
            return result
        write_json({"run": str(run_dir), "split": split, "settings": vars(cfg), "levels": cfg.levels,
                    "level_values": {name: list(noise_levels(name, cfg.levels)) for name in curves},
                    "sweeps": curves},
                   Path(run_dir) / f"robustness_{split}.json")
        write_text_atomic(Path(run_dir) / f"robustness_{split}.csv", pd.DataFrame(
            [row for c in curves.values() for row in sweep_rows(cfg.run_name, c)]).to_csv(index=False))
        figures.sweep_curves_figure({cfg.run_name: curves}, Path(run_dir) / f"robustness_{split}.png",
                                    f"{cfg.run_name}: {split} split")
        for name, curve in curves.items():
            print(f"{name} ({cfg.levels} levels): AUC {curve['auc']:.3f}, AUC of F1 {curve['auc_f1']:.3f}; "
                  "accuracy " + ", ".join(f"{a:.3f}" for a in curve["accuracy"]) +
                  "; mean F1 " + ", ".join(f"{f:.3f}" for f in curve["mean_f1"]))
    return result


def read_result(path: Path, key: str) -> dict:
    """The entry ``key`` of a result file's JSON object, checked to be an object (a dict) too."""
    if not path.is_file():
        raise EvaluationError(f"{path}: not found (evaluate that run first: python evaluate.py {path.parent})")
    content = read_json(path)
    if not isinstance(content, dict) or not isinstance(content.get(key), dict):
        raise EvaluationError(f"{path}: not valid JSON with a '{key}' object: not a result file of this project")
    return content[key]


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _are_numbers(values, count: int) -> bool:
    return isinstance(values, list) and len(values) == count and all(map(is_number, values))


def first_wrong(content: dict, checks: dict) -> str | None:
    """What is wrong with ``content`` ("'key' is value") for the first key of ``checks`` ({key: test
    of its value}) whose value fails its test; None when none does."""
    wrong = next((key for key, test in checks.items() if not test(content.get(key))), None)
    return None if wrong is None else f"'{wrong}' is {content.get(wrong)!r}"


CLEAN_CHECKS = {"f1": lambda v: _are_numbers(v, NUM_CLASSES), "n": lambda v: type(v) is int,
                **{key: is_number for key in ("accuracy", "mean_f1", "Faf", "Fblock", "Fpc", "Fst")}}
SWEEP_SETTING_KEYS = ("steps", "restarts", "max_batches", "seed")


def read_clean(path: Path) -> dict:
    """The clean metrics of an eval_<split>.json, checked to hold every number the tables show."""
    clean = read_result(path, "clean")
    wrong = first_wrong(clean, CLEAN_CHECKS)
    if wrong:
        raise EvaluationError(f"{path}: malformed clean metrics ({wrong}): evaluate the run again")
    return clean


def _sweep_checks(levels: int) -> dict:
    """What a sweep result of ``levels`` levels holds (robustness_sweep), as _first_wrong's checks."""
    return {"level_list": lambda v: isinstance(v, str), "axis_levels": lambda v: _are_numbers(v, levels),
            "accuracy": lambda v: _are_numbers(v, levels), "mean_f1": lambda v: _are_numbers(v, levels),
            "auc": is_number, "auc_f1": is_number, "n": lambda v: type(v) is int,
            "settings": lambda v: isinstance(v, dict) and all(type(v.get(k)) is int for k in SWEEP_SETTING_KEYS)}


def read_sweeps(path: Path) -> dict[str, dict]:
    """The sweep results of a robustness_<split>.json ({sweep: robustness_sweep result}), each
    checked to hold what the tables, the report and the masking check read."""
    sweeps = read_result(path, "sweeps")
    for name, result in sweeps.items():
        if not isinstance(result, dict):
            wrong = "not an object"
        elif not isinstance(result.get("levels"), list) or len(result["levels"]) < 2:
            wrong = f"'levels' is {result.get('levels')!r}"
        else:
            wrong = first_wrong(result, _sweep_checks(len(result["levels"])))
        if wrong:
            raise EvaluationError(f"{path}: malformed '{name}' results ({wrong}): evaluate the run again")
    return sweeps


def _level_labels(sweep: str, levels: list) -> list[str]:
    """Column names of a sweep table: "clean" for the first (noise-free) level, then the levels;
    SNR levels carry "dB" (their 0 dB is the loudest noise, not clean)."""
    unit = " dB" if sweep in SWEEPS and SWEEPS[sweep].snr_db else ""
    return ["clean", *(f"{level:g}{unit}" for level in levels[1:])]


def sweep_table(curves: dict[str, dict], sweep: str, metric: str) -> pd.DataFrame:
    """One sweep's table of ``metric`` (a key of SWEEP_METRICS) over {run: its sweeps, as
    read_sweeps reads them}: rows runs, columns clean, each level, then the AUC labelled with the
    level list it was computed over. Runs swept over different level lists are refused: their
    AUCs are not comparable."""
    results = {name: runs[sweep] for name, runs in curves.items() if sweep in runs}
    lists = {name: r["level_list"] for name, r in results.items()}
    if len(set(lists.values())) > 1:
        raise EvaluationError(f"compare: '{sweep}' was swept over different level lists ("
                              + ", ".join(f"{name}: {lists[name]}" for name in lists)
                              + "): their AUCs cannot share a column; evaluate them with the same --levels")
    auc_key, _ = SWEEP_METRICS[metric]
    rows = {name: {**dict(zip(_level_labels(sweep, r["levels"]), r[metric], strict=True)),
                   f"AUC ({r['level_list']} levels)": r[auc_key]} for name, r in results.items()}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("run")


def compare_runs(run_dirs: list[str | Path], out_dir: str | Path, split: str = "test",
                 example_eps: float = figures.EXAMPLE_EPS) -> dict[str, str]:
    """The paper's tables and figures for several evaluated runs.

    Writes to out_dir: clean.md/.csv (per-class F1, mean F1, CPSC sub-scores, accuracy per
    run) and, for every sweep the runs share, <sweep>_accuracy and <sweep>_f1 .md/.csv (rows:
    runs; columns: clean, each level, AUC; ``sweep_table``) and .png (one curve per run);
    masking_check.md when a run has both the pgd_linf and the autoattack sweep
    (``masking_check``); adversarial_example.png and .json
    (``figures.adversarial_example_figure`` at ``example_eps``, 0: none) when the runs'
    checkpoints and data are at hand. Returns {table name: Markdown}.
    """

    names = [Path(r).name for r in run_dirs]
    if len(set(names)) != len(names):
        names = [str(r) for r in run_dirs]
    clean_rows, curves = [], {}
    for name, run in zip(names, run_dirs):
        path = Path(run) / f"eval_{split}.json"
        clean = read_clean(path)
        clean_rows.append({"run": name, **{f"F1 {c}": f for c, f in zip(CLASSES, clean["f1"])},
                           **{k: clean[k] for k in ("mean_f1", "Faf", "Fblock", "Fpc", "Fst", "accuracy")},
                           "n": clean["n"]})
        robustness = Path(run) / f"robustness_{split}.json"
        if robustness.is_file():
            curves[name] = read_sweeps(robustness)
        else:
            curves[name] = {}
            print(f"note: {run} has no {robustness.name} (no robustness sweeps run): it is left out of "
                  "the robustness tables", file=sys.stderr)
    tables = {"clean": pd.DataFrame(clean_rows).set_index("run")}
    sweep_plots = {}
    for sweep in dict.fromkeys(s for run in curves.values() for s in run):
        for metric, short in (("accuracy", "accuracy"), ("mean_f1", "f1")):
            tables[f"{sweep}_{short}"] = sweep_table(curves, sweep, metric)
            sweep_plots[f"{sweep}_{short}"] = (sweep, metric)
    # The runs are accepted: the folder is made, and what an earlier compare wrote there goes, so
    # that no file stays that this one would not write.
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise EvaluationError(f"--out {out_dir}: cannot create the output folder ({error.strerror})") from None
    earlier = [f"{sweep}_{short}.{ext}" for sweep in SWEEPS for short in ("accuracy", "f1")
               for ext in ("md", "csv", "png")]
    for name in ("clean.md", "clean.csv", "masking_check.md", "adversarial_example.png", "adversarial_example.json",
                 *earlier):
        (out_dir / name).unlink(missing_ok=True)
    markdown = {}
    for table_name, table in tables.items():
        write_text_atomic(out_dir / f"{table_name}.csv", table.to_csv(float_format="%.4f"))
        markdown[table_name] = to_markdown(table)
        write_text_atomic(out_dir / f"{table_name}.md", markdown[table_name] + "\n")
    for table_name, (sweep, metric) in sweep_plots.items():
        title = f"{sweep}, {split} split: {SWEEP_METRICS[metric][1]}"
        figures.sweep_curves_figure({name: {sweep: c[sweep]} for name, c in curves.items() if sweep in c},
                                    out_dir / f"{table_name}.png", title, metric)
    checks = {name: check for name, results in curves.items() if (check := masking_check(results))}
    if checks:
        markdown["masking_check"] = masking_check_markdown(checks)
        write_text_atomic(out_dir / "masking_check.md", markdown["masking_check"] + "\n")
    if example_eps:
        try:
            figures.adversarial_example_figure({name: load_model(run) for name, run in zip(names, run_dirs)},
                                               out_dir / "adversarial_example.png", example_eps, split)
        except (figures.ExampleUnavailable, EvaluationError, DataError) as error:
            print(f"note: no adversarial example figure ({error})", file=sys.stderr)
    return markdown


def main(argv: list[str] | None = None) -> int:

    argv = sys.argv[1:] if argv is None else argv
    locks = contextlib.ExitStack()
    try:
        if argv[:1] == ["compare"]:
            parser = OneLineParser(prog="evaluate.py compare",
                                   description="Tables and figures for several evaluated runs.")
            parser.add_argument("runs", nargs="+", help="run folders (evaluated)")
            parser.add_flag("--split", default="test", choices=("test", "val"))
            parser.add_flag("--out", type=folder, default="result/compare", help="output folder")
            parser.add_flag("--example_eps", type=float, default=figures.EXAMPLE_EPS,
                            help="L-inf eps of the adversarial-example figure (0: no figure)")
            args = parser.parse_args(argv[1:])
            if not 0 <= args.example_eps < float("inf"):
                raise EvaluationError(f"--example_eps must be a finite number >= 0, got {args.example_eps}")
            for name, table in compare_runs(args.runs, args.out, args.split, args.example_eps).items():
                print(f"\n## {name}\n{table}")
            print(f"\ntables and figures written to {args.out}/")
            return 0
        parser = OneLineParser(description="Evaluate a trained run (PROTOCOL sections 6-7).")
        parser.add_argument("run", help="a run folder under result/ (its model.pt), or a checkpoint file "
                                        "(for example checkpoints/epoch_010.pt: results in checkpoints/epoch_010/)")
        parser.add_flag("--split", default="test", choices=("test", "val"))
        parser.add_flag("--data_dir", type=folder, help="override the run's data cache folder")
        parser.add_flag("--device", default="auto")
        parser.add_flag("--eval_max_batches", type=int, default=0,
                        help="clean evaluation: at most this many batches")
        parser.add_flag("--levels", help=f"the sweeps' level list: {', '.join(LEVEL_LISTS)} (default: the run's; "
                                         "the paper's lists are 'paper')")
        parser.add_flag("--sweeps", help=f"comma-separated, 'all' or '' (default: the run's); known: {', '.join(SWEEPS)}")
        parser.add_flag("--sweep_steps", type=int, help="PGD/IFGSM iterations (default: the run's, 100 in the paper)")
        parser.add_flag("--sweep_restarts", type=int, help="PGD random starts (the paper: 2)")
        parser.add_flag("--sweep_max_batches", type=int, help="sweeps: at most this many batches")
        parser.add_flag("--sweep_max_records", type=int, default=0,
                            help="attack sweeps: a fixed class-balanced subset of this many records "
                                 "(0: all; the records are listed in the results)")
        args = parser.parse_args(argv)
        checkpoint = checkpoint_file(args.run)
        model, config = load_model(checkpoint)
        cfg = SimpleNamespace(**config)
        cfg.levels = config.get("levels", "paper")  # a config.json naming no level list: the paper's
        for key in ("device", "data_dir", "sweeps", "levels", "sweep_steps", "sweep_restarts", "sweep_max_batches",
                    "sweep_max_records"):
            if getattr(args, key) is not None:
                setattr(cfg, key, getattr(args, key))
        for key in ("sweep_max_records", "eval_max_batches"):
            if getattr(args, key) < 0:
                raise EvaluationError(f"--{key} must be >= 0, got {getattr(args, key)}")
        check_sweep_settings(vars(cfg))
        check_device(cfg.device)
        out_dir = results_folder(checkpoint)
        # Under torchrun the processes share the records (evaluate_run); alone, this is the device.
        device = init_distributed(cfg.device)
        # One process per folder written (rank 0 locks it): refused while a training or evaluation holds it.
        on_main_process(lambda: locks.enter_context(lock_folder(out_dir, "run folder")))
        evaluate_run(out_dir, model.to(device), cfg, args.split, args.eval_max_batches, checkpoint)
    except (EvaluationError, DataError, ConfigError, FolderInUseError) as error:
        if is_main_process():
            print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a file that could not be written while running
        if is_main_process():
            print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        locks.close()
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
