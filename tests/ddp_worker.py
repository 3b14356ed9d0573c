"""Helper of tests/test_distributed.py, run by it under torchrun (not a test module).

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py grads OUT
    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py train OUT METHOD \
        [--stop_on_rank R --stop_at_call K] -- <harness flags>

``grads``: every rank takes its share of a fixed union batch, runs a method's loss through
the DistributedDataParallel model and one backward, and saves the averaged gradients (and
the logged values) to OUT/<case>_rank<r>.pt; the test compares them with one process's
gradients on the union batch (``union_batch`` and ``labels_for`` rebuild it).
``train``: harness.main of METHOD (a method name of config.METHODS, with its script's loss)
with the given flags; each rank saves its final weights to OUT/weights_rank<r>.pt;
``--stop_on_rank R --stop_at_call K`` sends SIGTERM to rank R's own process during its K-th
loss evaluation, as a scheduler would.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training import harness  # noqa: E402
from config import parse_script  # noqa: E402
from ECG_CNN import build_model  # noqa: E402
from helpers import script_with  # noqa: E402
from plumbing import distributed  # noqa: E402
from plumbing.flags import ConfigError, OneLineParser  # noqa: E402
from reproduce import SCRIPTS  # noqa: E402

UNION = 6         # samples in the union batch (3 per rank with 2 ranks)
LENGTH = 3072
# Which samples of the union batch get their predicted label (the others a wrong one):
# "mixed" has correct samples on both ranks, "one_rank" on rank 0 only (rank 1 has n_r = 0).
PATTERNS = {"mixed": (0, 1, 3), "one_rank": (0, 2)}
CASES = {  # case name: (method, label pattern, extra settings)
    "CE": ("CE", "mixed", {}),
    "NSR_mixed": ("NSR", "mixed", {}),
    "NSR_one_rank": ("NSR", "one_rank", {}),
    "jacob": ("jacob", "mixed", {}),
    "advls": ("advls", "mixed", dict(adv_start_epoch=0, pgd_steps=2)),
    "fast_adv_wong": ("fast_adv", "mixed", dict(adv_start_epoch=0, wong_loss=1)),
}
# Cases whose random draws (FGSM's random start) are seeded alike before each rank's loss, so that
# one process computing each rank's share after the same seed gets DDP's gradient exactly.
SEEDED = {"fast_adv_wong": 5}


def union_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed union batch (x, mask): random signals, different lengths."""
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(UNION, 8, LENGTH, generator=generator) * 2 - 1
    mask = torch.zeros(UNION, 1, LENGTH)
    for i, start in enumerate(range(0, 6 * 300, 300)):
        mask[i, :, start:] = 1
    return x * mask, mask


def fresh_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("resnet18a")


def labels_for(model: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor, pattern: str) -> torch.Tensor:
    with torch.no_grad():
        predicted = model(x, mask).argmax(dim=1)
    correct = torch.zeros(UNION, dtype=torch.bool)
    correct[list(PATTERNS[pattern])] = True
    return torch.where(correct, predicted, (predicted + 1) % 9)


def case_config(case: str):
    method, _, extra = CASES[case]
    module = SCRIPTS[method]
    cfg = parse_script(module, argv=["--device", "cpu"])
    cfg.reg_start_epoch = 0  # NSR's extra terms from the first epoch
    for key, value in extra.items():
        setattr(cfg, key, value)
    return module, cfg


def grads(out: Path) -> None:
    device = distributed.init_distributed("cpu")
    rank, world = distributed.rank(), distributed.world_size()
    x, mask = union_batch()
    share = slice(rank * UNION // world, (rank + 1) * UNION // world)
    for case, (_, pattern, _) in CASES.items():
        module, cfg = case_config(case)
        model = fresh_model()
        y = labels_for(model, x, mask, pattern)
        ddp = distributed.distributed_model(model, device)
        if case in SEEDED:
            torch.manual_seed(SEEDED[case])
        loss, parts = module.loss_fn(ddp, x[share], y[share], mask[share], 0, cfg)
        logged, _ = distributed.average_logged({"loss": loss.detach(), **parts}, False)
        loss.backward()
        torch.save({"grads": {name: p.grad for name, p in model.named_parameters()}, "logged": logged},
                   out / f"{case}_rank{rank}.pt")
    distributed.shutdown_distributed()


def train(out: Path, method: str, stop_on_rank: int, stop_at_call: int, flags: list[str]) -> int:
    module = SCRIPTS[method]
    seen: dict = {"calls": 0}

    def loss_fn(model, x, y, mask, epoch, cfg):
        seen["model"] = model
        seen["calls"] += 1
        if distributed.rank() == stop_on_rank and seen["calls"] == stop_at_call:
            os.kill(os.getpid(), signal.SIGTERM)
        return module.loss_fn(model, x, y, mask, epoch, cfg)

    status = harness.main(script_with(module, loss_fn=loss_fn), argv=flags)
    if "model" in seen:
        torch.save(distributed.unwrap(seen["model"]).state_dict(), out / f"weights_rank{distributed.rank()}.pt")
    return status


def main() -> int:
    parser = OneLineParser()
    parser.add_argument("mode", choices=("grads", "train"))
    parser.add_argument("out", type=Path)
    parser.add_argument("method", nargs="?", choices=SCRIPTS)
    parser.add_flag("--stop_on_rank", type=int, default=-1)
    parser.add_flag("--stop_at_call", type=int, default=0)
    try:
        args, flags = parser.parse_known_args()
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    flags = [f for f in flags if f != "--"]
    if args.mode == "grads":
        grads(args.out)
        return 0
    return train(args.out, args.method, args.stop_on_rank, args.stop_at_call, flags)


if __name__ == "__main__":
    sys.exit(main())
