"""Every training setting in one place (PROTOCOL section 5): the defaults, the presets, the
command-line flags and the checks that refuse settings that cannot work.

A setting is resolved as: ``TRAIN_DEFAULTS`` and the method script's own values (its
TRAINING, which sets the SCRIPT_SETTINGS, and its HYPERPARAMETERS), then the preset, then the
flags. Each flag's type is declared here (``flag_type``), never taken from its default, so
that editing a default (44.0 to 44) does not change what its flag accepts.
"""
from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch

import attacks
from perturbations import autoattack
from perturbations import noises
from ECG_CNN import MODELS, check_length
from ECG_Dataset import MAX_LENGTH, RANDOM_PAD
from plumbing.distributed import choose_device, world_size
from plumbing.flags import ConfigError, OneLineParser, folder
from preprocess import DEFAULT_OUT_DIR, DEFAULT_RAW_DIR

# PROTOCOL section 5: the settings shared by all four methods; each is a command-line flag.
# These each method script sets at its top (TRAINING), where a researcher edits them:
SCRIPT_SETTINGS = ("epochs", "batch_size", "lr")
# The others:
TRAIN_DEFAULTS = dict(
    data_dir=DEFAULT_OUT_DIR,  # the cache written by preprocess.py
    result_dir="result",
    run_name="",             # empty: the method's own name with its key settings
    model="resnet18a",
    eval_batch_size=64,
    seed=0,
    max_length=MAX_LENGTH,   # records are truncated to this many samples
    random_pad=RANDOM_PAD,   # training shift range; inputs are max_length + random_pad long
    bucket=False,            # batch by length and crop the padding (for --model resnet18a_vl)
    device="auto",           # auto: CUDA when available, else CPU
    num_workers=-1,          # -1: 4 loader processes on CUDA (pinned memory), none on the CPU
    amp=False,               # CUDA only: bf16 autocast of the forward passes and losses
    cudnn_benchmark=False,   # CUDA only: cuDNN autotuning (faster, no longer deterministic)
    checkpoint_every=10,
    max_batches=0,           # >0: stop each epoch after this many batches (quick looks)
    noise_sd=0.0,            # >0: Gaussian noise of this std on each training batch's signal (not the paper's)
    resume=False,
    overwrite=False,
    sweeps="pgd_linf,pgd_l2,white",  # robustness sweeps after training (empty: none)
    levels="paper",          # the sweeps' noise levels: paper or extended (LEVEL_LISTS)
    sweep_steps=100,
    sweep_restarts=2,
    sweep_max_batches=0,
)

MAX_SEED = 2**32 - 1  # numpy's legacy seeding (np.random.seed) takes 0 .. 2**32 - 1


@dataclass(frozen=True)
class Method:
    """A training method: its script (a module name) and the rule that names its runs: the
    method's name, then each setting of ``named`` as name_value, then each of ``named_when_set``
    ({setting: label}) as label_value when it is not 0."""

    script: str
    named: tuple[str, ...] = ()
    named_when_set: dict[str, str] = field(default_factory=dict)


# The methods by the name that presets' sections and --methods use: the paper's four in its order,
# then the baselines beyond the paper (PROTOCOL section 10).
METHODS = {"CE": Method("CPSC2018_CNN_CE"),
           "NSR": Method("CPSC2018_CNN_NSR", named=("beta1", "beta2")),
           "jacob": Method("CPSC2018_CNN_jacob", named=("beta",), named_when_set={"jacobian_projections": "proj"}),
           "advls": Method("CPSC2018_CNN_ce_adv_pgd_ls", named=("eps", "beta"),
                           named_when_set={"label_smoothing": "ls"}),
           "trades": Method("CPSC2018_CNN_trades", named=("eps", "beta")),
           "fast_adv": Method("CPSC2018_CNN_fast_adv", named=("eps", "beta"), named_when_set={"wong_loss": "wong"})}
