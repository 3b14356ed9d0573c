"""What every benchmark script shares: the device, the command line, timing and the JSON record."""
from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's modules

from attacks import ce_loss  # noqa: E402
from ECG_CNN import build_model  # noqa: E402
from ECG_Dataset import PADDED_LENGTH  # noqa: E402
from plumbing.distributed import choose_device  # noqa: E402
from plumbing.flags import ConfigError, OneLineParser  # noqa: E402
from plumbing.safe_writes import write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
RATIO_TARGET = 1.15  # an attack iteration may cost at most this many bare passes


def add_common_arguments(parser: OneLineParser, name: str, smoke_help: str) -> None:
    """--device, --threads, --out and --smoke, the same in every benchmark."""
    parser.add_flag("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    parser.add_flag("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_flag("--out", type=Path, default=None,
                    help=f"JSON path (default benchmarks/results/{name}_<device>[_smoke].json)")
    parser.add_flag("--smoke", action="store_true", help=smoke_help)


def add_attack_arguments(parser: OneLineParser, steps_help: str) -> None:
    """The sizes of the attack benchmarks (bench_pgd.py, bench_autoattack.py)."""
    parser.add_flag("--batch_size", type=int, default=8)
    parser.add_flag("--length", type=int, default=PADDED_LENGTH, help="input length T")
    parser.add_flag("--steps", type=int, default=100, help=steps_help)
    parser.add_flag("--repeats", type=int, default=3, help="timed repeats (median reported)")
    parser.add_flag("--model", default="resnet18a")
    parser.add_flag("--seed", type=int, default=0)


def check_at_least_one(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")


def start(parse_args: Callable[[list[str] | None], argparse.Namespace],
          argv: list[str] | None) -> tuple[argparse.Namespace, torch.device] | None:
    """(flags, device) of a benchmark, or None after one 'error: ...' line on stderr (a bad flag)."""
    try:
        args = parse_args(argv)
        return args, open_device(args.device, args.threads)
    except (ConfigError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return None


def attack_setup(args: argparse.Namespace, device: torch.device):
    """The attack benchmarks' starting point (seeded): an untrained ``args.model``, a random batch
    in [-1, 1] of ``args.length`` samples, its all-ones mask and the model's clean predictions."""
    torch.manual_seed(args.seed)
    model = build_model(args.model).to(device).eval()
    x = torch.rand(args.batch_size, 8, args.length, device=device) * 2 - 1
    mask = torch.ones(args.batch_size, 1, args.length, device=device)
    with torch.no_grad():
        clean_predictions = model(x, mask).argmax(dim=1)
    return model, x, mask, clean_predictions


def bare_passes(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                steps: int) -> None:
    """The floor for a gradient attack: ``steps`` forward + input-gradient passes on the same batch."""
    for _ in range(steps):
        x_req = x.detach().requires_grad_(True)
        torch.autograd.grad(ce_loss(model(x_req, mask), y), x_req)


def apply_smoke(args: argparse.Namespace, settings: dict) -> None:
    """With --smoke, replace the sizes by the benchmark's tiny ones (what CI runs)."""
    if args.smoke:
        for key, value in settings.items():
            setattr(args, key, value)


def default_out(name: str, device: torch.device, smoke: bool) -> Path:
    """Where a benchmark writes its JSON without --out; smoke runs never replace real results."""
    return RESULTS / f"{name}_{device.type}{'_smoke' if smoke else ''}.json"


def command_line(script: str, argv: list[str] | None) -> str:
    """The command as a user would type it from the repository root."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python", f"benchmarks/{script}", *(shlex.quote(a) for a in args)])


def open_device(name: str, threads: int | None) -> torch.device:
    """The torch device (``auto``: CUDA when there is one), checked by allocating on it.

    Raises ValueError with a one-line reason; sets the CPU thread count.
    """
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    try:
        device = choose_device(name)
        torch.empty(0, device=device)
    except (AssertionError, RuntimeError) as error:  # torch asserts when built without CUDA
        raise ValueError(f"--device {name}: not available here ({error})") from None
    if threads is not None:
        torch.set_num_threads(threads)
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call, the device's queue drained on both ends.

    On a shared CPU the process's CPU time is the steadier measure (with one thread it is
    the compute itself); on CUDA only the wall time means anything.
    """
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def environment(device: torch.device) -> dict:
    """The facts that a timing depends on, for the JSON record."""
    return {"device": str(device), "device_name": device_name(device), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version()}


def save_result(out: Path, record: dict) -> None:
    """Write a benchmark's JSON record to ``out`` and say where."""
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(record, out)
    print(f"wrote {out}")
