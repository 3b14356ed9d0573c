"""A model folder: a trained model as it leaves the project (``python export.py``) and comes back
(``ECG_CNN.from_pretrained``), in the Hugging Face Hub's layout.

- ``model.safetensors``: the weights (the safetensors format: tensors only, nothing executes
  when it loads);
- ``config.json``: what it takes to run the model on a new record: the architecture and its
  arguments, the class names in output order, the preprocessing (PREPROCESSING_KEYS: leads in
  input order, sampling rate, truncation, padding, normalisation; those this code applies,
  stated for readers in other languages) and the run's training settings;
- whatever else the exporter writes beside them (the model card README.md, robustness.json).

``resolve`` turns a folder or a Hub repository id into a folder (huggingface_hub's
snapshot_download, which reads its cache first and honours HF_HUB_OFFLINE); ``read_config``
checks config.json against what this code can run; ``save_weights`` and ``load_weights`` move
the weights. Every problem is a ModelFolderError naming the file.
"""
from __future__ import annotations

from pathlib import Path

import huggingface_hub
import torch
from huggingface_hub.utils import HFValidationError
from safetensors.torch import load_file, save

from databases.cpsc2018 import CLASSES, FS, LEAD_NAMES, LEADS
from plumbing.safe_writes import atomic_path, read_json

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "robust-ecg-cnn"  # config.json's "format": what tells a model folder of this project
FORMAT_VERSION = 1
# The preprocessing this code applies (ECG_Dataset: each record's first max_length samples, each
# lead divided by its peak |mV|, zero-padded on the left to input_length): config.json states it
# for readers in other languages, and a folder stating another is refused.
PADDING_SIDE = "left"
TRUNCATION = "keep the first max_length samples"
NORMALISATION = "each lead divided by its maximum absolute value (an all-zero lead stays zero)"
PREPROCESSING_KEYS = ("leads", "sampling_rate", "units", "max_length", "input_length", "truncation",
                      "padding_side", "normalisation", "bucket")
CONFIG_KEYS = ("format", "format_version", "architecture", "architecture_args", "classes", "preprocessing",
               "training")


class ModelFolderError(Exception):
    """A model folder (or Hub repository) that cannot be used; the message names the file."""


def preprocessing(max_length: int, input_length: int, bucket: bool) -> dict:
    """config.json's "preprocessing" of a model reading records truncated to ``max_length``
    samples and padded to ``input_length`` (the leads: those the data loaders feed, cpsc2018.LEADS)."""
    return {"leads": [LEAD_NAMES[i] for i in LEADS], "sampling_rate": FS, "units": "mV", "max_length": max_length,
            "input_length": input_length, "truncation": TRUNCATION, "padding_side": PADDING_SIDE,
            "normalisation": NORMALISATION, "bucket": bucket}


