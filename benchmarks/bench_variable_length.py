"""Benchmark: one CE training epoch, the paper's fixed padding against resnet18a_vl on length buckets.

The epoch is the class-balanced training epoch of PROTOCOL section 3 over a real set of records:
those of ``--records`` (a CPSC2018 folder in either format, every single-label record in the
training split) or, by default, a synthetic CPSC2018-format dataset with CPSC2018-like
lengths written by synthetic.py. The records go through preprocess.py and
``get_dataloaders`` as in training. Cases (the harness's Adam, mean cross-entropy, forward + backward +
step, train mode), each from the same initial weights:

- ``resnet18a, fixed T``: the paper: every batch padded to max_length + random_pad. Its cost
  per sample does not depend on the records, so the epoch's first ``--fixed_steps`` batches
  are timed.
- ``resnet18a_vl, fixed T``: the variable-length model on those batches (the cost of masking).
- ``resnet18a_vl, bucketed``: ``get_dataloaders(..., bucket=True)``: the whole epoch is timed.
- ``resnet18a, bucketed (reference)``: the paper's model on those batches. Not a training
  option (its logits depend on the padding), but its time is what the bucketed epoch would
  cost without masking, which splits the speed-up into padding removed and masking paid.

The loaders draw the epoch's batches first (their time is reported as the data path's). Every
distinct input shape is run once before timing (oneDNN and cuDNN prepare kernels per shape; a
training run meets each of its widths over and over). Repeats are interleaved so that load
drift on a shared machine hits the cases alike; each batch's fastest step over the repeats
counts (interference only ever adds time). Compare ratios from one run only.

    python benchmarks/bench_variable_length.py --records data/CPSC2018/train   # or any CPSC2018 folder
    python benchmarks/bench_variable_length.py --smoke        # seconds; what CI runs

Writes JSON to --out (default benchmarks/results/variable_length_<device>[_smoke].json).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's modules

from benchmarks.common import (add_common_arguments, apply_smoke, check_at_least_one,  # noqa: E402
                               command_line, default_out, environment, open_device, save_result, timed)
from databases.cpsc2018 import DataError  # noqa: E402
from ECG_CNN import build_model, check_length  # noqa: E402
from ECG_Dataset import MAX_LENGTH, RANDOM_PAD, get_dataloaders, set_loader_epoch  # noqa: E402
from training.harness import make_optimizer  # noqa: E402
from plumbing.flags import ConfigError, OneLineParser  # noqa: E402
from preprocess import preprocess  # noqa: E402
from databases.synthetic import generate_dataset  # noqa: E402

SMOKE = dict(batch_size=2, max_length=4096, random_pad=1024, fixed_steps=1, repeats=1,
             synthetic_per_class=2, synthetic_max_seconds=8.0)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_flag("--records", type=Path, default=None,
                    help="a CPSC2018 folder (original .mat or WFDB); default: synthetic records")
    parser.add_flag("--synthetic_per_class", type=int, default=20,
                    help="records per class of the synthetic set (without --records)")
    parser.add_flag("--batch_size", type=int, default=64, help="default: the paper's 64")
    parser.add_flag("--max_length", type=int, default=MAX_LENGTH, help="records are cut to this")
    parser.add_flag("--random_pad", type=int, default=RANDOM_PAD,
                    help="training shift range; fixed T = max_length + random_pad")
    parser.add_flag("--fixed_steps", type=int, default=2, help="timed batches per fixed-T case")
    parser.add_flag("--repeats", type=int, default=3, help="timed repeats (each batch's fastest counts)")
    parser.add_flag("--epoch", type=int, default=0, help="which epoch of the sampler")
    parser.add_flag("--seed", type=int, default=0)
    add_common_arguments(parser, "variable_length",
                         "seconds: 18 short synthetic records, batch 2, T 5120, 1 repeat")
    args = parser.parse_args(argv)
    args.synthetic_max_seconds = 60.0
    apply_smoke(args, SMOKE)
    check_at_least_one(args, "batch_size", "fixed_steps", "repeats", "max_length", "synthetic_per_class")
    if args.random_pad < 0 or args.epoch < 0:
        raise ValueError("--random_pad and --epoch must be >= 0")
    if args.records is not None and not args.records.is_dir():
        raise ValueError(f"--records {args.records}: not a folder")
    check_length(args.max_length + args.random_pad)
    return args


def build_cache(args: argparse.Namespace, work: Path) -> tuple[Path, str]:
    """The preprocessed cache of the benchmark's records, and a line saying what they are."""
    raw = args.records
    if raw is None:
        raw = work / "raw"
        generate_dataset(raw, args.synthetic_per_class, seed=args.seed,
                         max_seconds=args.synthetic_max_seconds)
    summary = preprocess(raw, work / "cache", val_per_class=0, test_per_class=0)
    what = (f"{args.records}" if args.records else
            f"SYNTHETIC records (synthetic.py, {args.synthetic_per_class} per class)")
    train = sum(summary["class_counts"]["train"].values())
    return work / "cache", f"{what}: {train} training records, {len(summary['skipped'])} skipped"


