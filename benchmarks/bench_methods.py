"""Time per sample of each method's training step and of evaluation, with peak memory.

    python benchmarks/bench_methods.py                       # the paper's T = 33792, batch 8
    python benchmarks/bench_methods.py --length 8192 --repeats 2
    python benchmarks/bench_methods.py --smoke               # seconds; what CI runs

Every row runs in its own process so that its peak memory is its own (peak RSS on the
CPU, peak allocated memory on CUDA). A training step is forward, the method's loss,
backward and an Adam step at the method's last epoch, so that its extra terms are active
(NSR's from its start epoch, advls, TRADES and fast_adv at their final eps); the labels are the model's own
predictions, so the terms that apply to correctly classified samples run on the whole batch
(their worst case).
Evaluation rows: a clean forward pass, and PGD with 100 iterations (L-inf, eps 0.01, no
early stop, one start). The data row times the training DataLoader (class-balanced sampler,
random pad, no worker processes) over an in-memory cache of 200 records with CPSC2018-like
lengths. Prints a table, the command line and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's modules

import attacks  # noqa: E402
from training import harness  # noqa: E402
from analysis.selection import CLEAN_ROW, PGD_ROW, benchmark_row  # noqa: E402
from benchmarks.common import (add_common_arguments, apply_smoke, command_line,  # noqa: E402
                               default_out, environment, open_device, save_result, timed)
from config import parse_script  # noqa: E402
from ECG_CNN import build_model  # noqa: E402
from ECG_Dataset import PADDED_LENGTH, RANDOM_PAD, ClassBalancedSampler, ECGDataset  # noqa: E402
from plumbing.flags import ConfigError, OneLineParser  # noqa: E402
from preprocess import Cache  # noqa: E402
from reproduce import SCRIPTS  # noqa: E402

STEP_VARIANTS = {"jacob": [["--jacobian_projections", "1"]], "fast_adv": [["--wong_loss", "1"]]}  # settings timed besides a method's defaults
# The training-step rows, {row: (method, its settings)}, in config.METHODS' order
STEP_ROWS = {benchmark_row(method, cfg): (method, cfg)
             for method, script in SCRIPTS.items() for flags in [[], *STEP_VARIANTS.get(method, [])]
             for cfg in [parse_script(script, argv=flags)]}
LOADER_ROW = "data: training loader"
ROWS = [*STEP_ROWS, LOADER_ROW, CLEAN_ROW, PGD_ROW]
PGD_EPS = 0.01  # the PGD row's L-inf budget: the paper's


def make_batch(batch_size: int, length: int, device: torch.device):
    """Scaled random signals, right-aligned with CPSC2018-like lengths (6 s up to the whole T)."""
    generator = torch.Generator().manual_seed(0)
    x = (2 * torch.rand(batch_size, 8, length, generator=generator) - 1) * 0.5
    lengths = torch.randint(min(3000, length), length + 1, (batch_size,), generator=generator)
    mask = (torch.arange(length) >= length - lengths[:, None]).float()[:, None, :]
    return (x * mask).to(device), mask.to(device)


def make_loader(batch_size: int, length: int):
    """The training loader over 200 random records of 6 to 60 s (truncated to fit ``length``)."""
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(6500), 0.5, 200).astype(int), 3000, 30000)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    names = [f"A{i:04d}" for i in range(200)]
    records = pd.DataFrame({"Recording": names, "First_label": rng.integers(1, 10, 200),
                            "offset": offsets, "length": lengths}).set_index("Recording", drop=False)
    cache = Cache(signals=rng.normal(size=(12, lengths.sum())).astype(np.float32), records=records,
                  splits={}, meta={})
    pad = min(RANDOM_PAD, length - 1024)
    dataset = ECGDataset(cache, records, length - pad, length, random_pad=pad)
    return torch.utils.data.DataLoader(dataset, batch_size, sampler=ClassBalancedSampler(dataset.labels))


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def model_and_batch(model_name: str, batch_size: int, length: int, device: torch.device):
    """(model, x, y, mask), in training_step's and evaluation_step's order: the seeded model and
    make_batch's batch on ``device``, the labels the model's own predictions (so that every term
    of a loss or an attack for correctly classified samples is active)."""
    torch.manual_seed(0)
    model = build_model(model_name).to(device)
    x, mask = make_batch(batch_size, length, device)
    with torch.no_grad():
        y = model(x, mask).argmax(dim=1)
    return model, x, y, mask


def pgd_row(steps: int) -> str:
    """The PGD evaluation row's name: PGD_ROW at its 100 iterations, else named by its own count."""
    return PGD_ROW if steps == 100 else f"eval: PGD-{steps}"


