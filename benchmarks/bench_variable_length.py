"""Benchmark: CE training-step time per sample, fixed T = 33792 against length-bucketed batches.

Cases (Adam, mean cross-entropy, forward + backward + step, the model in train mode):

- ``resnet18a, fixed T``: the paper's pipeline, every batch padded to max_length + random_pad.
- ``resnet18a_vl, fixed T``: the variable-length model on the same batches (the cost of masking).
- ``resnet18a_vl, bucketed``: the variable-length model on batches as ``get_dataloaders(...,
  bucket=True)`` forms them: a class-balanced epoch of CPSC2018-like records (6-60 s at
  500 Hz, median 12 s, mean ~16 s; classes sized like CPSC2018's single-label records)
  bucketed by BucketBatchSampler, each record shifted by a random 0..random_pad-1 samples,
  each batch cropped to its longest extent rounded up to 1024 (at least 3072). The epoch has
  hundreds of batch widths; ``--bucketed-steps`` batches at evenly spaced quantiles of that
  width distribution are timed, so their mean estimates the epoch's mean time per sample.

Every distinct input shape is run once before timing (oneDNN builds kernels per shape; a real
run meets each of its ~30 widths thousands of times). Cases are interleaved over the repeats
so that load drift on a shared machine hits them alike; compare ratios from one run only.
Wall-clock and process CPU time are both reported: on an oversubscribed CPU the CPU time
(best with --threads 1, where no thread spins waiting for another) is the steadier measure.

Example: python benchmarks/bench_variable_length.py --batch-size 8
Writes JSON to --out (default benchmarks/results/variable_length_<device>[_smoke].json).
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: import the repo's modules

from ECG_CNN import DOWNSAMPLE, MIN_LENGTH, build_model, check_length  # noqa: E402
from ECG_Dataset import BucketBatchSampler, ClassBalancedSampler  # noqa: E402

FS = 500
# Training-split records per class (Normal, AF, ..., STE): CPSC2018's single-label records
# less 5 + 50 for val and test; the largest, 1478, makes the 13302-sample epoch.
CLASS_SIZES = (863, 921, 631, 124, 1478, 477, 552, 729, 130)
SMOKE = dict(batch_size=2, max_length=2048, random_pad=1024, steps=1, bucketed_steps=2,
             repeats=1, class_scale=0.02)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=30720, help="records are cut to this")
    parser.add_argument("--random-pad", type=int, default=3072,
                        help="random shift range; fixed T = max-length + random-pad")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per fixed-T case and repeat")
    parser.add_argument("--bucketed-steps", type=int, default=8,
                        help="timed bucketed batches (width quantiles) per repeat")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats (median reported)")
    parser.add_argument("--class-scale", type=float, default=1.0,
                        help="scale of the class sizes (CPSC2018's at 1.0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmarks/results/variable_length_<device>[_smoke].json)")
    parser.add_argument("--smoke", action="store_true",
                        help="a run of seconds: batch 2, T 3072, 1 + 2 steps, 1 repeat")
    args = parser.parse_args(argv)
    if args.smoke:
        for name, value in SMOKE.items():
            setattr(args, name, value)
    for name in ("batch_size", "steps", "bucketed_steps", "repeats", "max_length"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.random_pad < 0 or args.class_scale <= 0:
        raise ValueError("--random-pad must be >= 0 and --class-scale > 0")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    check_length(args.max_length + args.random_pad)
    return args


def cpsc_like_lengths(count: int, max_length: int, rng: np.random.RandomState) -> np.ndarray:
    """Record lengths like CPSC2018's: 6-60 s at 500 Hz, median 12 s, mean ~16 s, cut at max_length."""
    seconds = np.clip(rng.lognormal(np.log(12.0), 0.75, count), 6.0, 60.0)
    return np.minimum((seconds * FS).astype(np.int64), max_length)