PAPER_METHODS = ("CE", "NSR", "jacob", "advls")
# The Gaussian noise of the noise-trained CE baseline (Cohen et al.'s sigma 0.25): its RMS is 1.5 times
# the median RMS of a scaled lead of real CPSC2018 records (0.164; PROTOCOL section 10).
BASELINE_NOISE_SD = 0.25
# What a plan with baselines (Preset.baselines, or reproduce.py --methods all) runs besides the
# paper's: every method of METHODS, and CE also trained with Gaussian noise ({method: (setting, values)},
# one run per value, as Preset.grid).
BASELINE_GRID = {"CE": ("noise_sd", (0.0, BASELINE_NOISE_SD))}


# The shared settings that every method's run name shows when they are not 0 ({setting: label}).
SHARED_NAMED_WHEN_SET = {"noise_sd": "noise"}


def method_of(script: str | Path) -> str:
    """The name of the method whose script is the file ``script``."""
    names = [name for name, method in METHODS.items() if method.script == Path(script).stem]
    if not names:
        raise ConfigError(f"{script}: not the script of a method of config.METHODS")
    return names[0]


def run_name(cfg: SimpleNamespace) -> str:
    """The run's folder name: --run_name, else the method's name with its key settings (METHODS)."""
    if cfg.run_name:
        return cfg.run_name
    method = METHODS[cfg.method]
    shown = {**{key: key for key in method.named},
             **{label: key for key, label in {**method.named_when_set, **SHARED_NAMED_WHEN_SET}.items()
                if getattr(cfg, key)}}
    return "_".join([cfg.method, *(f"{label}_{_name_part(getattr(cfg, key))}" for label, key in shown.items())])


def _name_part(value) -> str:
    """A setting as run names write it: 44.0 as 44, 1e20 as 1e+20, a whole number as it is."""
    return f"{value:g}" if isinstance(value, float) else str(value)


# Shared whole-number settings (a method declares its own: its script's WHOLE_NUMBERS); SWITCHES
# are on/off flags, FOLDERS paths (never empty), TEXTS strings; every other setting is a float.
COUNTS = {"epochs", "batch_size", "eval_batch_size", "seed", "max_length", "random_pad", "num_workers",
          "checkpoint_every", "max_batches", "sweep_steps", "sweep_restarts", "sweep_max_batches"}
SWITCHES = {"bucket", "amp", "cudnn_benchmark", "resume", "overwrite"}
FOLDERS = {"data_dir", "result_dir"}
TEXTS = {"run_name", "model", "device", "sweeps", "levels"}


def value_type(key: str, whole_numbers: tuple[str, ...] = ()) -> type:
    """The type of a setting's value; ``whole_numbers``: the method's whole-number hyperparameters."""
    if key in SWITCHES:
        return bool
    if key in FOLDERS | TEXTS:
        return str
    return int if key in COUNTS or key in whole_numbers else float


def flag_type(key: str, whole_numbers: tuple[str, ...] = ()) -> Callable:
    """What reads a setting's flag: its value type, or ``folder`` for a folder."""
    return folder if key in FOLDERS else value_type(key, whole_numbers)


def as_flag_type(key: str, value, whole_numbers: tuple[str, ...] = ()):
    """A default as its flag reads values (``beta=44`` -> 44.0, ``batch_size=64.0`` -> 64), so
    that how a value is written at the top of a script never changes the run."""
    kind = flag_type(key, whole_numbers)
    if value is None or kind not in (int, float):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} = {value!r}: --{key} takes a number")
    if kind is int and value != int(value):
        raise ConfigError(f"{key} = {value!r}: --{key} takes a whole number")
    return kind(value)


# Sweeps beyond the paper's (TRAIN_DEFAULTS' sweeps), named once for the presets below.
REAL_NOISE_SWEEPS = "baseline_wander,powerline_50hz,muscle"  # noise that real ECGs carry
ENSEMBLE_SWEEPS = "apgd_ce,apgd_dlr,square,autoattack,autoattack_fast"  # the gradient-masking check, both line-ups

@dataclass(frozen=True)
class Certify:
    """What reproduce.py certifies by randomized smoothing (certify.py, PROTOCOL section 10) after
    each run's evaluation: every sigma on the test split, with these settings."""

    sigmas: tuple[float, ...]
    n0: int = 100
    n: int = 10_000
    alpha: float = 0.001
    max_records: int = 0       # > 0: a fixed class-balanced subset of the test split
    methods: tuple[str, ...] = ()  # the methods whose runs are certified; empty: every run


