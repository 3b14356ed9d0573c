"""One command that proves the CUDA path and measures it, for the minutes a GPU is at hand.

    python benchmarks/gpu_check.py --out DIR                     # CUDA, budgeted to 450 s (--budget_s)
    python benchmarks/gpu_check.py --out DIR --device cpu --tiny  # every stage at tiny sizes (CI)

Writes DIR/gpu_check.json and DIR/gpu_check.md (the device, torch, CUDA, cuDNN and Python
versions, then each stage's results), rewritten after every stage: a stage that fails records
its one-line error and the next one runs; a run that is killed keeps what the finished stages
found. The run budgets its own time (--budget_s): before each stage and each timed row it
checks what is left and records "skipped: <why>" for what would not fit. Stages:

1. models: resnet18a and resnet18a_vl, forward and input gradient on the device against the
   CPU (same weights and batch, zero padding of several lengths), in float32 with TF32 off and
   deterministic cuDNN; passes when the relative error ||device - cpu|| / ||cpu|| of logits and
   gradient is at most FLOAT32_TOLERANCE.
2. attacks and losses: PGD and APGD (L-inf and L2) on the device leave the padding untouched,
   stay within eps and inside [-1, 1]; every method's training loss (bench_methods' rows) is
   finite on the device, with finite gradients, and equal to the CPU's where the loss is
   deterministic.
3. training: a short training of resnet18a_vl on synthetic signals (three classes told apart
   by their period); passes when the loss falls.
4. amp: the trained model's logits and accuracy under bf16 autocast beside float32.
5. speed: seconds per training step of every method (bench_methods.training_step, the labels
   the model's own predictions) at the paper's batch 64 and T = 33792, cuDNN benchmark on;
   float32, then AMP; clean forward and PGD-100 evaluation (per record; PGD-2 with --tiny); the variable-length
   path (resnet18a_vl on a bucket of BUCKET_LENGTH samples); torch.compile of the paper path (a
   failure is recorded in one line; compile time apart from step time).
6. projection: the cost of `reproduce.py --preset paper` from the float32 paper-path rows by
   the rule of the CPU dry run's cost table (selection.estimate_seconds per run), in hours of
   the device.

Needs only torch and numpy: benchmarks/stand_ins.py stands in for the other packages.
Exit status 0 when no check failed and no stage ended in an error (skipped ones do not count),
1 otherwise (results written either way), 2 for a bad flag or an unavailable device (``--device cpu`` runs it on the CPU).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch._dynamo
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's modules

from benchmarks import stand_ins  # noqa: E402  (first: the project's modules import optional packages)
import attacks  # noqa: E402
from perturbations import autoattack  # noqa: E402
from training import harness  # noqa: E402
import reproduce  # noqa: E402
from analysis import selection  # noqa: E402
from benchmarks.bench_methods import (PGD_EPS, STEP_ROWS, evaluation_step, make_batch, model_and_batch,  # noqa: E402
                                      pgd_row, training_step)
from benchmarks.common import command_line, environment, open_device, timed  # noqa: E402
from config import METHODS  # noqa: E402
from ECG_CNN import DOWNSAMPLE, build_model  # noqa: E402
from ECG_Dataset import PADDED_LENGTH  # noqa: E402
from plumbing.flags import ConfigError, OneLineParser, folder  # noqa: E402
from plumbing.safe_writes import FolderInUseError, lock_folder, write_json, write_text_atomic  # noqa: E402

STOOD_IN = stand_ins.withdraw()  # the project's modules hold their stand-ins; torch sees the truth

FLOAT32_TOLERANCE = 1e-4  # relative error, device against CPU, float32 with TF32 off
AMP_TOLERANCE = 0.05  # relative error of bf16-autocast logits against float32
AMP_ACCURACY_GAP = 0.1  # largest accuracy difference AMP may make on the synthetic batch
EPS_SLACK = 1e-5  # relative: a perturbation's norm may exceed eps by rounding only
ATTACK_EPS = {"inf": PGD_EPS, "2": 0.5}  # the paper's L-inf budget; an L2 budget of the same order
SYNTHETIC_PERIODS = (64.0, 32.0, 16.0)  # samples per period of the three synthetic classes
# The variable-length rows' width: the mean bucketed width of the 151 real records at batch 16
# (10679, results/variable_length_cpu_batch16.json) rounded up to a multiple of 1024.
BUCKET_LENGTH = 11264

SIZES = {  # the paper's sizes, and the tiny ones of --tiny (CI)
    False: dict(batch_size=64, length=PADDED_LENGTH, bucket_length=BUCKET_LENGTH, check_batch=4,
                check_length=4 * DOWNSAMPLE, attack_steps=10, train_steps=30, train_batch=16,
                train_length=8 * DOWNSAMPLE, pgd_steps=100, repeats=2, budget_s=450.0),
    True: dict(batch_size=2, length=3 * DOWNSAMPLE, bucket_length=3 * DOWNSAMPLE, check_batch=2,
               check_length=3 * DOWNSAMPLE, attack_steps=2, train_steps=12, train_batch=8,
               train_length=3 * DOWNSAMPLE, pgd_steps=2, repeats=0, budget_s=50.0, threads=1),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_flag("--out", type=folder, required=True, help="the folder for gpu_check.json and .md")
    parser.add_flag("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_flag("--tiny", action="store_true", help="tiny sizes: the whole check in under a minute")
    parser.add_flag("--budget_s", type=float, default=None,
                    help="seconds the whole run may take (default 450; 50 with --tiny)")
    parser.add_flag("--threads", type=int, default=None, help="torch CPU threads (default: torch's; 1 with --tiny)")
    parser.add_flag("--compile_backend", default=None,
                    help="torch.compile backend (default inductor; eager with --tiny, whose "
                         "inductor compile alone would take minutes on a CPU)")
    args = parser.parse_args(argv)
    for key, value in SIZES[args.tiny].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.compile_backend = args.compile_backend or ("eager" if args.tiny else "inductor")
    if not (math.isfinite(args.budget_s) and args.budget_s > 0):
        raise ValueError(f"--budget_s must be a finite number > 0, got {args.budget_s:g}")
    backends = torch._dynamo.list_backends(exclude_tags=())  # the default list leaves out eager and aot_eager
    if args.compile_backend not in backends:
        raise ValueError(f"--compile_backend {args.compile_backend}: not a torch.compile backend here "
                         "(inductor, eager, aot_eager, ...: torch._dynamo.list_backends(exclude_tags=()))")
    return args


class Budget:
    """The run's time: what is left, and whether a piece of work of a known cost still fits."""

    def __init__(self, seconds: float):
        self.seconds, self.started = seconds, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def refusal(self, cost: float) -> str | None:
        """None when ``cost`` seconds fit in what is left, else 'skipped: ...'."""
        if cost <= self.left():
            return None
        if self.left() <= 0:
            return f"skipped: the budget of {self.seconds:g} s is spent"
        return f"skipped: needs about {cost:.0f} s, {self.left():.0f} s of the budget left"


