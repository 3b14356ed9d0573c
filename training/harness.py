"""The training harness shared by the four method scripts (PROTOCOL section 5).

A method script supplies its settings and a loss function (config.METHODS names its runs);
``main`` does the rest: the settings (config.py), the run folder (plumbing/run_folder.py), then
``train`` (data, model, Adam; for each epoch, for each batch: forward, loss, backward, step; then
``end_epoch``: validation, checkpoints, history.json and curves.png), the final model's file and,
as its last call, the evaluation of the final model (evaluate.py). Checkpoints
(plumbing/checkpoints.py): every ``checkpoint_every`` epochs, a rolling ``last.pt`` after every
epoch, and on SIGINT/SIGTERM at the next batch boundary (``stop_at_signal``); ``--resume``
continues from the newest. Several processes under torchrun: plumbing/distributed.py.
Everything lands in ``result/<run name>/``.

A loss function has the signature ``loss_fn(model, x, y, mask, epoch, cfg)`` and returns
``(loss, parts)``: the scalar to minimise and a dict of named detached scalars to log.
With ``--noise_sd S`` > 0 every training batch gets Gaussian noise of standard deviation S on
its signal before the loss sees it (``gaussian_noise``; Cohen et al.'s base classifiers).

A script may also define ``guard(model, x, y, mask, epoch, cfg) -> float | None`` and the
hyperparameter ``overfit_drop`` (fast_adv: against catastrophic overfitting): its score of each
epoch on a fixed class-balanced validation batch (None: not scored) goes into the history as
``guard_accuracy``; ``checkpoints/best.pt`` holds the best-scored epoch; when a score falls by
more than the fraction overfit_drop below the best before it (``collapsed``), training stops,
the model returns to best.pt's weights (so model.pt is the best epoch's), one line says so and
the run's settings record it as ``stopped_early`` (in model.pt and eval_<split>.json).
"""
from __future__ import annotations

import contextlib
import random
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

import evaluate
from analysis import figures
from analysis.metrics import class_balanced_accuracy, confusion_matrix
from config import check_run_name, parse_script, run_name
from databases.cpsc2018 import DataError
from ECG_CNN import build_model
from ECG_Dataset import batch_records, get_dataloaders, set_loader_epoch
from plumbing.checkpoints import Progress, data_fingerprint, load_checkpoint, resume, save_atomic, save_checkpoint
from plumbing.distributed import (all_reduce, average_logged, distributed_model, in_process_group, init_distributed,
                                  is_main_process, on_main_process, rank, shutdown_distributed, unwrap, world_size)
from plumbing.flags import ConfigError
from plumbing.run_folder import record_settings, start_run
from plumbing.safe_writes import FolderInUseError, write_json
from preprocess import Cache, load_cache

LossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
Guard = Callable[..., "float | None"]  # guard(model, x, y, mask, epoch, cfg)


class TrainingError(Exception):
    """Training cannot go on (for example a non-finite loss)."""


def make_optimizer(model: torch.nn.Module, lr: float, device: torch.device) -> torch.optim.Adam:
    """Adam (PROTOCOL section 5); ATen's fused implementation where there is one (CPU and CUDA),
    the same update in fewer kernels (benchmarks/README.md)."""
    fused = True if device.type in ("cpu", "cuda") else None  # None: torch's own choice
    return torch.optim.Adam(model.parameters(), lr=lr, fused=fused)