@dataclass(frozen=True)
class Preset:
    """One --preset, the same whichever entry point runs it (a method script or reproduce.py).

    ``settings`` override TRAIN_DEFAULTS and the scripts' values; a setting applies to the
    methods that have it, and a section named after a method ("NSR", "jacob", ...) applies to
    that method only, after the rest. The other fields are what reproduce.py does around the
    runs; paths are relative to the working directory.
    """

    settings: dict
    data_note: str             # the report's statement of what the data is
    raw_dir: str | None        # the records (synthetic presets generate them here); None: --raw_dir required
    val_per_class: int
    test_per_class: int
    grid: tuple[tuple[str, str, tuple[float, ...]], ...]  # (method, setting, its values): one run per value
    synthetic_records_per_class: int = 0  # > 0: a synthetic dataset (synthetic.py)
    synthetic_max_seconds: float = 60.0
    selection: bool = False    # the coefficient study: only the grid's methods, judged on the validation split
    certify: Certify | None = None  # None: no certification
    baselines: bool = False    # the baselines beyond the paper (every method, BASELINE_GRID) are in its plan

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods its plan runs by default."""
        return tuple(METHODS) if self.baselines else PAPER_METHODS


CPSC2018_NOTE = ("**Data: CPSC2018** (real 12-lead ECGs, the official training set) with the paper's reference "
                 "split (PROTOCOL section 2)")
SYNTHETIC_NOTE = ("**Data: synthetic signals, not CPSC2018.** The records are simulated by "
                  "`synthetic.py` (Gaussian-wave beats with a textbook feature per class, in "
                  "CPSC2018's file format); they are not recordings of patients, and nothing "
                  "below says anything about real ECGs or about the paper's numbers.")
PAPER_GRID = (("advls", "eps", (0.005, 0.01, 0.05, 0.1)),)
# Cohen et al.'s sigmas; n = 10^4 (radii up to 3.2 sigma) on 10 records per class (PROTOCOL 10)
PAPER_CERTIFY = Certify((0.12, 0.25, 0.5), max_records=90)
# "paper" is the defaults; "demo" and "smoke" run on synthetic data that `python reproduce.py
# --preset demo|smoke` generates and preprocesses first (see README).
PRESETS = {
    "paper": Preset({}, f"{CPSC2018_NOTE}.", DEFAULT_RAW_DIR, 5, 50, PAPER_GRID, certify=PAPER_CERTIFY),
    # The paper's runs (the same folders: finished ones are reused) and the baselines beyond it.
    "baselines": Preset({}, f"{CPSC2018_NOTE}.", DEFAULT_RAW_DIR, 5, 50, PAPER_GRID, certify=PAPER_CERTIFY,
                        baselines=True),
    # Sized for about ten minutes of `python reproduce.py --preset demo` on 2 CPU cores: no L2
    # sweep, and in the grid the paper's default eps only.
    "demo": Preset(dict(data_dir="data/demo/processed", result_dir="result/demo", max_length=4096,
                        random_pad=1024, epochs=10, batch_size=16, checkpoint_every=5,
                        sweeps=f"pgd_linf,white,{REAL_NOISE_SWEEPS}", sweep_steps=5, sweep_restarts=1,
                        adv_start_epoch=2, pgd_steps=5, jacobian_projections=1,
                        NSR=dict(batch_size=8, reg_start_epoch=7, beta1=0.1, beta2=0.05),
                        jacob=dict(beta=0.5, reg_start_epoch=4)),
                   SYNTHETIC_NOTE, "data/demo/train", 3, 6, (("advls", "eps", (0.01,)),),
                   synthetic_records_per_class=30, synthetic_max_seconds=20.0,
                   certify=Certify((0.25, 0.5), n0=10, n=100, max_records=18, methods=("CE", "advls"))),
    "smoke": Preset(dict(data_dir="data/smoke/processed", result_dir="result/smoke", max_length=2048,
                         random_pad=1024, epochs=1, batch_size=16, checkpoint_every=1,
                         max_batches=2, sweeps="white,pgd_linf", sweep_steps=2, sweep_restarts=1,
                         sweep_max_batches=1,
                         reg_start_epoch=0, adv_start_epoch=0, pgd_steps=2, jacobian_projections=1),
                    SYNTHETIC_NOTE, "data/smoke/train", 1, 1, (("advls", "eps", (0.01,)),),
                    synthetic_records_per_class=4, synthetic_max_seconds=8.0,
                    certify=Certify((0.25,), n0=4, n=16, max_records=9, methods=("CE",))),
    # A small real CPSC2018 set given with reproduce.py --preset mini --raw_dir DIR.
    "mini": Preset(dict(data_dir="data/mini/processed", result_dir="result/mini", max_length=4096,
                        random_pad=1024, epochs=10, batch_size=16, checkpoint_every=5,
                        sweeps=f"pgd_linf,white,{ENSEMBLE_SWEEPS},{REAL_NOISE_SWEEPS}", sweep_steps=10,
                        sweep_restarts=1, adv_start_epoch=3, pgd_steps=5, jacobian_projections=1,
                        NSR=dict(batch_size=8, reg_start_epoch=7, beta1=0.1, beta2=0.05),
                        jacob=dict(beta=0.5, reg_start_epoch=4)),
                   "**Data: real CPSC2018 records, but only a small sample of them** with a small "
                   "stratified split of its own (2 validation and 4 test records per class), not the "
                   "paper's 450-record test set: a small-scale check of the pipeline on real ECGs, "
                   "not a reproduction of the paper's numbers.", None, 2, 4, (("advls", "eps", (0.01, 0.05)),),
                   certify=Certify((0.25, 0.5), n0=50, n=500, max_records=18, methods=("CE", "advls")),
                   baselines=True),
    # How the paper chose its NSR and Jacobian coefficients: each value trained with the paper's
    # settings and judged on the validation split under PGD L-inf (reproduce.SELECTION_SWEEP), so
    # no sweeps of the test split.
    "paper-selection": Preset(dict(result_dir="result/selection", sweeps=""),
                              f"{CPSC2018_NOTE}; coefficients judged on its validation split.", DEFAULT_RAW_DIR,
                              5, 50, (("NSR", "beta2", (0.4, 0.6, 0.8, 0.9, 1.0, 1.1, 1.2)),
                                      ("jacob", "beta", (4, 14, 24, 34, 44, 54, 64, 74, 84))),
                              selection=True),
}


# PROTOCOL section 6: the robustness sweeps (--sweeps), each one entry of SWEEPS: its
# perturbation, its noise levels in each level list (--levels), its curve's axis, its report
# title and a one-line description of its settings. The paper's level lists are the default;
# "extended" reaches stronger L-inf and weaker L2 attacks. The real-ECG noises (beyond the
# paper) are swept over signal-to-noise ratios in dB; their curves use the noise-to-signal
# amplitude ratio 10 ** (-snr / 20) as the level, so that clean (infinite SNR) is level 0 as
# for the others.
LEVEL_LISTS = ("paper", "extended")
LINF_LEVELS = {"paper": (0.001, 0.003, 0.005, 0.007, 0.01, 0.03, 0.05, 0.1),
               "extended": (0.001, 0.003, 0.005, 0.007, 0.01, 0.03, 0.05, 0.1, 0.2, 0.3)}
L2_LEVELS = {"paper": (1, 3, 5, 10, 15, 20, 25, 30),
             "extended": (0.1, 0.2, 0.3, 0.5, 0.7, 1, 3, 5, 10, 15, 20, 25, 30)}
WHITE_LEVELS = dict.fromkeys(LEVEL_LISTS, (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6))
SNR_DB_LEVELS = dict.fromkeys(LEVEL_LISTS, (40, 30, 20, 15, 10, 5, 0))
SNR_AXIS = "noise/signal amplitude"
# Square's queries scale with the gradient attacks' iterations: at the paper's 100 the published
# budgets (autoattack.SQUARE_QUERIES: 1000 alone and in the fast ensemble, 5000 in the standard one).
REFERENCE_STEPS = 100

# perturb(model, x, y, mask, level, steps, restarts, generator) -> the perturbed x
Perturb = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Sweep:
    """One robustness sweep (--sweeps NAME)."""

    title: str                       # the report's heading
    perturb: Perturb                 # one level's input (the attacks run with the model as given)
    levels: dict[str, tuple]         # {level list: its levels, without the clean level}
    axis: str                        # the curve's x-axis label
    describe: Callable[[dict], str]  # its settings ("steps", "restarts") in one line
    # Attacks the model: --sweep_max_records restricts all of these to the same records, so that
    # PGD and the ensemble are compared on equal footing (analysis.compare.masking_check).
    attacks_model: bool = False
    snr_db: bool = False             # levels are signal-to-noise ratios in dB
    # An ensemble_attack version: perturb returns (x, broken_by), and the sweep reports who broke
    # how many records and AutoAttack's warnings.
    ensemble: str = ""


def square_queries(steps: int, version: str = "fast") -> int:
    """Square's query budget in a sweep run with ``steps`` gradient-attack iterations, alone or in the
    ensemble ``version``."""
    return max(1, autoattack.SQUARE_QUERIES[version] * steps // REFERENCE_STEPS)


def _pgd(norm: str) -> Perturb:
    return lambda model, x, y, mask, level, steps, restarts, generator: attacks.pgd_attack(
        model, x, y, mask, level, norm, steps=steps, restarts=restarts, generator=generator)


def _ifgsm(norm: str) -> Perturb:
    return lambda model, x, y, mask, level, steps, restarts, generator: attacks.ifgsm_attack(
        model, x, y, mask, level, norm, steps=steps)


def _apgd(loss: str) -> Perturb:
    return lambda model, x, y, mask, level, steps, restarts, generator: autoattack.apgd_attack(
        model, x, y, mask, level, "inf", steps=steps, loss=loss, restarts=restarts, generator=generator)


def _square(model, x, y, mask, level, steps, restarts, generator):
    return autoattack.square_attack(model, x, y, mask, level, "inf", queries=square_queries(steps), generator=generator)


def _ensemble(version: str) -> Perturb:
    return lambda model, x, y, mask, level, steps, restarts, generator: autoattack.ensemble_attack(
        model, x, y, mask, level, "inf", version, steps=steps, queries=square_queries(steps, version),
        restarts=restarts, generator=generator)


def _ensemble_text(version: str) -> Callable[[dict], str]:
    second = {"standard": "APGD-T (every other class as a target in turn; {} each)", "fast": "APGD-DLR ({} each)"}
    return lambda s: (f"AutoAttack {version}: APGD-CE, then {second[version].format(_apgd_steps(s))} and Square "
                      f"({square_queries(s['steps'], version)} queries) on the survivors, {IN_EVAL}")


def _white(model, x, y, mask, level, steps, restarts, generator):
    return noises.white_noise(x, level, generator=generator)


def _snr_noise(noise: Callable, **options) -> Perturb:
    return lambda model, x, y, mask, level, steps, restarts, generator: noise(
        x, mask, level, **options, generator=generator)


IN_EVAL = "early stop, model in eval mode"


def _pgd_text(s: dict) -> str:
    return f"{s['steps']} steps of size eps/10, {s['restarts']} random start(s), CE loss, {IN_EVAL}"


def _ifgsm_text(s: dict) -> str:
    return f"{s['steps']} steps of size eps/10, no random start, CE loss, {IN_EVAL}"


def _apgd_steps(s: dict) -> str:
    return f"{s['steps']} steps, {s['restarts']} random start(s)"


def _noise_text(s: dict) -> str:
    return "one noise draw per record and level"


SWEEPS = {
    "pgd_linf": Sweep("PGD, L-inf budget", _pgd("inf"), LINF_LEVELS, "L-inf eps", _pgd_text, attacks_model=True),
    "pgd_l2": Sweep("PGD, L2 budget", _pgd("2"), L2_LEVELS, "L2 eps", _pgd_text, attacks_model=True),
    "ifgsm_linf": Sweep("IFGSM, L-inf budget", _ifgsm("inf"), LINF_LEVELS, "L-inf eps", _ifgsm_text,
                        attacks_model=True),
    "ifgsm_l2": Sweep("IFGSM, L2 budget", _ifgsm("2"), L2_LEVELS, "L2 eps", _ifgsm_text, attacks_model=True),
    # AutoAttack-style evaluation (autoattack.apgd_attack, square_attack, ensemble_attack).
    "apgd_ce": Sweep("APGD-CE, L-inf budget", _apgd("ce"), LINF_LEVELS, "L-inf eps",
                     lambda s: f"APGD-CE, {_apgd_steps(s)}, {IN_EVAL}", attacks_model=True),
    "apgd_dlr": Sweep("APGD-DLR, L-inf budget", _apgd("dlr"), LINF_LEVELS, "L-inf eps",
                      lambda s: f"APGD-DLR, {_apgd_steps(s)}, {IN_EVAL}", attacks_model=True),
    "square": Sweep("Square, L-inf budget", _square, LINF_LEVELS, "L-inf eps",
                    lambda s: f"Square L-inf, {square_queries(s['steps'])} queries, {IN_EVAL}", attacks_model=True),
    "apgd_t": Sweep("APGD-T, L-inf budget", _apgd("dlr_targeted"), LINF_LEVELS, "L-inf eps",
                    lambda s: f"APGD-T, every other class as a target in turn, {_apgd_steps(s)} per target, "
                              f"{IN_EVAL}", attacks_model=True),
    "autoattack": Sweep("AutoAttack standard (APGD-CE, APGD-T, Square), L-inf budget", _ensemble("standard"),
                        LINF_LEVELS, "L-inf eps", _ensemble_text("standard"), attacks_model=True,
                        ensemble="standard"),
    "autoattack_fast": Sweep("AutoAttack fast (APGD-CE, APGD-DLR, Square), L-inf budget", _ensemble("fast"),
                             LINF_LEVELS, "L-inf eps", _ensemble_text("fast"), attacks_model=True,
                             ensemble="fast"),
    "white": Sweep("White noise", _white, WHITE_LEVELS, "white noise amplitude eps", _noise_text),
    "baseline_wander": Sweep("Real-ECG noise: baseline wander", _snr_noise(noises.baseline_wander), SNR_DB_LEVELS,
                             SNR_AXIS, _noise_text, snr_db=True),
    "powerline_50hz": Sweep("Real-ECG noise: power line 50 Hz", _snr_noise(noises.powerline, freq=50.0),
                            SNR_DB_LEVELS, SNR_AXIS, _noise_text, snr_db=True),
    "powerline_60hz": Sweep("Real-ECG noise: power line 60 Hz", _snr_noise(noises.powerline, freq=60.0),
                            SNR_DB_LEVELS, SNR_AXIS, _noise_text, snr_db=True),
    "muscle": Sweep("Real-ECG noise: muscle (EMG)", _snr_noise(noises.muscle_noise), SNR_DB_LEVELS, SNR_AXIS,
                    _noise_text, snr_db=True),
}
GRADIENT_SWEEPS = ("pgd_linf", "apgd_ce", "apgd_dlr", "apgd_t")  # the L-inf gradient attacks (analysis.compare.masking_check)


def noise_levels(sweep: str, levels: str = "paper") -> tuple:
    """The levels of ``sweep`` in the level list ``levels`` (without the clean level 0)."""
    return SWEEPS[sweep].levels[levels]


def preset_settings(preset: str, method: str) -> dict:
    """What ``preset`` sets for ``method``: its shared settings, then the method's own section."""
    shared = {key: value for key, value in PRESETS[preset].settings.items() if key not in METHODS}
    return {**shared, **PRESETS[preset].settings.get(method, {})}


