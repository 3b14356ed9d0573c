"""A run's folder, ``<result_dir>/<run_name>/``: a real folder (never a link), created and locked
for one process, cleared of the temporary files of killed writers, emptied by --overwrite only
when it is a run folder of this project, and given the run's config.json."""
from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from plumbing.distributed import world_size
from plumbing.flags import ConfigError
from plumbing.safe_writes import LOCK_NAME, lock_folder, read_json, remove_stale_temporaries, write_json


def _git_commit() -> str:
    """The commit of the repository (the folder above plumbing/); "" outside git."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parents[1], timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def is_run_folder(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds the config.json that start_run writes for a run of that name."""
    config = read_json(run_dir / "config.json")
    return isinstance(config, dict) and config.get("run_name") == run_dir.name and "method" in config


def prepare_run_dir(cfg: SimpleNamespace, locks: contextlib.ExitStack) -> Path:
    """Create and lock the run folder (the lock joins ``locks``); with --overwrite, empty it."""
    run_dir = Path(cfg.result_dir) / cfg.run_name
    # Every file of a run is written inside --result_dir: a link (planted, or left by a copy) would
    # send the writes, and --overwrite's deletions, to its target.
    for folder in (run_dir, run_dir / "checkpoints"):
        if folder.is_symlink():
            raise ConfigError(f"{folder} is a link to {os.readlink(folder)}: training never writes through a "
                              "link; replace it by a real folder, or choose another --run_name")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        locks.enter_context(lock_folder(run_dir, "run folder"))
    except OSError as error:
        raise ConfigError(f"--result_dir: cannot write to {run_dir}: {error.strerror}") from None
    if (run_dir / "checkpoints").exists() and not (cfg.resume or cfg.overwrite):
        raise ConfigError(f"{run_dir} already holds a run: pass --resume to continue it, "
                          "--overwrite to start it again, or --run_name for another")
    if cfg.overwrite and not cfg.resume:  # nothing of the old run may be mistaken for the new one
        contents = [path for path in run_dir.iterdir() if path.name != LOCK_NAME]
        if contents and not is_run_folder(run_dir):
            raise ConfigError(f"--overwrite: {run_dir} is not a run folder of this project (no config.json "
                              "of a run of that name); it is left alone: delete it yourself or choose "
                              "another --run_name")
        for path in contents:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    for folder in (run_dir, run_dir / "checkpoints"):  # the folders training writes (evaluate.py locks its own)
        if folder.is_dir() and remove_stale_temporaries(folder):
            print(f"removed the temporary files an interrupted write left in {folder}")
    return run_dir


def start_run(cfg: SimpleNamespace, device: torch.device, locks: contextlib.ExitStack) -> Path:
    """Prepare the run folder; a new run's settings are recorded at once, a resumed run's by
    record_settings once its checkpoint is accepted, so that a refused resume leaves the folder as it was."""
    run_dir = prepare_run_dir(cfg, locks)
    if not cfg.resume:
        record_settings(cfg, device, run_dir)
    return run_dir


def record_settings(cfg: SimpleNamespace, device: torch.device, run_dir: Path) -> None:
    """Write the run's settings to its config.json; a resumed run keeps the config.json of its
    start and records each resume beside it (config_resume_N.json)."""
    name = "config.json"
    if cfg.resume and (run_dir / name).exists():
        name = f"config_resume_{len(list(run_dir.glob('config_resume_*.json'))) + 1}.json"
    write_json({**vars(cfg), "command": " ".join(sys.argv), "git_commit": _git_commit(),
                "torch": torch.__version__, "python": platform.python_version(),
                "device_used": str(device), "world_size": world_size(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S")}, run_dir / name)
