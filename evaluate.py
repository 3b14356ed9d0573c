"""Clean metrics and robustness evaluation of trained models (PROTOCOL sections 6 and 7).

    python evaluate.py result/CE                     # clean metrics + the run's sweeps, test split
    python evaluate.py result/CE --split val --sweeps ""
    python evaluate.py result/NSR/model.pt --sweeps pgd_linf --sweep_max_batches 2
    python evaluate.py result/NSR --sweeps pgd_linf,autoattack,square --sweep_max_records 90
    python evaluate.py compare result/CE result/NSR  # the paper's tables and figures

The metrics themselves (confusion matrix, accuracy, F1, AUC) are in analysis/metrics.py; the
result files' readers and the comparison of several runs in analysis/compare.py.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import attacks
from perturbations import autoattack
from analysis import figures
from analysis.compare import EXAMPLE_STEM, EvaluationError, compare_runs, run_names
from analysis.metrics import (NUM_CLASSES, class_balanced_accuracy, classification_scores, confusion_matrix,
                              mean_f1, ratio, robustness_auc, scores_table)
from config import (LEAST, LEVEL_LISTS, MAX_SEED, SWEEPS, check_device, check_levels, check_sweep_settings,
                    noise_levels, parse_sweeps, value_type)
from databases.cpsc2018 import CLASSES, FS, LEAD_NAMES, LEADS, DataError
from ECG_CNN import build_model, check_length, from_pretrained
from ECG_Dataset import BucketBatchSampler, crop_collate, get_dataloaders
from plumbing.distributed import (all_reduce, choose_device, distributed, init_distributed, is_main_process,
                                  on_main_process, process_device, rank, shutdown_distributed, world_size)
from plumbing import pretrained
from plumbing.flags import ConfigError, OneLineParser, folder
from plumbing.safe_writes import FolderInUseError, lock_folder, write_json, write_text_atomic


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


def _level_scores(matrices: np.ndarray, axis: list[float]) -> dict:
    """Class-balanced accuracy, mean F1, per-class sensitivity, confusion matrices and the AUCs of
    one curve's per-level confusion matrices."""
    accuracy = [class_balanced_accuracy(cm) for cm in matrices]
    f1 = [mean_f1(cm) for cm in matrices]
    return {"accuracy": accuracy, "mean_f1": f1,
            "sensitivity": [ratio(np.diag(cm), cm.sum(axis=1)).tolist() for cm in matrices],
            "confusion_matrix": matrices.tolist(),
            "auc": robustness_auc(axis, accuracy), "auc_f1": robustness_auc(axis, f1)}