def preset_setting(preset: str, key: str):
    """A shared setting's value under ``preset``: the preset's own, else TRAIN_DEFAULTS' (not one
    of the SCRIPT_SETTINGS, which are each script's)."""
    return PRESETS[preset].settings.get(key, TRAIN_DEFAULTS[key])


def parse_sweeps(names: str) -> list[str]:
    """A comma-separated list of sweep names ("" for none, "all" for every one)."""
    if names.strip() == "all":
        return list(SWEEPS)
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in SWEEPS]
    if unknown:
        raise ConfigError(f"--sweeps: unknown sweep '{unknown[0]}' (known: {', '.join(SWEEPS)}, all)")
    return chosen


def check_levels(name: str) -> None:
    if name not in LEVEL_LISTS:
        raise ConfigError(f"--levels: unknown level list '{name}' (known: {', '.join(LEVEL_LISTS)})")


# The least value each whole-number setting runs with: checked on the command line and in the
# settings a checkpoint saved (evaluate.check_saved_settings).
LEAST = {"epochs": 1, "batch_size": 1, "eval_batch_size": 1, "checkpoint_every": 1, "max_length": 1,
         "max_batches": 0, "random_pad": 0, "seed": 0, "sweep_steps": 0, "sweep_restarts": 1, "sweep_max_batches": 0}


