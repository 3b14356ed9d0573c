"""Reproduce the paper in one command: data, the four methods, the comparison, a report.

    python reproduce.py                    # the paper: CPSC2018 in data/CPSC2018/train, 7 runs
    python reproduce.py --preset demo      # synthetic data it generates itself, ~10 min on 2 CPU cores
    python reproduce.py --preset smoke     # the smallest chain (CI), synthetic data
    python reproduce.py --preset mini --raw_dir DIR  # a small real CPSC2018 set of your own, on a CPU
    python reproduce.py --dry_run          # print the commands, run nothing
    python reproduce.py --nproc_per_node 4 # each run trained and evaluated by 4 processes (torchrun, 4 GPUs)
    python reproduce.py --preset demo --methods CE advls  # only these runs (the tables show every finished one)
    python reproduce.py --preset demo --skip_train        # tables and report from the finished runs
    python reproduce.py --preset paper-selection --dry_run  # the coefficient study: its runs and their cost

Stages: the data (synthetic presets generate their records; a valid preprocessed cache is
reused), one training subprocess per run (the method scripts, with this Python; each
evaluates its final model and runs the sweeps at the end), `evaluate.compare_runs` into
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
from types import SimpleNamespace

import pandas as pd

import evaluate
import selection
from config import METHODS, PRESETS, SWEEPS, TRAIN_DEFAULTS, parse_config, parse_sweeps, preset_setting, preset_settings
from cpsc2018 import CLASSES, DataError
from plumbing.checkpoints import RESUME_KEYS, changed_settings
from plumbing.flags import ConfigError, OneLineParser, folder
from plumbing.safe_writes import read_json, write_json, write_text_atomic
from preprocess import DEFAULT_RAW_DIR, load_cache
from synthetic import DEMO_RAW_DIR, MARKER_NAME

REPO = Path(__file__).resolve().parent
# method -> its script's module (config.METHODS names them), imported here once
SCRIPTS = {method: importlib.import_module(name) for method, name in METHODS.items()}

CHANCE_NOTE_ACCURACY = 1.5 / len(CLASSES)  # the report flags runs whose clean accuracy is no better than this
SWEEP_TITLES = {"pgd_linf": "PGD, L-inf budget", "pgd_l2": "PGD, L2 budget",
                "ifgsm_linf": "IFGSM, L-inf budget", "ifgsm_l2": "IFGSM, L2 budget",
                "white": "White noise", "baseline_wander": "Real-ECG noise: baseline wander",
                "powerline_50hz": "Real-ECG noise: power line 50 Hz",
                "powerline_60hz": "Real-ECG noise: power line 60 Hz",
                "muscle": "Real-ECG noise: muscle (EMG)"}


@dataclass(frozen=True)
class Plan:
    """What reproduce itself does for one --preset, beyond the runs' settings (config.PRESETS
    under the same name, which also name the cache and the result folder). Paths are relative
    to the working directory."""

    data_note: str             # the report's statement of what the data is
    raw_dir: str | None        # the records (synthetic presets generate them here); None: --raw_dir required
    val_per_class: int
    test_per_class: int
    grid: tuple[tuple[str, str, tuple[float, ...]], ...]  # (method, setting, its values): one run per value
    synthetic_records_per_class: int = 0  # > 0: a synthetic dataset (synthetic.py)
    synthetic_max_seconds: float = 60.0
    selection: bool = False    # the coefficient study: only the grid's methods, judged on the validation split


SYNTHETIC_NOTE = ("**Data: synthetic signals, not CPSC2018.** The records are simulated by "
                  "`synthetic.py` (Gaussian-wave beats with a textbook feature per class, in "
                  "CPSC2018's file format); they are not recordings of patients, and nothing "
                  "below says anything about real ECGs or about the paper's numbers.")
PLANS = {
    "paper": Plan("**Data: CPSC2018** (real 12-lead ECGs, the official training set) with the "
                  "paper's reference split (PROTOCOL section 2).", DEFAULT_RAW_DIR, 5, 50,
                  (("advls", "eps", (0.005, 0.01, 0.05, 0.1)),)),
    # The paper's default eps only: to fit the demo's ten minutes.
    "demo": Plan(SYNTHETIC_NOTE, DEMO_RAW_DIR, 3, 6, (("advls", "eps", (0.01,)),),
                 synthetic_records_per_class=30, synthetic_max_seconds=20.0),
    "smoke": Plan(SYNTHETIC_NOTE, "data/smoke/train", 1, 1, (("advls", "eps", (0.01,)),),
                  synthetic_records_per_class=4, synthetic_max_seconds=8.0),
    "mini": Plan("**Data: real CPSC2018 records, but only a small sample of them** with a small "
                 "stratified split of its own (2 validation and 4 test records per class), not the "
                 "paper's 450-record test set: a small-scale check of the pipeline on real ECGs, "
                 "not a reproduction of the paper's numbers.", None, 2, 4, (("advls", "eps", (0.01, 0.05)),)),
    # How the paper chose its NSR and Jacobian coefficients: each value trained with the paper's
    # settings and judged on the validation split under PGD L-inf (SELECTION_SWEEP).
    "paper-selection": Plan("**Data: CPSC2018** (real 12-lead ECGs, the official training set) with "
                            "the paper's reference split (PROTOCOL section 2); coefficients judged on its "
                            "validation split.", DEFAULT_RAW_DIR, 5, 50,
                            (("NSR", "beta2", (0.4, 0.6, 0.8, 0.9, 1.0, 1.1, 1.2)),
                             ("jacob", "beta", (4, 14, 24, 34, 44, 54, 64, 74, 84))),
                            selection=True),
}
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
    script: Path
    flags: list[str]
    cfg: SimpleNamespace
    hyperparameters: dict
    run_dir: Path
    varied: str = ""  # the plan's grid setting of this run, if any

    @property
    def label(self) -> str:
        varied = f" {self.varied} {getattr(self.cfg, self.varied):g}" if self.varied else ""
        return f"{self.method}{varied} ({self.run_dir.name})"

    @property
    def compared_settings(self) -> tuple[str, ...]:
        """The settings a run in this job's folder must share with it to be its run (--epochs too:
        a run trained for another number of epochs is not this preset's run)."""
        return (*RESUME_KEYS, "epochs", *self.hyperparameters)


