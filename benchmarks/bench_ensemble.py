"""Benchmark: the strength and time of AutoAttack's two ensembles and of Square's two starts on a
trained run, over a class-balanced subset of its test records.

For each ensemble version (autoattack.ENSEMBLE_VERSIONS) the levels run as the ``autoattack``
sweeps run them (evaluate.robustness_sweep): each eps attacks only the records still unbroken at
the smaller ones (the envelope); per eps the robust accuracy (fraction of the records), which
attack broke how many records first, and the seconds. For each Square start
(autoattack.SQUARE_STARTS), Square alone at each eps on the clean-correct records with the
standard ensemble's budget at the levels ``--square_eps``: records broken and seconds. Budgets follow the sweeps: ``--steps``
APGD iterations, Square's queries config.square_queries(steps, version).

Example: python benchmarks/bench_ensemble.py result/demo/CE --records 18 --steps 5 --eps 0.001,0.003,0.005,0.007,0.01,0.03
Writes JSON to --out (default benchmarks/results/ensemble_<device>.json).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's modules

from perturbations.autoattack import ENSEMBLE_VERSIONS, SQUARE_STARTS, ensemble_attack, square_attack  # noqa: E402
from benchmarks.common import (add_common_arguments, apply_smoke, check_at_least_one, command_line,  # noqa: E402
                               default_out, environment, save_result, start)
from config import square_queries  # noqa: E402
from databases.cpsc2018 import DataError  # noqa: E402
from ECG_Dataset import get_dataloaders  # noqa: E402
from evaluate import EvaluationError, balanced_records, load_model  # noqa: E402
from plumbing.flags import OneLineParser  # noqa: E402

SMOKE = dict(records=2, steps=1, eps=[0.01], square_eps=[0.01])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a trained run folder (its model.pt) or checkpoint file")
    parser.add_flag("--records", type=int, default=18, help="class-balanced test records")
    parser.add_flag("--steps", type=int, default=5, help="APGD iterations (Square's queries scale with them)")
    parser.add_flag("--restarts", type=int, default=1)
    parser.add_flag("--eps", type=lambda text: [float(v) for v in text.split(",")],
                    default=[0.001, 0.003, 0.005, 0.007, 0.01, 0.03], help="comma-separated L-inf levels")
    parser.add_flag("--square_eps", type=lambda text: [float(v) for v in text.split(",")], default=[0.003, 0.01],
                    help="comma-separated L-inf levels of the Square starts' comparison")
    parser.add_flag("--seed", type=int, default=0)
    add_common_arguments(parser, "ensemble", "tiny run for CI: 2 records, 1 step, eps 0.01")
    args = parser.parse_args(argv)
    apply_smoke(args, SMOKE)
    check_at_least_one(args, "records", "steps", "restarts")
    return args


def main(argv: list[str] | None = None) -> int:
    started = start(parse_args, argv)
    if started is None:
        return 2
    args, device = started
    try:
        model, config = load_model(args.run, device)
        dataset = get_dataloaders(config["data_dir"], eval_batch_size=config["eval_batch_size"],
                                  max_length=config["max_length"], random_pad=config["random_pad"],
                                  splits=("test",))["test"].dataset
    except (EvaluationError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    model.eval()
    chosen = balanced_records(dataset.labels, args.records)
    x, y, mask = (torch.stack(parts).to(device) for parts in zip(*(dataset[i] for i in chosen)))

    def generator() -> torch.Generator:
        return torch.Generator(device=device).manual_seed(args.seed)

    def wrong(inputs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(inputs, mask[rows]).argmax(dim=1) != y[rows]

    everyone = torch.arange(len(y), device=device)
    clean_correct = int((~wrong(x, everyone)).sum())
    ensembles = {}
    for version, attack_names in ENSEMBLE_VERSIONS.items():
        unbroken, levels = ~wrong(x, everyone), []
        for eps in args.eps:
            rows = unbroken.nonzero().squeeze(1)
            began = time.perf_counter()
            counts = dict.fromkeys(attack_names, 0)
            if len(rows):
                _, broken_by = ensemble_attack(model, x[rows], y[rows], mask[rows], eps, "inf", version, args.steps,
                                               square_queries(args.steps, version), args.restarts,
                                               generator=generator())
                counts = {name: broken_by.count(name) for name in attack_names}
                unbroken[rows[[by != "" for by in broken_by]]] = False
            levels.append({"eps": eps, "robust_accuracy": float(unbroken.float().mean()), "broken_by": counts,
                           "seconds": round(time.perf_counter() - began, 2)})
            print(f"{version} eps {eps:g}: {levels[-1]}", flush=True)  # progress: the runs are long
        ensembles[version] = levels
    queries = square_queries(args.steps, "standard")
    starts = {}
    for square_start in SQUARE_STARTS:
        rows, levels = (~wrong(x, everyone)).nonzero().squeeze(1), []
        for eps in args.square_eps:
            began = time.perf_counter()
            x_adv = square_attack(model, x[rows], y[rows], mask[rows], eps, "inf", queries,
                                  generator=generator(), start=square_start)
            levels.append({"eps": eps, "broken": int(wrong(x_adv, rows).sum()),
                           "seconds": round(time.perf_counter() - began, 2)})
            print(f"square start {square_start} eps {eps:g}: {levels[-1]}", flush=True)
        starts[square_start] = levels

    command = command_line("bench_ensemble.py", argv)
    print(f"command: {command}")
    print(f"{args.run}: {len(y)} test records, {clean_correct} clean-correct; {args.steps} APGD steps, "
          f"{args.restarts} start(s); device {device}, {torch.get_num_threads()} threads")
    for version, levels in ensembles.items():
        print(f"ensemble {version} (Square {square_queries(args.steps, version)} queries), envelope:")
        for level in levels:
            print(f"  eps {level['eps']:g}: robust accuracy {level['robust_accuracy']:.3f}, broken by "
                  f"{level['broken_by']}, {level['seconds']:.1f} s")
    print(f"Square alone, {queries} queries, broken of {clean_correct} clean-correct records:")
    for square_start, levels in starts.items():
        print(f"  start {square_start}: " + ", ".join(f"eps {lv['eps']:g} {lv['broken']} ({lv['seconds']:.0f} s)"
                                                      for lv in levels))
    save_result(args.out or default_out("ensemble", device, args.smoke), {
        "command": command, **environment(device), "run": str(args.run), "records": len(y),
        "clean_correct": clean_correct, "steps": args.steps, "restarts": args.restarts, "seed": args.seed,
        "ensembles": ensembles, "square_starts": {"queries": queries, **starts}, "smoke": args.smoke})
    return 0


if __name__ == "__main__":
    sys.exit(main())