def check_least(settings: dict, *keys: str) -> None:
    """Refuse a setting of ``keys`` below its LEAST, naming the flag."""
    for key in keys:
        if settings[key] < LEAST[key]:
            bound = f"at least {LEAST[key]}" if LEAST[key] else ">= 0"
            raise ConfigError(f"--{key} must be {bound}, got {settings[key]}")


def check_sweep_settings(settings: dict) -> None:
    """Refuse sweep settings that cannot run (the training's and evaluate.py's), naming the flag."""
    parse_sweeps(settings["sweeps"])
    check_levels(settings["levels"])
    check_least(settings, "sweep_restarts", "sweep_steps", "sweep_max_batches")


def non_negative(cfg: SimpleNamespace, *keys: str) -> None:
    """Refuse a value of ``keys`` that is negative or not finite."""
    for key in keys:
        value = getattr(cfg, key)
        if not 0 <= value < math.inf:
            raise ConfigError(f"--{key} must be a finite non-negative number, got {value}")


def within_one(cfg: SimpleNamespace, *keys: str) -> None:
    """Refuse a value of ``keys`` above 1 (a weight or a fraction of 1, or an L-inf budget: the inputs
    are scaled to [-1, 1], so an eps beyond 1 perturbs by more than half their range)."""
    for key in keys:
        if getattr(cfg, key) > 1:
            raise ConfigError(f"--{key} must be between 0 and 1, got {getattr(cfg, key):g}")


