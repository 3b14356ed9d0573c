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
from types import SimpleNamespace
from typing import Callable

import torch

from ECG_CNN import MODELS, check_length
from ECG_Dataset import MAX_LENGTH, RANDOM_PAD
from plumbing.distributed import choose_device, world_size
from plumbing.flags import ConfigError, OneLineParser, folder

# PROTOCOL section 5: the settings shared by all four methods; each is a command-line flag.
# These each method script sets at its top (TRAINING), where a researcher edits them:
SCRIPT_SETTINGS = ("epochs", "batch_size", "lr")
# The others:
TRAIN_DEFAULTS = dict(
    data_dir="data/CPSC2018/processed",  # the cache written by preprocess.py
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
    resume=False,
    overwrite=False,
    sweeps="pgd_linf,pgd_l2,white",  # robustness sweeps after training (empty: none)
    levels="paper",          # the sweeps' noise levels: paper or extended (LEVEL_LISTS)
    sweep_steps=100,
    sweep_restarts=2,
    sweep_max_batches=0,
)

MAX_SEED = 2**32 - 1  # numpy's legacy seeding (np.random.seed) takes 0 .. 2**32 - 1

# The four methods in the paper's order: the name each script passes to harness.main (and
# presets' sections use) -> the script's module name.
METHODS = {"CE": "CPSC2018_CNN_CE", "NSR": "CPSC2018_CNN_NSR", "jacob": "CPSC2018_CNN_jacob",
           "advls": "CPSC2018_CNN_ce_adv_pgd_ls"}

# Whole-number settings (shared and of the methods); SWITCHES are on/off flags, FOLDERS paths
# (never empty), TEXTS strings; every other setting is a float.
COUNTS = {"epochs", "batch_size", "eval_batch_size", "seed", "max_length", "random_pad", "num_workers",
          "checkpoint_every", "max_batches", "sweep_steps", "sweep_restarts", "sweep_max_batches",
          "reg_start_epoch", "adv_start_epoch", "pgd_steps", "jacobian_projections"}
SWITCHES = {"bucket", "amp", "cudnn_benchmark", "resume", "overwrite"}
FOLDERS = {"data_dir", "result_dir"}
TEXTS = {"run_name", "model", "device", "sweeps", "levels"}


def value_type(key: str) -> type:
    """The type of a setting's value."""
    return bool if key in SWITCHES else str if key in FOLDERS | TEXTS else int if key in COUNTS else float


def flag_type(key: str) -> Callable:
    """What reads a setting's flag: its value type, or ``folder`` for a folder."""
    return folder if key in FOLDERS else value_type(key)


def as_flag_type(key: str, value):
    """A default as its flag reads values (``beta=44`` -> 44.0, ``batch_size=64.0`` -> 64), so
    that how a value is written at the top of a script never changes the run."""
    kind = flag_type(key)
    if value is None or kind not in (int, float):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} = {value!r}: --{key} takes a number")
    if kind is int and value != int(value):
        raise ConfigError(f"{key} = {value!r}: --{key} takes a whole number")
    return kind(value)


# Sweeps beyond the paper's (TRAIN_DEFAULTS' sweeps), named once for the presets below.
REAL_NOISE_SWEEPS = "baseline_wander,powerline_50hz,muscle"  # noise that real ECGs carry
ENSEMBLE_SWEEPS = "apgd_ce,apgd_dlr,square,autoattack"  # the gradient-masking check