def draw_epoch(cache: Path, args: argparse.Namespace, bucket: bool, steps: int | None
               ) -> tuple[list[Batch], float]:
    """The epoch's first ``steps`` batches (all with None) as the training loader gives them,
    and the loader's CPU seconds per sample."""
    loader = get_dataloaders(str(cache), args.batch_size, max_length=args.max_length,
                             random_pad=args.random_pad, seed=args.seed, splits=("train",),
                             bucket=bucket)["train"]
    set_loader_epoch(loader, args.epoch)
    torch.manual_seed(args.seed)  # the random shifts
    batches: list[Batch] = []
    _, cpu = timed(lambda: batches.extend(b for _, b in zip(range(steps or len(loader)), loader)),
                   torch.device("cpu"))
    return batches, cpu / sum(len(y) for _, y, _ in batches)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Batch,
               device: torch.device) -> None:
    x, y, mask = (part.to(device, non_blocking=True) for part in batch)
    loss = F.cross_entropy(model(x, mask), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def padding_fraction(batches: list[Batch]) -> float:
    return 1 - sum(float(mask.sum()) for _, _, mask in batches) / sum(mask.numel() for _, _, mask in batches)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        device = open_device(args.device, args.threads)
        with tempfile.TemporaryDirectory() as work:
            cache, records = build_cache(args, Path(work))
            fixed, fixed_data = draw_epoch(cache, args, bucket=False, steps=args.fixed_steps)
            bucketed, bucketed_data = draw_epoch(cache, args, bucket=True, steps=None)
    except (ConfigError, ValueError, RuntimeError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    command = command_line("bench_variable_length.py", argv)
    fixed_length = args.max_length + args.random_pad
    epoch_samples = sum(len(y) for _, y, _ in bucketed)

    torch.manual_seed(args.seed)
    initial = build_model("resnet18a").state_dict()
    models = {name: build_model(name).to(device).train() for name in ("resnet18a", "resnet18a_vl")}
    optimizers = {}
    for name, model in models.items():
        model.load_state_dict(initial)
        optimizers[name] = make_optimizer(model, 1e-3, device)
    cases = {f"resnet18a, fixed T={fixed_length}": ("resnet18a", fixed),
             f"resnet18a_vl, fixed T={fixed_length}": ("resnet18a_vl", fixed),
             "resnet18a_vl, bucketed": ("resnet18a_vl", bucketed),
             "resnet18a, bucketed (reference)": ("resnet18a", bucketed)}
    for name, batches in cases.values():  # warm-up: one step per distinct shape
        for width in sorted({x.shape[-1] for x, _, _ in batches}):
            train_step(models[name], optimizers[name],
                       next(b for b in batches if b[0].shape[-1] == width), device)

    # Each batch's fastest step over the repeats (interference only ever adds time), per clock.
    best = {case: np.full((2, len(batches)), np.inf) for case, (_, batches) in cases.items()}
    for _ in range(args.repeats):
        for case, (name, batches) in cases.items():
            for index, batch in enumerate(batches):
                seconds = timed(lambda: train_step(models[name], optimizers[name], batch, device), device)
                best[case][:, index] = np.minimum(best[case][:, index], seconds)

    results = {}
    for case, (_, batches) in cases.items():
        wall, cpu = best[case].sum(axis=1) / sum(len(y) for _, y, _ in batches)
        results[case] = {
            "ms_per_sample": 1000 * wall, "cpu_ms_per_sample": 1000 * cpu,
            "epoch_seconds": wall * epoch_samples,
            "batches_timed": len(batches),
            "padding_fraction": padding_fraction(batches),
            "widths": sorted({x.shape[-1] for x, _, _ in batches})}
    first = results[next(iter(cases))]
    for result in results.values():
        result["speedup_vs_fixed_resnet18a"] = first["ms_per_sample"] / result["ms_per_sample"]
        result["cpu_speedup_vs_fixed_resnet18a"] = first["cpu_ms_per_sample"] / result["cpu_ms_per_sample"]
    widths = np.array([x.shape[-1] for x, _, _ in bucketed])
    sizes = np.array([len(y) for _, y, _ in bucketed])
    epoch = {"samples": epoch_samples, "batches": len(bucketed),
             "mean_bucketed_width": float(np.average(widths, weights=sizes)),
             "distinct_widths": int(len(np.unique(widths))),
             "data_cpu_ms_per_sample_fixed": 1000 * fixed_data,
             "data_cpu_ms_per_sample_bucketed": 1000 * bucketed_data}

    print(f"command: {command}")
    print(f"records: {records}")
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"batch {args.batch_size}, each batch's fastest of {args.repeats} repeats; compare ratios from one run only")
    print(f"epoch {args.epoch}: {epoch_samples} samples in {len(bucketed)} bucketed batches, mean width "
          f"{epoch['mean_bucketed_width']:.0f} ({epoch['distinct_widths']} widths); data path "
          f"{epoch['data_cpu_ms_per_sample_fixed']:.2f} ms/sample fixed, "
          f"{epoch['data_cpu_ms_per_sample_bucketed']:.2f} bucketed (CPU)")
    print(f"{'case':<34}{'wall ms/sample':>15}{'speed-up':>10}{'CPU ms/sample':>15}{'speed-up':>10}"
          f"{'epoch s':>9}{'padding':>9}")
    for case, result in results.items():
        print(f"{case:<34}{result['ms_per_sample']:>15.1f}"
              f"{result['speedup_vs_fixed_resnet18a']:>10.2f}{result['cpu_ms_per_sample']:>15.1f}"
              f"{result['cpu_speedup_vs_fixed_resnet18a']:>10.2f}{result['epoch_seconds']:>9.1f}"
              f"{result['padding_fraction']:>9.2f}")

    out = args.out or default_out("variable_length", device, args.smoke)
    save_result(out, {
        "command": command, "records": records, **environment(device),
        "settings": {key: (str(value) if isinstance(value, Path) else value)
                     for key, value in vars(args).items() if key != "out"},
        "fixed_length": fixed_length, "epoch": epoch, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