def parse_script(script, argv: list[str] | None = None) -> SimpleNamespace:
    """parse_config for a method script (its module): the method its file is, its TRAINING,
    HYPERPARAMETERS, WHOLE_NUMBERS and check_hyperparameters if it has one."""
    return parse_config(method_of(script.__file__), script.HYPERPARAMETERS, argv,
                        getattr(script, "check_hyperparameters", None), training=script.TRAINING,
                        whole_numbers=script.WHOLE_NUMBERS)


def parse_config(method: str, hyperparameters: dict, argv: list[str] | None = None,
                 check: Callable[[SimpleNamespace], None] | None = None, *, training: dict,
                 whole_numbers: tuple[str, ...] = ()) -> SimpleNamespace:
    """TRAIN_DEFAULTS with the method script's ``training`` (its values of SCRIPT_SETTINGS) and
    ``hyperparameters`` (those named in ``whole_numbers`` whole numbers, the others floats), then
    the preset, then the flags.

    ``check``: the method's rules for its hyperparameters (raises ConfigError); without one,
    each must be a finite non-negative number.
    """
    if set(training) != set(SCRIPT_SETTINGS):
        raise ConfigError(f"{method}: TRAINING must set exactly {', '.join(SCRIPT_SETTINGS)} "
                          f"(it sets {', '.join(training) or 'nothing'})")
    defaults = {key: as_flag_type(key, value, whole_numbers)
                for key, value in {**TRAIN_DEFAULTS, **training, **hyperparameters}.items()}
    parser = OneLineParser(prog=f"{method} training", description=f"Train {method} (PROTOCOL section 5).",
                           argument_default=argparse.SUPPRESS)
    parser.add_flag("--preset", default="paper", choices=sorted(PRESETS))
    for key in defaults:
        kind = flag_type(key, whole_numbers)
        if kind is bool:
            parser.add_switch(f"--{key}", dest=key)
        else:
            parser.add_flag(f"--{key}", dest=key, type=kind, metavar=kind.__name__.upper())
    args = vars(parser.parse_args(argv))
    preset = args.pop("preset", "paper")
    overrides = {key: as_flag_type(key, value, whole_numbers) for key, value in preset_settings(preset, method).items()
                 if key in defaults}
    cfg = SimpleNamespace(**{**defaults, **overrides, **args, "preset": preset, "method": method})
    validate_config(cfg)
    (check or (lambda cfg: non_negative(cfg, *hyperparameters)))(cfg)
    return cfg


