"""CPSC2018 readers, the paper's reference split and the preprocessed cache (PROTOCOL sections 1-2).

Reads the 12-lead CPSC2018 training set in either of its two distributions:

- the original one: ``A0001.mat`` .. ``A6877.mat`` (a MATLAB struct ``ECG`` with fields
  ``sex``, ``age``, ``data`` 12 x N millivolts) and ``REFERENCE.csv``;
- the PhysioNet/CinC 2020 WFDB copy: ``A0001.hea`` + ``A0001.mat`` (int16 ``val``, converted
  to millivolts with the header's gain and baseline), with or without ``REFERENCE.csv``.

Bad records are skipped, counted and reported with their reason; the good ones are written to
a cache (``signals.npy`` with every record concatenated along time, ``records.csv`` with the
offsets, the split CSVs and ``meta.json``) that ``load_cache`` reads back memory-mapped.

CLI: ``python preprocess.py [--raw_dir data/CPSC2018/train] [--out_dir data/CPSC2018/processed]
[--val_per_class 5] [--test_per_class 50] [--download [--url URL]]``; ``--download`` first
fetches the records into --raw_dir (download.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import scipy.io
from tqdm import tqdm

from download import CPSC2018_ARCHIVE_URL, DownloadError, fetch_cpsc2018
from flags import ConfigError, OneLineParser, folder
from safe_writes import FolderInUseError, lock_folder, remove_stale_temporaries, temporary_path, write_json

CLASSES = ("Normal", "AF", "I-AVB", "LBBB", "RBBB", "PAC", "PVC", "STD", "STE")
# SNOMED CT codes of the nine classes in the PhysioNet/CinC 2020 headers; label k = CLASSES[k-1].
SNOMED_TO_CLASS = {
    "426783006": 1,
    "164889003": 2,
    "270492004": 3,
    "164909002": 4,
    "59118001": 5,
    "284470004": 6,
    "164884008": 7,
    "429622005": 8,
    "164931005": 9,
}
# Early copies of the 2020 headers write the class abbreviations instead of the codes.
ABBREVIATION_TO_CLASS = {name: label for label, name in enumerate(CLASSES, start=1)}
# The Verhoeff check digit that ends every SNOMED CT identifier (6 to 18 digits): a mistyped
# code fails it, so it is told apart from a real diagnosis of another database.
_VERHOEFF_MULTIPLY = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9), (1, 2, 3, 4, 0, 6, 7, 8, 9, 5), (2, 3, 4, 0, 1, 7, 8, 9, 5, 6),
    (3, 4, 0, 1, 2, 8, 9, 5, 6, 7), (4, 0, 1, 2, 3, 9, 5, 6, 7, 8), (5, 9, 8, 7, 6, 0, 4, 3, 2, 1),
    (6, 5, 9, 8, 7, 1, 0, 4, 3, 2), (7, 6, 5, 9, 8, 2, 1, 0, 4, 3), (8, 7, 6, 5, 9, 3, 2, 1, 0, 4),
    (9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
)
_VERHOEFF_PERMUTE = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9), (1, 5, 7, 6, 2, 8, 3, 0, 9, 4), (5, 8, 0, 3, 7, 9, 6, 1, 4, 2),
    (8, 9, 1, 6, 0, 4, 3, 5, 2, 7), (9, 4, 5, 3, 1, 2, 6, 8, 7, 0), (4, 2, 8, 6, 5, 7, 3, 9, 0, 1),
    (2, 7, 9, 3, 8, 0, 6, 4, 1, 5), (7, 0, 4, 6, 9, 1, 3, 2, 5, 8),
)
LEAD_NAMES = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
# The leads the models read, I, II, V1..V6: the other four are combinations of I and II.
LEADS = (0, 1, 6, 7, 8, 9, 10, 11)
FS = 500
CACHE_VERSION = 1
# The shortest record the models classify: 2049 samples (4.1 s; CPSC2018's shortest is 6 s) always
# cover three of the trunk's 1024-sample cells, the window of one final position of resnet18a_vl
# (ECG_CNN.py: POOL_KERNEL - DOWNSAMPLE + 1; it imports this module, so the number is repeated
# here and tests/test_preprocess.py checks it against the model). A shorter record may have no
# valid final position, or only one position per channel where GroupNorm needs two.
MIN_RECORD_LENGTH = 2049

REFERENCE_COLUMNS = ("Recording", "First_label", "Second_label", "Third_label")
LABEL_COLUMNS = REFERENCE_COLUMNS[1:]
RECORDS_COLUMNS = REFERENCE_COLUMNS + ("offset", "length")
SPLIT_NAMES = ("train", "val", "test")
CACHE_FILES = ("signals.npy", "records.csv", "train.csv", "val.csv", "test.csv")
DEFAULT_RAW_DIR = "data/CPSC2018/train"
DEFAULT_OUT_DIR = "data/CPSC2018/processed"
# The official CPSC2018 label file for all 6877 records (data/README.md says where it comes from).
OFFICIAL_REFERENCE = Path(__file__).resolve().parent / "data" / "CPSC2018_REFERENCE.csv"
DOWNLOAD_HINT = (
    "run `python preprocess.py --download`, or put A0001.mat..A6877.mat and REFERENCE.csv there "
    "from the original CPSC2018 download (http://2018.icbeb.org/Challenge.html), or the .hea + .mat "
    "files of the PhysioNet/CinC 2020 copy of CPSC2018 'Training_WFDB' "
    "(https://physionet.org/content/challenge-2020/)"
)


class DataError(Exception):
    """A problem with the whole dataset or cache (missing folder, stale cache, bad label file)."""


class RecordError(Exception):
    """One bad record; the message is the reason it is skipped."""


# --------------------------------------------------------------------------- REFERENCE.csv


def read_reference(path: str | Path, columns: Sequence[str] = REFERENCE_COLUMNS) -> pd.DataFrame:
    """Read a CPSC2018 label file (also used for the CSV files of the cache, with their ``columns``).

    Returns a DataFrame with ``columns``: Recording and any other column as stripped text, and
    First_label, Second_label, Third_label (pandas nullable "Int64", <NA> where empty), rows
    in file order. Labels are not range-checked here (``preprocess`` skips records with labels
    outside 1..9); a label that is not an integer makes the file unusable and raises DataError.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: label file not found")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not a readable CSV file ({error})") from None
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
    table = table.loc[:, list(columns)].apply(lambda column: column.str.strip())
    for column in LABEL_COLUMNS:
        text = table[column]
        numbers = pd.to_numeric(text.where(text != ""), errors="coerce")
        bad = (text != "") & ~(numbers.notna() & (numbers % 1 == 0))
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(
                f"{path}: {column} {text.iloc[row]!r} of {table['Recording'].iloc[row]!r} "
                f"(data row {row + 1}) is not an integer label"
            )
        table[column] = numbers.astype("Int64")
    return table.reset_index(drop=True)


