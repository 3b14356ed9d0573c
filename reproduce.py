"""Reproduce the paper in one command: data, the four methods, the comparison, a report.

    python reproduce.py                    # the paper: CPSC2018 in data/CPSC2018/train, 7 runs
    python reproduce.py --preset demo      # synthetic data it generates itself, ~10 min on 2 CPU cores
    python reproduce.py --preset smoke     # the smallest chain (CI), synthetic data
    python reproduce.py --preset mini --raw_dir DIR  # a small real CPSC2018 set of your own, on a CPU
    python reproduce.py --dry_run          # print the commands, run nothing
    python reproduce.py --nproc_per_node 4 # each run trained and evaluated by 4 processes (torchrun, 4 GPUs)
    python reproduce.py --preset demo --methods CE advls  # only these runs (the tables show every finished one)
    python reproduce.py --preset baselines # the paper's runs and the baselines beyond it (TRADES, fast AT, noise CE)
    python reproduce.py --preset demo --methods all       # the demo with the baselines
    python reproduce.py --preset demo --skip_train        # tables and report from the finished runs
    python reproduce.py --preset paper-selection --dry_run  # the coefficient study: its runs and their cost

Stages: the data (synthetic presets generate their records; a valid preprocessed cache is
reused), one training subprocess per run (the method scripts, with this Python; each
evaluates its final model and runs the sweeps at the end), certify.py on the runs the preset
certifies (Preset.certify), `evaluate.compare_with_example` into
<result dir>/compare/, then <result dir>/report.md and timings.json. A finished run
(model.pt and its evaluation files) is skipped, an interrupted one resumed from its
checkpoints, so rerunning the same command continues where it stopped. A stage that fails
stops the chain: its name and exit status are printed and reproduce exits non-zero. Ctrl-C or
SIGTERM stops the running stage (a training saves a checkpoint first, see run_stage), then
reproduce, with status 128 + N.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import resource
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pandas as pd

import evaluate
from analysis import selection
from analysis.compare import (EvaluationError, certificate_path, first_wrong, is_number, older_than_model, read_certificate,
                              read_clean, read_sweeps)
from analysis.report import Timings, build_report, duration, write_selection_report
from config import (BASELINE_GRID, METHODS, PAPER_METHODS, PRESETS, Certify, Preset, parse_script, parse_sweeps,
                    preset_setting, run_name)
from databases.cpsc2018 import CLASSES, DataError
from plumbing.checkpoints import RESUME_KEYS, changed_settings
from plumbing.flags import ConfigError, OneLineParser, folder
from plumbing.safe_writes import read_json, write_text_atomic
from preprocess import load_cache
from databases.synthetic import MARKER_NAME

REPO = Path(__file__).resolve().parent
# method -> its script's module (config.METHODS names them), imported here once
SCRIPTS = {name: importlib.import_module(method.script) for name, method in METHODS.items()}

SELECTION_SWEEP = "pgd_linf"  # at the paper's levels, on the validation split
# How long a stage may take to stop after SIGINT or SIGTERM (a training finishes its batch and
# saves a checkpoint) before reproduce kills it.
STOP_GRACE_SECONDS = 60


class ReproduceError(Exception):
    """A bad flag or a state reproduce cannot continue from; the message says which."""


class StageFailed(Exception):
    """A stage's command exited non-zero."""

    def __init__(self, stage: str, status: int):
        super().__init__(stage, status)
        self.stage, self.status = stage, status


class Interrupted(Exception):
    """Ctrl-C or SIGTERM during a stage (the training scripts checkpoint before exiting); ``killed``:
    the stage did not stop within STOP_GRACE_SECONDS."""

    def __init__(self, stage: str, signum: int, killed: bool = False):
        super().__init__(stage, signum, killed)
        self.stage, self.signum, self.killed = stage, signum, killed


# --- the runs ------------------------------------------------------------------------------