# Named bundles of overrides, the same whichever entry point runs them (a method script or
# reproduce.py, whose PLANS add only what reproduce itself does: data, split sizes, grids).
# "paper" is the defaults; "demo" and "smoke" run on synthetic data that `python reproduce.py
# --preset demo|smoke` generates and preprocesses first (see README). A setting applies to the
# methods that have it; a section named after a method ("NSR", "jacob", ...) applies to that
# method only, after the rest.
PRESETS = {
    "paper": {},
    # The coefficient study (reproduce.py --preset paper-selection): the paper's settings, its
    # runs judged on the validation split afterwards, so no sweeps of the test split.
    "paper-selection": dict(result_dir="result/selection", sweeps=""),
    # Sized for about ten minutes of `python reproduce.py --preset demo` on 2 CPU cores: no L2
    # sweep (and in reproduce's grid the paper's default eps only).
    "demo": dict(data_dir="data/demo/processed", result_dir="result/demo", max_length=4096,
                 random_pad=1024, epochs=10, batch_size=16, checkpoint_every=5,
                 sweeps=f"pgd_linf,white,{REAL_NOISE_SWEEPS}", sweep_steps=5, sweep_restarts=1,
                 adv_start_epoch=2, pgd_steps=5, jacobian_projections=1,
                 NSR=dict(batch_size=8, reg_start_epoch=7, beta1=0.1, beta2=0.05),
                 jacob=dict(beta=0.5, reg_start_epoch=4)),
    "smoke": dict(data_dir="data/smoke/processed", result_dir="result/smoke", max_length=2048,
                  random_pad=1024, epochs=1, batch_size=16, checkpoint_every=1,
                  max_batches=2, sweeps="white,pgd_linf", sweep_steps=2, sweep_restarts=1,
                  sweep_max_batches=1,
                  reg_start_epoch=0, adv_start_epoch=0, pgd_steps=2, jacobian_projections=1),
    # A small real CPSC2018 set given with reproduce.py --preset mini --raw_dir DIR.
    "mini": dict(data_dir="data/mini/processed", result_dir="result/mini", max_length=4096,
                 random_pad=1024, epochs=10, batch_size=16, checkpoint_every=5,
                 sweeps=f"pgd_linf,white,{ENSEMBLE_SWEEPS},{REAL_NOISE_SWEEPS}", sweep_steps=10,
                 sweep_restarts=1, adv_start_epoch=3, jacobian_projections=1,
                 NSR=dict(batch_size=8, reg_start_epoch=7, beta1=0.1, beta2=0.05),
                 jacob=dict(beta=0.5, reg_start_epoch=4)),
}


# PROTOCOL section 6: the robustness sweeps (--sweeps) and their noise levels (--levels). The
# paper's lists are the default; "extended" reaches stronger L-inf and weaker L2 attacks. The
# real-ECG noises (beyond the paper) are swept over signal-to-noise ratios in dB; their curves
# use the noise-to-signal amplitude ratio 10 ** (-snr / 20) as the level, so that clean
# (infinite SNR) is level 0 as for the others.
WHITE_LEVELS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
SNR_DB_LEVELS = (40, 30, 20, 15, 10, 5, 0)
LEVEL_LISTS = {
    "paper": {"linf": (0.001, 0.003, 0.005, 0.007, 0.01, 0.03, 0.05, 0.1),
              "l2": (1, 3, 5, 10, 15, 20, 25, 30),
              "white": WHITE_LEVELS, "snr_db": SNR_DB_LEVELS},
    "extended": {"linf": (0.001, 0.003, 0.005, 0.007, 0.01, 0.03, 0.05, 0.1, 0.2, 0.3),
                 "l2": (0.1, 0.2, 0.3, 0.5, 0.7, 1, 3, 5, 10, 15, 20, 25, 30),
                 "white": WHITE_LEVELS, "snr_db": SNR_DB_LEVELS},
}

SWEEPS = {
    # name: (kind, norm or noise function name, its levels in LEVEL_LISTS, x-axis label)
    "pgd_linf": ("attack", "inf", "linf", "L-inf eps"),
    "pgd_l2": ("attack", "2", "l2", "L2 eps"),
    "ifgsm_linf": ("ifgsm", "inf", "linf", "L-inf eps"),
    "ifgsm_l2": ("ifgsm", "2", "l2", "L2 eps"),
    # AutoAttack-style evaluation (attacks.apgd_attack, square_attack, ensemble_attack).
    "apgd_ce": ("apgd_ce", "inf", "linf", "L-inf eps"),
    "apgd_dlr": ("apgd_dlr", "inf", "linf", "L-inf eps"),
    "square": ("square", "inf", "linf", "L-inf eps"),
    "autoattack": ("autoattack", "inf", "linf", "L-inf eps"),
    "white": ("white", None, "white", "white noise amplitude eps"),
    "baseline_wander": ("snr", "baseline_wander", "snr_db", "noise/signal amplitude"),
    "powerline_50hz": ("snr", "powerline_50", "snr_db", "noise/signal amplitude"),
    "powerline_60hz": ("snr", "powerline_60", "snr_db", "noise/signal amplitude"),
    "muscle": ("snr", "muscle_noise", "snr_db", "noise/signal amplitude"),
}


def noise_levels(sweep: str, levels: str = "paper") -> tuple:
    """The levels of ``sweep`` in the level list ``levels`` (without the clean level 0)."""
    return LEVEL_LISTS[levels][SWEEPS[sweep][2]]


# Sweeps that attack the model: --sweep_max_records restricts all of them to the same
# records, so that PGD and the ensemble are compared on equal footing (masking_check).
ATTACK_KINDS = ("attack", "ifgsm", "apgd_ce", "apgd_dlr", "square", "autoattack")
GRADIENT_SWEEPS = ("pgd_linf", "apgd_ce", "apgd_dlr")  # the L-inf gradient attacks