def evaluation_step(row: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                    pgd_steps: int) -> Callable[[], None]:
    """CLEAN_ROW's clean forward pass, or PGD with ``pgd_steps`` iterations (L-inf, PGD_EPS, one
    start, no early stop) for the PGD row; puts the model in eval mode."""
    model.eval()
    if row == CLEAN_ROW:
        def step():
            with torch.no_grad():
                model(x, mask)
    else:
        def step():
            attacks.pgd_attack(model, x, y, mask, PGD_EPS, "inf", steps=pgd_steps, restarts=1, early_stop=False)
    return step


def training_step(row: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                  amp: bool = False) -> Callable[[], None]:
    """One training step of a STEP_ROWS row on this batch, as the harness takes it (the loss under
    bf16 autocast with ``amp``), at the method's last epoch; puts the model in train mode. Adam
    runs at learning rate 0 (the same work): the weights stay as they are, so the labels stay the
    model's predictions and every timed step attacks the whole batch, not the fewer samples an
    updated model still gets right."""
    method, cfg = STEP_ROWS[row]
    optimizer = harness.make_optimizer(model, 0.0, x.device)
    model.train()

    def step():
        with torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
            loss, _ = SCRIPTS[method].loss_fn(model, x, y, mask, cfg.epochs - 1, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def measure(row: str, args) -> dict:
    """Seconds per sample of one row, measured in this process."""
    device = open_device(args.device, args.threads)
    model, x, y, mask = model_and_batch("resnet18a", args.batch_size, args.length, device)
    if row in STEP_ROWS:
        step = training_step(row, model, x, y, mask)
    elif row == LOADER_ROW:
        loader = make_loader(args.batch_size, args.length)

        def step():
            for _ in zip(range(1), loader):  # one batch from a fresh iterator
                pass
    else:
        step = evaluation_step(row, model, x, y, mask, args.pgd_steps)
    for _ in range(args.warmup):
        step()
    times, cpu_times = zip(*(timed(step, device) for _ in range(args.repeats)))
    best = min(cpu_times) if device.type == "cpu" else min(times)
    return {"row": row, "seconds_per_sample": best / args.batch_size, "seconds_per_step": best,
            "wall_step_seconds": list(times), "cpu_step_seconds": list(cpu_times),
            "peak_memory_mb": peak_memory_mb(device)}


def main(argv=None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_flag("--length", type=int, default=PADDED_LENGTH, help=f"input length T (paper: {PADDED_LENGTH})")
    parser.add_flag("--batch_size", type=int, default=8)
    parser.add_flag("--repeats", type=int, default=3, help="timed steps; the fastest counts")
    parser.add_flag("--warmup", type=int, default=1)
    parser.add_flag("--pgd_steps", type=int, default=100)
    parser.add_flag("--rows", default=",".join(ROWS), help="comma-separated subset of: " + ", ".join(ROWS))
    add_common_arguments(parser, "methods", "tiny sizes, for CI")
    parser.add_flag("--worker", help=argparse.SUPPRESS)
    try:
        args = parser.parse_args(argv)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    apply_smoke(args, dict(length=3072, batch_size=2, repeats=1, warmup=0, pgd_steps=2))
    if args.worker:
        print(json.dumps(measure(args.worker, args)))
        return 0

    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        print(f"error: --rows: unknown row '{unknown[0]}'", file=sys.stderr)
        return 2
    try:
        device = open_device(args.device, args.threads)
    except (ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    given = sys.argv[1:] if argv is None else argv
    forwarded = [a for i, a in enumerate(given)  # each worker measures the one row it is given
                 if not a.startswith("--rows") and not (i and given[i - 1] == "--rows")]
    results = []
    for row in rows:
        command = [sys.executable, __file__, *forwarded, "--worker", row]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            print(f"error: row '{row}' failed:\n{done.stderr}", file=sys.stderr)
            return 1
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"  {row}: {results[-1]['seconds_per_sample'] * 1000:.1f} ms/sample", file=sys.stderr)
    ce = next((r["seconds_per_sample"] for r in results if r["row"] == "CE"), None)
    command = command_line("bench_methods.py", argv)
    settings = {"length": args.length, "batch_size": args.batch_size, "repeats": args.repeats,
                "warmup": args.warmup, "pgd_steps": args.pgd_steps, **environment(device)}
    measure_name = "process CPU time" if device.type == "cpu" else "wall time"
    print(f"\n{command}\ndevice {device} ({settings['device_name']}), T = {args.length}, "
          f"batch {args.batch_size}, fastest of {args.repeats} by {measure_name}\n")
    print("| row | ms / sample | x CE step | peak memory (MB) |\n|---|---|---|---|")
    for r in results:
        ratio = f"{r['seconds_per_sample'] / ce:.2f}" if ce else "-"
        print(f"| {r['row']} | {r['seconds_per_sample'] * 1000:.1f} | {ratio} | {r['peak_memory_mb']:.0f} |")
    out = args.out or default_out("methods", device, args.smoke)
    save_result(out, {"command": command, "settings": settings, "rows": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