def seed_everything(seed: int, cudnn_benchmark: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = not cudnn_benchmark
    torch.backends.cudnn.benchmark = cudnn_benchmark


class StoppedAtOnce(KeyboardInterrupt):
    """A second SIGINT/SIGTERM during training: stop without waiting for the batch to end."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


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
            raise StoppedAtOnce(signum)
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# --- training ----------------------------------------------------------------------------

def validation_accuracy(model: torch.nn.Module, loader, device: torch.device) -> float:
    """Each rank predicts its share of the records; the confusion counts are summed."""
    counts = confusion_matrix(*evaluate.predict(unwrap(model), loader, device))
    return class_balanced_accuracy(all_reduce(torch.from_numpy(counts)).numpy())


def gaussian_noise(x: torch.Tensor, mask: torch.Tensor, sd: float) -> torch.Tensor:
    """x + sd * N(0, 1) on the signal (the mask), never on the padding, unclipped: the noise of
    randomized smoothing (Cohen et al. 2019), which draws it the same way."""
    return x + sd * torch.randn_like(x) * mask


def collapsed(scores: list, drop: float) -> bool:
    """Whether the last of ``scores`` (None: an epoch not scored) is below (1 - drop) times the
    best score before it."""
    earlier = [score for score in scores[:-1] if score is not None]
    return scores[-1] is not None and bool(earlier) and scores[-1] < (1 - drop) * max(earlier)


def guard_batch(loader, size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(x, y, mask) of at most ``size`` records of ``loader``'s split, class-balanced and the
    same at every call (evaluate.balanced_records), on ``device``."""
    records = evaluate.balanced_records(loader.dataset.labels, size)
    x, y, mask = next(iter(evaluate.loader_over(loader, records)))
    return x.to(device), y.to(device), mask.to(device)


def stop_collapsed(cfg: SimpleNamespace, model: torch.nn.Module, history: list[dict], run_dir: Path) -> None:
    """The guard's score collapsed: back to best.pt's weights, one line, cfg.stopped_early."""
    scores = [h.get("guard_accuracy") for h in history]
    best = max((i for i, score in enumerate(scores) if score is not None), key=lambda i: (scores[i], i))
    path = run_dir / "checkpoints" / "best.pt"
    unwrap(model).load_state_dict(load_checkpoint(path)["model"])
    cfg.stopped_early = {"epoch": history[-1]["epoch"], "guard_accuracy": scores[-1],
                         "best_epoch": history[best]["epoch"], "best_guard_accuracy": scores[best]}
    if is_main_process():
        print(f"catastrophic overfitting: the guard's PGD accuracy fell from {scores[best]:.3f} (epoch "
              f"{history[best]['epoch']}) to {scores[-1]:.3f} at epoch {history[-1]['epoch']}, more than "
              f"--overfit_drop {cfg.overfit_drop:g} below its best; training stopped and the run keeps epoch "
              f"{history[best]['epoch']}'s model ({path})")


def non_finite_loss(loss: float, epoch: int, progress: Progress, loader, run_dir: Path) -> TrainingError:
    records = batch_records(loader, progress.batch)
    share = " (this process's share)" if world_size() > 1 else ""
    last = run_dir / "checkpoints" / "last.pt"
    kept = f"the last checkpoint, {last}, is kept" if last.is_file() else "no checkpoint yet"
    return TrainingError(f"non-finite loss ({loss}) at epoch {epoch}, batch {progress.batch}, "
                         f"records{share} {', '.join(records)}: check their signals, or lower --lr; {kept}")


def stop_at_signal(signum: int, cfg: SimpleNamespace, model, optimizer, progress: Progress, loader,
                   started: float, checkpoints: Path) -> int:
    """Save the batch reached to ``last.pt`` and say how to go on; the exit status 128+signal
    (the largest signal number of any rank)."""
    progress.running["seconds"] = time.time() - started
    save_checkpoint(checkpoints / "last.pt", cfg, model, optimizer, progress, loader.generator)
    signum = int(all_reduce(torch.tensor(signum or 0), "max"))
    if is_main_process():
        print(f"stopped by signal {signum}: saved epoch {progress.epoch}, batch {progress.batch} to "
              f"{checkpoints / 'last.pt'}; continue with --resume", file=sys.stderr)
    return 128 + signum


def end_epoch(cfg: SimpleNamespace, model, optimizer, progress: Progress, loader, val_loader, device: torch.device,
              started: float, run_dir: Path, guard: Guard | None = None, guarded: tuple = ()) -> bool:
    """Validate, record the epoch in the history, save the checkpoints (``last.pt``, and
    ``epoch_NNN.pt`` every ``checkpoint_every`` epochs and at the end), write history.json and
    curves.png. With the method's ``guard`` (module docstring), its score on the batch
    ``guarded`` joins the record, ``best.pt`` is saved at a best score, and the result is whether
    the score collapsed."""
    epoch = progress.epoch
    samples = max(progress.running.pop("samples", 0), 1)
    progress.running.pop("seconds", None)
    record = {"epoch": epoch, **{k: v / samples for k, v in progress.running.items()},
              "val_accuracy": validation_accuracy(model, val_loader, device),
              "seconds": round(time.time() - started, 3)}
    if guard:
        score = guard(unwrap(model), *guarded, epoch, cfg)
        # the same on every rank (the same weights and batch), made exactly so for the stop decision
        if score is not None:
            score = float(all_reduce(torch.tensor(score, dtype=torch.float64), "max"))
        record["guard_accuracy"] = score
    progress.history.append(record)
    if is_main_process():
        guarded = f", guard's PGD accuracy {record['guard_accuracy']:.4f}" \
            if record.get("guard_accuracy") is not None else ""
        print(f"epoch {epoch}: loss {record['loss']:.4f}, val class-balanced accuracy "
              f"{record['val_accuracy']:.4f}{guarded} ({record['seconds']:.1f} s)")
    progress.epoch, progress.batch, progress.running = epoch + 1, 0, {}
    checkpoints = run_dir / "checkpoints"
    save_checkpoint(checkpoints / "last.pt", cfg, model, optimizer, progress, loader.generator)
    if progress.epoch % cfg.checkpoint_every == 0 or progress.epoch == cfg.epochs:
        save_checkpoint(checkpoints / f"epoch_{progress.epoch:03d}.pt", cfg, model, optimizer, progress,
                        loader.generator)
    scores = [h.get("guard_accuracy") for h in progress.history]
    if guard and scores[-1] is not None and scores[-1] >= max(s for s in scores if s is not None):
        save_checkpoint(checkpoints / "best.pt", cfg, model, optimizer, progress, loader.generator)
    if is_main_process():
        write_json(progress.history, run_dir / "history.json")
        figures.training_curves_figure(progress.history, run_dir / "curves.png", f"{cfg.method}: {cfg.run_name}")
    return bool(guard) and collapsed(scores, cfg.overfit_drop)


def train(cfg: SimpleNamespace, loss_fn: LossFn, run_dir: Path, cache: Cache,
          hyperparameters: tuple[str, ...] = (), guard: Guard | None = None) -> tuple[torch.nn.Module, int]:
    """Train per ``cfg`` on ``cache`` (cfg.data_dir, loaded); returns (model, exit status): 0
    when done (or stopped by ``guard``, the model then at its best epoch: module docstring),
    128+signal when stopped by a signal.

    Under torchrun every process runs this together: each takes its share of every batch,
    DistributedDataParallel averages the gradients, and rank 0 alone writes checkpoints,
    history and plots (the other ranks wait for each checkpoint). The returned model is the
    plain module, with the same weights on every rank.
    """
    # data
    device = init_distributed(cfg.device)
    world, this_rank = world_size(), rank()
    seed_everything(cfg.seed, cfg.cudnn_benchmark)
    workers = cfg.num_workers if cfg.num_workers >= 0 else (4 if device.type == "cuda" else 0)
    batch_size = cfg.batch_size // world  # this process's share; config checks that it divides
    loaders = get_dataloaders(cache, batch_size, cfg.eval_batch_size, cfg.max_length,
                              cfg.random_pad, cfg.seed, workers,
                              pin_memory=device.type == "cuda", splits=("train", "val"),
                              num_replicas=world, rank=this_rank, bucket=cfg.bucket)
    train_loader = loaders["train"]
    val_loader = evaluate.shard_loader(loaders["val"], this_rank, world) if world > 1 else loaders["val"]
    # the guard's batch: class-balanced records of the validation split, the same every epoch
    guarded = guard_batch(loaders["val"], cfg.eval_batch_size, device) if guard else ()
    # model and optimizer
    model = build_model(cfg.model).to(device)  # the same initial weights on every rank
    if this_rank:  # other random pads, projections and PGD starts than rank 0's
        seed_everything(int(np.random.SeedSequence([cfg.seed, this_rank]).generate_state(1)[0]),
                        cfg.cudnn_benchmark)
    optimizer = make_optimizer(model, cfg.lr, device)
    progress = Progress()
    if cfg.resume:
        # the guard scores a batch of eval_batch_size records: another size would change its decisions
        kept = (*hyperparameters, "eval_batch_size") if guard else hyperparameters
        progress = resume(cfg, run_dir, model, optimizer, train_loader.generator, kept)
        on_main_process(lambda: record_settings(cfg, device, run_dir))
    model = distributed_model(model, device)
    batches_per_epoch = min(len(train_loader), cfg.max_batches or len(train_loader))
    # A resumed run whose guard had collapsed (a signal or a kill came before its model.pt) stops again.
    stopped = bool(guard and progress.history) and collapsed([h.get("guard_accuracy") for h in progress.history],
                                                             cfg.overfit_drop)
    if stopped:
        stop_collapsed(cfg, model, progress.history, run_dir)
    # the loop
    with _StopRequest() as stop:
        while not stopped and progress.epoch < cfg.epochs:
            set_loader_epoch(train_loader, progress.epoch, start=progress.batch * batch_size)
            model.train()
            started = time.time() - progress.running.get("seconds", 0.0)
            with tqdm(total=batches_per_epoch, initial=progress.batch, desc=f"epoch {progress.epoch}",
                      unit="batch", dynamic_ncols=True, mininterval=1.0, disable=not is_main_process()) as bar:
                for x, y, mask in train_loader:
                    if progress.batch >= batches_per_epoch:
                        break
                    x, y, mask = (t.to(device, non_blocking=True) for t in (x, y, mask))
                    if cfg.noise_sd:
                        x = gaussian_noise(x, mask, cfg.noise_sd)
                    with torch.autocast(device.type, torch.bfloat16, enabled=cfg.amp):
                        loss, parts = loss_fn(model, x, y, mask, progress.epoch, cfg)
                    # One all_reduce decides for every rank: the logged means, a non-finite loss
                    # anywhere, and a stop request on any rank (all stop after this same batch).
                    logged, stop_requested = average_logged({"loss": loss.detach(), **parts},
                                                            stop.signum is not None)
                    if not np.isfinite(logged["loss"]):
                        raise non_finite_loss(logged["loss"], progress.epoch, progress, train_loader, run_dir)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    progress.add(logged, len(y) * world)
                    bar.update()
                    bar.set_postfix(loss=f"{progress.running['loss'] / progress.running['samples']:.4f}")
                    if stop_requested:
                        bar.close()
                        return unwrap(model), stop_at_signal(stop.signum, cfg, model, optimizer, progress,
                                                             train_loader, started, run_dir / "checkpoints")
            if end_epoch(cfg, model, optimizer, progress, train_loader, val_loader, device, started, run_dir,
                         guard, guarded):
                stop_collapsed(cfg, model, progress.history, run_dir)
                break
        if stop.signum is not None:  # arrived after the last batch: stop before the evaluation
            return unwrap(model), 128 + stop.signum
    return unwrap(model), 0


def main(script, argv: list[str] | None = None) -> int:
    """Parse flags, train, evaluate the final model. Returns the process exit status (docs/USAGE.md).

    ``script``: the method script's module (config.parse_script reads its settings; its
    ``loss_fn`` is the loss). Under torchrun every process calls this; rank 0 alone locks and prepares the run folder,
    writes files and prints (errors are raised on every rank alike, so none is left waiting).
    """
    joins_group = not in_process_group()  # then it leaves it at the end
    locks = contextlib.ExitStack()  # the run folder's lock, held until the evaluation is written
    try:
        cfg = parse_script(script, argv)
        cfg.run_name = run_name(cfg)
        check_run_name(cfg.run_name)
        cache = load_cache(cfg.data_dir)  # missing or bad data is refused before the run folder is made
        cfg.data_fingerprint = data_fingerprint(cache)  # recorded with the run; a resume on other data is refused
        device = init_distributed(cfg.device)
        run_dir = on_main_process(lambda: start_run(cfg, device, locks))
        model, status = train(cfg, script.loss_fn, run_dir, cache, tuple(script.HYPERPARAMETERS),
                              getattr(script, "guard", None))
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
    except OSError as error:  # a file that could not be written while running
        if is_main_process():
            print(f"error: {error}", file=sys.stderr)
        return 1
    except StoppedAtOnce as stop:
        if is_main_process():
            print(f"error: stopped at once by a second signal {stop.signum}, without saving the batch in "
                  f"progress; --resume continues from the last checkpoint", file=sys.stderr)
        return 128 + stop.signum
    finally:
        locks.close()
        if joins_group:
            shutdown_distributed()
