"""Benchmark: APGD-100 against 100 bare forward + input-gradient passes, and Square's
queries against bare forward passes.

APGD's own work per iteration (momentum, two projections, the best-point bookkeeping, the
checkpoint tests, early stop) should add little to the model's forward and input-gradient
pass: the target ratio is <= 1.15. Square should cost about one forward pass per query.
Both attacks run on ``resnet18a`` with random inputs, labels equal to the untrained
model's clean predictions and a budget too small to flip any of them, so that every
iteration and query runs on the whole batch (nothing is dropped by early stop); the
number of samples fooled is reported.

Example: python benchmarks/bench_autoattack.py --length 8192 --batch_size 8 --threads 1
Writes JSON to --out (default benchmarks/results/autoattack_<device>.json).
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
from perturbations.autoattack import apgd_attack, square_attack  # noqa: E402
from plumbing.flags import OneLineParser  # noqa: E402

SMOKE = dict(batch_size=2, length=3072, steps=3, queries=3, repeats=1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    add_attack_arguments(parser, "APGD iterations = bare passes")
    parser.add_flag("--queries", type=int, default=100, help="Square queries = bare forwards")
    parser.add_flag("--eps", type=float, default=1e-6,
                    help="L-inf budget (small: nothing is fooled, every step runs)")
    add_common_arguments(parser, "autoattack",
                         "tiny run for CI: batch 2, length 3072, 3 steps and queries, 1 repeat")
    args = parser.parse_args(argv)
    apply_smoke(args, SMOKE)
    check_at_least_one(args, "batch_size", "steps", "queries", "repeats")
    check_length(args.length)
    return args


def main(argv: list[str] | None = None) -> int:
    started = start(parse_args, argv)
    if started is None:
        return 2
    args, device = started
    command = command_line("bench_autoattack.py", argv)

    model, x, mask, y = attack_setup(args, device)

    def generator() -> torch.Generator:
        return torch.Generator(device=device).manual_seed(args.seed)

    def bare_forwards(count: int) -> None:
        with torch.no_grad():
            for _ in range(count):
                model(x, mask)

    cases = {  # name: (run it with a count, the count, the bare case it is compared with)
        "bare forward+input-grad": (lambda n: bare_passes(model, x, y, mask, n), args.steps, None),
        "apgd-ce": (lambda n: apgd_attack(model, x, y, mask, args.eps, steps=n, generator=generator()),
                    args.steps, "bare forward+input-grad"),
        "apgd-dlr": (lambda n: apgd_attack(model, x, y, mask, args.eps, steps=n, loss="dlr",
                                           generator=generator()), args.steps, "bare forward+input-grad"),
        "bare forward": (bare_forwards, args.queries, None),
        "square": (lambda n: square_attack(model, x, y, mask, args.eps, queries=n, generator=generator()),
                   args.queries, "bare forward"),
    }
    for run, count, _ in cases.values():  # warm-up: allocator, thread pools, kernels
        run(min(2, count))
    # On the CPU the ratios use process CPU time (steadier than wall time on a shared machine,
    # and with one thread it is the compute itself); on CUDA only wall time means anything.
    measure = 1 if device.type == "cpu" else 0
    timings: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    outputs = {}
    for _ in range(args.repeats):  # interleaved so that load drift hits every case alike
        for name, (run, count, _) in cases.items():
            timings[name].append(timed(lambda: outputs.__setitem__(name, run(count)), device))

    with torch.no_grad():
        fooled = {name: int((model(outputs[name], mask).argmax(dim=1) != y).sum())
                  for name, (_, _, bare) in cases.items() if bare}
    results = {}
    for name, (_, count, bare) in cases.items():
        walls, cpus = zip(*timings[name])
        median = statistics.median([walls, cpus][measure])
        results[name] = {"median_s": median, "min_s": min([walls, cpus][measure]),
                         "wall_s": list(walls), "cpu_s": list(cpus), "passes": count,
                         "per_pass_ms": 1000 * median / count}
    for name, (_, _, bare) in cases.items():
        results[name]["ratio_to_bare"] = (results[name]["median_s"] / results[bare]["median_s"]
                                          if bare else 1.0)
    results["square"]["queries_per_s"] = args.queries / results["square"]["median_s"]

    print(f"command: {command}")
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.model}, batch {args.batch_size}, length {args.length}, {args.steps} APGD "
          f"iterations, {args.queries} Square queries, {args.repeats} repeats (median "
          f"{'process CPU' if measure else 'wall'} time)")
    print(f"{'case':<26}{'median s':>10}{'min s':>10}{'per pass ms':>13}{'ratio':>8}")
    for name, result in results.items():
        print(f"{name:<26}{result['median_s']:>10.3f}{result['min_s']:>10.3f}"
              f"{result['per_pass_ms']:>13.2f}{result['ratio_to_bare']:>8.3f}")
    print(f"Square: {results['square']['queries_per_s']:.2f} queries/s on batches of {args.batch_size}; "
          f"fooled (eps {args.eps}): {fooled}; APGD ratio target <= {RATIO_TARGET}")

    out = args.out or default_out("autoattack", device, args.smoke)
    save_result(out, {
        "command": command, **environment(device), "model": args.model, "batch_size": args.batch_size,
        "length": args.length, "steps": args.steps, "queries": args.queries, "repeats": args.repeats,
        "eps": args.eps, "time": "process CPU" if measure else "wall", "fooled": fooled, "ratio_target": RATIO_TARGET, "smoke": args.smoke,
        "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