def robustness_sweep(model: torch.nn.Module, loader, sweep: str, device: torch.device,
                     steps: int = 100, restarts: int = 2, max_batches: int = 0,
                     seed: int = 0, sharded: bool = False, levels: str = "paper",
                     per_level: bool = False) -> dict:
    """Class-balanced accuracy, mean F1, per-class sensitivity and the confusion matrix at
    every level of one sweep (the level list ``levels``), and the AUC of accuracy and of F1.

    A record misclassified on the clean input keeps its clean prediction at every level, as
    in the original evaluation: noise never counts a wrong record right (the attacks leave
    such records unperturbed anyway, PROTOCOL section 6).

    Attacks (``Sweep.attacks_model``) report the envelope: a record broken at a level counts as
    broken, with the prediction that broke it, at every larger level (its adversarial input lies
    in every larger ball), so robust accuracy never rises with the budget. Each level attacks
    only the records unbroken at the levels below, unless ``per_level``: then every level
    attacks every record, as the paper does, and its own numbers are kept beside the envelope
    ("per_level"). Noise sweeps are not attacks (a noise draw bounds nothing at other levels):
    their numbers are per level, as in the paper. Ensemble sweeps (``Sweep.ensemble``) also
    count the records each attack broke first per level ("broken_by") and run AutoAttack's
    checks on every clean batch ("checks", "warnings" in plain words).

    ``sharded``: under torchrun, ``loader`` is this process's share (``shard_loader``); the
    counts are summed over the processes and rank r draws its noise from seed + r.
    """

    started = time.perf_counter()
    was_training = model.training
    model.eval()
    noise, axis = sweep_levels(sweep, levels)
    chosen = SWEEPS[sweep]
    envelope = chosen.attacks_model
    generator = torch.Generator(device=device).manual_seed(seed + (rank() if sharded else 0))
    total = min(len(loader), max_batches) if max_batches else len(loader)
    shape = (len(noise), NUM_CLASSES, NUM_CLASSES)
    matrices, own_matrices = np.zeros(shape, dtype=np.int64), np.zeros(shape, dtype=np.int64)
    attacked = np.zeros(len(noise), dtype=np.int64)  # records perturbed at each level
    attack_names = autoattack.ENSEMBLE_VERSIONS.get(chosen.ensemble, ())
    broken_by = np.zeros((len(noise), len(attack_names)), dtype=np.int64)
    checks: dict[str, int] = {}
    with tqdm(total=total * len(noise), desc=sweep, leave=False, mininterval=1.0,
              disable=not is_main_process()) as bar:
        for index, (x, y, mask) in enumerate(loader):
            if index >= total:
                break
            x, y, mask = x.to(device), y.to(device), mask.to(device)
            if chosen.ensemble:
                for key, count in autoattack.model_checks(model, x, y, mask).items():
                    checks[key] = checks.get(key, 0) + count
            with torch.no_grad():
                clean = model(x, mask).argmax(dim=1)
            kept = clean.clone()  # the envelope's prediction: the one that broke the record, else the latest
            for i, level in enumerate(noise):
                own = clean
                if i:
                    rows = (kept == y if envelope and not per_level else torch.ones_like(y, dtype=torch.bool)
                            ).nonzero().squeeze(1)
                    own = clean.clone()
                    if len(rows):
                        outcome = chosen.perturb(model, x[rows], y[rows], mask[rows], level, steps, restarts,
                                                 generator)
                        x_noisy, by = outcome if chosen.ensemble else (outcome, None)
                        with torch.no_grad():
                            own[rows] = torch.where(clean[rows] == y[rows],
                                                    model(x_noisy, mask[rows]).argmax(dim=1), clean[rows])
                        attacked[i] += len(rows)
                        if chosen.ensemble:  # each record counted once: at the level that first broke it
                            first = [b for b, unbroken in zip(by, (kept[rows] == y[rows]).tolist()) if unbroken]
                            for j, name in enumerate(attack_names):
                                broken_by[i, j] += first.count(name)
                    if envelope:
                        kept = torch.where(kept == y, own, kept)
                truth = y.cpu().numpy()
                own_matrices[i] += confusion_matrix(truth, own.cpu().numpy())
                matrices[i] += confusion_matrix(truth, (kept if envelope else own).cpu().numpy())
                bar.update()
    model.train(was_training)
    if sharded:
        matrices, own_matrices, attacked, broken_by = (
            all_reduce(torch.from_numpy(counts)).numpy() for counts in (matrices, own_matrices, attacked, broken_by))
        checks = {key: int(all_reduce(torch.tensor(count))) for key, count in checks.items()}
    result = {"sweep": sweep, "axis": chosen.axis, "level_list": levels,
              "levels": [None if np.isinf(v) else v for v in noise], "axis_levels": axis,
              "envelope": envelope, **_level_scores(matrices, axis), "n": int(matrices[0].sum()),
              "attacked": attacked.tolist(),
              "settings": {"steps": steps, "restarts": restarts, "max_batches": max_batches,
                           "seed": seed, "per_level": per_level}}
    if envelope and per_level:
        result["per_level"] = _level_scores(own_matrices, axis)
    if chosen.ensemble:
        result["ensemble_version"] = chosen.ensemble
        result["broken_by"] = {name: broken_by[:, j].tolist() for j, name in enumerate(attack_names)}
        result["checks"] = checks
        result["warnings"] = autoattack.check_warnings(checks, int(broken_by[:, attack_names.index("square")].sum()))
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result


def sweep_rows(run: str, result: dict) -> list[dict]:
    """Long-format CSV rows of one sweep: one row per level (an attack's envelope; its per-level
    accuracy and mean F1 beside it when the sweep attacked every record at every level)."""
    rows = []
    per_level = result.get("per_level")
    for i, (level, axis, acc, f1, sens) in enumerate(zip(result["levels"], result["axis_levels"], result["accuracy"],
                                                         result["mean_f1"], result["sensitivity"])):
        own = {"per_level_accuracy": per_level["accuracy"][i], "per_level_mean_f1": per_level["mean_f1"][i]} \
            if per_level else {}
        rows.append({"run": run, "sweep": result["sweep"], "level_list": result["level_list"], "level": level,
                     "axis_level": axis, "envelope": result.get("envelope", False), "accuracy": acc, "mean_f1": f1,
                     **own, **{f"sensitivity_{c}": s for c, s in zip(CLASSES, sens)}})
    return rows


