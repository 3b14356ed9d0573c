"""Classify CPSC2018-form records with an exported model (docs/USAGE.md, "Sharing a model").

    python predict.py models/CE data/sample/A0001.hea data/sample/A0004.mat
    python predict.py owner/name record.hea --json      # a Hugging Face Hub repository

MODEL: a model folder written by export.py, or the Hub repository id of one. RECORD: a record
of the PhysioNet/CinC WFDB form (its .hea, or its .mat beside its .hea) or of the original
CPSC2018 form (a .mat holding the ECG struct); no REFERENCE.csv is needed. Each record takes the
path of the evaluation exactly: read by cpsc2018.py's readers, stored as the cache stores it
(float32), then ECG_Dataset's leads, truncation, scaling and padding with the model's
config.json settings, batched as evaluate.py batches. Prints each record's class
probabilities and predicted class (--json: one JSON object).

A record the model cannot take (unreadable, other leads, too short, probabilities not finite) is
one line on stderr naming it, and the others are still classified. Exit status: 0 every record classified, 1 some
record could not be, 2 refused before running (the model, the flags).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from config import check_device
from databases.cpsc2018 import CLASSES, LEAD_NAMES, REFERENCE_COLUMNS, RecordError, read_original_record, read_wfdb_header, \
    read_wfdb_signal
from ECG_CNN import from_pretrained
from ECG_Dataset import get_dataloaders
from plumbing.distributed import choose_device
from plumbing.flags import ConfigError, OneLineParser
from plumbing.pretrained import ModelFolderError
from preprocess import Cache, too_short


def read_record(path: Path) -> np.ndarray:
    """The (12, N) mV signal of a record file, as preprocess reads it; RecordError naming the file."""
    header = path.with_suffix(".hea")
    if path.suffix == ".hea" or path.suffix == ".mat" and header.is_file():
        return read_wfdb_signal(read_wfdb_header(header))
    if path.suffix == ".mat":
        return read_original_record(path)[0]
    raise RecordError(path, "not a record file: give its .hea (WFDB form) or its .mat")


def records_cache(signals: list[np.ndarray]) -> Cache:
    """An in-memory cache of ``signals`` as preprocess writes one (float32, concatenated in time),
    its one split "records" naming them "0", "1", ... with no label (First_label 0)."""
    lengths = [signal.shape[1] for signal in signals]
    names = [str(i) for i in range(len(signals))]
    records = pd.DataFrame({"Recording": names, "offset": np.cumsum([0, *lengths[:-1]]), "length": lengths})
    split = pd.DataFrame({column: names if column == "Recording" else 0 for column in REFERENCE_COLUMNS})
    return Cache(signals=np.concatenate(signals, axis=1).astype(np.float32), records=records.set_index("Recording"),
                 splits={"records": split}, meta={})


@torch.no_grad()
def class_probabilities(model: torch.nn.Module, signals: list[np.ndarray], device: torch.device) -> np.ndarray:
    """(records, classes) softmax probabilities of ``model`` (from from_pretrained) on ``signals``."""
    steps, training = model.config["preprocessing"], model.config["training"]
    loader = get_dataloaders(records_cache(signals), eval_batch_size=training["eval_batch_size"],
                             max_length=steps["max_length"], random_pad=steps["input_length"] - steps["max_length"],
                             splits=("records",), bucket=steps["bucket"])["records"]
    probabilities = np.zeros((len(signals), len(CLASSES)))
    for indices, (x, _, mask) in zip(loader.batch_sampler, loader):  # bucketed batches come by length
        probabilities[indices] = torch.softmax(model(x.to(device), mask.to(device)), dim=1).cpu().double().numpy()
    return probabilities


def predict_records(model: torch.nn.Module, paths: list[Path], device: torch.device) -> tuple[list[dict], list[dict]]:
    """(predictions, failures): {"record", "predicted", "probabilities"} per classified record in
    the order given, {"record", "reason"} per record that could not be."""
    signals, taken, failed = [], [], []
    for path in paths:
        try:
            signal = read_record(path)
            if short := too_short(signal.shape[1]):
                raise RecordError(path, short)
        except RecordError as error:
            failed.append({"record": str(path), "reason": error.reason})
            continue
        signals.append(signal)
        taken.append(path)
    predictions = []
    if signals:
        for path, row in zip(taken, class_probabilities(model, signals, device)):
            if not np.isfinite(row).all():  # logits that overflowed: no class to name, and JSON holds no NaN
                failed.append({"record": str(path),
                               "reason": "the model's probabilities are not finite (NaN or infinity)"})
                continue
            predictions.append({"record": str(path), "predicted": CLASSES[int(row.argmax())],
                                "probabilities": dict(zip(CLASSES, row.round(6).tolist()))})
    return predictions, failed


def table(predictions: list[dict]) -> str:
    """The predictions as text: one line per record, its predicted class, then each class's probability."""
    width = max(len("record"), *(len(p["record"]) for p in predictions))
    lines = [f"{'record':{width}}  {'predicted':10}" + "".join(f"{name:>7}" for name in CLASSES)]
    lines += [f"{p['record']:{width}}  {p['predicted']:10}" + "".join(f"{v:7.3f}" for v in p["probabilities"].values())
              for p in predictions]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description="Class probabilities of CPSC2018-form records under an exported model.")
    parser.add_argument("model", help="a model folder (python export.py) or a Hugging Face Hub repository id")
    parser.add_argument("records", nargs="+", help=f"record files: .hea (WFDB form) or .mat; {len(LEAD_NAMES)} leads "
                                                   "at 500 Hz")
    parser.add_flag("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_flag("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    try:
        args = parser.parse_args(argv)
        check_device(args.device)
        device = choose_device(args.device)
        model = from_pretrained(args.model).to(device)
    except (ConfigError, ModelFolderError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    predictions, failed = predict_records(model, [Path(record) for record in args.records], device)
    for failure in failed:
        print(f"error: {failure['record']}: {failure['reason']}", file=sys.stderr)
    if args.json:
        print(json.dumps({"model": args.model, "classes": list(CLASSES), "predictions": predictions, "failed": failed},
                         indent=2, allow_nan=False))
    elif predictions:
        print(table(predictions))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
