"""Checkpoints: atomic save, safe load, the newest valid one, the RNG state, the resume check,
Progress (where training stands: what a checkpoint records besides the weights), and the two
steps the training loop takes with them: save_checkpoint and resume."""
from __future__ import annotations

import glob
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from distributed import barrier, gather_to_main, is_main_process, rank, unwrap, world_size
from flags import ConfigError
from safe_writes import atomic_path


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
    """Write to a temporary file beside ``path``, then rename: a crash never leaves half a file."""
    with atomic_path(path) as temporary:
        torch.save(obj, temporary)


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint without executing anything from the file."""
    return torch.load(path, map_location="cpu", weights_only=True)


def newest_checkpoint(run_dir: Path) -> dict | None:
    """The valid checkpoint furthest into training; unreadable ones are skipped with a warning."""
    best = None
    for path in sorted(glob.glob(str(run_dir / "checkpoints" / "*.pt"))):
        try:
            state = load_checkpoint(Path(path))
            position = (state["epoch"], state["batch"])
            missing = {"model_name", "model", "optimizer", "config"} - state.keys()
            if missing:
                raise KeyError(f"no {', '.join(sorted(missing))} entry")
        except Exception as error:  # a truncated or foreign file: never fatal, never silent
            warnings.warn(f"ignoring unreadable checkpoint {path}: {type(error).__name__}: {error}")
            continue
        if best is None or position > (best["epoch"], best["batch"]):
            best = state
    return best


# The settings that change what is trained (besides the method's hyperparameters and
# --epochs, which a resume may raise): a resumed run must share them with its checkpoint.
RESUME_KEYS = ("data_dir", "model", "batch_size", "lr", "seed", "max_length", "random_pad", "bucket",
               "max_batches", "amp")


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
    refuse one trained with other settings. A fresh Progress when there is none."""
    state = newest_checkpoint(run_dir)
    if state is None:
        if is_main_process():
            print(f"--resume: no checkpoint in {run_dir}; starting from scratch")
        return Progress()
    if state["model_name"] != cfg.model:
        raise ConfigError(f"--resume: the checkpoint in {run_dir} is a {state['model_name']}, not a {cfg.model}")
    saved = state["config"]
    changed = changed_settings(saved, cfg, (*RESUME_KEYS, *hyperparameters))
    if changed:
        key, before, now = changed[0]
        raise ConfigError(f"--resume: {run_dir} was trained with --{key} {before}, not {now}")
    if saved.get("epochs") != cfg.epochs and is_main_process():
        print(f"--resume: training to epoch {cfg.epochs} (the run was started for {saved['epochs']})")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    # Each rank continues its own random streams; a checkpoint of another number of processes
    # gives rank 0 its stream and the others fresh ones.
    rng_per_rank = state.get("rng_per_rank") or [state["rng"]]
    if len(rng_per_rank) == world_size():
        set_rng_state(rng_per_rank[rank()], generator)
    elif rank() == 0:
        set_rng_state(state["rng"], generator)
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
