"""The training harness shared by the four method scripts (PROTOCOL section 5).

A method script supplies its hyperparameters, a loss function and a run name; this
module does everything else: configuration from defaults, presets and command-line
flags; seeding and device choice; data; Adam; the epoch loop with a progress bar;
validation after every epoch; atomic checkpoints (every ``checkpoint_every`` epochs, a
rolling ``last.pt`` after every epoch, and on SIGINT/SIGTERM at the next batch
boundary); ``--resume``; history JSON and a training-curve PNG; and, at the end, the
evaluation of the final model. Everything lands in ``result/<run name>/``.

A loss function has the signature ``loss_fn(model, x, y, mask, epoch, cfg)`` and returns
``(loss, parts)``: the scalar to minimise and a dict of named detached scalars to log.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import io
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ECG_CNN import MODELS, build_model, check_length
from safe_writes import LOCK_NAME, FolderInUseError, atomic_path, lock_folder

LossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]

# PROTOCOL section 5: the settings shared by all four methods; each is a command-line flag.
TRAIN_DEFAULTS = dict(
    data_dir="data/CPSC2018/processed",  # the cache written by preprocess.py
    result_dir="result",
    run_name="",             # empty: the method's own name with its key settings
    model="resnet18a",
    epochs=70,
    batch_size=64,
    eval_batch_size=64,
    lr=1e-3,
    seed=0,
    max_length=30720,        # records are truncated to this many samples
    random_pad=3072,         # training shift range; inputs are max_length + random_pad long
    bucket=False,            # batch by length and crop the padding (for --model resnet18a_vl)
    device="auto",           # auto: CUDA when available, else CPU
    num_workers=-1,          # -1: 4 loader processes on CUDA (pinned memory), none on the CPU
    amp=False,               # CUDA only: bf16 autocast of the forward passes and losses
    cudnn_benchmark=False,   # CUDA only: cuDNN autotuning (faster, no longer deterministic)
    checkpoint_every=10,
    max_batches=0,           # >0: stop each epoch after this many batches (quick looks)
    resume=False,
    overwrite=False,
    sweeps="pgd_linf,pgd_l2,white",  # robustness sweeps after training (empty: none)
    sweep_steps=100,
    sweep_restarts=2,
    sweep_max_batches=0,
)

# Named bundles of overrides. "paper" is the defaults; "demo" and "smoke" run on the
# synthetic dataset that `python synthetic.py` writes (see README).
PRESETS = {
    "paper": {},
    # Sized for about ten minutes of `python reproduce.py --preset demo` on 2 CPU cores.
    "demo": dict(data_dir="data/demo/processed", result_dir="result/demo", max_length=4096,
                 random_pad=1024, epochs=10, batch_size=16, checkpoint_every=5,
                 sweep_steps=5, sweep_restarts=1),
    "smoke": dict(data_dir="data/smoke/processed", result_dir="result/smoke", max_length=2048,
                  random_pad=1024, epochs=1, batch_size=16, checkpoint_every=1,
                  max_batches=2, sweeps="white", sweep_steps=2, sweep_restarts=1,
                  sweep_max_batches=1),
    # A small real CPSC2018 set given with reproduce.py --preset mini --raw-dir DIR.
    "mini": dict(data_dir="data/mini/processed", result_dir="result/mini", max_length=4096,
                 random_pad=1024, epochs=10, batch_size=16, checkpoint_every=5,
                 sweeps="pgd_linf,white", sweep_steps=10, sweep_restarts=1),
}


class ConfigError(Exception):
    """A bad flag or setting; the message names it."""


class TrainingError(Exception):
    """Training cannot go on (for example a non-finite loss)."""


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ConfigError(message)


def parse_config(method: str, hyperparameters: dict, preset_overrides: dict | None = None,
                 argv: list[str] | None = None,
                 check: Callable[[SimpleNamespace], None] | None = None) -> SimpleNamespace:
    """Defaults, then the preset, then the method's preset overrides, then the flags.

    ``check``: the method's own rules for its hyperparameters (raises ConfigError).
    """
    defaults = {**TRAIN_DEFAULTS, **hyperparameters}
    parser = _OneLineParser(prog=f"{method} training", description=f"Train {method} (PROTOCOL section 5).",
                            argument_default=argparse.SUPPRESS, allow_abbrev=False)
    parser.add_argument("--preset", default="paper", choices=sorted(PRESETS))
    for key, value in defaults.items():
        names = dict.fromkeys([f"--{key}", f"--{key.replace('_', '-')}"])  # --data_dir or --data-dir
        if isinstance(value, bool):
            parser.add_argument(*names, dest=key, action=argparse.BooleanOptionalAction)
        else:
            parser.add_argument(*names, dest=key, type=type(value), metavar=type(value).__name__.upper())
    args = vars(parser.parse_args(argv))
    preset = args.pop("preset", "paper")
    config = {**defaults, **PRESETS[preset], **(preset_overrides or {}).get(preset, {}), **args}
    config["preset"] = preset
    config["method"] = method
    validate_config(config, hyperparameters)
    cfg = SimpleNamespace(**config)
    if check is not None:
        check(cfg)
    return cfg


def validate_config(config: dict, hyperparameters: dict) -> None:
    """Reject settings that cannot work, naming the flag."""
    for key in ("epochs", "batch_size", "eval_batch_size", "checkpoint_every", "max_length"):
        if config[key] < 1:
            raise ConfigError(f"--{key} must be at least 1, got {config[key]}")
    if config["batch_size"] % world_size():
        raise ConfigError(f"--batch_size {config['batch_size']} must be a multiple of the number of "
                          f"processes ({world_size()}): each takes an equal share of every batch")
    if config["num_workers"] < -1:
        raise ConfigError(f"--num_workers must be >= -1 (-1: automatic), got {config['num_workers']}")
    if config["sweep_restarts"] < 1:
        raise ConfigError(f"--sweep_restarts must be at least 1, got {config['sweep_restarts']}")
    if config["bucket"] and config["model"] != "resnet18a_vl":
        raise ConfigError(f"--bucket needs --model resnet18a_vl: the predictions of {config['model']} "
                          "depend on the padding that bucketing crops")
    from evaluate import EvaluationError, parse_sweeps
    try:
        parse_sweeps(config["sweeps"])
    except EvaluationError as error:
        raise ConfigError(str(error)) from None
    for key in ("max_batches", "random_pad", "sweep_steps", "sweep_max_batches"):
        if config[key] < 0:
            raise ConfigError(f"--{key} must be >= 0, got {config[key]}")
    if not 0 < config["lr"] < math.inf:
        raise ConfigError(f"--lr must be positive and finite, got {config['lr']}")
    if config["model"] not in MODELS:
        raise ConfigError(f"--model: unknown model '{config['model']}' (known: {', '.join(MODELS)})")
    try:
        check_length(config["max_length"] + config["random_pad"])
    except ValueError as error:
        raise ConfigError(f"--max_length + --random_pad: {error}") from None
    for key in hyperparameters:
        value = config[key]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not 0 <= value < math.inf:
            raise ConfigError(f"--{key} must be a finite non-negative number, got {value}")
    check_device(config["device"])
    device = config["device"]
    for key in ("amp", "cudnn_benchmark"):
        if config[key] and choose_device(device).type != "cuda":
            raise ConfigError(f"--{key} needs a CUDA device (this run uses {choose_device(device)})")


def check_device(name: str) -> None:
    """Raise ConfigError unless ``name`` (auto, cpu, cuda, cuda:N, mps) is usable on this machine.

    CUDA is checked without creating a context: a process that only plans runs (reproduce.py)
    must not hold GPU memory.
    """
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device: unknown device '{name}' (known: auto, cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"--device {name}: MPS is not available on this machine")
    elif device.type != "cpu":
        raise ConfigError(f"--device {name}: not supported (auto, cpu, cuda, cuda:N, mps)")


def choose_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_optimizer(model: torch.nn.Module, lr: float, device: torch.device) -> torch.optim.Adam:
    """Adam (PROTOCOL section 5); ATen's fused implementation where there is one (CPU and CUDA):
    the same update, about 5x faster than the per-tensor loop on the CPU."""
    fused = True if device.type in ("cpu", "cuda") else None  # None: torch's own choice
    return torch.optim.Adam(model.parameters(), lr=lr, fused=fused)


def seed_everything(seed: int, cudnn_benchmark: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = not cudnn_benchmark
    torch.backends.cudnn.benchmark = cudnn_benchmark


# --- several processes (torchrun) ----------------------------------------------------------
# `torchrun --nproc_per_node N <script> ...` starts N copies of a script with WORLD_SIZE, RANK
# and LOCAL_RANK set. Each process takes batch_size / N samples of every batch (the union of
# the processes' shares is the single-process batch) and DistributedDataParallel averages the
# gradients; rank 0 alone writes files. Outside torchrun (or with N = 1) the helpers below are
# the identity and nothing else changes.

def world_size() -> int:
    """The number of training processes: the process group's size, else torchrun's WORLD_SIZE."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank (0 outside torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """True for the process that writes files and prints (rank 0)."""
    return rank() == 0


def distributed() -> bool:
    """True in one of several processes that have joined the process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def process_device(name: str) -> torch.device:
    """This process's device: ``choose_device(name)``, except that under torchrun a CUDA device
    is the process's own GPU, cuda:LOCAL_RANK."""
    device = choose_device(name)
    if world_size() > 1 and device.type == "cuda":
        if device.index is not None:
            raise ConfigError(f"--device {name}: under torchrun each process uses its own GPU "
                              "(cuda:LOCAL_RANK); pass --device cuda or auto")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def init_distributed(device_name: str) -> torch.device:
    """This process's device; under torchrun with several processes, also join the process
    group once (NCCL on GPUs, gloo on the CPU)."""
    device = process_device(device_name)
    if world_size() > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return device


