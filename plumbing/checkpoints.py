"""Checkpoints: atomic save, safe load, the newest valid one, the RNG state, the resume check
(the settings, the data and the checkpoint's own form), Progress (where training stands: what a
checkpoint records besides the weights), and the two steps the training loop takes with them:
save_checkpoint and resume."""
from __future__ import annotations

import glob
import hashlib
import io
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np
import torch

from plumbing.distributed import barrier, gather_to_main, is_main_process, rank, unwrap, world_size
from plumbing.flags import ConfigError
from plumbing.safe_writes import atomic_path

if TYPE_CHECKING:  # the type of data_fingerprint's argument; plumbing imports no command
    from preprocess import Cache


def rng_state(loader_generator: torch.Generator) -> dict:
    """Every RNG the training draws from, in a form that loads with weights_only=True."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss],
            "torch": torch.get_rng_state(), "loader": loader_generator.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict, loader_generator: torch.Generator) -> None:
    loader_generator.set_state(state["loader"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj: dict, path: Path) -> None:
    """Write to a temporary file beside ``path``, then rename: a crash never leaves half a file,
    and a failed write (a full disk) raises OSError naming ``path``, which is left as it was."""
    buffer = io.BytesIO()  # torch reports a failed file write as an opaque RuntimeError; Python names it
    torch.save(obj, buffer)
    with atomic_path(path) as temporary:
        temporary.write_bytes(buffer.getbuffer())


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint without executing anything from the file."""
    return torch.load(path, map_location="cpu", weights_only=True)


CHECKPOINT_KEYS = ("model_name", "model", "optimizer", "epoch", "batch", "history", "running", "rng", "config")