@dataclass(eq=False)
class Job:
    """One training run: its script, flags, settings and folder."""

    method: str
    module: ModuleType  # the method's script
    flags: list[str]
    cfg: SimpleNamespace
    run_dir: Path
    varied: str = ""  # the plan's grid setting of this run, if any

    @property
    def script(self) -> Path:
        return REPO / f"{self.module.__name__}.py"

    @property
    def training(self) -> dict:
        return self.module.TRAINING

    @property
    def hyperparameters(self) -> dict:
        return self.module.HYPERPARAMETERS

    @property
    def whole_numbers(self) -> tuple[str, ...]:
        return self.module.WHOLE_NUMBERS

    @property
    def label(self) -> str:
        varied = f" {self.varied} {getattr(self.cfg, self.varied):g}" if self.varied else ""
        return f"{self.method}{varied} ({self.run_dir.name})"

    @property
    def compared_settings(self) -> tuple[str, ...]:
        """The settings a run in this job's folder must share with it to be its run (--epochs too:
        a run trained for another number of epochs is not this preset's run)."""
        return (*RESUME_KEYS, "epochs", *self.hyperparameters)


def plan_jobs(preset: str, methods: list[str], result_dir: str | None = None, baselines: bool = False) -> list[Job]:
    """The training runs of ``preset`` for ``methods``, in the order of METHODS: the method scripts
    with ``--preset``, the plan's grid setting and ``result_dir`` when given (else the preset's),
    settings resolved exactly as the script will resolve them (so the run folder is the script's).
    Without ``baselines`` only the paper's methods run; with them every method, and the runs of
    BASELINE_GRID besides (CE with Gaussian noise)."""
    plan = PRESETS[preset]
    grids = {method: (setting, values) for method, setting, values in plan.grid}
    if baselines and not plan.selection:
        grids.update(BASELINE_GRID)
    planned = METHODS if baselines else PAPER_METHODS
    jobs = []
    for method in (m for m in planned if m in methods and (m in grids or not plan.selection)):
        module = SCRIPTS[method]
        setting, values = grids.get(method, ("", (None,)))
        for value in values:
            flags = ["--preset", preset, *(["--result_dir", result_dir] if result_dir else [])]
            if setting:
                flags += [f"--{setting}", f"{value:g}"]
            cfg = parse_script(module, flags)
            jobs.append(Job(method, module, flags, cfg, Path(cfg.result_dir) / run_name(cfg), setting))
    return jobs


def saved_settings(job: Job) -> dict:
    """The run folder's config.json (empty when missing: a training stopped before it saved its
    settings), checked to hold the settings reproduce compares with their flags' types."""
    path = job.run_dir / "config.json"
    if not path.is_file():
        return {}
    config = read_json(path)
    wrong = "not a JSON object" if not isinstance(config, dict) else next(
        (f"its {key} is {wrong}" for key in job.compared_settings
         if key in config and (wrong := evaluate.wrong_setting_type(key, config[key], job.whole_numbers))), None)
    if wrong:
        raise ReproduceError(f"{path}: {wrong}: not the settings of a run of this project; delete that folder "
                             "or choose another --result_dir")
    return config


def _check_same_settings(job: Job) -> None:
    """A run folder that holds a run with other training settings is not this preset's run."""
    changed = changed_settings(saved_settings(job), job.cfg, job.compared_settings)
    if changed:
        key, before, now = changed[0]
        raise ReproduceError(f"{job.run_dir} holds a run trained with {key}={before!r}, but this "
                             f"preset asks for {now!r}: delete that folder or choose another --result_dir")


def evaluation_complete(job: Job, split: str = "test", sweeps: str | None = None) -> bool:
    """eval_<split>.json is there and robustness_<split>.json has every requested sweep (the
    run's by default) with the requested level list and attack settings. A result file that
    evaluate.py would not have written (damaged, altered) counts as missing: a note says so, and
    the evaluation is run again."""
    if not (job.run_dir / f"eval_{split}.json").is_file():
        return False
    sweeps = parse_sweeps(job.cfg.sweeps if sweeps is None else sweeps)
    robustness = job.run_dir / f"robustness_{split}.json"
    try:
        read_clean(job.run_dir / f"eval_{split}.json")
        done = read_sweeps(robustness) if sweeps and robustness.is_file() else {}
    except EvaluationError as error:
        print(f"note: {error} (this invocation does)", flush=True)
        return False
    wanted = {"steps": job.cfg.sweep_steps, "restarts": job.cfg.sweep_restarts,
              "max_batches": job.cfg.sweep_max_batches}
    return all(name in done and done[name]["level_list"] == job.cfg.levels
               and all(done[name]["settings"][k] == v for k, v in wanted.items())
               for name in sweeps)