def plan_jobs(preset: str, methods: list[str], result_dir: str | None = None) -> list[Job]:
    """The training runs of ``preset`` for ``methods``, in the paper's order: the method scripts
    with ``--preset``, the plan's grid setting and ``result_dir`` when given (else the preset's),
    settings resolved exactly as the script will resolve them (so the run folder is the script's)."""
    plan = PLANS[preset]
    grids = {method: (setting, values) for method, setting, values in plan.grid}
    jobs = []
    for method in (m for m in METHODS if m in methods and (m in grids or not plan.selection)):
        module = SCRIPTS[method]
        setting, values = grids.get(method, ("", (None,)))
        for value in values:
            flags = ["--preset", preset, *(["--result_dir", result_dir] if result_dir else [])]
            if setting:
                flags += [f"--{setting}", f"{value:g}"]
            cfg = parse_config(method, module.HYPERPARAMETERS, flags,
                               getattr(module, "check_hyperparameters", None), training=module.TRAINING)
            jobs.append(Job(method, REPO / f"{module.__name__}.py", flags, cfg, module.HYPERPARAMETERS,
                            Path(cfg.result_dir) / module.run_name(cfg), setting))
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
         if key in config and (wrong := evaluate.wrong_setting_type(key, config[key]))), None)
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
        evaluate.read_clean(job.run_dir / f"eval_{split}.json")
        done = evaluate.read_sweeps(robustness) if sweeps and robustness.is_file() else {}
    except evaluate.EvaluationError as error:
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
    wrong = evaluate.first_wrong(meta, META_CHECKS)
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

