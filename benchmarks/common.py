"""What every benchmark script shares: the device, the command line, timing and the JSON record."""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def add_common_arguments(parser: argparse.ArgumentParser, name: str, smoke_help: str) -> None:
    """--device, --threads, --out and --smoke, the same in every benchmark."""
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"JSON path (default benchmarks/results/{name}_<device>[_smoke].json)")
    parser.add_argument("--smoke", action="store_true", help=smoke_help)


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
        device = torch.device("cuda" if name == "auto" and torch.cuda.is_available()
                              else "cpu" if name == "auto" else name)
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


def write_json(out: Path, record: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