def run_state(job: Job) -> str:
    """'done', 'evaluate' (trained, evaluation missing or incomplete), 'resume' or 'train'."""
    trained = (job.run_dir / "model.pt").is_file()
    resumable = any((job.run_dir / "checkpoints").glob("*.pt"))
    if trained or resumable:
        _check_same_settings(job)
    if trained:
        return "done" if evaluation_complete(job) else "evaluate"
    return "resume" if resumable else "train"


def launcher(nproc_per_node: int = 1) -> list[str]:
    """What runs a training or evaluation script: this Python, or torchrun with that many
    processes (one per GPU; the scripts split each batch between them, see README)."""
    if nproc_per_node == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}"]


def job_command(job: Job, state: str, nproc_per_node: int = 1) -> list[str]:
    if state in ("evaluate", "validate"):
        split, sweeps = ("val", SELECTION_SWEEP) if state == "validate" else ("test", job.cfg.sweeps)
        return [*launcher(nproc_per_node), str(REPO / "evaluate.py"), str(job.run_dir), "--split", split,
                "--data_dir", job.cfg.data_dir,
                "--sweeps", sweeps, "--levels", job.cfg.levels, "--sweep_steps", str(job.cfg.sweep_steps),
                "--sweep_restarts", str(job.cfg.sweep_restarts),
                "--sweep_max_batches", str(job.cfg.sweep_max_batches)]
    return [*launcher(nproc_per_node), str(job.script), *job.flags, *(["--resume"] if state == "resume" else [])]


# --- the data ------------------------------------------------------------------------------

def synthetic_complete(raw_dir: Path, records_per_class: int) -> bool:
    """A dataset synthetic.py wrote with this many records per class, every file present."""
    if not (raw_dir / MARKER_NAME).is_file() or not (raw_dir / "REFERENCE.csv").is_file():
        return False
    try:
        reference = pd.read_csv(raw_dir / "REFERENCE.csv", dtype={"Recording": str})
        counts = reference["First_label"].value_counts()
    except (ValueError, KeyError, pd.errors.ParserError):
        return False
    return (len(reference) == len(CLASSES) * records_per_class
            and sorted(counts.index) == list(range(1, len(CLASSES) + 1))
            and (counts == records_per_class).all()
            and all((raw_dir / f"{name}.mat").is_file() for name in reference["Recording"]))


# What reproduce reads of a cache's meta.json: {key: test of its value}.
META_CHECKS = {
    "settings": lambda v: isinstance(v, dict),
    "raw_dir": lambda v: isinstance(v, str),
    "source_format": lambda v: isinstance(v, str),
    "n_records": lambda v: type(v) is int,
    "class_counts": lambda v: isinstance(v, dict) and all(
        isinstance(v.get(split), dict) and all(type(n) is int for n in v[split].values())
        for split in ("train", "val", "test")),
}


def cache_meta(data_dir: Path) -> dict | None:
    """The meta.json of the cache in data_dir; None when load_cache refuses the cache, or when a
    field that reproduce reads has another type (a note names it: the cache is taken as damaged)."""
    try:
        meta = load_cache(data_dir).meta
    except DataError:
        return None
    wrong = first_wrong(meta, META_CHECKS)
    if wrong:
        print(f"note: {Path(data_dir) / 'meta.json'}: {wrong}: the cache is taken as damaged", flush=True)
        return None
    return meta


def cache_valid(data_dir: Path, raw_dir: Path, val_per_class: int, test_per_class: int) -> bool:
    """load_cache accepts the cache and it was made from raw_dir with these split settings."""
    meta = cache_meta(data_dir)
    if meta is None:
        return False
    settings = meta["settings"]
    return (settings.get("val_per_class") == val_per_class and settings.get("test_per_class") == test_per_class
            and meta["raw_dir"] == str(raw_dir.resolve()))


# --- stages and timings --------------------------------------------------------------------

def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class _Stop(Exception):
    """Raised by run_stage's signal handler to end a wait for the stage's process."""