# What Timings reads of an earlier invocation's stage: {key: test of its value}.
STAGE_CHECKS = {"stage": lambda v: isinstance(v, str), "status": lambda v: isinstance(v, str),
                "seconds": evaluate.is_number, "cpu_seconds": evaluate.is_number,
                "earlier": lambda v: v is None or not _stage_problem(v)}


def _stage_problem(entry) -> str | None:
    """What is wrong with a stage entry of timings.json (Timings.record writes them); None: nothing."""
    return evaluate.first_wrong(entry, STAGE_CHECKS) if isinstance(entry, dict) else f"{entry!r} is not an object"


def _timings_problem(timings) -> str | None:
    """What is wrong with the content of a timings.json; None: nothing."""
    if not isinstance(timings, dict) or not isinstance(timings.get("stages"), list):
        return "not a JSON object with a list of 'stages'"
    return next((f"stage {i + 1}: {wrong}" for i, entry in enumerate(timings["stages"])
                 if (wrong := _stage_problem(entry))), None)


class Timings:
    """Per-stage wall and CPU times, kept in <result dir>/timings.json across invocations:
    a stage skipped now keeps the times of the invocation that ran it. A timings.json that this
    class would not have written is set aside (a note says so) and written anew."""

    def __init__(self, path: Path, preset: str, dry_run: bool):
        self.path, self.dry_run = path, dry_run
        previous = read_json(path) if path.is_file() else None
        if path.is_file() and (wrong := _timings_problem(previous)):
            print(f"note: {path}: {wrong}: the earlier invocations' stage times are dropped", flush=True)
            previous = None
        self.previous = {s["stage"]: s for s in (previous or {}).get("stages", [])} \
            if (previous or {}).get("preset") == preset else {}
        self.preset = preset
        self.stages: list[dict] = []
        self.started = time.time()

    def record(self, stage: str, status: str, seconds: float = 0.0, cpu_seconds: float = 0.0,
               command: list[str] | None = None) -> None:
        entry = {"stage": stage, "status": status, "seconds": round(seconds, 2),
                 "cpu_seconds": round(cpu_seconds, 2), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        if command:
            entry["command"] = shlex.join(command)
        if status == "skipped" and self._last_run(stage):
            entry["earlier"] = self._last_run(stage)
        self.stages.append(entry)
        self.save()

    def _last_run(self, stage: str) -> dict | None:
        """The entry of the last invocation that ran ``stage`` (not just skipped it)."""
        earlier = self.previous.get(stage)
        return earlier.get("earlier") if earlier and earlier["status"] == "skipped" else earlier

    def all_stages(self) -> list[dict]:
        """This invocation's stages, plus (as skipped) those that only an earlier invocation ran
        (with --skip_train or --methods), in the order they ran."""
        current = {entry["stage"]: entry for entry in self.stages}
        carried = {name: {"stage": name, "status": "skipped", "seconds": 0.0, "cpu_seconds": 0.0,
                          "finished": None, "earlier": self._last_run(name)}
                   for name in self.previous if name not in current and self._last_run(name)}
        by_name = {**carried, **current}
        order = list(self.previous) + [name for name in current if name not in self.previous]
        return [by_name[name] for name in order if name in by_name]

    def save(self) -> None:
        if self.dry_run:
            return
        data = {"preset": self.preset, "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started)),
                "total_seconds": round(time.time() - self.started, 2),
                "total_cpu_seconds": round(sum(s["cpu_seconds"] for s in self.stages), 2),
                "stages": self.all_stages()}
        write_json(data, self.path)


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
    print(f"=== {stage}: done in {_duration(seconds)}", flush=True)


def skip_stage(stage: str, reason: str, timings: Timings) -> None:
    print(f"skip {stage}: {reason}", flush=True)
    timings.record(stage, "skipped")


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s" if minutes \
        else f"{seconds} s"


# --- the chain -----------------------------------------------------------------------------

def prepare_data(plan: Plan, raw_dir: Path, data_dir: Path, timings: Timings, dry_run: bool) -> None:
    regenerated = False
    if plan.synthetic_records_per_class:
        stage = "data: generate synthetic records"
        if synthetic_complete(raw_dir, plan.synthetic_records_per_class):
            skip_stage(stage, f"{raw_dir} holds the complete synthetic dataset", timings)
        else:
            run_stage(stage, [sys.executable, str(REPO / "synthetic.py"), "--out_dir", str(raw_dir),
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
        print(f"{job.run_dir.name}: {_duration(sum(parts.values()))} ("
              + ", ".join(f"{name} {_duration(seconds)}" for name, seconds in parts.items()) + ")")
    without = f", {unknown} of them without an estimate" if unknown else ""
    print(f"total: {_duration(total)} of single-thread CPU time for {len(jobs)} runs{without} (a GPU is much faster)")


def write_selection_report(preset: str, plan: Plan, jobs: list[Job], result_dir: Path, timings: Timings) -> Path:
    """selection.md: per method of the grid, the validation tables and each criterion's pick."""
    started = time.perf_counter()
    studies = {method: (setting, {getattr(job.cfg, setting): job.run_dir for job in jobs if job.method == method})
               for method, setting, _ in plan.grid}
    body = selection.selection_report({m: study for m, study in studies.items() if study[1]}, SELECTION_SWEEP,
                                      result_dir / "selection")
    path = result_dir / "selection.md"
    write_text_atomic(path, "\n".join([
        "# Coefficient selection", "", plan.data_note, "",
        f"Written {time.strftime('%Y-%m-%d %H:%M:%S')} by "
        f"`python {shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])}`.",
        "", f"Each run: the paper's settings (preset `{preset}`) but for the coefficient in "
        f"its row; its final `model.pt` evaluated on the validation split under `{SELECTION_SWEEP}` "
        f"({_sweep_settings_line(SELECTION_SWEEP, _validation_sweeps(jobs), 'val')}). Rows: the coefficient; columns: "
        "clean, each level, the robustness AUC over the level list named in its header. Each criterion picks "
        "the value with the highest score (a tie: the first value of the grid).", "", body]))
    timings.record("selection report", "ran", time.perf_counter() - started)
    return path


def _validation_sweeps(jobs: list[Job]) -> dict[str, dict]:
    return {job.run_dir.name: evaluate.read_sweeps(job.run_dir / "robustness_val.json")[SELECTION_SWEEP]
            for job in jobs}


def compare(jobs: list[Job], out_dir: Path, timings: Timings) -> tuple[list[Job], dict[str, str]]:
    """compare_runs over every run of the plan that has been evaluated."""
    ready = [job for job in jobs if (job.run_dir / "eval_test.json").is_file()]
    for job in jobs:
        if job not in ready:
            print(f"note: {job.run_dir} is not evaluated yet; it is left out of the tables", flush=True)
    if not ready:
        raise ReproduceError(f"no evaluated run under {jobs[0].run_dir.parent if jobs else 'the result dir'}"
                             " to compare: train first (run without --skip_train)")
    print(f"\n=== compare {len(ready)} runs -> {out_dir}", flush=True)
    started, cpu = time.perf_counter(), time.process_time()
    tables = evaluate.compare_runs([job.run_dir for job in ready], out_dir)
    timings.record("compare", "ran", time.perf_counter() - started, time.process_time() - cpu)
    return ready, tables


# --- the report ----------------------------------------------------------------------------

def _format_seconds(seconds) -> str:
    return "n/a" if seconds is None else _duration(seconds)


def _run_settings(job: Job) -> str:
    """The run's own hyperparameters (method-specific), as key=value."""
    return ", ".join(f"{k}={getattr(job.cfg, k):g}" if isinstance(getattr(job.cfg, k), float)
                     else f"{k}={getattr(job.cfg, k)}" for k in job.hyperparameters) or "none"


def _preset_changes(preset: str, job: Job) -> str:
    """What ``preset`` changes for this run against the paper's settings (config.PRESETS):
    its method settings and its own section, each with the paper's value."""
    paper = {**TRAIN_DEFAULTS, **SCRIPTS[job.method].TRAINING, **job.hyperparameters}
    changed = {k: v for k, v in preset_settings(preset, job.method).items()
               if k in job.hyperparameters or k in PRESETS[preset].get(job.method, {})}
    return ", ".join(f"{k}={v:g} (paper {paper[k]:g})" for k, v in changed.items()) or "none"


def _sweep_settings_line(sweep: str, results: dict[str, dict], split: str = "test") -> str:
    """One line stating the attack/noise settings (they are shared when the runs agree)."""
    kind = SWEEPS[sweep][0]

    def describe(settings: dict) -> str:
        records = f"all {split} batches" if not settings["max_batches"] else \
            f"the first {settings['max_batches']} {split} batch(es)"
        if settings.get("max_records"):
            records = f"a fixed class-balanced subset of {settings['max_records']} {split} records"
        if kind in ("attack", "ifgsm"):
            starts = "no random start" if kind == "ifgsm" else f"{settings['restarts']} random start(s)"
            return (f"{settings['steps']} steps of size eps/10, {starts}, CE loss, early stop, model in eval "
                    f"mode, {records}, seed {settings['seed']}")
        if kind in ("apgd_ce", "apgd_dlr", "square", "autoattack"):
            steps = f"{settings['steps']} steps, {settings['restarts']} random start(s)"
            queries = f"{evaluate.square_queries(settings['steps'])} queries"
            attack = {"apgd_ce": f"APGD-CE, {steps}", "apgd_dlr": f"APGD-DLR, {steps}",
                      "square": f"Square L-inf, {queries}",
                      "autoattack": f"APGD-CE, then APGD-DLR ({steps} each) and Square ({queries}) "
                                    "on the survivors"}[kind]
            return f"{attack}, early stop, model in eval mode, {records}, seed {settings['seed']}"
        return f"one noise draw per record and level, {records}, seed {settings['seed']}"

    described = {run: describe(r["settings"]) for run, r in results.items()}
    if len(set(described.values())) == 1:
        return next(iter(described.values()))
    return "; ".join(f"{run}: {text}" for run, text in described.items())


HISTORY_CHECKS = {"seconds": evaluate.is_number, "val_accuracy": evaluate.is_number}  # what the report reads


def _history(path: Path) -> list[dict]:
    """A run's history.json (an entry per epoch; none when missing), checked to hold what the report reads."""
    history = read_json(path) if path.is_file() else []
    wrong = "not a JSON list" if not isinstance(history, list) else next(
        (f"epoch {i + 1}: {wrong}" for i, entry in enumerate(history)
         if (wrong := evaluate.first_wrong(entry, HISTORY_CHECKS) if isinstance(entry, dict) else "not an object")),
        None)
    if wrong:
        raise ReproduceError(f"{path}: {wrong}: not a history that training writes")
    return history


def build_report(plan_name: str, plan: Plan, raw_dir: Path, data_dir: Path, result_dir: Path,
                 jobs: list[Job], ready: list[Job], tables: dict[str, str], timings: Timings) -> str:
    def rel(path: Path) -> str:
        return Path(path).relative_to(result_dir).as_posix() if Path(path).is_relative_to(result_dir) \
            else Path(path).as_posix()

    lines = [f"# Reproduction report: `{plan_name}` preset", "", plan.data_note, "",
             f"Written {time.strftime('%Y-%m-%d %H:%M:%S')} by "
             f"`python {shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])}`.",
             ""]
    meta = cache_meta(data_dir)
    lines += ["## Data", "", f"- records: `{raw_dir}` ({meta['source_format'] if meta else '?'} form, "
              f"{meta['n_records'] if meta else '?'} usable records)",
              f"- cache: `{data_dir}`; split: {plan.val_per_class} validation and {plan.test_per_class} test "
              "records per class (PROTOCOL section 2's seeded procedure), multi-label records in no split"]
    if meta:
        counts = meta["class_counts"]
        classes = list(counts["train"])
        lines += ["", "| split | " + " | ".join(classes) + " | total |", "|---|" + "---|" * (len(classes) + 1)]
        for split in ("train", "val", "test"):
            lines.append(f"| {split} | " + " | ".join(str(counts[split][c]) for c in classes)
                         + f" | {sum(counts[split].values())} |")
    lines += [""]

    histories = {job: _history(job.run_dir / "history.json") for job in ready}
    configs = {job: saved_settings(job) for job in ready}
    lines += ["## Runs", "",
              f"Preset `{plan_name}` for every run: " +
              ", ".join(f"{k}={getattr(jobs[0].cfg, k)}" for k in
                        ("epochs", "batch_size", "lr", "max_length", "random_pad", "max_batches", "model")) +
              " (a run's own changes are in its row). Checkpoint evaluated: each run's final `model.pt` "
              "(the last epoch).", "",
              "| run | method | method settings | preset's changes to the paper's settings | epochs done | "
              "checkpoint | device | training time | final val accuracy | figures |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for job in ready:
        history = histories[job]
        train_seconds = sum(h.get("seconds", 0) for h in history) if history else None
        val = f"{history[-1]['val_accuracy']:.3f}" if history else "n/a"
        lines.append(f"| {job.run_dir.name} | {job.method} | {_run_settings(job)} | "
                     f"{_preset_changes(plan_name, job)} | {len(history)} | "
                     f"`{rel(job.run_dir / 'model.pt')}` | {configs[job].get('device_used', '?')} | "
                     f"{_format_seconds(train_seconds)} | {val} | [training curves]({rel(job.run_dir / 'curves.png')}), "
                     f"[test confusion matrix]({rel(job.run_dir / 'confusion_test.png')}) |")
    missing = [job for job in jobs if job not in ready]
    if missing:
        lines += ["", "Not in the tables (not trained or not evaluated yet): "
                  + ", ".join(f"`{job.run_dir.name}`" for job in missing) + "."]

    evals = {job: evaluate.read_clean(job.run_dir / "eval_test.json") for job in ready}
    n_test = {evals[job]["n"] for job in ready}
    lines += ["", "## Clean metrics", "",
              f"Split: test ({', '.join(map(str, sorted(n for n in n_test if n)))} records), clean inputs, model in "
              "eval mode, signals right-aligned. Checkpoint of each row: that run's `model.pt` (see Runs). "
              "Columns: per-class F1, mean F1 over the 9 classes, the CPSC2018 sub-scores Faf, Fblock, Fpc, "
              "Fst, class-balanced accuracy (mean per-class recall), number of records. Time: part of each "
              "run's training stage (see Stage timings).", "", tables["clean"], ""]
    near_chance = [job.run_dir.name for job in ready if evals[job]["accuracy"] <= CHANCE_NOTE_ACCURACY]
    if near_chance:
        lines += [f"Note: near chance (class-balanced accuracy of guessing: 1/{len(CLASSES)} = "
                  f"{1 / len(CLASSES):.3f}): "
                  f"{', '.join(f'`{name}`' for name in near_chance)}. Within this preset's training budget "
                  "such a run learned (almost) nothing, so its robustness rows below are no evidence of "
                  "robustness (a constant prediction does not change under any noise).", ""]

    robustness = {job: evaluate.read_sweeps(job.run_dir / "robustness_test.json")
                  if (job.run_dir / "robustness_test.json").is_file() else {} for job in ready}
    sweep_names = [s for s in SWEEPS if f"{s}_accuracy" in tables]
    if sweep_names:
        lines += ["## Robustness", "",
                  "Per noise type two tables, class-balanced accuracy and mean F1 over the 9 classes (the "
                  "paper's two measures). Rows: runs; columns: clean, then each noise level, then the "
                  "robustness AUC (trapezoid area under the measure over the level, from 0 to the largest "
                  "level, divided by it), labelled with the level list it was computed over (`--levels`; "
                  "PROTOCOL section 6). A record misclassified on the clean input counts as wrong at every "
                  "level. Split: test. Checkpoint of each row: that run's `model.pt`. Sweep times are per "
                  "run, measured inside its training stage.", ""]
    for sweep in sweep_names:
        results = {job.run_dir.name: robustness[job][sweep] for job in ready if sweep in robustness[job]}
        n_used = sorted({r["n"] for r in results.values()})
        axis = SWEEPS[sweep][3]
        level_note = ("columns: signal-to-noise ratio in dB (noise only on the signal, scaled per record and "
                      "lead; 0 dB is the loudest); AUC over the noise/signal amplitude ratio 10^(-SNR/20), 0 to 1"
                      if SWEEPS[sweep][0] == "snr" else f"columns: {axis}")
        times = ", ".join(f"{run} {_format_seconds(r.get('seconds'))}" for run, r in results.items())
        lines += [f"### {SWEEP_TITLES.get(sweep, sweep)} (`{sweep}`)", "",
                  f"Split: test, {', '.join(map(str, n_used))} records used; {level_note}. "
                  f"Settings: {_sweep_settings_line(sweep, results)}. Time: {times}.", "",
                  "Class-balanced accuracy:", "", tables[f"{sweep}_accuracy"], "",
                  f"![{sweep}, accuracy]({rel(result_dir / 'compare' / f'{sweep}_accuracy.png')})", "",
                  "Mean F1:", "", tables[f"{sweep}_f1"], "",
                  f"![{sweep}, mean F1]({rel(result_dir / 'compare' / f'{sweep}_f1.png')})", ""]

    example = result_dir / "compare" / "adversarial_example.png"
    if example.is_file():
        plotted = read_json(example.with_suffix(".json"))
        eps = plotted.get("eps", "?") if isinstance(plotted, dict) else "?"
        lines += ["## Adversarial example", "",
                  f"One test record under L-inf PGD at eps {eps} (each run's pgd_linf settings), every run side by "
                  "side: two leads clean and attacked, the perturbation, the predictions before and after; the "
                  f"title says how the record was chosen. The plotted numbers: `{rel(example.with_suffix('.json'))}`.",
                  "", f"![adversarial example]({rel(example)})", ""]

    checks = {job.run_dir.name: check for job in ready if (check := evaluate.masking_check(robustness[job]))}
    if checks:
        lines += ["## Gradient-masking check", "",
                  "For each run with both a PGD (`pgd_linf`) and an ensemble (`autoattack`) sweep: "
                  "class-balanced accuracy under each at every shared eps, the gap in points (PGD minus "
                  "ensemble) and, when the run has a `square` sweep, Square's accuracy next to the strongest "
                  f"gradient attack's. A run is flagged when the ensemble is more than {100 * evaluate.MASKING_GAP:g} "
                  "points below PGD at some eps, or when Square, which uses no gradients, does better than "
                  "the gradient attacks: then PGD's numbers overstate the model's robustness.", "",
                  evaluate.masking_check_markdown(checks), ""]

    lines += ["## Stage timings", "",
              f"Wall time and CPU time (user + system of the stage's processes) of this invocation; a skipped "
              f"stage shows the invocation that ran it. Also in `{rel(timings.path)}`.", "",
              "| stage | status | wall time | CPU time | finished |", "|---|---|---|---|---|"]
    for entry in (e for e in timings.all_stages() if e["stage"] != "report"):  # this one is being written
        shown = entry.get("earlier") if entry["status"] == "skipped" and entry.get("earlier") else entry
        status = entry["status"] + (" (ran earlier)" if shown is not entry else "")
        lines.append(f"| {entry['stage']} | {status} | {_format_seconds(shown['seconds'])} | "
                     f"{_format_seconds(shown['cpu_seconds'])} | {shown['finished']} |")
    lines += ["", f"Total wall time of this invocation: {_duration(time.time() - timings.started)}.", ""]
    return "\n".join(lines)


# --- command line --------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__.split("\n\n")[0],
                           epilog="Presets: paper (CPSC2018, the paper's settings), demo (synthetic, ~10 min "
                                  "on 2 CPU cores), smoke (synthetic, CI), mini (a small real set given with --raw_dir), "
                                  "paper-selection (the NSR and Jacobian coefficient study on CPSC2018's validation "
                                  "split; with --dry_run: every run and its estimated cost).")
    parser.add_flag("--preset", default="paper", choices=list(PLANS))
    parser.add_flag("--raw_dir", type=folder,
                    help="the records (synthetic presets generate them there); default per preset: "
                         + ", ".join(f"{k} {p.raw_dir or '(required)'}" for k, p in PLANS.items()))
    parser.add_flag("--result_dir", type=folder,
                    help="where the runs, compare/, report.md and timings.json go (default per preset: "
                         + ", ".join(f"{k} {preset_setting(k, 'result_dir')}" for k in PLANS) + ")")
    parser.add_flag("--methods", nargs="+", default=list(METHODS), metavar="METHOD",
                    help=f"a subset of {', '.join(METHODS)} (space- or comma-separated)")
    parser.add_flag("--skip_train", action="store_true",
                    help="no data or training stages: compare the finished runs and write the report")
    parser.add_flag("--dry_run", action="store_true", help="print the commands, run nothing")
    parser.add_flag("--nproc_per_node", type=int, default=1, metavar="N",
                    help="train and evaluate each run with N processes under torchrun (one per GPU); "
                         "the batch size must be a multiple of N")
    args = parser.parse_args(argv)
    if args.raw_dir is None and PLANS[args.preset].raw_dir is None:
        raise ReproduceError(f"--preset {args.preset} needs --raw_dir DIR: a folder of real CPSC2018 records "
                             "(e.g. 150 of them in the WFDB form, with REFERENCE.csv or #Dx headers; "
                             "see the README, 'Reproducing the paper')")
    if args.nproc_per_node < 1:
        raise ReproduceError(f"--nproc_per_node must be at least 1, got {args.nproc_per_node}")
    methods = [m.strip() for token in args.methods for m in token.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ReproduceError(f"--methods: unknown method '{unknown[0] if unknown else ''}' "
                             f"(known: {', '.join(METHODS)})")
    args.methods = methods
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
    plan = PLANS[args.preset]
    raw_dir = Path(args.raw_dir or plan.raw_dir)
    all_jobs = plan_jobs(args.preset, list(METHODS), args.result_dir)
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
        if plan.selection:
            validate_all(jobs, timings, args.dry_run, args.nproc_per_node)
    if plan.selection:
        if args.dry_run:
            print_costs(jobs)
            print(f"\n=== selection report -> {result_dir / 'selection.md'}")
            return 0
        path = write_selection_report(args.preset, plan, jobs, result_dir, timings)
        print(f"\nselection report written to {path} (this invocation: {_duration(time.time() - timings.started)})")
        return 0
    if args.dry_run:
        print(f"\n=== compare -> {result_dir / 'compare'}\n=== report -> {result_dir / 'report.md'}")
        return 0
    ready, tables = compare(all_jobs, result_dir / "compare", timings)
    started = time.perf_counter()
    report_path = result_dir / "report.md"
    write_text_atomic(report_path, build_report(args.preset, plan, raw_dir, data_dir, result_dir, all_jobs, ready,
                                                tables, timings))
    timings.record("report", "ran", time.perf_counter() - started)
    print(f"\nreport written to {report_path} (this invocation: {_duration(time.time() - timings.started)})")
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
    except (ReproduceError, ConfigError, DataError, evaluate.EvaluationError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a file or folder that could not be read or written while running
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