@contextlib.contextmanager
def exact_float32():
    """Full float32 on CUDA (no TF32 in matmuls or convolutions) and deterministic cuDNN."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) = saved


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.detach().double().cpu(), reference.detach().double().cpu()
    return float((value - reference).norm() / reference.norm().clamp_min(1e-30))


def free_device_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None


# --------------------------------------------------------------------------- correctness


def forward_and_input_gradient(model: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor,
                               y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_(True)
    logits = model(x, mask)
    return logits, torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), x)[0]


def check_models(device: torch.device, args) -> dict:
    x, mask = make_batch(args.check_batch, args.check_length, torch.device("cpu"))
    y = torch.arange(args.check_batch) % 9
    results = {}
    with exact_float32():
        for name in ("resnet18a", "resnet18a_vl"):
            torch.manual_seed(0)
            model = build_model(name).eval()
            reference = forward_and_input_gradient(model, x, mask, y)
            on_device = forward_and_input_gradient(copy.deepcopy(model).to(device), x.to(device),
                                                   mask.to(device), y.to(device))
            errors = {part: relative_error(value, ref)
                      for part, value, ref in zip(("logits", "input_gradient"), on_device, reference)}
            results[name] = {**{f"{part}_relative_error": e for part, e in errors.items()},
                             "passed": all(e <= FLOAT32_TOLERANCE for e in errors.values())}
    return {"tolerance": FLOAT32_TOLERANCE, "settings": "float32, TF32 off (matmul and cuDNN), "
            "deterministic cuDNN, benchmark off", "batch": args.check_batch, "length": args.check_length,
            "models": results, "passed": all(r["passed"] for r in results.values())}


def check_perturbation(x_adv: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, eps: float, norm: str,
                       device: torch.device) -> dict:
    delta = (x_adv - x).detach()
    size = (delta.abs().amax(dim=(1, 2)) if norm == "inf" else delta.flatten(1).norm(dim=1)).max().item()
    result = {"on_device": x_adv.device.type == device.type,
              "padding_untouched": bool((delta * (1 - mask)).abs().max() == 0),
              "within_eps": size <= eps * (1 + EPS_SLACK), "in_range": bool(x_adv.abs().max() <= 1),
              "largest_norm_over_eps": size / eps}
    result["passed"] = all(result[key] for key in ("on_device", "padding_untouched", "within_eps", "in_range"))
    return result


def check_attacks_and_losses(device: torch.device, args) -> dict:
    x, mask = make_batch(args.check_batch, args.check_length, device)
    results = {}
    for name in ("resnet18a", "resnet18a_vl"):
        torch.manual_seed(0)
        model = build_model(name).to(device).eval()
        with torch.no_grad():  # correctly classified: APGD returns a misclassified input unchanged
            y = model(x, mask).argmax(dim=1)
        for norm, eps in ATTACK_EPS.items():
            generator = torch.Generator(device=device).manual_seed(0)
            runs = {"pgd": lambda: attacks.pgd_attack(model, x, y, mask, eps, norm, steps=args.attack_steps,
                                                      restarts=1, early_stop=False, generator=generator),
                    "apgd-ce": lambda: autoattack.apgd_attack(model, x, y, mask, eps, norm, steps=args.attack_steps,
                                                              loss="ce", generator=generator),
                    "apgd-dlr": lambda: autoattack.apgd_attack(model, x, y, mask, eps, norm, steps=args.attack_steps,
                                                               loss="dlr", generator=generator)}
            for attack, run in runs.items():
                results[f"{name}, {attack}, L{norm} eps {eps:g}"] = check_perturbation(run(), x, mask, eps, norm,
                                                                                        device)
    losses = {row: check_loss(row, device, args) for row in STEP_ROWS}
    return {"attack_steps": args.attack_steps, "attacks": results, "losses": losses,
            "passed": all(r["passed"] for r in (*results.values(), *losses.values()))}


def method_loss(row: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                seed: int) -> torch.Tensor:
    """A STEP_ROWS row's training loss at the method's last epoch, its random draws seeded."""
    method, cfg = STEP_ROWS[row]
    torch.manual_seed(seed)
    return reproduce.SCRIPTS[method].loss_fn(model, x, y, mask, cfg.epochs - 1, cfg)[0]


def check_loss(row: str, device: torch.device, args) -> dict:
    """Finite on the device with finite gradients; equal to the CPU's when deterministic (the
    CPU gives the same value under two seeds)."""
    model, x, y, mask = model_and_batch("resnet18a", args.check_batch, args.check_length, torch.device("cpu"))
    with exact_float32():
        cpu = [method_loss(row, model, x, y, mask, seed).item() for seed in (0, 1)]
        device_model = copy.deepcopy(model).to(device)
        loss = method_loss(row, device_model, x.to(device), y.to(device), mask.to(device), 0)
        gradients = torch.autograd.grad(loss, list(device_model.parameters()), allow_unused=True)
    deterministic = cpu[0] == cpu[1]
    result = {"loss_device": loss.item(), "loss_cpu": cpu[0], "deterministic": deterministic,
              "finite": math.isfinite(loss.item()),
              "finite_gradients": all(bool(g.isfinite().all()) for g in gradients if g is not None)}
    if deterministic:
        result["relative_error"] = abs(loss.item() - cpu[0]) / max(abs(cpu[0]), 1e-30)
    result["passed"] = (result["finite"] and result["finite_gradients"]
                        and (not deterministic or result["relative_error"] <= FLOAT32_TOLERANCE))
    return result


def synthetic_task(samples: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, y, mask): three classes told apart by the period of a noisy sinusoid on every lead,
    with random lengths of half the array to all of it, right-aligned and zero-padded."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(0, len(SYNTHETIC_PERIODS), (samples,), generator=generator)
    phase = 2 * math.pi * torch.rand(samples, 8, 1, generator=generator)
    t = torch.arange(length, dtype=torch.float32)
    periods = torch.tensor(SYNTHETIC_PERIODS)[y][:, None, None]
    x = 0.5 * torch.sin(2 * math.pi * t / periods + phase) + 0.05 * torch.randn(samples, 8, length,
                                                                             generator=generator)
    lengths = torch.randint(length // 2, length + 1, (samples,), generator=generator)
    mask = (torch.arange(length) >= length - lengths[:, None]).float()[:, None, :]
    return (x * mask).clamp(-1, 1), y, mask


def check_training(device: torch.device, args, state: dict) -> dict:
    x, y, mask = (t.to(device) for t in synthetic_task(args.train_batch * 4, args.train_length, seed=0))
    torch.manual_seed(0)
    model = build_model("resnet18a_vl").to(device).train()
    optimizer = harness.make_optimizer(model, 1e-3, device)
    losses = []
    for step in range(args.train_steps):
        batch = slice((step % 4) * args.train_batch, (step % 4 + 1) * args.train_batch)
        loss = F.cross_entropy(model(x[batch], mask[batch]), y[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    state["trained"] = model.eval()
    third = max(len(losses) // 3, 1)
    first, last = float(np.mean(losses[:third])), float(np.mean(losses[-third:]))
    return {"model": "resnet18a_vl", "steps": args.train_steps, "batch": args.train_batch,
            "length": args.train_length, "losses": losses, "mean_first_third": first,
            "mean_last_third": last, "passed": last < first and all(map(math.isfinite, losses))}


def check_amp(device: torch.device, args, state: dict) -> dict:
    model = state.get("trained")
    if model is None:
        raise RuntimeError("no trained model (the training stage did not finish)")
    x, y, mask = (t.to(device) for t in synthetic_task(args.train_batch, args.train_length, seed=1))
    with torch.no_grad():
        full = model(x, mask).float()
        with torch.autocast(device.type, torch.bfloat16):
            amp = model(x, mask).float()
    accuracy = {name: float((logits.argmax(dim=1) == y).float().mean()) for name, logits in
                (("float32", full), ("bf16_autocast", amp))}
    error = relative_error(amp, full)
    return {"batch": len(y), "logits_relative_error": error, "accuracy": accuracy,
            "same_predictions": float((amp.argmax(dim=1) == full.argmax(dim=1)).float().mean()),
            "tolerance": AMP_TOLERANCE, "accuracy_gap_allowed": AMP_ACCURACY_GAP,
            "passed": error <= AMP_TOLERANCE
            and abs(accuracy["float32"] - accuracy["bf16_autocast"]) <= AMP_ACCURACY_GAP}


# --------------------------------------------------------------------------- speed


def time_step(make_step: Callable[[], Callable[[], object]], device: torch.device, budget: Budget,
              repeats: int, per_sample: int) -> dict:
    """Build a step, run it once (warm-up: cuDNN autotuning, compilation), then time up to
    ``repeats`` more as the budget allows; the fastest counts (wall time, the queue drained)."""
    free_device_memory(device)
    step = make_step()
    warmup = timed(step, device)[0]
    times: list[float] = []
    while len(times) < repeats and budget.refusal(min([warmup, *times])) is None:
        times.append(timed(step, device)[0])
    best = min(times) if times else warmup
    return {"seconds_per_step": best, "seconds_per_sample": best / per_sample, "warmup_s": warmup,
            "step_s": times, "peak_memory_mb": peak_memory_mb(device),
            **({} if times else {"note": "no time for a repeat: the warm-up step counts"})}


def timed_rows(rows: dict[str, Callable[[], Callable[[], object]]], device: torch.device, budget: Budget,
               repeats: int, per_sample: int, reserve: float) -> dict:
    """time_step for each row while ``reserve`` seconds (an estimate of one row, raised to the
    longest row so far) still fit; a row's error is recorded in one line and the next row runs."""
    results = {}
    for name, make_step in rows.items():
        refusal = budget.refusal(reserve)
        if refusal:
            results[name] = {"status": refusal}
            continue
        started = time.perf_counter()
        try:
            results[name] = {"status": "done", **time_step(make_step, device, budget, repeats, per_sample)}
        except Exception as error:  # noqa: BLE001 (an out-of-memory or compile failure of one row)
            results[name] = {"status": f"error: {one_line(error)}"}
        free_device_memory(device)
        reserve = max(reserve, time.perf_counter() - started)
    return results