def run_stage(stage: str, command: list[str], timings: Timings, dry_run: bool) -> None:
    """Run one command with inherited stdout/stderr (its output streams live).

    Each SIGINT or SIGTERM that reproduce gets is passed on to the stage's process as SIGTERM (a
    training saves a checkpoint at the next batch boundary on the first and stops at once on the
    second, as for Ctrl-C; any other stage ends without a traceback); a stage still running
    STOP_GRACE_SECONDS after the first is killed with its whole process group (torchrun's
    workers, data loaders), so that none of it outlives reproduce and holds its run folder.
    """
    print(f"\n=== {stage}\n$ {shlex.join(command)}", flush=True)
    if dry_run:
        return
    started, cpu = time.perf_counter(), _children_cpu()
    # A session (and process group) of its own: a Ctrl-C in the terminal reaches reproduce alone.
    process = subprocess.Popen(command, env=_without_torchrun(dict(os.environ)), start_new_session=True)
    interrupted_by, deadline, killed, waiting = None, None, False, True

    def forward(signum, frame):
        nonlocal interrupted_by, deadline
        if interrupted_by is None:
            interrupted_by, deadline = signum, time.monotonic() + STOP_GRACE_SECONDS
        process.send_signal(signal.SIGTERM)
        if waiting:  # ends the wait below, which goes on with the deadline
            raise _Stop

    previous_handlers = {signum: signal.signal(signum, forward) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        while waiting:
            try:
                status = process.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
                waiting = False
            except _Stop:
                continue
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                    os.killpg(process.pid, signal.SIGKILL)
                killed, deadline = True, None
    finally:
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
    seconds, cpu = time.perf_counter() - started, _children_cpu() - cpu
    if interrupted_by is not None:
        timings.record(stage, "killed" if killed else "interrupted", seconds, cpu, command)
        raise Interrupted(stage, interrupted_by, killed)
    timings.record(stage, "ran" if status == 0 else "failed", seconds, cpu, command)
    if status != 0:
        raise StageFailed(stage, status)
    print(f"=== {stage}: done in {duration(seconds)}", flush=True)


def skip_stage(stage: str, reason: str, timings: Timings) -> None:
    print(f"skip {stage}: {reason}", flush=True)
    timings.record(stage, "skipped")


# --- the chain -----------------------------------------------------------------------------

def prepare_data(plan: Preset, raw_dir: Path, data_dir: Path, timings: Timings, dry_run: bool) -> None:
    regenerated = False
    if plan.synthetic_records_per_class:
        stage = "data: generate synthetic records"
        if synthetic_complete(raw_dir, plan.synthetic_records_per_class):
            skip_stage(stage, f"{raw_dir} holds the complete synthetic dataset", timings)
        else:
            run_stage(stage, [sys.executable, str(REPO / "databases" / "synthetic.py"), "--out_dir", str(raw_dir),
                              "--records_per_class", str(plan.synthetic_records_per_class), "--seed", "0",
                              "--max_seconds", f"{plan.synthetic_max_seconds:g}"], timings, dry_run)
            regenerated = True
    stage = "data: preprocess"
    if not regenerated and cache_valid(data_dir, raw_dir, plan.val_per_class, plan.test_per_class):
        skip_stage(stage, f"{data_dir} holds a valid cache of {raw_dir} with these split settings", timings)
        return
    run_stage(stage, [sys.executable, str(REPO / "preprocess.py"), "--raw_dir", str(raw_dir),
                      "--out_dir", str(data_dir), "--val_per_class", str(plan.val_per_class),
                      "--test_per_class", str(plan.test_per_class)], timings, dry_run)


def train_all(jobs: list[Job], timings: Timings, dry_run: bool, nproc_per_node: int = 1) -> None:
    for job in jobs:
        state = run_state(job)
        if state == "done":
            skip_stage(f"train {job.label}", f"{job.run_dir} is finished (model.pt and evaluation present)",
                       timings)
            continue
        stage = f"evaluate {job.label}" if state == "evaluate" else f"train {job.label}"
        if state == "resume":
            print(f"resume {job.run_dir} from its checkpoints", flush=True)
        run_stage(stage, job_command(job, state, nproc_per_node), timings, dry_run)


def validate_all(jobs: list[Job], timings: Timings, dry_run: bool, nproc_per_node: int = 1) -> None:
    """The selection study's evaluation: SELECTION_SWEEP on the validation split of every run."""
    for job in jobs:
        stage = f"validate {job.label}"
        if not dry_run and evaluation_complete(job, "val", SELECTION_SWEEP):
            skip_stage(stage, f"{job.run_dir} has its validation results", timings)
            continue
        run_stage(stage, job_command(job, "validate", nproc_per_node), timings, dry_run)


# --- certification (certify.py, PROTOCOL section 10) ------------------------------------------

def certified_jobs(plan: Preset, jobs: list[Job]) -> list[Job]:
    """The runs of ``jobs`` that ``plan`` certifies (Preset.certify)."""
    if plan.certify is None:
        return []
    return [job for job in jobs if not plan.certify.methods or job.method in plan.certify.methods]


def certify_command(job: Job, settings: Certify, sigma: float) -> list[str]:
    """certify.py on the run's test split at ``sigma`` with the preset's settings (one process: the
    noisy copies of a record are batched on one device)."""
    return [sys.executable, str(REPO / "certify.py"), str(job.run_dir), "--sigma", f"{sigma:g}",
            "--n0", str(settings.n0), "--n", str(settings.n), "--alpha", f"{settings.alpha:g}",
            "--max_records", str(settings.max_records), "--data_dir", job.cfg.data_dir]


def certification_complete(job: Job, settings: Certify, sigma: float) -> bool:
    """The run's certify_<sigma>.json is there, newer than its model.pt, with these settings; one
    that certify.py would not have written counts as missing (a note says so)."""
    path = certificate_path(job.run_dir, sigma)
    if not path.is_file() or older_than_model(path, job.run_dir):
        return False
    try:
        saved = read_certificate(path)["settings"]
    except EvaluationError as error:
        print(f"note: {error} (this invocation does)", flush=True)
        return False
    wanted = {"sigma": sigma, "n0": settings.n0, "n": settings.n, "alpha": settings.alpha,
              "max_records": settings.max_records, "split": "test"}
    return all(saved.get(key) == value for key, value in wanted.items())


def certify_all(plan: Preset, jobs: list[Job], timings: Timings, dry_run: bool) -> None:
    """Each run the preset certifies, at each of its sigmas, after the run's evaluation; a
    certification already done with these settings is skipped."""
    for job in certified_jobs(plan, jobs):
        for sigma in plan.certify.sigmas:
            stage = f"certify {job.label} sigma {sigma:g}"
            if not dry_run and certification_complete(job, plan.certify, sigma):
                skip_stage(stage, f"{certificate_path(job.run_dir, sigma)} holds it", timings)
                continue
            run_stage(stage, certify_command(job, plan.certify, sigma), timings, dry_run)


def print_costs(jobs: list[Job]) -> None:
    """Each run's estimated cost (selection.estimate_seconds) and the total."""
    rows = [selection.benchmark_row(job.method, job.cfg) for job in jobs]
    print(f"\n=== estimated cost per run ({selection.cost_source(rows)})")
    total, unknown = 0.0, 0
    for job in jobs:
        try:
            parts = selection.estimate_seconds(job.method, job.cfg, SELECTION_SWEEP)
        except KeyError as missing:  # a setting the benchmark did not time: the rest still print
            print(f"{job.run_dir.name}: no estimate ({missing.args[0]})")
            unknown += 1
            continue
        total += sum(parts.values())
        print(f"{job.run_dir.name}: {duration(sum(parts.values()))} ("
              + ", ".join(f"{name} {duration(seconds)}" for name, seconds in parts.items()) + ")")
    without = f", {unknown} of them without an estimate" if unknown else ""
    print(f"total: {duration(total)} of single-thread CPU time for {len(jobs)} runs{without} (a GPU is much faster)")


def compare(jobs: list[Job], out_dir: Path, timings: Timings) -> tuple[list[Job], dict[str, str]]:
    """evaluate.compare_with_example over every run of the plan that has been evaluated."""
    ready = [job for job in jobs if (job.run_dir / "eval_test.json").is_file()]
    for job in jobs:
        if job not in ready:
            print(f"note: {job.run_dir} is not evaluated yet; it is left out of the tables", flush=True)
    if not ready:
        raise ReproduceError(f"no evaluated run under {jobs[0].run_dir.parent if jobs else 'the result dir'}"
                             " to compare: train first (run without --skip_train)")
    print(f"\n=== compare {len(ready)} runs -> {out_dir}", flush=True)
    started, cpu = time.perf_counter(), time.process_time()
    tables = evaluate.compare_with_example([job.run_dir for job in ready], out_dir)
    timings.record("compare", "ran", time.perf_counter() - started, time.process_time() - cpu)
    return ready, tables


HISTORY_CHECKS = {"seconds": is_number, "val_accuracy": is_number}  # what the report reads


def _history(path: Path) -> list[dict]:
    """A run's history.json (an entry per epoch; none when missing), checked to hold what the report reads."""
    history = read_json(path) if path.is_file() else []
    wrong = "not a JSON list" if not isinstance(history, list) else next(
        (f"epoch {i + 1}: {wrong}" for i, entry in enumerate(history)
         if (wrong := first_wrong(entry, HISTORY_CHECKS) if isinstance(entry, dict) else "not an object")),
        None)
    if wrong:
        raise ReproduceError(f"{path}: {wrong}: not a history that training writes")
    return history


# --- command line --------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__.split("\n\n")[0],
                           epilog="Presets: paper (CPSC2018, the paper's settings), demo (synthetic, ~10 min "
                                  "on 2 CPU cores), smoke (synthetic, CI), mini (a small real set given with --raw_dir), "
                                  "paper-selection (the NSR and Jacobian coefficient study on CPSC2018's validation "
                                  "split; with --dry_run: every run and its estimated cost), baselines (the paper's "
                                  "runs, TRADES, fast adversarial training and CE with Gaussian noise; mini has them "
                                  "too).")
    parser.add_flag("--preset", default="paper", choices=list(PRESETS))
    parser.add_flag("--raw_dir", type=folder,
                    help="the records (synthetic presets generate them there); default per preset: "
                         + ", ".join(f"{k} {p.raw_dir or '(required)'}" for k, p in PRESETS.items()))
    parser.add_flag("--result_dir", type=folder,
                    help="where the runs, compare/, report.md and timings.json go (default per preset: "
                         + ", ".join(f"{k} {preset_setting(k, 'result_dir')}" for k in PRESETS) + ")")
    parser.add_flag("--methods", nargs="+", metavar="METHOD",
                    help=f"a subset of {', '.join(METHODS)} (space- or comma-separated), or all; default: the "
                         f"preset's ({', '.join(PAPER_METHODS)}; every method for presets with the baselines). "
                         "Naming a method beyond the paper's, or all, adds the baselines' runs to the plan "
                         "(CE also with Gaussian noise)")
    parser.add_flag("--skip_train", action="store_true",
                    help="no data or training stages: compare the finished runs and write the report")
    parser.add_flag("--dry_run", action="store_true", help="print the commands, run nothing")
    parser.add_flag("--nproc_per_node", type=int, default=1, metavar="N",
                    help="train and evaluate each run with N processes under torchrun (one per GPU); "
                         "the batch size must be a multiple of N")
    args = parser.parse_args(argv)
    if args.raw_dir is None and PRESETS[args.preset].raw_dir is None:
        raise ReproduceError(f"--preset {args.preset} needs --raw_dir DIR: a folder of real CPSC2018 records "
                             "(e.g. 150 of them in the WFDB form, with REFERENCE.csv or #Dx headers; "
                             "see the README, 'Reproducing the paper')")
    if args.nproc_per_node < 1:
        raise ReproduceError(f"--nproc_per_node must be at least 1, got {args.nproc_per_node}")
    plan = PRESETS[args.preset]
    methods = [m.strip() for token in args.methods or plan.methods for m in token.split(",") if m.strip()]
    methods = list(METHODS) if methods == ["all"] else methods
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ReproduceError(f"--methods: unknown method '{unknown[0] if unknown else ''}' "
                             f"(known: {', '.join(METHODS)}, all)")
    args.methods = methods
    args.baselines = plan.baselines or not set(methods) <= set(PAPER_METHODS)
    # `torchrun --nproc_per_node N reproduce.py ...` means what `--nproc_per_node N` says: the
    # first process runs the chain, starting every run with N processes; the others are done.
    args.torchrun_rank = int(os.environ.get("RANK", 0)) if _torchrun_world() > 1 else None
    if args.torchrun_rank is not None and args.nproc_per_node == 1:
        args.nproc_per_node = _torchrun_world()
    return args