def resolve(path_or_repo_id: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The folder ``path_or_repo_id`` names: a local folder as it is, anything else as a Hub
    repository id fetched (or found in the Hub cache, ``cache_dir`` or HF_HUB_CACHE) by
    huggingface_hub.snapshot_download."""
    if Path(path_or_repo_id).is_dir():
        return Path(path_or_repo_id)
    try:
        return Path(huggingface_hub.snapshot_download(str(path_or_repo_id), cache_dir=cache_dir,
                                                      allow_patterns=[CONFIG_FILE, WEIGHTS_FILE]))
    except HFValidationError:
        raise ModelFolderError(f"{path_or_repo_id}: no such folder, nor a Hub repository id (owner/name)") from None
    except Exception as error:  # offline without a cached copy, unknown repository, network: one line
        first_line = str(error).strip().split("\n")[0]
        raise ModelFolderError(f"{path_or_repo_id}: no such folder, and the Hub repository could not be "
                               f"fetched ({type(error).__name__}: {first_line})") from None


def _is_count(value, least: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _config_problem(config, architectures) -> str | None:
    """What makes ``config`` (config.json's content) unusable here, or None."""
    if not isinstance(config, dict):
        return "not a JSON object"
    missing = [key for key in CONFIG_KEYS if key not in config]
    if missing:
        return f"no {', '.join(missing)} (not a model folder of this project)"
    if (config["format"], config["format_version"]) != (FORMAT, FORMAT_VERSION):
        return (f"format {config['format']!r} version {config['format_version']!r}, this code reads "
                f"{FORMAT!r} version {FORMAT_VERSION}")
    if not isinstance(config["architecture"], str) or config["architecture"] not in architectures:
        return f"unknown architecture {config['architecture']!r} (known: {', '.join(architectures)})"
    arguments, steps = config["architecture_args"], config["preprocessing"]
    if not isinstance(arguments, dict) or set(arguments) != {"in_leads", "num_classes"} or not all(
            map(_is_count, arguments.values())):
        return f"architecture_args {arguments!r} are not whole numbers in_leads and num_classes"
    if config["classes"] != list(CLASSES) or arguments["num_classes"] != len(CLASSES):
        return (f"classes {config['classes']!r} with num_classes {arguments['num_classes']}: this code "
                f"classifies the {len(CLASSES)} CPSC2018 classes {', '.join(CLASSES)}, in that order")
    if not isinstance(steps, dict):
        return "preprocessing is not an object"
    missing = [key for key in PREPROCESSING_KEYS if key not in steps]
    if missing:
        return f"preprocessing lacks {', '.join(missing)}"
    expected = preprocessing(steps["max_length"], steps["input_length"], steps["bucket"])
    if arguments["in_leads"] != len(expected["leads"]):
        return f"in_leads {arguments['in_leads']}: this code feeds the {len(expected['leads'])} leads {', '.join(expected['leads'])}"
    # checked first: what this code applies is built from them, and a NaN equals nothing
    if not _is_count(steps["max_length"]) or not _is_count(steps["input_length"], steps["max_length"]) \
            or not isinstance(steps["bucket"], bool):
        return (f"preprocessing max_length {steps['max_length']!r}, input_length {steps['input_length']!r}, "
                f"bucket {steps['bucket']!r}: whole numbers, input_length >= max_length, and true or false")
    different = [key for key in PREPROCESSING_KEYS if steps[key] != expected[key]]
    if different:
        return f"preprocessing {different[0]} {steps[different[0]]!r}: this code applies {expected[different[0]]!r}"
    if not isinstance(config["training"], dict):
        return "training is not an object"
    if "eval_batch_size" not in config["training"]:  # the batch size a record is classified in
        return "training lacks eval_batch_size"
    if not _is_count(config["training"]["eval_batch_size"]):
        return f"training eval_batch_size {config['training']['eval_batch_size']!r}: not a whole number of at least 1"
    return None


def read_config(folder: Path, architectures) -> dict:
    """``folder``'s config.json, checked (``architectures``: the names this code builds)."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise ModelFolderError(f"{path}: not found (not a model folder: export a run with "
                               "`python export.py result/RUN OUT_DIR`)")
    config = read_json(path)
    if config is None:
        raise ModelFolderError(f"{path}: unreadable or not JSON")
    problem = _config_problem(config, architectures)
    if problem:
        raise ModelFolderError(f"{path}: {problem}")
    return config


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """Write ``model``'s state dict to ``path`` in the safetensors format, atomically."""
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    with atomic_path(path) as temporary:  # written by Python, which names the file when a write fails
        temporary.write_bytes(save(state, metadata={"format": "pt"}))


def _weights_problem(weights: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str | None:
    """What makes ``weights`` unfit for a model whose state dict is ``state``, beyond the names and
    shapes that load_state_dict checks: a dtype it would cast silently (another model than the
    one exported), a value that is not finite; or None."""
    for name, tensor in weights.items():
        if name in state and tensor.dtype != state[name].dtype:
            return f"tensor {name} is {tensor.dtype}, the model's is {state[name].dtype}"
        if not torch.isfinite(tensor).all():
            return f"tensor {name} holds values that are not finite (NaN or infinity)"
    return None


def load_weights(model: torch.nn.Module, folder: Path) -> None:
    """Load ``folder``'s model.safetensors into ``model`` (every parameter, exactly its shapes and
    dtypes, finite)."""
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise ModelFolderError(f"{path}: not found")
    try:
        weights = load_file(path)
        problem = _weights_problem(weights, model.state_dict())
        if problem is None:
            model.load_state_dict(weights)
    except Exception as error:  # a truncated or foreign file, or weights of another shape: one line
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise ModelFolderError(f"{path}: does not load into a {type(model).__name__} "
                               f"({type(error).__name__}: {' '.join(lines[:2])})") from None
    if problem:
        raise ModelFolderError(f"{path}: {problem}")