def method_rows(args, device: torch.device, model_name: str, length: int, amp: bool,
                compile_backend: str | None = None) -> dict[str, Callable[[], Callable[[], object]]]:
    """{row: a function building its training step} for every method, as bench_methods times them."""
    def builder(row: str) -> Callable[[], Callable[[], object]]:
        def make_step():
            model, x, y, mask = model_and_batch(model_name, args.batch_size, length, device)
            run = model if compile_backend is None else torch.compile(model, backend=compile_backend)
            return training_step(row, run, x, y, mask, amp=amp)
        return make_step
    return {row: builder(row) for row in STEP_ROWS}


def evaluation_rows(args, device: torch.device) -> dict[str, Callable[[], Callable[[], object]]]:
    """bench_methods' evaluation rows: a clean forward pass and PGD with args.pgd_steps iterations."""
    def builder(row: str) -> Callable[[], Callable[[], object]]:
        return lambda: evaluation_step(row, *model_and_batch("resnet18a", args.batch_size, args.length, device),
                                       args.pgd_steps)
    return {row: builder(row) for row in (selection.CLEAN_ROW, pgd_row(args.pgd_steps))}


def speed_stage(rows_of: Callable[[], dict], args, device: torch.device, budget: Budget,
                compiled: bool = False) -> dict:
    """Time the rows with cuDNN benchmark on; a row starts while a fortieth of the budget (a sixth
    when compiling) or the longest row so far still fits. A row's error makes the stage's status
    an error."""
    torch.backends.cudnn.benchmark = True
    reserve = budget.seconds / (6 if compiled else 40)
    rows = timed_rows(rows_of(), device, budget, args.repeats, args.batch_size, reserve)
    errors = sum(row["status"].startswith("error") for row in rows.values())
    return {"rows": rows, **({"status": f"error: {errors} of {len(rows)} rows failed"} if errors else {}),
            "cudnn_benchmark": True, "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32,
                                              "cudnn": torch.backends.cudnn.allow_tf32}}