def shutdown_distributed() -> None:
    """Leave the process group (no-op outside torchrun)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process (no-op outside torchrun)."""
    if distributed():
        dist.barrier()


def all_sum(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """The sum (or another reduction ``op``) of ``tensor`` over the processes, detached
    (``tensor`` itself outside torchrun)."""
    if not distributed():
        return tensor
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    total = tensor.detach().to(on, copy=True)
    dist.all_reduce(total, op)
    return total.to(tensor.device)


def union_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over the processes, differentiable so that DistributedDataParallel
    averages the gradient of the whole (union) batch's loss.

    Its value is the sum S over ranks, the same on every rank; its gradient on a rank is
    world_size times that of the rank's own ``tensor``. DDP divides the sum of the ranks'
    gradients by world_size, so a loss f(union_sum(t)) gets f'(S) * sum_r dt_r/dw, the
    gradient of f on the union batch: use it for normalizers and for non-additive terms
    (a mean over a data-dependent count, a square root of a sum). Terms that are means over
    the local batch need nothing (equal shares: DDP's average is the union mean).
    Outside torchrun: ``tensor`` itself.
    """
    if not distributed():
        return tensor
    total = all_sum(tensor)
    if not tensor.requires_grad:
        return total
    return total + world_size() * (tensor - tensor.detach())


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (the model itself otherwise).

    Loss functions run their extra passes (attacks, input gradients with create_graph) on it:
    only the main forward pass goes through the wrapper, and the single backward at the end
    still reaches every parameter once, so DDP all-reduces the whole gradient.
    """
    return model.module if isinstance(model, DistributedDataParallel) else model


def distributed_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` in a DistributedDataParallel wrapper under torchrun, else ``model`` itself."""
    if not distributed():
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def on_main_process(function: Callable[[], object]):
    """Run ``function`` on rank 0 only; every rank returns its result or raises its error."""
    if not distributed():
        return function()
    outcome: list = [None]
    if is_main_process():
        try:
            outcome = [(True, function())]
        except Exception as error:  # raised again on every rank below
            outcome = [(False, error)]
    dist.broadcast_object_list(outcome, src=0)
    succeeded, value = outcome[0]
    if not succeeded:
        raise value
    return value


def gather_to_main(state: dict) -> list[dict] | None:
    """Every process's ``state`` (tensors, numbers, containers) in rank order on rank 0, None
    on the others ([state] outside torchrun). Sent as torch.save bytes, read back with
    weights_only=True."""
    if not distributed():
        return [state]
    buffer = io.BytesIO()
    torch.save(state, buffer)
    gathered = [None] * world_size() if is_main_process() else None
    dist.gather_object(buffer.getvalue(), gathered, dst=0)
    if gathered is None:
        return None
    return [torch.load(io.BytesIO(data), weights_only=True) for data in gathered]


def average_logged(values: dict, flag: bool) -> tuple[dict[str, float], bool]:
    """The mean over the processes of each logged scalar and whether any process raised
    ``flag``, in one all_reduce (outside torchrun: the values as floats and ``flag``).

    Every process must pass the same keys in the same order.
    """
    if not distributed():
        return {key: float(value) for key, value in values.items()}, flag
    packed = all_sum(torch.tensor([*map(float, values.values()), float(flag)], dtype=torch.float64))
    means = (packed[:-1] / world_size()).tolist()
    return dict(zip(values, means)), bool(packed[-1] > 0)


# --- checkpoints -------------------------------------------------------------------------

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


# --- the run -----------------------------------------------------------------------------

@dataclass
class Progress:
    """Where training stands: the next (epoch, batch) to run and what has been logged."""
    epoch: int = 0
    batch: int = 0
    history: list | None = None
    running: dict | None = None  # sums for the epoch in progress


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


# A run folder is one folder inside --result_dir: no separators, never "." or "..".
RUN_NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]+")


def check_run_name(name: str) -> None:
    if not RUN_NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        raise ConfigError(f"--run_name {name!r}: a run name is one folder name of letters, digits "
                          "and . _ - (not . or ..)")


def is_run_folder(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds the config.json that main() writes for a run of that name."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("run_name") == run_dir.name and "method" in config


def prepare_run_dir(cfg: SimpleNamespace, locks: contextlib.ExitStack) -> Path:
    """Create and lock the run folder (the lock joins ``locks``); with --overwrite, empty it."""
    run_dir = Path(cfg.result_dir) / cfg.run_name
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        locks.enter_context(lock_folder(run_dir, "run folder"))
    except OSError as error:
        raise ConfigError(f"--result_dir: cannot write to {run_dir}: {error.strerror}") from None
    if (run_dir / "checkpoints").exists() and not (cfg.resume or cfg.overwrite):
        raise ConfigError(f"{run_dir} already holds a run: pass --resume to continue it, "
                          "--overwrite to start it again, or --run_name for another")
    if cfg.overwrite and not cfg.resume:  # nothing of the old run may be mistaken for the new one
        contents = [path for path in run_dir.iterdir() if path.name != LOCK_NAME]
        if contents and not is_run_folder(run_dir):
            raise ConfigError(f"--overwrite: {run_dir} is not a run folder of this project (no config.json "
                              "of a run of that name); it is left alone: delete it yourself or choose "
                              "another --run_name")
        for path in contents:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    return run_dir


def write_json(obj, path: Path) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(obj, indent=2, default=str))


def plot_history(history: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.savefig(path, dpi=100)
    plt.close(fig)


class _StopRequest:
    """Remembers SIGINT/SIGTERM so that training stops at the next batch boundary."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second signal: the user does not want to wait
            self.__exit__()
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


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


def train(cfg: SimpleNamespace, loss_fn: LossFn, run_dir: Path,
          hyperparameters: tuple[str, ...] = ()) -> tuple[torch.nn.Module, int]:
    """Train per ``cfg``; returns (model, exit status): 0 when done, 128+signal when stopped.

    Under torchrun every process runs this together: each takes its share of every batch,
    DistributedDataParallel averages the gradients, and rank 0 alone writes checkpoints,
    history and plots (the other ranks wait for each checkpoint). The returned model is the
    plain module, with the same weights on every rank.
    """
    from ECG_Dataset import batch_records, get_dataloaders, set_loader_epoch
    from evaluate import class_balanced_accuracy, confusion_matrix, predict, shard_loader

    device = init_distributed(cfg.device)
    world, this_rank = world_size(), rank()
    seed_everything(cfg.seed, cfg.cudnn_benchmark)
    workers = cfg.num_workers if cfg.num_workers >= 0 else (4 if device.type == "cuda" else 0)
    batch_size = cfg.batch_size // world  # this process's share; validate_config checks it divides
    loaders = get_dataloaders(cfg.data_dir, batch_size, cfg.eval_batch_size, cfg.max_length,
                              cfg.random_pad, cfg.seed, workers,
                              pin_memory=device.type == "cuda", splits=("train", "val"),
                              num_replicas=world, rank=this_rank, bucket=cfg.bucket)
    model = build_model(cfg.model).to(device)  # the same initial weights on every rank
    if this_rank:  # other random pads, projections and PGD starts than rank 0's
        seed_everything(int(np.random.SeedSequence([cfg.seed, this_rank]).generate_state(1)[0]),
                        cfg.cudnn_benchmark)
    optimizer = make_optimizer(model, cfg.lr, device)
    progress = Progress(history=[], running={})

    if cfg.resume:
        state = newest_checkpoint(run_dir)
        if state is None and is_main_process():
            print(f"--resume: no checkpoint in {run_dir}; starting from scratch")
        if state is not None:
            if state["model_name"] != cfg.model:
                raise ConfigError(f"--resume: the checkpoint in {run_dir} is a {state['model_name']}, "
                                  f"not a {cfg.model}")
            saved = state["config"]
            changed = changed_settings(saved, cfg, (*RESUME_KEYS, *hyperparameters))
            if changed:
                key, before, now = changed[0]
                raise ConfigError(f"--resume: {run_dir} was trained with --{key} {before}, not {now}")
            if saved.get("epochs") != cfg.epochs and is_main_process():
                print(f"--resume: training to epoch {cfg.epochs} (the run was started for {saved['epochs']})")
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            # Each rank continues its own random streams; a checkpoint of another number of
            # processes gives rank 0 its stream and the others fresh ones.
            rng_per_rank = state.get("rng_per_rank") or [state["rng"]]
            if len(rng_per_rank) == world:
                set_rng_state(rng_per_rank[this_rank], loaders["train"].generator)
            elif this_rank == 0:
                set_rng_state(state["rng"], loaders["train"].generator)
            progress = Progress(state["epoch"], state["batch"], state["history"], state["running"])
            if is_main_process():
                print(f"resuming {run_dir} at epoch {progress.epoch}, batch {progress.batch}")
    model = distributed_model(model, device)

    def checkpoint(name: str) -> None:
        rng = gather_to_main(rng_state(loaders["train"].generator))
        if is_main_process():
            save_atomic({"model_name": cfg.model, "model": unwrap(model).state_dict(),
                         "optimizer": optimizer.state_dict(), "epoch": progress.epoch,
                         "batch": progress.batch, "history": progress.history,
                         "running": progress.running, "rng": rng[0],
                         **({"rng_per_rank": rng} if world > 1 else {}), "config": vars(cfg)},
                        run_dir / "checkpoints" / name)
        barrier()

    # Validation: each rank predicts its share of the records; the counts are summed.
    val_loader = shard_loader(loaders["val"], this_rank, world) if world > 1 else loaders["val"]

    def validation_accuracy() -> float:
        counts = confusion_matrix(*predict(unwrap(model), val_loader, device))
        return class_balanced_accuracy(all_sum(torch.from_numpy(counts)).numpy())

    train_loader = loaders["train"]
    batches_per_epoch = len(train_loader)
    if cfg.max_batches:
        batches_per_epoch = min(batches_per_epoch, cfg.max_batches)
    with _StopRequest() as stop:
        while progress.epoch < cfg.epochs:
            epoch = progress.epoch
            set_loader_epoch(train_loader, epoch, start=progress.batch * batch_size)
            model.train()
            started = time.time() - progress.running.get("seconds", 0.0)
            bar = tqdm(total=batches_per_epoch, initial=progress.batch, desc=f"epoch {epoch}",
                       unit="batch", dynamic_ncols=True, mininterval=1.0, disable=not is_main_process())
            for x, y, mask in train_loader:
                if progress.batch >= batches_per_epoch:
                    break
                x, y, mask = (t.to(device, non_blocking=True) for t in (x, y, mask))
                with torch.autocast(device.type, torch.bfloat16, enabled=cfg.amp):
                    loss, parts = loss_fn(model, x, y, mask, epoch, cfg)
                # One all_reduce decides for every rank: the logged means, a non-finite loss
                # anywhere, and a stop request on any rank (all stop after this same batch).
                logged, stop_requested = average_logged({"loss": loss.detach(), **parts},
                                                        stop.signum is not None)
                if not np.isfinite(logged["loss"]):
                    bar.close()  # the error line comes after the bar, not on it
                    records = batch_records(train_loader, progress.batch)
                    share = " (this process's share)" if world > 1 else ""
                    last = run_dir / "checkpoints" / "last.pt"
                    kept = f"the last checkpoint, {last}, is kept" if last.is_file() else "no checkpoint yet"
                    raise TrainingError(f"non-finite loss ({logged['loss']}) at epoch {epoch}, batch "
                                        f"{progress.batch}, records{share} {', '.join(records)}: check "
                                        f"their signals, or lower --lr; {kept}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                running = progress.running
                samples = len(y) * world
                for key, value in logged.items():
                    running[key] = running.get(key, 0.0) + value * samples
                running["samples"] = running.get("samples", 0) + samples
                progress.batch += 1
                bar.update()
                bar.set_postfix(loss=f"{running['loss'] / running['samples']:.4f}")
                if stop_requested:
                    bar.close()
                    running["seconds"] = time.time() - started
                    checkpoint("last.pt")
                    signum = int(all_sum(torch.tensor(stop.signum or 0), dist.ReduceOp.MAX))
                    if is_main_process():
                        print(f"stopped by signal {signum}: saved epoch {epoch}, batch "
                              f"{progress.batch} to {run_dir / 'checkpoints' / 'last.pt'}; "
                              "continue with --resume", file=sys.stderr)
                    return unwrap(model), 128 + signum
            bar.close()
            samples = max(progress.running.pop("samples", 0), 1)
            progress.running.pop("seconds", None)
            record = {"epoch": epoch, **{k: v / samples for k, v in progress.running.items()}}
            record["val_accuracy"] = validation_accuracy()
            record["seconds"] = round(time.time() - started, 3)
            progress.history.append(record)
            if is_main_process():
                print(f"epoch {epoch}: loss {record['loss']:.4f}, val class-balanced accuracy "
                      f"{record['val_accuracy']:.4f} ({record['seconds']:.1f} s)")
            progress.epoch, progress.batch, progress.running = epoch + 1, 0, {}
            checkpoint("last.pt")
            if progress.epoch % cfg.checkpoint_every == 0 or progress.epoch == cfg.epochs:
                checkpoint(f"epoch_{progress.epoch:03d}.pt")
            if is_main_process():
                write_json(progress.history, run_dir / "history.json")
                plot_history(progress.history, run_dir / "curves.png", f"{cfg.method}: {cfg.run_name}")
        if stop.signum is not None:  # arrived after the last batch: stop before the evaluation
            return unwrap(model), 128 + stop.signum
    return unwrap(model), 0


def main(method: str, loss_fn: LossFn, hyperparameters: dict, run_name: Callable[[SimpleNamespace], str],
         preset_overrides: dict | None = None, argv: list[str] | None = None,
         check: Callable[[SimpleNamespace], None] | None = None) -> int:
    """Parse flags, train, evaluate the final model. Returns the process exit status.

    ``check`` raises ConfigError for hyperparameters the method cannot train with.
    Under torchrun every process calls this; rank 0 alone locks and prepares the run folder,
    writes files and prints (errors are raised on every rank alike, so none is left waiting).
    """
    from preprocess import DataError
    import evaluate

    joins_group = not (dist.is_available() and dist.is_initialized())  # then it leaves it at the end
    locks = contextlib.ExitStack()  # the run folder's lock, held until the evaluation is written
    try:
        cfg = parse_config(method, hyperparameters, preset_overrides, argv, check)
        cfg.run_name = cfg.run_name or run_name(cfg)
        check_run_name(cfg.run_name)
        device = init_distributed(cfg.device)

        def start_run() -> Path:
            run_dir = prepare_run_dir(cfg, locks)
            # A resumed run keeps the config.json of its start; each resume is recorded beside it.
            name = "config.json"
            if cfg.resume and (run_dir / name).exists():
                name = f"config_resume_{len(list(run_dir.glob('config_resume_*.json'))) + 1}.json"
            write_json({**vars(cfg), "command": " ".join(sys.argv), "git_commit": _git_commit(),
                        "torch": torch.__version__, "python": platform.python_version(),
                        "device_used": str(device), "world_size": world_size(),
                        "started": time.strftime("%Y-%m-%d %H:%M:%S")}, run_dir / name)
            return run_dir

        run_dir = on_main_process(start_run)
        model, status = train(cfg, loss_fn, run_dir, tuple(hyperparameters))
        if status:
            return status
        if is_main_process():
            save_atomic({"model_name": cfg.model, "model": model.state_dict(), "config": vars(cfg)},
                        run_dir / "model.pt")
        evaluate.evaluate_run(run_dir, model, cfg)
        return 0
    except (ConfigError, DataError, TrainingError, evaluate.EvaluationError, FolderInUseError) as error:
        if is_main_process():
            print(f"error: {error}", file=sys.stderr)
        return 1 if isinstance(error, TrainingError) else 2
    finally:
        locks.close()
        if joins_group:
            shutdown_distributed()