# --- runs --------------------------------------------------------------------------------

# The settings of a run that its evaluation reads (a run saved without "levels" swept the paper's).
RUN_SETTINGS = ("run_name", "device", "data_dir", "max_length", "random_pad", "batch_size", "eval_batch_size",
                "bucket", "seed", "sweeps", "sweep_steps", "sweep_restarts", "sweep_max_batches")
# The least value of each whole-number setting that a training saves (config.validate_config).
TYPE_NAMES = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}


def checkpoint_file(run: str | Path) -> Path:
    """The checkpoint a run folder stands for (its model.pt), an exported model folder's weights
    (its model.safetensors, which no run folder holds), or ``run`` itself when it is a file."""
    run = Path(run)
    if not run.is_dir():
        return run
    return run / (pretrained.WEIGHTS_FILE if (run / pretrained.WEIGHTS_FILE).is_file() else "model.pt")


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict]:
    """The model of a run folder (its model.pt), of a checkpoint file or of an exported model
    folder (python export.py; its training settings), with its settings."""

    path = checkpoint_file(path)
    if path.name == pretrained.WEIGHTS_FILE:
        try:
            model = from_pretrained(path.parent)
        except pretrained.ModelFolderError as error:
            raise EvaluationError(str(error)) from None
        check_saved_settings(path.parent / pretrained.CONFIG_FILE, model.config["training"])
        return model.to(device), model.config["training"]
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
    """Refuse settings in a checkpoint's config (or an exported model's training settings) that no
    training of this project saves (a damaged or altered file), naming the file and the setting,
    before the evaluation fails on them."""
    missing = [key for key in RUN_SETTINGS if key not in config]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise EvaluationError(f"{path}: not a checkpoint of this project (its config lacks "
                              f"{', '.join(missing[:3])}{more})")
    saved = {**{key: config[key] for key in RUN_SETTINGS}, "levels": config.get("levels", "paper")}
    for key, value in saved.items():
        if wrong := wrong_setting_type(key, value):
            raise EvaluationError(f"{path}: its saved {key} is {wrong}")
        if key in LEAST and value < LEAST[key]:
            raise EvaluationError(f"{path}: its saved {key} is {value}, below the least a training saves "
                                  f"({LEAST[key]})")
        if key == "seed" and value > MAX_SEED:  # config.validate_config's bound (torch's seeds end at 2**64 - 1)
            raise EvaluationError(f"{path}: its saved seed is {value}, above the most a training saves ({MAX_SEED})")
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
                                            cfg.sweep_max_batches, cfg.seed, sharded, cfg.levels,
                                            getattr(cfg, "sweep_per_level", False))
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
                  f"accuracy{' (envelope)' if curve['envelope'] else ''} " +
                  ", ".join(f"{a:.3f}" for a in curve["accuracy"]) +
                  "; mean F1 " + ", ".join(f"{f:.3f}" for f in curve["mean_f1"]))
            for warning in curve.get("warnings", []):
                print(f"  warning ({name}): {warning}")
    return result


# --- the adversarial example of a comparison ----------------------------------------------

# 0.03 is in the paper's L-inf list and large enough to see next to the clean trace
# (3 % of each lead's peak); the perturbation panel shows it at any eps.
EXAMPLE_EPS = 0.03
EXAMPLE_LEADS = ("II", "V1")  # a limb lead and a precordial lead
# Model inputs are each lead divided by its peak |mV| (ECG_Dataset.scale_leads); PGD clips to [-1, 1].
INPUT_UNIT = "scaled: mV / lead's peak |mV|"
JSON_DECIMALS = 6  # float32 carries about 7 significant digits; rounding keeps the JSON small


class ExampleUnavailable(Exception):
    """The runs cannot share one adversarial example; the message says why."""


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