def project_paper_cost(args, device: torch.device, state: dict, out: Path) -> dict:
    """selection.estimate_seconds for each run of ``reproduce.py --preset paper`` on the float32
    paper-path rows and the evaluation rows of this run (written as DIR/methods.json, in
    bench_methods' format, which the rule reads; a PGD row of other than 100 iterations stands
    for PGD-100 scaled by its iterations, as the rule scales PGD-100 to a sweep's)."""
    timed_rows_found = {name: row for stage in ("speed: paper path, float32", "speed: evaluation")
                        for name, row in state["results"]["stages"].get(stage, {}).get("rows", {}).items()
                        if row.get("status") == "done"}
    if not timed_rows_found:
        return {"status": "skipped: no timed rows (the speed stages did not run)"}
    benchmark = out / "methods.json"
    write_json({"command": state["results"]["command"],
                "settings": {"length": args.length, "batch_size": args.batch_size, "device": str(device),
                             "threads": torch.get_num_threads()},
                "rows": [{"row": selection.PGD_ROW, "seconds_per_sample": row["seconds_per_sample"] * 100
                          / args.pgd_steps} if name == pgd_row(args.pgd_steps) else
                         {"row": name, "seconds_per_sample": row["seconds_per_sample"]}
                         for name, row in timed_rows_found.items()]}, benchmark)
    runs, total = {}, 0.0
    for job in reproduce.plan_jobs("paper", list(METHODS)):
        try:
            parts = selection.estimate_seconds(job.method, job.cfg, reproduce.SELECTION_SWEEP, benchmark)
        except KeyError as missing:
            runs[job.run_dir.name] = {"status": f"no estimate: {missing.args[0]}"}
            continue
        runs[job.run_dir.name] = {"status": "done", "seconds": parts, "hours": sum(parts.values()) / 3600}
        total += sum(parts.values())
    estimated = sum(r["status"] == "done" for r in runs.values())
    return {"rule": "selection.estimate_seconds per run of reproduce.plan_jobs('paper'): training, the clean "
                    "evaluation of the validation and test splits and a pgd_linf sweep on the validation split "
                    f"(its rows: {benchmark.name})", "runs": runs, "total_hours": total / 3600,
            "runs_estimated": estimated,
            "note": "tiny sizes: not a projection of anything" if args.tiny else
            f"{device.type} at batch {args.batch_size}, T = {args.length}"}