def preset_settings(preset: str, method: str) -> dict:
    """What ``preset`` sets for ``method``: its shared settings, then the method's own section."""
    shared = {key: value for key, value in PRESETS[preset].items() if key not in METHODS}
    return {**shared, **PRESETS[preset].get(method, {})}


def preset_setting(preset: str, key: str):
    """A shared setting's value under ``preset``: the preset's own, else TRAIN_DEFAULTS' (not one
    of the SCRIPT_SETTINGS, which are each script's)."""
    return PRESETS[preset].get(key, TRAIN_DEFAULTS[key])


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


def check_sweep_settings(settings: dict) -> None:
    """Refuse sweep settings that cannot run (the training's and evaluate.py's), naming the flag."""
    parse_sweeps(settings["sweeps"])
    check_levels(settings["levels"])
    if settings["sweep_restarts"] < 1:
        raise ConfigError(f"--sweep_restarts must be at least 1, got {settings['sweep_restarts']}")
    for key in ("sweep_steps", "sweep_max_batches"):
        if settings[key] < 0:
            raise ConfigError(f"--{key} must be >= 0, got {settings[key]}")


def non_negative(cfg: SimpleNamespace, *keys: str) -> None:
    """Refuse a value of ``keys`` that is negative or not finite."""
    for key in keys:
        value = getattr(cfg, key)
        if not 0 <= value < math.inf:
            raise ConfigError(f"--{key} must be a finite non-negative number, got {value}")


def parse_config(method: str, hyperparameters: dict, argv: list[str] | None = None,
                 check: Callable[[SimpleNamespace], None] | None = None, *, training: dict) -> SimpleNamespace:
    """TRAIN_DEFAULTS with the method script's ``training`` (its values of SCRIPT_SETTINGS) and
    ``hyperparameters``, then the preset, then the flags.

    ``check``: the method's rules for its hyperparameters (raises ConfigError); without one,
    each must be a finite non-negative number.
    """
    if set(training) != set(SCRIPT_SETTINGS):
        raise ConfigError(f"{method}: TRAINING must set exactly {', '.join(SCRIPT_SETTINGS)} "
                          f"(it sets {', '.join(training) or 'nothing'})")
    defaults = {key: as_flag_type(key, value)
                for key, value in {**TRAIN_DEFAULTS, **training, **hyperparameters}.items()}
    parser = OneLineParser(prog=f"{method} training", description=f"Train {method} (PROTOCOL section 5).",
                           argument_default=argparse.SUPPRESS)
    parser.add_flag("--preset", default="paper", choices=sorted(PRESETS))
    for key in defaults:
        kind = flag_type(key)
        if kind is bool:
            parser.add_switch(f"--{key}", dest=key)
        else:
            parser.add_flag(f"--{key}", dest=key, type=kind, metavar=kind.__name__.upper())
    args = vars(parser.parse_args(argv))
    preset = args.pop("preset", "paper")
    overrides = {key: as_flag_type(key, value) for key, value in preset_settings(preset, method).items()
                 if key in defaults}
    cfg = SimpleNamespace(**{**defaults, **overrides, **args, "preset": preset, "method": method})
    validate_config(cfg)
    (check or (lambda cfg: non_negative(cfg, *hyperparameters)))(cfg)
    return cfg


def validate_config(cfg: SimpleNamespace) -> None:
    """Reject shared settings that cannot work, naming the flag."""
    config = vars(cfg)
    for key in ("epochs", "batch_size", "eval_batch_size", "checkpoint_every", "max_length"):
        if config[key] < 1:
            raise ConfigError(f"--{key} must be at least 1, got {config[key]}")
    if config["batch_size"] % world_size():
        raise ConfigError(f"--batch_size {config['batch_size']} must be a multiple of the number of "
                          f"processes ({world_size()}): each takes an equal share of every batch")
    if config["num_workers"] < -1:
        raise ConfigError(f"--num_workers must be >= -1 (-1: automatic), got {config['num_workers']}")
    if config["bucket"] and config["model"] != "resnet18a_vl":
        raise ConfigError(f"--bucket needs --model resnet18a_vl: the predictions of {config['model']} "
                          "depend on the padding that bucketing crops")
    check_sweep_settings(config)
    for key in ("max_batches", "random_pad"):
        if config[key] < 0:
            raise ConfigError(f"--{key} must be >= 0, got {config[key]}")
    if not 0 <= config["seed"] <= MAX_SEED:
        raise ConfigError(f"--seed must be between 0 and {MAX_SEED} (numpy's seeds), got {config['seed']}")
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