def adversarial_example(runs: dict[str, tuple[torch.nn.Module, dict]], eps: float = EXAMPLE_EPS,
                        split: str = "test", leads: Sequence[str] = EXAMPLE_LEADS) -> dict:
    """One record of ``split``, clean and under L-inf PGD at ``eps``, for each run: what
    figures.adversarial_example_figure draws and ``example_json`` writes.

    ``runs``: {run name: (model, its config)}, as ``load_model`` returns them; the runs must
    share their data settings. The record is chosen by ``choose_record`` (the first run stands
    in for CE). Each run is attacked as its pgd_linf sweep does: attacks.pgd_attack with the
    run's sweep_steps and sweep_restarts, a generator seeded with the run's seed, on CUDA when
    available (choose_device("auto")).
    Returns the record's name, class and the reason it was chosen, the settings, the full
    padded mask, "clean" (the ``leads``' channels of the model input, a float32 array of
    leads x samples) and, per run, its predictions and "adversarial" (the same channels of the
    attack's output).
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
    example = {"record": loader.dataset.names[index], "split": split, "true_class": CLASSES[int(y)],
               "selection": selection, "eps": eps, "norm": "inf", "fs": FS, "unit": INPUT_UNIT,
               "leads": list(leads), "lead_channels": channels, "mask": mask[0, 0].int().tolist(),
               "clean": x[0, channels].numpy(), "runs": {}}
    for run, model in models.items():
        config = configs[run]
        generator = torch.Generator(device=device).manual_seed(config["seed"])
        x_adv = attacks.pgd_attack(model, x_device, y_device, mask_device, eps, "inf",
                                   steps=config["sweep_steps"], restarts=config["sweep_restarts"],
                                   generator=generator)
        before, after = (CLASSES[int(_predict(model, inputs, mask_device))] for inputs in (x_device, x_adv))
        example["runs"][run] = {"steps": config["sweep_steps"], "restarts": config["sweep_restarts"],
                                "seed": config["seed"], "predicted_clean": before,
                                "predicted_adversarial": after, "adversarial": x_adv.cpu()[0, channels].numpy()}
    return example


def example_json(example: dict) -> str:
    """An ``adversarial_example`` as JSON, its arrays rounded to JSON_DECIMALS."""
    def rounded(array: np.ndarray) -> list:
        return np.round(array.astype(np.float64), JSON_DECIMALS).tolist()

    return json.dumps({**example, "clean": rounded(example["clean"]),
                       "runs": {run: {**result, "adversarial": rounded(result["adversarial"])}
                                for run, result in example["runs"].items()}})


def compare_with_example(run_dirs: list[str | Path], out_dir: str | Path, split: str = "test",
                         example_eps: float = EXAMPLE_EPS) -> dict[str, str]:
    """``python evaluate.py compare``: analysis.compare.compare_runs (the tables and figures of
    the runs' results), then, at ``example_eps`` (0: none) and when the runs' checkpoints and
    data are at hand (else a note), their ``adversarial_example`` in out_dir: the figure
    (figures.adversarial_example_figure) and its data (``example_json``) beside it. Returns
    compare_runs' {table name: Markdown}.
    """
    markdown = compare_runs(run_dirs, out_dir, split)
    if example_eps:
        try:
            example = adversarial_example({name: load_model(run) for name, run in zip(run_names(run_dirs), run_dirs)},
                                          example_eps, split)
        except (ExampleUnavailable, EvaluationError, DataError) as error:
            print(f"note: no adversarial example figure ({error})", file=sys.stderr)
        else:
            figure = Path(out_dir) / f"{EXAMPLE_STEM}.png"
            figures.adversarial_example_figure(example, figure)
            write_text_atomic(figure.with_suffix(".json"), example_json(example))
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
            parser.add_flag("--example_eps", type=float, default=EXAMPLE_EPS,
                            help="L-inf eps of the adversarial-example figure (0: no figure)")
            args = parser.parse_args(argv[1:])
            if not 0 <= args.example_eps < float("inf"):
                raise EvaluationError(f"--example_eps must be a finite number >= 0, got {args.example_eps}")
            for name, table in compare_with_example(args.runs, args.out, args.split, args.example_eps).items():
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
        parser.add_flag("--sweep_per_level", action="store_true",
                        help="attack sweeps: attack every record at every level, as the paper does, and keep "
                             "each level's own numbers beside the envelope (default: each level attacks only "
                             "the records unbroken at the levels below)")
        args = parser.parse_args(argv)
        checkpoint = checkpoint_file(args.run)
        model, config = load_model(checkpoint)
        cfg = SimpleNamespace(**config)
        cfg.levels = config.get("levels", "paper")  # a config.json naming no level list: the paper's
        for key in ("device", "data_dir", "sweeps", "levels", "sweep_steps", "sweep_restarts", "sweep_max_batches",
                    "sweep_max_records", "sweep_per_level"):
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