# --------------------------------------------------------------------------- the run


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def versions(device: torch.device) -> dict:
    return {**environment(device), "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "numpy": np.__version__, "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "stand_ins": STOOD_IN}


def stage_list(args, device: torch.device, budget: Budget, state: dict, out: Path) -> list[tuple[str, float, Callable]]:
    """(name, seconds it needs at least, the stage) in the order they run."""
    share = budget.seconds / 100  # the check stages' estimate: a small share of the run each
    paper, vl, backend = "resnet18a", "resnet18a_vl", args.compile_backend

    def speed(model_name: str, length: int, amp: bool, compiled: str | None = None) -> Callable[[], dict]:
        return lambda: speed_stage(lambda: method_rows(args, device, model_name, length, amp, compiled), args,
                                   device, budget, compiled=compiled is not None)
    return [
        ("models: device against CPU", share, lambda: check_models(device, args)),
        ("attacks and losses", share, lambda: check_attacks_and_losses(device, args)),
        ("training", share, lambda: check_training(device, args, state)),
        ("amp", share / 4, lambda: check_amp(device, args, state)),
        ("speed: paper path, float32", 4 * share, speed(paper, args.length, False)),
        ("speed: evaluation", 4 * share,
         lambda: speed_stage(lambda: evaluation_rows(args, device), args, device, budget)),
        ("projection: reproduce.py --preset paper", 0.0, lambda: project_paper_cost(args, device, state, out)),
        ("speed: paper path, AMP", 4 * share, speed(paper, args.length, True)),
        ("speed: variable length, float32", 4 * share, speed(vl, args.bucket_length, False)),
        ("speed: variable length, AMP", 4 * share, speed(vl, args.bucket_length, True)),
        ("speed: paper path, torch.compile, float32", 4 * share, speed(paper, args.length, False, backend)),
        ("speed: paper path, torch.compile, AMP", 4 * share, speed(paper, args.length, True, backend)),
    ]