def validate_config(cfg: SimpleNamespace) -> None:
    """Reject shared settings that cannot work, naming the flag."""
    config = vars(cfg)
    check_least(config, "epochs", "batch_size", "eval_batch_size", "checkpoint_every", "max_length")
    if config["batch_size"] % world_size():
        raise ConfigError(f"--batch_size {config['batch_size']} must be a multiple of the number of "
                          f"processes ({world_size()}): each takes an equal share of every batch")
    if config["num_workers"] < -1:
        raise ConfigError(f"--num_workers must be >= -1 (-1: automatic), got {config['num_workers']}")
    if config["bucket"] and config["model"] != "resnet18a_vl":
        raise ConfigError(f"--bucket needs --model resnet18a_vl: the predictions of {config['model']} "
                          "depend on the padding that bucketing crops")
    check_sweep_settings(config)
    check_least(config, "max_batches", "random_pad")
    if not 0 <= config["seed"] <= MAX_SEED:
        raise ConfigError(f"--seed must be between 0 and {MAX_SEED} (numpy's seeds), got {config['seed']}")
    non_negative(cfg, "noise_sd")
    if not 0 < config["lr"] < math.inf:
        raise ConfigError(f"--lr must be positive and finite, got {config['lr']}")
    if config["model"] not in MODELS:
        raise ConfigError(f"--model: unknown model '{config['model']}' (known: {', '.join(MODELS)})")
    try:
        check_length(config["max_length"] + config["random_pad"])
    except ValueError as error:
        raise ConfigError(f"--max_length + --random_pad: {error}") from None
    check_device(cfg.device)
    for key in ("amp", "cudnn_benchmark"):
        if config[key] and choose_device(cfg.device).type != "cuda":
            raise ConfigError(f"--{key} needs a CUDA device (this run uses {choose_device(cfg.device)})")