def _take_per_class(rows: Sequence, first_labels: np.ndarray, per_class: int) -> list:
    """Walk ``rows`` in order, taking a row while fewer than ``per_class`` of its class are taken."""
    taken: list = []
    counts: Counter = Counter()
    for row in rows:
        label = first_labels[row]
        if counts[label] < per_class:
            counts[label] += 1
            taken.append(row)
    return taken


def reference_split(
    reference: pd.DataFrame, val_per_class: int = 5, test_per_class: int = 50, seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The paper's seeded split, exactly PROTOCOL section 2; returns (train, val, test).

    Row i means the i-th row of ``reference`` (in its order). Only single-label rows take
    part. The row indices are numpy int64 values, as in the reference code, and the Python
    set operations of steps 4 and 7 define the order of the pool and of train. A class with
    fewer rows than requested gives what it has. Each returned DataFrame has the REFERENCE
    columns and keeps the row positions of ``reference`` as its index; val and test are in
    the order taken, train in set order.
    """
    if val_per_class < 0 or test_per_class < 0:
        raise ValueError("val_per_class and test_per_class must be >= 0")
    reference = reference.reset_index(drop=True)
    first = reference["First_label"]
    candidates = np.flatnonzero(reference["Second_label"].isna().to_numpy()).astype(np.int64)
    candidate_labels = first.iloc[candidates]
    if candidate_labels.isna().any() or not candidate_labels.between(1, len(CLASSES)).all():
        raise ValueError("reference_split needs a First_label in 1..9 on every single-label row")
    first_labels = first.fillna(0).to_numpy(dtype=np.int64)

    rng = np.random.RandomState(seed)
    rng.shuffle(candidates)
    validation = _take_per_class(candidates, first_labels, val_per_class)
    pool = list(set(candidates) - set(validation))
    for _ in range(9):
        rng.shuffle(pool)
    test = _take_per_class(pool, first_labels, test_per_class)
    train = list(set(pool) - set(test))

    columns = list(REFERENCE_COLUMNS)
    return tuple(reference.loc[rows, columns] for rows in (train, validation, test))


# --------------------------------------------------------------------------- record readers


def _check_signal(signal: np.ndarray) -> None:
    """Raise RecordError unless ``signal`` is a finite, non-empty 12 x N array."""
    if signal.ndim != 2:
        raise RecordError(f"signal has {signal.ndim} dimensions (shape {signal.shape}), expected 12 x N")
    if signal.shape[0] != len(LEAD_NAMES):
        raise RecordError(
            f"{signal.shape[0]} leads (shape {signal.shape[0]} x {signal.shape[1]}), expected 12"
        )
    if signal.shape[1] == 0:
        raise RecordError("zero-length record (0 samples)")
    finite = np.isfinite(signal)
    if not finite.all():
        leads = [LEAD_NAMES[i] for i in np.flatnonzero(~finite.all(axis=1))]
        raise RecordError(f"NaN or inf samples in lead(s) {', '.join(leads)}")
    with np.errstate(over="ignore"):
        stored = np.isfinite(signal.astype(np.float32))  # the cache's dtype
    if not stored.all():
        leads = [LEAD_NAMES[i] for i in np.flatnonzero(~stored.all(axis=1))]
        raise RecordError(f"samples beyond the float32 range of the cache (|value| > "
                          f"{np.finfo(np.float32).max:.3g} mV) in lead(s) {', '.join(leads)}")


def _load_mat(mat_path: Path) -> dict:
    """scipy.io.loadmat with every failure turned into a RecordError."""
    if not mat_path.is_file():
        raise RecordError(f"file {mat_path.name} not found")
    if mat_path.stat().st_size == 0:
        raise RecordError(f"empty file {mat_path.name}")
    try:
        return scipy.io.loadmat(mat_path)
    except Exception as error:  # scipy raises many types on corrupt input
        raise RecordError(
            f"unreadable .mat file {mat_path.name} (truncated or corrupt: {type(error).__name__}: {error})"
        ) from None


def _variables(contents: dict) -> str:
    names = [name for name in contents if not name.startswith("__")]
    return ", ".join(names) or "none"


def read_original_record(mat_path: str | Path) -> tuple[np.ndarray, str, float]:
    """Read one record of the original CPSC2018 distribution.

    The .mat holds a 1x1 struct ``ECG`` with fields sex (char), age (double) and data
    (12 x N double, mV). Returns (signal float64 (12, N) in mV, sex, age; NaN if absent).
    Raises RecordError with the reason for an unusable file.
    """
    mat_path = Path(mat_path)
    contents = _load_mat(mat_path)
    if "ECG" not in contents:
        raise RecordError(f"no variable 'ECG' in {mat_path.name} (variables: {_variables(contents)})")
    ecg = contents["ECG"]
    fields = ecg.dtype.names or ()
    if "data" not in fields or ecg.size != 1:
        raise RecordError(f"'ECG' in {mat_path.name} is not a 1x1 struct with a 'data' field")
    ecg = ecg.reshape(-1)[0]
    if np.iscomplexobj(ecg["data"]):  # converting would drop the imaginary part
        raise RecordError(f"ECG.data in {mat_path.name} is complex-valued")
    try:
        signal = np.asarray(ecg["data"], dtype=np.float64)
    except (TypeError, ValueError):
        raise RecordError(f"ECG.data in {mat_path.name} is not numeric") from None
    _check_signal(signal)
    sex = "".join(np.asarray(ecg["sex"]).ravel().astype(str)) if "sex" in fields else ""
    age_values = np.asarray(ecg["age"]).ravel() if "age" in fields else np.array([])
    try:
        age = float(age_values[0]) if age_values.size == 1 else math.nan
    except (TypeError, ValueError):
        age = math.nan
    return signal, sex, age


@dataclass(frozen=True)
class _WfdbHeader:
    """What this module uses from a PhysioNet/CinC 2020 header."""

    mat_path: Path
    n_signals: int
    n_samples: int | None  # None where the header leaves it out
    gains: np.ndarray  # (n_signals,) ADC units per mV
    baselines: np.ndarray  # (n_signals,)
    dx: tuple[str, ...]
    sex: str
    age: float


def _parse_signal_line(line: str) -> tuple[str, float, float, str, str]:
    """(file name, gain, baseline, units, lead name) of a WFDB signal specification line.

    Format: ``file fmt [gain[(baseline)][/units] [adcres [adczero [initval [checksum
    [blocksize [description]]]]]]]``; WFDB defaults: gain 200 where absent or 0, baseline =
    adczero (default 0), units mV. Raises ValueError/IndexError on malformed lines.
    """
    fields = line.split(maxsplit=8)
    gain_field = fields[2] if len(fields) > 2 else "0"
    gain_text, _, units = gain_field.partition("/")
    gain_text, _, baseline_text = gain_text.partition("(")
    gain = float(gain_text) or 200.0
    adc_zero = float(fields[4]) if len(fields) > 4 else 0.0
    baseline = float(baseline_text.rstrip(")")) if baseline_text else adc_zero
    description = fields[8].strip() if len(fields) > 8 else ""
    return fields[0], gain, baseline, units or "mV", description


def _read_wfdb_header(hea_path: Path) -> _WfdbHeader:
    """Parse and check a WFDB header; raise RecordError with the reason if it is unusable.

    A small parser of the WFDB header format (record line, signal lines, ``#`` comments), in
    place of wfdb.rdheader, which is much slower per header (benchmarks/README.md); every
    header is read twice.
    """
    if not hea_path.is_file():
        raise RecordError(f"header {hea_path.name} not found")
    if hea_path.stat().st_size == 0:
        raise RecordError(f"empty file {hea_path.name}")
    try:
        text = hea_path.read_text(encoding="latin-1")
    except OSError as error:
        raise RecordError(f"unreadable header {hea_path.name} ({error})") from None
    lines = [line.strip() for line in text.splitlines()]
    comments = [line.lstrip("#").strip() for line in lines if line.startswith("#")]
    specification = [line for line in lines if line and not line.startswith("#")]
    try:
        record_fields = specification[0].split()
        n_signals = int(record_fields[1])
        fs = float(record_fields[2].split("/")[0].split("(")[0]) if len(record_fields) > 2 else 250.0
        n_samples = int(record_fields[3]) if len(record_fields) > 3 else None
        signals = [_parse_signal_line(line) for line in specification[1:]]
    except (IndexError, ValueError):
        raise RecordError(f"malformed header {hea_path.name}") from None
    if len(signals) != n_signals:
        raise RecordError(f"header {hea_path.name} declares {n_signals} signals but describes {len(signals)}")
    if n_signals != len(LEAD_NAMES):
        raise RecordError(f"{n_signals} leads in header {hea_path.name}, expected 12")
    file_names, gains, baselines, units, lead_names = zip(*signals)
    if fs != FS:
        raise RecordError(f"sampling frequency {fs:g} Hz in {hea_path.name}, expected {FS}")
    if tuple(lead_names) != LEAD_NAMES:
        raise RecordError(
            f"leads {', '.join(lead_names)} in {hea_path.name}, expected {', '.join(LEAD_NAMES)}"
        )
    if set(file_names) != {f"{hea_path.stem}.mat"}:
        raise RecordError(
            f"header {hea_path.name} names signal file(s) {', '.join(sorted(set(file_names)))}, expected {hea_path.stem}.mat"
        )
    if set(units) != {"mV"}:
        raise RecordError(f"units {', '.join(sorted(set(units)))} in {hea_path.name}, expected mV")
    if min(gains) < 0:
        raise RecordError(f"negative gain in {hea_path.name}")
    fields = {}
    for comment in comments:
        key, _, value = comment.partition(":")
        fields[key.strip().lower()] = value.strip()
    dx = tuple(code.strip() for code in fields.get("dx", "").split(",") if code.strip())
    try:
        age = float(fields.get("age", "nan"))
    except ValueError:
        age = math.nan
    return _WfdbHeader(
        mat_path=hea_path.with_suffix(".mat"),
        n_signals=n_signals,
        n_samples=n_samples,
        gains=np.asarray(gains),
        baselines=np.asarray(baselines),
        dx=dx,
        sex=fields.get("sex", ""),
        age=age,
    )


def _is_snomed_code(text: str) -> bool:
    """Whether ``text`` is a well-formed SNOMED CT identifier (digits with a valid check digit)."""
    if not (text.isascii() and text.isdigit() and 6 <= len(text) <= 18):
        return False
    check = 0
    for position, digit in enumerate(reversed(text)):
        check = _VERHOEFF_MULTIPLY[check][_VERHOEFF_PERMUTE[position % 8][int(digit)]]
    return check == 0


def _unknown_dx(dx: Sequence[str]) -> list[str]:
    """The Dx entries that are neither a SNOMED CT code nor a class abbreviation (typos)."""
    return [entry for entry in dx if entry not in ABBREVIATION_TO_CLASS and not _is_snomed_code(entry)]


def _dx_to_labels(dx: Sequence[str]) -> list[int]:
    """Labels 1..9 of the Dx entries (codes or abbreviations) in header order; others dropped."""
    labels: list[int] = []
    for entry in dx:
        label = SNOMED_TO_CLASS.get(entry, ABBREVIATION_TO_CLASS.get(entry))
        if label is not None and label not in labels:
            labels.append(label)
    return labels


def _read_wfdb_signal(header: _WfdbHeader) -> np.ndarray:
    """The record's (12, N) float64 signal in mV: (val - baseline) / gain, checked against the header."""
    contents = _load_mat(header.mat_path)
    if "val" not in contents:
        raise RecordError(f"no variable 'val' in {header.mat_path.name} (variables: {_variables(contents)})")
    values = contents["val"]
    if not np.issubdtype(values.dtype, np.number) or values.ndim != 2:
        raise RecordError(f"'val' in {header.mat_path.name} is not a numeric 2-D array")
    if np.iscomplexobj(values):  # converting would drop the imaginary part
        raise RecordError(f"'val' in {header.mat_path.name} is complex-valued")
    if values.shape[0] != header.n_signals or header.n_samples not in (None, values.shape[1]):
        raise RecordError(
            f"header says {header.n_signals} x {header.n_samples or '?'} samples but "
            f"{header.mat_path.name} holds {values.shape[0]} x {values.shape[1]}"
        )
    signal = (values.astype(np.float64) - header.baselines[:, None]) / header.gains[:, None]
    _check_signal(signal)
    return signal


def read_wfdb_record(hea_path: str | Path) -> tuple[np.ndarray, list[int], str, float]:
    """Read one PhysioNet/CinC 2020 record (``.hea`` + ``.mat`` with int16 ``val``).

    Returns (signal float64 (12, N) in mV, labels 1..9 in header Dx order, sex, age).
    Raises RecordError with the reason for an unusable record, including one whose Dx
    names none of the nine CPSC2018 classes.
    """
    header = _read_wfdb_header(Path(hea_path))
    labels = _dx_to_labels(header.dx)
    if not labels:
        raise RecordError(f"Dx {','.join(header.dx) or '(empty)'} names none of the 9 CPSC2018 classes")
    return _read_wfdb_signal(header), labels, header.sex, header.age


# --------------------------------------------------------------------------- preprocessing


@dataclass
class _Inventory:
    """The records found in a raw folder, before any signal is read."""

    source_format: str
    table: pd.DataFrame  # REFERENCE columns, one row per record with valid labels, in split order
    sources: dict[str, Path | _WfdbHeader]  # Recording -> .mat path (original) or parsed header (WFDB)
    skipped: list[dict]
    warnings: list[dict]
    n_foreign: int


def _issue(record: str, reason: str) -> dict:
    return {"record": record, "reason": reason}


def _is_plain_name(name: str) -> bool:
    """Whether ``name`` names a file in the records folder itself (no folder part, no '..')."""
    return name not in (".", "..") and not any(separator in name for separator in "/\\\0")


def _validate_reference(reference: pd.DataFrame, skipped: list[dict]) -> pd.DataFrame:
    """Rows of REFERENCE.csv that name a usable record once; the others go to ``skipped``."""
    occurrences = reference["Recording"].value_counts()
    keep = np.ones(len(reference), dtype=bool)
    reported: set[str] = set()
    for position, row in enumerate(reference.itertuples(index=False)):
        record = row.Recording
        labels = [row.First_label, row.Second_label, row.Third_label]
        reason = None
        if record == "":
            reason = f"REFERENCE.csv data row {position + 1} has no Recording name"
        elif not _is_plain_name(record):  # a path would read a file outside the records folder
            reason = f"Recording {record!r} in REFERENCE.csv is a path, not a record name"
        elif occurrences[record] > 1:
            reason = f"listed {occurrences[record]} times in REFERENCE.csv"
        elif pd.isna(row.First_label):
            reason = "no First_label in REFERENCE.csv"
        else:
            outside = [
                int(label) for label in labels if not pd.isna(label) and not 1 <= label <= len(CLASSES)
            ]
            if outside:
                reason = f"label {outside[0]} in REFERENCE.csv is outside 1..9"
        if reason is not None:
            keep[position] = False
            if record not in reported:
                skipped.append(_issue(record or f"row {position + 1}", reason))
                reported.add(record)
    return reference.loc[keep].reset_index(drop=True)


def _missing_data_error(raw_dir: Path, problem: str) -> DataError:
    return DataError(f"{problem} in {raw_dir.as_posix().rstrip('/')}/: {DOWNLOAD_HINT}")


def _inventory(raw_dir: Path) -> _Inventory:
    """Detect the distribution, read the labels and list the records to read."""
    if not raw_dir.is_dir():
        raise _missing_data_error(raw_dir, "no CPSC2018 data (folder not found)")
    headers = {path.stem: path for path in sorted(raw_dir.glob("*.hea"))}
    mats = {path.stem: path for path in sorted(raw_dir.glob("*.mat"))}
    if not headers and not mats:
        raise _missing_data_error(raw_dir, "no CPSC2018 records (.mat or .hea files)")
    reference_path = raw_dir / "REFERENCE.csv"
    reference = read_reference(reference_path) if reference_path.is_file() else None
    listed = set(reference["Recording"]) if reference is not None else set()
    skipped: list[dict] = []
    warnings: list[dict] = []
    table = _validate_reference(reference, skipped) if reference is not None else None
    invalid_in_reference = listed - set(table["Recording"]) if table is not None else set()

    if not headers:
        if reference is None:
            raise DataError(
                f"{reference_path}: not found; the original CPSC2018 .mat files need their REFERENCE.csv"
            )
        skipped += [_issue(name, "not in REFERENCE.csv") for name in mats if name not in listed]
        sources = {name: raw_dir / f"{name}.mat" for name in table["Recording"]}
        return _Inventory("original", table, sources, skipped, warnings, 0)

    # WFDB: REFERENCE.csv, where present, decides which records belong and their labels;
    # otherwise the headers do, and records of other databases are only counted.
    n_foreign = 0
    parsed: dict[str, _WfdbHeader] = {}
    for name, path in tqdm(headers.items(), desc="reading headers", unit="record", disable=None):
        if name not in listed and not name.startswith("A"):
            n_foreign += 1
            continue
        try:
            header = _read_wfdb_header(path)
        except RecordError as error:
            if name not in invalid_in_reference:  # those were reported with their label problem
                skipped.append(_issue(name, str(error)))
            continue
        if name in listed:
            parsed[name] = header
        elif not header.dx:
            skipped.append(_issue(name, f"no diagnosis: the Dx line of {name}.hea is empty or missing"))
        elif not _dx_to_labels(header.dx) and _unknown_dx(header.dx):
            skipped.append(_issue(name, f"unknown diagnosis code(s) {', '.join(_unknown_dx(header.dx))} "
                                        f"in the Dx line of {name}.hea (Dx: {','.join(header.dx)})"))
        elif not _dx_to_labels(header.dx):  # real codes of other diagnoses: another database
            n_foreign += 1
        elif reference is not None:
            skipped.append(_issue(name, "not in REFERENCE.csv"))
        else:
            parsed[name] = header
    for name in sorted(mats.keys() - headers.keys() - listed):  # listed ones are reported below
        if name.startswith("A"):
            skipped.append(_issue(name, f"{name}.mat has no header {name}.hea"))
        else:
            n_foreign += 1

    if table is not None:
        for row in table.itertuples(index=False):
            header = parsed.get(row.Recording)
            labels = {int(label) for label in row[1:] if not pd.isna(label)}
            if header is not None and set(_dx_to_labels(header.dx)) != labels:
                warnings.append(
                    _issue(
                        row.Recording,
                        f"header Dx {','.join(header.dx)} differs from REFERENCE.csv; REFERENCE.csv used",
                    )
                )
    else:
        rows = []
        for name, header in parsed.items():
            labels = _dx_to_labels(header.dx)
            if _unknown_dx(header.dx):
                warnings.append(_issue(name, f"unknown diagnosis code(s) {', '.join(_unknown_dx(header.dx))} "
                                             "in Dx ignored"))
            if len(labels) > len(LABEL_COLUMNS):
                warnings.append(
                    _issue(name, f"{len(labels)} labels in Dx; the first {len(LABEL_COLUMNS)} kept")
                )
            rows.append([name] + (labels + [pd.NA] * len(LABEL_COLUMNS))[: len(LABEL_COLUMNS)])
        table = pd.DataFrame(rows, columns=list(REFERENCE_COLUMNS))
        table[list(LABEL_COLUMNS)] = table[list(LABEL_COLUMNS)].astype("Int64")
    reported = {item["record"] for item in skipped}
    skipped += [
        _issue(name, f"no header {name}.hea" + ("" if name in mats else f" and no signal file {name}.mat"))
        for name in table["Recording"]
        if name not in parsed and name not in reported
    ]
    sources = {name: parsed[name] for name in table["Recording"] if name in parsed}
    return _Inventory("wfdb", table, sources, skipped, warnings, n_foreign)


def _read_signal(source: Path | _WfdbHeader) -> np.ndarray:
    """The checked (12, N) mV signal of one record of either distribution."""
    if isinstance(source, _WfdbHeader):
        return _read_wfdb_signal(source)
    return read_original_record(source)[0]


def _class_counts(table: pd.DataFrame) -> dict[str, int]:
    counts = table["First_label"].value_counts()
    return {name: int(counts.get(label, 0)) for label, name in enumerate(CLASSES, start=1)}


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Name ``path`` in an OSError raised while writing it (a full disk, a file size limit)."""
    try:
        yield
    except OSError as error:
        raise OSError(error.errno, error.strerror, str(path)) from None


def _open_signals(path: Path, shape: tuple[int, int]) -> np.memmap:
    """A new float32 .npy file of ``shape`` at ``path``, memory-mapped for writing. Its blocks are
    allocated first: a write through a memory map to a full disk kills the process with SIGBUS,
    while a failed allocation is an OSError."""
    signals = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
    with open(path, "r+b") as file:
        os.posix_fallocate(file.fileno(), 0, os.fstat(file.fileno()).st_size)
    return signals


def _write_csv(table: pd.DataFrame, path: Path) -> Path:
    temporary = temporary_path(path)
    with _naming(path):
        table.to_csv(temporary, index=False)
    return temporary


def _write_meta(meta: dict, out_dir: Path) -> None:
    """Write meta.json last: its presence is what makes the cache loadable."""
    with _naming(out_dir / "meta.json"):
        write_json(meta, out_dir / "meta.json")


def preprocess(
    raw_dir: str | Path, out_dir: str | Path, val_per_class: int = 5, test_per_class: int = 50
) -> dict:
    """Read every CPSC2018 record in ``raw_dir``, skip the bad ones, write the cache to ``out_dir``.

    The split (PROTOCOL section 2) runs on the REFERENCE.csv rows with usable labels (all of
    them for the official file), so a record whose signal file turns out to be bad leaves
    the other records' assignment unchanged: it is then only removed from its split.
    Signals are read twice, once to check them and collect lengths, once to fill the
    memory-mapped ``signals.npy``, so memory holds one record at a time. Everything is
    written under temporary names first; meta.json is replaced last, so an interrupted run
    leaves either the previous cache or none that loads.

    Returns the summary that is also stored as meta.json (plus ``out_dir``). Raises
    DataError for a missing/empty folder, when no record is usable or the training split would
    be empty, FolderInUseError when another process is writing ``out_dir`` (it is locked from
    before the first write).
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"--out_dir {out_dir}: a file is in the way of the cache folder")
    inventory = _inventory(raw_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"--out_dir {out_dir}: cannot create the cache folder ({error.strerror})") from None
    with lock_folder(out_dir, "cache folder"):
        return _preprocess_into(raw_dir, out_dir, inventory, val_per_class, test_per_class)


def _preprocess_into(raw_dir: Path, out_dir: Path, inventory: _Inventory, val_per_class: int,
                     test_per_class: int) -> dict:
    """``preprocess`` once this process holds ``out_dir``."""
    skipped, warnings = inventory.skipped, inventory.warnings
    # Temporaries of an earlier run killed before renaming them: this process holds the folder,
    # and every writer of a cache file holds it while its temporary exists, so none is live.
    remove_stale_temporaries(out_dir)

    lengths: dict[str, int] = {}
    for record, source in tqdm(
        inventory.sources.items(), desc="checking records", unit="record", disable=None
    ):
        try:
            signal = _read_signal(source)
        except RecordError as error:
            skipped.append(_issue(record, str(error)))
            continue
        if signal.shape[1] < MIN_RECORD_LENGTH:
            skipped.append(_issue(record, f"length {signal.shape[1]}, shorter than the models' minimum of "
                                          f"{MIN_RECORD_LENGTH} samples ({MIN_RECORD_LENGTH / FS:.1f} s)"))
            continue
        lengths[record] = signal.shape[1]
        zero_leads = [LEAD_NAMES[i] for i in np.flatnonzero(~signal.any(axis=1))]
        if zero_leads:
            warnings.append(_issue(record, f"all-zero lead(s) {', '.join(zero_leads)}"))
    if not lengths:
        example = f", e.g. {skipped[0]['record']}: {skipped[0]['reason']}" if skipped else ""
        raise DataError(f"no usable CPSC2018 record in {raw_dir}/ ({len(skipped)} skipped{example})")

    split_tables = reference_split(inventory.table, val_per_class, test_per_class)
    splits = {name: table[table["Recording"].isin(lengths)] for name, table in zip(SPLIT_NAMES, split_tables)}
    if splits["train"].empty:
        taken = len(splits["val"]) + len(splits["test"])
        why = (f"the validation and test splits take all {taken} usable single-label records; lower "
               f"--val_per_class ({val_per_class}) or --test_per_class ({test_per_class}) to leave records "
               "for training") if taken else "no usable single-label record (a multi-label one joins no split)"
        raise DataError(f"{raw_dir}/: the training split would be empty: {why}")
    split_counts = {name: _class_counts(table) for name, table in splits.items()}
    requested = {"val": val_per_class, "test": test_per_class}
    shortfalls = [
        f"{name}: {class_name} has {count} of {requested[name]} requested"
        for name in requested
        for class_name, count in split_counts[name].items()
        if count < requested[name]
    ]
    shortfalls += [
        f"train: no {class_name} record" for class_name, count in split_counts["train"].items() if count == 0
    ]

    records = inventory.table[inventory.table["Recording"].isin(lengths)].reset_index(drop=True)
    records["length"] = records["Recording"].map(lengths).astype(np.int64)
    records["offset"] = np.concatenate([[0], np.cumsum(records["length"].to_numpy())[:-1]]).astype(np.int64)
    records = records[list(RECORDS_COLUMNS)]
    total = int(records["length"].sum())

    temporaries: dict[str, Path] = {}
    try:
        temporaries["signals.npy"] = temporary_path(out_dir / "signals.npy")
        with _naming(out_dir / "signals.npy"):
            signals = _open_signals(temporaries["signals.npy"], (len(LEAD_NAMES), total))
        for row in tqdm(
            records.itertuples(index=False),
            total=len(records),
            desc="writing signals",
            unit="record",
            disable=None,
        ):
            try:
                signal = _read_signal(inventory.sources[row.Recording])
            except RecordError as error:
                raise DataError(f"{row.Recording} changed while preprocessing: {error}") from None
            if signal.shape[1] != row.length:
                raise DataError(
                    f"{row.Recording} changed while preprocessing (length {signal.shape[1]}, was {row.length})"
                )
            signals[:, row.offset : row.offset + row.length] = signal
        with _naming(out_dir / "signals.npy"):
            signals.flush()
        del signals
        temporaries["records.csv"] = _write_csv(records, out_dir / "records.csv")
        for name, table in splits.items():
            temporaries[f"{name}.csv"] = _write_csv(table, out_dir / f"{name}.csv")

        meta = {
            "cache_version": CACHE_VERSION,
            "source_format": inventory.source_format,
            "raw_dir": str(raw_dir.resolve()),
            "settings": {"val_per_class": val_per_class, "test_per_class": test_per_class, "seed": 0},
            "n_records": len(records),
            "total_samples": total,
            "n_multi_label": int(records["Second_label"].notna().sum()),
            "n_foreign": inventory.n_foreign,
            "skipped": sorted(skipped, key=lambda item: item["record"]),
            "warnings": sorted(warnings, key=lambda item: item["record"]),
            "class_counts": {"all": _class_counts(records)} | split_counts,
            "split_shortfalls": shortfalls,
        }
        # The old meta.json goes first: between here and _write_meta the folder holds no loadable cache.
        (out_dir / "meta.json").unlink(missing_ok=True)
        for name in CACHE_FILES:
            os.replace(temporaries.pop(name), out_dir / name)
        _write_meta(meta, out_dir)
    finally:
        for temporary in temporaries.values():
            temporary.unlink(missing_ok=True)
    return meta | {"out_dir": str(out_dir)}


# --------------------------------------------------------------------------- the cache


@dataclass(frozen=True)
class Cache:
    """A loaded cache: signals (12, total) float32 memmap in mV, records indexed by Recording
    (labels, offset, length), the splits (REFERENCE columns) and meta.json."""

    signals: np.ndarray
    records: pd.DataFrame
    splits: dict[str, pd.DataFrame]
    meta: dict

    def signal(self, recording: str) -> np.ndarray:
        """The (12, length) mV signal of one record (a view into the memmap)."""
        row = self.records.loc[recording]
        return self.signals[:, row["offset"] : row["offset"] + row["length"]]


def _labels_problem(table: pd.DataFrame) -> str | None:
    """Why the labels of a cache table are not those preprocess writes (a First_label, each
    label in 1..9), or None."""
    labels = table[list(LABEL_COLUMNS)]
    missing = table["First_label"].isna()
    outside = (labels.notna() & ~labels.apply(lambda column: column.between(1, len(CLASSES)))).any(axis=1)
    if missing.any():
        return f"{table['Recording'][missing].iloc[0]!r} has no First_label"
    if outside.any():
        return f"{table['Recording'][outside].iloc[0]!r} has a label outside 1..{len(CLASSES)}"
    return None


def _records_problem(records: pd.DataFrame, total_samples: int) -> str | None:
    """Why records.csv does not describe the cache preprocess writes, or None: one row per
    record, labels in range, integer offsets and lengths that tile signals.npy in order."""
    names = records["Recording"]
    twice = names[names.duplicated()]
    if len(twice):
        return f"record {twice.iloc[0]!r} listed twice"
    if (names == "").any():
        return "a row without a Recording name"
    for column in ("offset", "length"):
        bad = ~records[column].str.fullmatch(r"\d{1,18}")  # non-negative integers that int64 holds
        if bad.any():
            return f"{column} {records[column][bad].iloc[0]!r} of {names[bad].iloc[0]!r} is not a non-negative integer"
    offsets, lengths = (records[column].astype(np.int64).to_numpy() for column in ("offset", "length"))
    tiling = np.concatenate([[0], np.cumsum(lengths)])
    if (lengths == 0).any() or (offsets != tiling[:-1]).any() or tiling[-1] != total_samples:
        return f"offsets and lengths do not tile signals.npy ({total_samples} samples) record after record"
    return _labels_problem(records)


def _split_problem(name: str, split: pd.DataFrame, records: pd.DataFrame, others: Sequence[pd.DataFrame]) -> str | None:
    """Why split ``name`` is not one preprocess writes for ``records`` (indexed by Recording)
    beside the splits ``others``, or None."""
    names = split["Recording"]
    unknown = ~names.isin(records.index)
    if unknown.any():
        return f"{unknown.sum()} record(s) not in records.csv, e.g. {names[unknown].iloc[0]!r}"
    twice = names[names.duplicated()]
    if len(twice):
        return f"record {twice.iloc[0]!r} listed twice"
    if problem := _labels_problem(split):
        return problem
    differ = (split[list(LABEL_COLUMNS)].fillna(0).to_numpy()
              != records.loc[names, list(LABEL_COLUMNS)].fillna(0).to_numpy()).any(axis=1)
    if differ.any():
        return f"the labels of {names[differ].iloc[0]!r} differ from records.csv"
    if any(names.isin(other["Recording"]).any() for other in others):
        return "a record that is also in another split"
    if name == "train" and split.empty:
        return "no record (the training split is empty)"
    return None


def load_cache(out_dir: str | Path) -> Cache:
    """Load and check a cache written by ``preprocess``; DataError if missing, stale or inconsistent
    (a file that is not what preprocess writes: duplicated records, offsets and lengths that do
    not tile signals.npy, labels outside 1..9, splits naming unknown records or overlapping, an
    empty training split)."""
    out_dir = Path(out_dir)
    rerun = (f"build it with `python preprocess.py --raw_dir RECORDS --out_dir {out_dir}` (`--download` "
             "fetches CPSC2018 first; the demo, smoke and mini presets' data: `python reproduce.py --preset NAME`)")
    meta_path = out_dir / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"no preprocessed CPSC2018 cache in {out_dir} (meta.json missing): {rerun}")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{meta_path}: unreadable ({error}): {rerun}") from None
    if not isinstance(meta, dict) or meta.get("cache_version") != CACHE_VERSION:
        version = meta.get("cache_version") if isinstance(meta, dict) else None
        raise DataError(f"{out_dir}: cache version {version!r}, this code needs {CACHE_VERSION}: {rerun}")
    for name in CACHE_FILES:
        if not (out_dir / name).is_file():
            raise DataError(f"{out_dir}: {name} missing: {rerun}")
    try:
        signals = np.load(out_dir / "signals.npy", mmap_mode="r")
    except (ValueError, OSError, EOFError) as error:
        raise DataError(f"{out_dir}: unreadable cache file ({type(error).__name__}: {error}): {rerun}") from None
    if (
        signals.dtype != np.float32
        or signals.ndim != 2
        or signals.shape != (len(LEAD_NAMES), meta.get("total_samples"))
    ):
        raise DataError(
            f"{out_dir}/signals.npy: {signals.dtype} {signals.shape}, meta.json expects float32 "
            f"(12, {meta.get('total_samples')}): {rerun}"
        )
    records = read_reference(out_dir / "records.csv", RECORDS_COLUMNS)
    if len(records) != meta.get("n_records"):
        raise DataError(f"{out_dir}/records.csv: {len(records)} rows, meta.json says {meta.get('n_records')}: {rerun}")
    problem = _records_problem(records, signals.shape[1])
    if problem:
        raise DataError(f"{out_dir}/records.csv: {problem}: {rerun}")
    records = records.astype({"offset": np.int64, "length": np.int64}).set_index("Recording")
    splits: dict[str, pd.DataFrame] = {}
    for name in SPLIT_NAMES:
        split = read_reference(out_dir / f"{name}.csv")
        problem = _split_problem(name, split, records, list(splits.values()))
        if problem:
            raise DataError(f"{out_dir}/{name}.csv: {problem}: {rerun}")
        splits[name] = split
    return Cache(signals=signals, records=records, splits=splits, meta=meta)