def run_stages(args, device: torch.device, out: Path, command: str) -> dict:
    budget = Budget(args.budget_s)
    results = {"command": command, "versions": versions(device),
               "settings": {key: value for key, value in vars(args).items() if key != "out"}, "stages": {}}
    state = {"results": results}
    for name, needs, stage in stage_list(args, device, budget, state, out):
        refusal = budget.refusal(needs)
        started = time.perf_counter()
        if refusal:
            record = {"status": refusal}
        else:
            try:
                record = stage()
                if "status" not in record:
                    record["status"] = ("passed" if record["passed"] else "failed") if "passed" in record else "done"
            except Exception as error:  # noqa: BLE001 (every stage's failure is recorded; the next runs)
                record = {"status": f"error: {one_line(error)}", "traceback": traceback.format_exc()}
            free_device_memory(device)
        record["seconds"] = time.perf_counter() - started
        results["stages"][name] = record
        results["elapsed_s"] = budget.elapsed()
        write_results(results, out)
        print(f"{name}: {record['status']} ({record['seconds']:.1f} s)", flush=True)
    return results


def write_results(results: dict, out: Path) -> None:
    write_json(results, out / "gpu_check.json")
    write_text_atomic(out / "gpu_check.md", report(results))


def report(results: dict) -> str:
    """gpu_check.md: the versions, each stage's status, the checks' figures and the speed table."""
    v, stages = results["versions"], results["stages"]
    lines = [f"# gpu_check: {v['device_name']} ({v['device']})", "",
             f"`{results['command']}`", "",
             f"torch {v['torch']}, CUDA {v['cuda']}, cuDNN {v['cudnn']}, Python {v['python']}, numpy {v['numpy']}, "
             f"CPU threads {v['threads']}; {v['platform']}",
             f"stand-ins for absent packages: {', '.join(v['stand_ins']) or 'none'}",
             f"elapsed {results.get('elapsed_s', 0):.1f} s of a {results['settings']['budget_s']:g} s budget", "",
             "| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {stage['status']} | {stage['seconds']:.1f} |" for name, stage in stages.items()]
    models = stages.get("models: device against CPU", {})
    if "models" in models:
        lines += ["", f"Device against CPU ({models['settings']}; batch {models['batch']}, T = {models['length']}), "
                  f"relative error, tolerance {models['tolerance']:g}:", "",
                  "| model | logits | input gradient | passed |", "|---|---|---|---|"]
        lines += [f"| {name} | {r['logits_relative_error']:.2e} | {r['input_gradient_relative_error']:.2e} | "
                  f"{r['passed']} |" for name, r in models["models"].items()]
    checks = stages.get("attacks and losses", {})
    if "attacks" in checks:
        lines += ["", f"Attacks ({checks['attack_steps']} iterations):", "",
                  "| attack | padding untouched | within eps (largest norm / eps) | in [-1, 1] | passed |",
                  "|---|---|---|---|---|"]
        lines += [f"| {name} | {r['padding_untouched']} | {r['within_eps']} ({r['largest_norm_over_eps']:.4f}) | "
                  f"{r['in_range']} | {r['passed']} |" for name, r in checks["attacks"].items()]
        lines += ["", "Training losses (last epoch), device against CPU:", "",
                  "| method | device | CPU | deterministic | relative error | finite gradients | passed |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {name} | {r['loss_device']:.6g} | {r['loss_cpu']:.6g} | {r['deterministic']} | "
                  f"{r.get('relative_error', float('nan')):.2e} | {r['finite_gradients']} | {r['passed']} |"
                  for name, r in checks["losses"].items()]
    training = stages.get("training", {})
    if "losses" in training:
        lines += ["", f"Training ({training['model']}, {training['steps']} steps of {training['batch']}, "
                  f"T = {training['length']}): mean loss {training['mean_first_third']:.4f} over the first third, "
                  f"{training['mean_last_third']:.4f} over the last."]
    amp = stages.get("amp", {})
    if "accuracy" in amp:
        lines += ["", f"AMP (bf16 autocast) against float32, {amp['batch']} synthetic records: logits relative "
                  f"error {amp['logits_relative_error']:.2e} (tolerance {amp['tolerance']:g}), accuracy "
                  f"{amp['accuracy']['float32']:.3f} float32, {amp['accuracy']['bf16_autocast']:.3f} AMP, "
                  f"same predictions {amp['same_predictions']:.3f}."]
    speed = {name.removeprefix("speed: "): stage["rows"] for name, stage in stages.items() if "rows" in stage}
    if speed:
        settings = results["settings"]
        lines += ["", f"Seconds per step (batch {settings['batch_size']}; paper path T = {settings['length']}, "
                  f"variable length T = {settings['bucket_length']}; cuDNN benchmark on; fastest of "
                  f"{settings['repeats']} steps after a warm-up (none: the warm-up's time); compile: "
                  f"{settings['compile_backend']}, its time is the warm-up's):", "", "| row | " + " | ".join(speed) + " |", "|---|" + "---|" * len(speed)]
        for row in dict.fromkeys(name for rows in speed.values() for name in rows):
            lines.append(f"| {row} | " + " | ".join(cell(rows.get(row)) for rows in speed.values()) + " |")
    projection = stages.get("projection: reproduce.py --preset paper", {})
    if "runs" in projection:
        lines += ["", f"Projected cost of `reproduce.py --preset paper` ({projection['note']}): "
                  f"{projection['total_hours']:.2f} hours of this device for {projection['runs_estimated']} of "
                  f"{len(projection['runs'])} runs; rule: {projection['rule']}.", "",
                  "| run | hours |", "|---|---|"]
        lines += [f"| {name} | {r['hours']:.3f} |" if r["status"] == "done" else f"| {name} | {r['status']} |"
                  for name, r in projection["runs"].items()]
    return "\n".join(lines) + "\n"


def cell(row: dict | None) -> str:
    if row is None:
        return "-"
    if row["status"] != "done":
        return row["status"]
    compile_note = f" (warm-up {row['warmup_s']:.1f})" if row["warmup_s"] > 3 * row["seconds_per_step"] else ""
    return f"{row['seconds_per_step']:.3g}{compile_note}"


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        device = open_device(args.device, args.threads)
    except (ConfigError, ValueError) as error:
        hint = "; --device cpu runs the check on the CPU" if "not available" in str(error) else ""
        print(f"error: {error}{hint}", file=sys.stderr)
        return 2
    out = Path(args.out)
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(lock_folder(out, "gpu_check folder"))
        except FolderInUseError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        except OSError as error:  # a file where the folder would be, no permission, ...
            problem = "a file, not a folder" if out.exists() and not out.is_dir() else error.strerror or error
            print(f"error: --out {out}: not usable as the output folder ({problem})", file=sys.stderr)
            return 2
        results = run_stages(args, device, out, command_line("gpu_check.py", argv))
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    failed = [name for name, stage in results["stages"].items()
              if stage["status"] == "failed" or stage["status"].startswith("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