def check_device(name: str) -> None:
    """Raise ConfigError unless ``name`` (auto, cpu, cuda, cuda:N, mps) is usable on this machine.

    CUDA is checked without creating a context: a process that only plans runs (reproduce.py)
    must not hold GPU memory.
    """
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device: unknown device '{name}' (known: auto, cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"--device {name}: MPS is not available on this machine")
    elif device.type != "cpu":
        raise ConfigError(f"--device {name}: not supported (auto, cpu, cuda, cuda:N, mps)")
    if world_size() > 1 and device.type == "cuda" and device.index is not None:
        raise ConfigError(f"--device {name}: under torchrun each process uses its own GPU "
                          "(cuda:LOCAL_RANK); pass --device cuda or auto")


# A run folder is one folder inside --result_dir: no separators, never "." or ".."; "+" for the
# exponents of the run names the scripts build from large settings (f"{1e20:g}" is "1e+20").
RUN_NAME_PATTERN = re.compile(r"[A-Za-z0-9._+-]+")
MAX_NAME_BYTES = 255  # the longest file name of Linux's and macOS's file systems


def check_run_name(name: str) -> None:
    if not RUN_NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        raise ConfigError(f"--run_name {name!r}: a run name is one folder name of letters, digits "
                          "and . _ + - (not . or ..)")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise ConfigError(f"--run_name {name[:20]}...: {len(name.encode())} characters, a folder name has at "
                          f"most {MAX_NAME_BYTES}")