def batch_width(extents: np.ndarray) -> int:
    """crop_collate's width: the longest extent (length + shift) rounded up to 1024, at least 3072."""
    return max(MIN_LENGTH, -(-int(extents.max()) // DOWNSAMPLE) * DOWNSAMPLE)


def make_batch(lengths: np.ndarray, shifts: np.ndarray, width: int, generator: torch.Generator,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random signals of the given lengths, shifted left by ``shifts`` from the right end."""
    position = torch.arange(width)
    stops = torch.as_tensor(width - shifts)[:, None]
    mask = ((position >= stops - torch.as_tensor(lengths)[:, None]) & (position < stops)).float()
    x = (torch.rand(len(lengths), 8, width, generator=generator) * 2 - 1) * mask[:, None]
    y = torch.randint(0, 9, (len(lengths),), generator=generator)
    return x.to(device), y.to(device), mask[:, None].to(device)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    x, y, mask = batch
    loss = F.cross_entropy(model(x, mask), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        device = torch.device(args.device)
        torch.empty(0, device=device)  # fails early on an unavailable device
    except (ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/bench_variable_length.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    fixed_length = args.max_length + args.random_pad
    rng = np.random.RandomState(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)

    # The bucketed epoch: class-balanced resampling of CPSC-like records, a shift per visit.
    sizes = [max(1, round(size * args.class_scale)) for size in CLASS_SIZES]
    labels = np.repeat(np.arange(len(sizes)), sizes)
    lengths = cpsc_like_lengths(len(labels), args.max_length, rng)
    sampler = ClassBalancedSampler(labels, seed=args.seed)
    bucketed = BucketBatchSampler(sampler, lengths, args.batch_size, seed=args.seed)
    batches = list(bucketed)
    shifts = [rng.randint(0, max(args.random_pad, 1), len(batch)) for batch in batches]
    widths = np.array([batch_width(lengths[b] + s) for b, s in zip(batches, shifts)])
    signal = sum(int(lengths[b].sum()) for b in batches)
    samples = sum(len(b) for b in batches)
    epoch = {"records": len(labels), "samples": samples, "batches": len(batches),
             "mean_length": float(lengths[np.concatenate(batches)].mean()),
             "mean_bucketed_width": float(np.average(widths, weights=[len(b) for b in batches])),
             "distinct_widths": int(len(np.unique(widths))),
             "padding_fraction_fixed": 1 - signal / (fixed_length * samples),
             "padding_fraction_bucketed": 1 - signal / float(np.dot(widths, [len(b) for b in batches]))}

    # Timed batches: full batches at evenly spaced quantiles of the epoch's width distribution.
    full = [i for i, b in enumerate(batches) if len(b) == args.batch_size]
    by_width = sorted(full, key=lambda i: widths[i])
    chosen = [by_width[int((k + 0.5) / args.bucketed_steps * len(by_width))]
              for k in range(args.bucketed_steps)]
    bucketed_batches = [make_batch(lengths[batches[i]], shifts[i], int(widths[i]), generator, device)
                        for i in chosen]
    fixed_batches = [make_batch(lengths[batches[i]], shifts[i], fixed_length, generator, device)
                     for i in chosen[:args.steps]]
    while len(fixed_batches) < args.steps:
        fixed_batches.append(fixed_batches[-1])

    models = {name: build_model(name).to(device).train() for name in ("resnet18a", "resnet18a_vl")}
    models["resnet18a_vl"].load_state_dict(models["resnet18a"].state_dict())
    optimizers = {name: torch.optim.Adam(model.parameters(), lr=1e-3) for name, model in models.items()}
    cases = {
        f"resnet18a, fixed T={fixed_length}": ("resnet18a", fixed_batches),
        f"resnet18a_vl, fixed T={fixed_length}": ("resnet18a_vl", fixed_batches),
        "resnet18a_vl, bucketed": ("resnet18a_vl", bucketed_batches),
    }
    for name, case_batches in cases.values():  # warm-up: one step per distinct shape
        for width in sorted({batch[0].shape[-1] for batch in case_batches}):
            train_step(models[name], optimizers[name],
                       next(b for b in case_batches if b[0].shape[-1] == width))
    wall: dict[str, list[float]] = {case: [] for case in cases}  # seconds per sample
    cpu: dict[str, list[float]] = {case: [] for case in cases}
    for _ in range(args.repeats):
        for case, (name, case_batches) in cases.items():
            synchronize(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            for batch in case_batches:
                train_step(models[name], optimizers[name], batch)
            synchronize(device)
            count = sum(len(b[1]) for b in case_batches)
            wall[case].append((time.perf_counter() - start) / count)
            cpu[case].append((time.process_time() - start_cpu) / count)

    first = next(iter(cases))
    results = {case: {"median_ms_per_sample": 1000 * statistics.median(wall[case]),
                      "all_ms_per_sample": [1000 * v for v in wall[case]],
                      "speedup_vs_fixed_resnet18a": statistics.median(wall[first]) / statistics.median(wall[case]),
                      "median_cpu_ms_per_sample": 1000 * statistics.median(cpu[case]),
                      "all_cpu_ms_per_sample": [1000 * v for v in cpu[case]],
                      "cpu_speedup_vs_fixed_resnet18a": statistics.median(cpu[first]) / statistics.median(cpu[case]),
                      "widths": sorted({b[0].shape[-1] for b in cases[case][1]})}
               for case in cases}

    print(f"command: {command}")
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"batch {args.batch_size}, {args.repeats} repeats (median); shared CPU: compare ratios only")
    print(f"epoch: {epoch['samples']} samples in {epoch['batches']} batches, mean record "
          f"{epoch['mean_length']:.0f} samples, mean bucketed width {epoch['mean_bucketed_width']:.0f} "
          f"({epoch['distinct_widths']} widths); padding fraction fixed "
          f"{epoch['padding_fraction_fixed']:.3f}, bucketed {epoch['padding_fraction_bucketed']:.3f}")
    print(f"{'case':<32}{'wall ms/sample':>15}{'speed-up':>10}{'CPU ms/sample':>15}{'speed-up':>10}"
          "  timed widths")
    for case, result in results.items():
        print(f"{case:<32}{result['median_ms_per_sample']:>15.1f}"
              f"{result['speedup_vs_fixed_resnet18a']:>10.2f}{result['median_cpu_ms_per_sample']:>15.1f}"
              f"{result['cpu_speedup_vs_fixed_resnet18a']:>10.2f}  {result['widths']}")

    out = args.out or REPO / "benchmarks" / "results" / (
        f"variable_length_{device.type}{'_smoke' if args.smoke else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": command, "device": str(device), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "batch_size": args.batch_size, "max_length": args.max_length,
        "random_pad": args.random_pad, "fixed_length": fixed_length, "steps": args.steps,
        "bucketed_steps": args.bucketed_steps, "repeats": args.repeats, "seed": args.seed,
        "smoke": args.smoke, "epoch": epoch, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
