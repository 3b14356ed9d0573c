"""Benchmark: records certified per second by randomized smoothing (certify.certify).

Certifying a record runs n0 + n noisy copies through the model, ``batch_size`` per forward
pass, so it should cost about (n0 + n) / batch_size bare forward passes of that batch. Measured
on an untrained ``resnet18a`` with random records in [-1, 1] (all signal), at each thread count
of --threads: records per second (wall and process CPU time) and the ratio of certify's time to
that many bare forward passes (the noise's own cost).

Example: python benchmarks/bench_certify.py --n 10000 --length 4096 --threads 1,2
Writes JSON to --out (default benchmarks/results/certify_<device>.json).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's modules

from benchmarks.common import (apply_smoke, check_at_least_one, command_line, default_out,  # noqa: E402
                               environment, open_device, save_result, timed)
from certify import certify  # noqa: E402
from ECG_CNN import build_model, check_length  # noqa: E402
from plumbing.flags import ConfigError, OneLineParser  # noqa: E402

SMOKE = dict(n0=2, n=6, batch_size=4, length=3072, records=1, bare_passes=1)


def thread_counts(text: str) -> list[int]:
    """--threads: comma-separated thread counts, each at least 1 (ValueError naming the flag)."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--threads: not a comma-separated list of whole numbers: {text!r}") from None
    if min(counts) < 1:
        raise ValueError(f"--threads must be >= 1, got {text}")
    return counts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_flag("--n0", type=int, default=100, help="selection copies per record")
    parser.add_flag("--n", type=int, default=10_000, help="estimation copies per record")
    parser.add_flag("--batch_size", type=int, default=64, help="noisy copies per forward pass")
    parser.add_flag("--length", type=int, default=4096, help="input length T")
    parser.add_flag("--records", type=int, default=1, help="records certified at each thread count")
    parser.add_flag("--bare_passes", type=int, default=10, help="bare forward passes timed for the ratio")
    parser.add_flag("--model", default="resnet18a")
    parser.add_flag("--sigma", type=float, default=0.25)
    parser.add_flag("--seed", type=int, default=0)
    parser.add_flag("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    parser.add_flag("--threads", default="1,2", help="thread counts, comma-separated")
    parser.add_flag("--out", type=Path, default=None,
                    help="JSON path (default benchmarks/results/certify_<device>[_smoke].json)")
    parser.add_flag("--smoke", action="store_true", help="tiny run for CI: n0 2, n 6, length 3072, 1 record")
    args = parser.parse_args(argv)
    args.threads = thread_counts(args.threads)
    apply_smoke(args, SMOKE)
    check_at_least_one(args, "n0", "n", "batch_size", "records", "bare_passes")
    check_length(args.length)
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        device = open_device(args.device, None)
    except (ConfigError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    command = command_line("bench_certify.py", argv)
    torch.manual_seed(args.seed)
    model = build_model(args.model).to(device).eval()
    x = torch.rand(args.records, 8, args.length, device=device) * 2 - 1
    mask = torch.ones(args.records, 1, args.length, device=device)
    batch = x[:1].expand(args.batch_size, -1, -1).contiguous()
    batch_mask = mask[:1].expand(args.batch_size, -1, -1)
    passes = args.records * (math.ceil(args.n0 / args.batch_size) + math.ceil(args.n / args.batch_size))

    def bare() -> None:
        with torch.no_grad():
            for _ in range(args.bare_passes):
                model(batch, batch_mask)

    print(f"command: {command}")
    print(f"device {device}, torch {torch.__version__}, {args.model}, T {args.length}, n0 {args.n0}, n {args.n}, "
          f"batch {args.batch_size} noisy copies per pass, {args.records} record(s)")
    print(f"{'threads':>8}{'records/s':>12}{'s/record':>11}{'CPU s/record':>14}{'bare pass s':>13}{'ratio':>8}")
    rows = []
    for threads in args.threads:  # each row printed as soon as it is measured
        torch.set_num_threads(threads)
        bare()  # warm-up: allocator, thread pools, kernels
        pass_seconds = statistics.median(timed(bare, device)[0] for _ in range(2)) / args.bare_passes
        generator = torch.Generator(device=device).manual_seed(args.seed)
        wall, cpu = timed(lambda: certify(model, x, mask, args.sigma, args.n0, args.n, batch_size=args.batch_size,
                                          generator=generator), device)
        row = {"threads": threads, "records_per_s": args.records / wall, "seconds_per_record": wall / args.records,
               "cpu_seconds_per_record": cpu / args.records, "forward_passes": passes,
               "bare_pass_s": pass_seconds, "ratio_to_bare_passes": wall / (passes * pass_seconds)}
        rows.append(row)
        print(f"{row['threads']:>8}{row['records_per_s']:>12.4f}{row['seconds_per_record']:>11.2f}"
              f"{row['cpu_seconds_per_record']:>14.2f}{row['bare_pass_s']:>13.3f}{row['ratio_to_bare_passes']:>8.3f}",
              flush=True)
    out = args.out or default_out("certify", device, args.smoke)
    save_result(out, {"command": command, **environment(device), "model": args.model, "length": args.length,
                      "n0": args.n0, "n": args.n, "batch_size": args.batch_size, "records": args.records,
                      "sigma": args.sigma, "smoke": args.smoke, "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