def newest_checkpoint(run_dir: Path) -> tuple[Path, dict] | None:
    """(file, content) of the checkpoint furthest into training. Files that do not load, or
    lack a checkpoint's entries, are skipped with a warning (a foreign or truncated file); a
    checkpoint whose position is malformed is refused (ConfigError naming it)."""
    best = None
    for path in map(Path, sorted(glob.glob(str(run_dir / "checkpoints" / "*.pt")))):
        try:
            state = load_checkpoint(path)
            missing = set(CHECKPOINT_KEYS) - state.keys()
            if missing:
                raise KeyError(f"no {', '.join(sorted(missing))} entry")
        except Exception as error:  # a truncated or foreign file: never fatal, never silent
            warnings.warn(f"ignoring unreadable checkpoint {path}: {type(error).__name__}: {error}")
            continue
        for key in ("epoch", "batch"):
            if not _is_count(state[key]):
                raise ConfigError(f"--resume: {path}: its {key} is {state[key]!r}, not a whole number >= 0")
        if best is None or (state["epoch"], state["batch"]) > (best[1]["epoch"], best[1]["batch"]):
            best = path, state
    return best


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _shape(value) -> str:
    return str(list(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def checkpoint_problem(state: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> str | None:
    """What makes ``state`` (a checkpoint that loaded, of ``model``'s kind) unusable for ``model``
    and ``optimizer``, or None. Checked before anything is loaded: a wrong shape in the optimizer's state would
    otherwise crash the fused Adam step rather than raise."""
    for key, kind in (("config", dict), ("running", dict), ("history", list), ("rng", dict), ("model", dict),
                      ("optimizer", dict)):
        if not isinstance(state[key], kind):
            return f"its {key} is of type {type(state[key]).__name__}, not {kind.__name__}"
    if not all(isinstance(entry, dict) and {"epoch", "loss", "val_accuracy"} <= entry.keys()
               for entry in state["history"]):
        return "its history holds an entry that is not an epoch's record"
    if not all(isinstance(value, (int, float)) for value in state["running"].values()):
        return "its running sums are not all numbers"
    expected = model.state_dict()
    if state["model"].keys() != expected.keys():
        return f"its model weights are not a {state['model_name']}'s (other parameter names)"
    for key, value in state["model"].items():
        if not isinstance(value, torch.Tensor) or value.shape != expected[key].shape:
            return f"its model weight {key} is {_shape(value)}, the model's is {list(expected[key].shape)}"
    saved = state["optimizer"]
    groups = saved.get("param_groups")
    if not isinstance(groups, list) or not isinstance(saved.get("state"), dict) or not all(
            isinstance(group, dict) and isinstance(group.get("params"), list) for group in groups):
        return "its optimizer state is not an optimizer's"
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    ids = [i for group in groups for i in group["params"]]
    if [len(group["params"]) for group in groups] != [len(group["params"]) for group in optimizer.param_groups]:
        return "its optimizer state holds other parameter groups than the model's"
    by_id = dict(zip(ids, parameters))
    for key, values in saved["state"].items():
        if key not in by_id or not isinstance(values, dict):
            return f"its optimizer state names an unknown parameter {key!r}"
        for name, value in values.items():
            if not isinstance(value, torch.Tensor) or value.dim() and value.shape != by_id[key].shape:
                return (f"its optimizer's {name} of parameter {key} is {_shape(value)}, the parameter is "
                        f"{list(by_id[key].shape)}")
    return None


def data_fingerprint(cache: Cache) -> dict:
    """What a run trains on, to tell whether a cache is still the one a run started on: the
    numbers of records and samples, and digests of the record table (names, labels, offsets,
    lengths) and of the splits. Not where the records came from (meta.json's raw_dir): the same
    records preprocessed from a moved folder are the same data. The signal values are not
    read: a rebuilt cache with the same records, labels and lengths passes."""
    def digest(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    return {"records": len(cache.records), "samples": int(cache.records["length"].sum()),
            "records_sha256": digest(cache.records.to_csv()),
            "splits_sha256": digest("".join(f"{name}\n{split.to_csv(index=False)}"
                                            for name, split in sorted(cache.splits.items())))}


def data_difference(saved: dict | None, now: dict, data_dir: str) -> str | None:
    """How the data fingerprint ``now`` of ``data_dir`` differs from the one a run ``saved``, or None."""
    if saved == now:
        return None
    if not isinstance(saved, dict):
        return (f"its checkpoint does not record the data it was trained on (it predates data fingerprints), "
                f"so nothing shows that --data_dir {data_dir} still holds that data")
    if (saved.get("records"), saved.get("samples")) != (now["records"], now["samples"]):
        return (f"it was trained on {saved.get('records')} records ({saved.get('samples')} samples), "
                f"--data_dir {data_dir} now holds {now['records']} ({now['samples']})")
    changed = "record names, labels or lengths" if saved.get("records_sha256") != now["records_sha256"] else "splits"
    return f"it was trained on other {changed} than --data_dir {data_dir} now holds (as many records and samples)"


# The settings that change what is trained (besides the method's hyperparameters and
# --epochs, which a resume may raise): a resumed run must share them with its checkpoint.
RESUME_KEYS = ("data_dir", "model", "batch_size", "lr", "seed", "max_length", "random_pad", "bucket",
               "max_batches", "amp", "noise_sd")


def changed_settings(saved: dict, cfg: SimpleNamespace, keys) -> list[tuple[str, object, object]]:
    """(key, saved value, value in ``cfg``) for each of ``keys`` whose value differs; keys that
    ``saved`` (an older run's config) or ``cfg`` lacks are not compared."""
    changed = []
    for key in keys:
        if key not in saved or not hasattr(cfg, key):
            continue
        before, now = saved[key], getattr(cfg, key)
        same = Path(before).resolve() == Path(now).resolve() if key == "data_dir" else before == now
        if not same:
            changed.append((key, before, now))
    return changed


@dataclass
class Progress:
    """Where training stands: the next (epoch, batch) to run and what has been logged."""
    epoch: int = 0
    batch: int = 0
    history: list = field(default_factory=list)
    running: dict = field(default_factory=dict)  # sums for the epoch in progress

    def add(self, logged: dict[str, float], samples: int) -> None:
        for key, value in logged.items():
            self.running[key] = self.running.get(key, 0.0) + value * samples
        self.running["samples"] = self.running.get("samples", 0) + samples
        self.batch += 1


def resume(cfg: SimpleNamespace, run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
           generator: torch.Generator, hyperparameters: tuple[str, ...]) -> Progress:
    """Load the newest checkpoint of ``run_dir`` into ``model``, ``optimizer`` and the RNGs;
    refuse (ConfigError) a malformed one, one trained with other settings, on other data
    (cfg.data_fingerprint) or further than --epochs. A fresh Progress when there is none."""
    newest = newest_checkpoint(run_dir)
    if newest is None:
        if is_main_process():
            print(f"--resume: no checkpoint in {run_dir}; starting from scratch")
        return Progress()
    path, state = newest
    if state["model_name"] != cfg.model:
        raise ConfigError(f"--resume: the checkpoint {path} is a {state['model_name']}, not a {cfg.model}")
    problem = checkpoint_problem(state, model, optimizer)
    if problem:
        raise ConfigError(f"--resume: {path}: {problem}")
    saved = state["config"]
    changed = changed_settings(saved, cfg, (*RESUME_KEYS, *hyperparameters))
    if changed:
        key, before, now = changed[0]
        raise ConfigError(f"--resume: {run_dir} was trained with --{key} {before}, not {now}")
    difference = data_difference(saved.get("data_fingerprint"), cfg.data_fingerprint, cfg.data_dir)
    if difference:
        raise ConfigError(f"--resume: {run_dir}: {difference}; start it again with --overwrite, or under "
                          "another --run_name")
    started_for = saved.get("epochs")
    if cfg.epochs < state["epoch"] or _is_count(started_for) and cfg.epochs < started_for:
        raise ConfigError(f"--resume: {run_dir} is at epoch {state['epoch']} of --epochs {started_for}: "
                          f"--epochs {cfg.epochs} would shorten it (only --epochs may grow)")
    if started_for != cfg.epochs and is_main_process():
        print(f"--resume: training to epoch {cfg.epochs} (the run was started for {started_for})")
    # Each rank continues its own random streams; a checkpoint of another number of processes
    # gives rank 0 its stream and the others fresh ones.
    rng_per_rank = state.get("rng_per_rank") or [state["rng"]]
    try:  # what checkpoint_problem does not look into: the optimizer's settings, the RNG states
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if len(rng_per_rank) == world_size():
            set_rng_state(rng_per_rank[rank()], generator)
        elif rank() == 0:
            set_rng_state(state["rng"], generator)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as error:
        first_line = str(error).strip().split("\n")[0]
        raise ConfigError(f"--resume: {path}: does not load ({type(error).__name__}: {first_line})") from None
    if is_main_process():
        print(f"resuming {run_dir} at epoch {state['epoch']}, batch {state['batch']}")
    return Progress(state["epoch"], state["batch"], state["history"], state["running"])


def save_checkpoint(path: Path, cfg: SimpleNamespace, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    progress: Progress, generator: torch.Generator) -> None:
    """Every rank's RNG state goes to rank 0, which writes the checkpoint; the others wait."""
    rng = gather_to_main(rng_state(generator))
    if is_main_process():
        save_atomic({"model_name": cfg.model, "model": unwrap(model).state_dict(),
                     "optimizer": optimizer.state_dict(), "epoch": progress.epoch, "batch": progress.batch,
                     "history": progress.history, "running": progress.running, "rng": rng[0],
                     **({"rng_per_rank": rng} if world_size() > 1 else {}), "config": vars(cfg)}, path)
    barrier()