# --------------------------------------------------------------------------- CLI


def _format_summary(summary: dict) -> str:
    """The CLI report: records read, per-class counts per split, every skipped record."""
    counts = summary["class_counts"]
    width = max(len(name) for name in CLASSES) + 1
    lines = [
        f"read {summary['n_records']} CPSC2018 records ({summary['source_format']} form) from {summary['raw_dir']}",
        f"{'':6}" + "".join(f"{name:>{width}}" for name in CLASSES) + f"{'total':>{width}}",
    ]
    for name in SPLIT_NAMES:
        lines.append(
            f"{name:6}"
            + "".join(f"{counts[name][c]:>{width}}" for c in CLASSES)
            + f"{sum(counts[name].values()):>{width}}"
        )
    lines.append(f"multi-label records (in no split): {summary['n_multi_label']}")
    lines += [f"note: {shortfall}" for shortfall in summary["split_shortfalls"]]
    if summary["n_foreign"]:
        lines.append(
            f"ignored {summary['n_foreign']} records from other databases (id not starting with 'A' or no CPSC2018 class)"
        )
    lines += [f"warning: {item['record']}: {item['reason']}" for item in summary["warnings"]]
    lines += [f"skipped {item['record']}: {item['reason']}" for item in summary["skipped"]]
    lines.append(f"total skipped: {len(summary['skipped'])}")
    lines.append(f"cache written to {summary['out_dir']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_flag("--raw_dir", type=folder, default=DEFAULT_RAW_DIR, help="folder with the CPSC2018 records (default: %(default)s)")
    parser.add_flag("--out_dir", type=folder, default=DEFAULT_OUT_DIR, help="cache folder to write (default: %(default)s)")
    parser.add_flag("--val_per_class", type=int, default=5,
                    help="validation records per class (default: %(default)s)")
    parser.add_flag("--test_per_class", type=int, default=50, help="test records per class (default: %(default)s)")
    parser.add_flag("--download", action="store_true",
                    help="first fetch CPSC2018 (the PhysioNet/CinC Challenge 2021 WFDB archive) and unpack its "
                         "records into --raw_dir; a partial download is resumed")
    parser.add_flag("--url", help=f"the archive's address, implies --download (default: {CPSC2018_ARCHIVE_URL})")
    try:
        args = parser.parse_args(argv)
        if args.val_per_class < 0 or args.test_per_class < 0:
            raise ConfigError("--val_per_class and --test_per_class must be >= 0")
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.download or args.url:
        try:
            print(fetch_cpsc2018(Path(args.raw_dir), args.url or CPSC2018_ARCHIVE_URL, OFFICIAL_REFERENCE))
        except DownloadError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1  # the download failed while running
    try:
        summary = preprocess(args.raw_dir, args.out_dir, args.val_per_class, args.test_per_class)
    except (DataError, FolderInUseError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a file that could not be written while running
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(_format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