def check_folder(flag: str, path: Path) -> None:
    """Refuse a folder, given by ``flag`` or its default, that is a file or lies under one: every
    stage would fail on it, after the stages before it had run."""
    existing = next(folder for folder in (path, *path.parents) if folder.exists())
    if not existing.is_dir():
        raise ReproduceError(f"{flag} {path}: {existing} is a file, not a folder")


def _torchrun_world() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def _without_torchrun(environment: dict[str, str]) -> dict[str, str]:
    """The environment minus the variables of a torchrun that started reproduce itself, so
    that a stage's own torchrun (or plain process) does not take them for its own."""
    names = {"WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
             "ROLE_NAME", "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    return {k: v for k, v in environment.items() if k not in names and not k.startswith("TORCHELASTIC")}


def reproduce(args: argparse.Namespace) -> int:
    plan = PRESETS[args.preset]
    raw_dir = Path(args.raw_dir or plan.raw_dir)
    all_jobs = plan_jobs(args.preset, list(METHODS), args.result_dir, args.baselines)
    # The runs' own settings name the cache and the result folder (whatever set them).
    data_dir, result_dir = Path(all_jobs[0].cfg.data_dir), Path(all_jobs[0].cfg.result_dir)
    jobs = [job for job in all_jobs if job.method in args.methods]
    for flag, path in (("--raw_dir", raw_dir), ("--result_dir", result_dir)):
        check_folder(flag, path)
    timings = Timings(result_dir / "timings.json", args.preset, args.dry_run)
    print(f"reproduce: preset {args.preset}, records {raw_dir}, cache {data_dir}, results {result_dir}, "
          f"{len(jobs)} run(s): {', '.join(job.run_dir.name for job in jobs)}", flush=True)

    if not args.skip_train:
        prepare_data(plan, raw_dir, data_dir, timings, args.dry_run)
        train_all(jobs, timings, args.dry_run, args.nproc_per_node)
        certify_all(plan, jobs, timings, args.dry_run)
        if plan.selection:
            validate_all(jobs, timings, args.dry_run, args.nproc_per_node)
    if plan.selection:
        if args.dry_run:
            print_costs(jobs)
            print(f"\n=== selection report -> {result_dir / 'selection.md'}")
            return 0
        path = write_selection_report(args.preset, plan, jobs, result_dir, timings, SELECTION_SWEEP)
        print(f"\nselection report written to {path} (this invocation: {duration(time.time() - timings.started)})")
        return 0
    if args.dry_run:
        print(f"\n=== compare -> {result_dir / 'compare'}\n=== report -> {result_dir / 'report.md'}")
        return 0
    ready, tables = compare(all_jobs, result_dir / "compare", timings)
    started = time.perf_counter()
    report_path = result_dir / "report.md"
    write_text_atomic(report_path, build_report(
        args.preset, plan, raw_dir, data_dir, result_dir, all_jobs, ready, tables, timings, meta=cache_meta(data_dir),
        histories={job: _history(job.run_dir / "history.json") for job in ready},
        configs={job: saved_settings(job) for job in ready}))
    timings.record("report", "ran", time.perf_counter() - started)
    print(f"\nreport written to {report_path} (this invocation: {duration(time.time() - timings.started)})")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if args.torchrun_rank:  # not the first process of a torchrun: the first runs the chain
            return 0
        return reproduce(args)
    except StageFailed as failure:
        print(f"error: stage '{failure.stage}' failed with exit status {failure.status} (its output is "
              "above); fix the cause and rerun the same command: finished stages are skipped, an "
              "interrupted run resumes from its checkpoints", file=sys.stderr)
        return 1
    except Interrupted as interruption:
        killed = f" (killed: it had not stopped {STOP_GRACE_SECONDS} s after the signal)" \
            if interruption.killed else ""
        print(f"error: interrupted during stage '{interruption.stage}'{killed}; rerun the same command to "
              "continue (training resumes from its last checkpoint)", file=sys.stderr)
        return 128 + interruption.signum
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except (ReproduceError, ConfigError, DataError, EvaluationError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a file or folder that could not be read or written while running
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
