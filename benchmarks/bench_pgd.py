"""Benchmark: 100-iteration PGD against 100 bare forward + input-gradient passes.

The attack's own work per iteration (normalizing, stepping, projecting, clipping, the
early-stop bookkeeping) should add little to the model's forward and input-gradient
pass; the target ratio is <= 1.15. Two attack runs are timed on ``resnet18a`` with
random inputs and the same batch as the bare passes:

- ``pgd (no early stop)``: L-inf PGD, random start, ``early_stop=False``: every iteration runs.
- ``pgd (early stop)``: ``early_stop=True``, one start, on the untrained model with labels
  equal to its clean predictions and a budget too small to flip any of them, so that all
  iterations run and the early-stop bookkeeping (clean check, per-iteration freeze and
  host sync) is paid in full. The number of samples fooled is reported.

Example: python benchmarks/bench_pgd.py --length 8192 --batch_size 8
Writes JSON to --out (default benchmarks/results/pgd_<device>.json).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's modules

from benchmarks.common import (RATIO_TARGET, add_attack_arguments, add_common_arguments,  # noqa: E402
                               apply_smoke, attack_setup, bare_passes, check_at_least_one, command_line,
                               default_out, environment, save_result, start, timed)
from ECG_CNN import check_length  # noqa: E402
from attacks import pgd_attack  # noqa: E402
from plumbing.flags import OneLineParser  # noqa: E402

SMOKE = dict(batch_size=2, length=3072, steps=3, repeats=1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    add_attack_arguments(parser, "PGD iterations = bare passes")
    parser.add_flag("--eps", type=float, default=0.01, help="L-inf budget, no-early-stop run")
    parser.add_flag("--early_stop_eps", type=float, default=1e-6,
                    help="L-inf budget of the early-stop run (small: nothing is fooled)")
    add_common_arguments(parser, "pgd", "tiny run for CI: batch 2, length 3072, 3 steps, 1 repeat")
    args = parser.parse_args(argv)
    apply_smoke(args, SMOKE)
    check_at_least_one(args, "batch_size", "steps", "repeats")
    check_length(args.length)
    return args


def main(argv: list[str] | None = None) -> int:
    started = start(parse_args, argv)
    if started is None:
        return 2
    args, device = started
    command = command_line("bench_pgd.py", argv)

    model, x, mask, y_clean = attack_setup(args, device)  # nothing is clean-wrong in the early-stop run
    y_random = torch.randint(0, 9, (args.batch_size,), device=device)

    def run_pgd(early_stop: bool, steps: int) -> torch.Tensor:
        generator = torch.Generator(device=device).manual_seed(args.seed)
        if early_stop:
            return pgd_attack(model, x, y_clean, mask, args.early_stop_eps, steps=steps,
                              restarts=1, early_stop=True, generator=generator)
        return pgd_attack(model, x, y_random, mask, args.eps, steps=steps, early_stop=False,
                          generator=generator)

    cases = {
        "bare forward+input-grad": lambda steps: bare_passes(model, x, y_random, mask, steps),
        "pgd (no early stop)": lambda steps: run_pgd(False, steps),
        "pgd (early stop)": lambda steps: run_pgd(True, steps),
    }
    for case in cases.values():  # warm-up: allocator, thread pools, kernels
        case(min(2, args.steps))
    timings: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):  # interleaved so that load drift hits every case alike
        for name, case in cases.items():
            timings[name].append(timed(lambda: case(args.steps), device)[0])

    with torch.no_grad():
        fooled = int((model(run_pgd(True, args.steps), mask).argmax(dim=1) != y_clean).sum())
    baseline = statistics.median(timings["bare forward+input-grad"])
    results = {name: {"median_s": statistics.median(values), "min_s": min(values),
                      "all_s": values,
                      "ratio_to_bare": statistics.median(values) / baseline}
               for name, values in timings.items()}

    print(f"command: {command}")
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.model}, batch {args.batch_size}, length {args.length}, "
          f"{args.steps} iterations, {args.repeats} repeats (median)")
    print(f"{'case':<26}{'median s':>10}{'min s':>10}{'per iter ms':>13}{'ratio':>8}")
    for name, result in results.items():
        print(f"{name:<26}{result['median_s']:>10.3f}{result['min_s']:>10.3f}"
              f"{1000 * result['median_s'] / args.steps:>13.2f}{result['ratio_to_bare']:>8.3f}")
    print(f"early-stop run: {fooled} of {args.batch_size} samples fooled "
          f"(eps {args.early_stop_eps}); ratio target <= {RATIO_TARGET}")

    out = args.out or default_out("pgd", device, args.smoke)
    save_result(out, {
        "command": command, **environment(device), "model": args.model, "batch_size": args.batch_size, "length": args.length,
        "steps": args.steps, "repeats": args.repeats, "eps": args.eps,
        "early_stop_eps": args.early_stop_eps, "early_stop_fooled": fooled,
        "ratio_target": RATIO_TARGET, "smoke": args.smoke, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
