"""The CPSC2018 dataset: its constants and the readers of its two distribution forms (PROTOCOL section 1).

The 12-lead training set of the China Physiological Signal Challenge 2018: 6877 records of
6 to 144 s at 500 Hz (FS), leads LEAD_NAMES, each labelled with one to three of nine classes
(CLASSES; label k is CLASSES[k - 1]). It comes in two forms:

- the original one (http://2018.icbeb.org/Challenge.html): ``A0001.mat`` .. ``A6877.mat``
  (``read_original_record``) and the labels in ``REFERENCE.csv`` (``read_reference``;
  REFERENCE_COLUMNS ``Recording,First_label,Second_label,Third_label``, labels 1..9, empty
  where a record has fewer);
- the PhysioNet/CinC Challenge WFDB copy: ``A0001.hea`` + ``A0001.mat`` pairs
  (``read_wfdb_record``, or ``read_wfdb_header`` then ``read_wfdb_signal``), the labels in the
  header's ``#Dx`` line as SNOMED CT codes (SNOMED_TO_CLASS) or class abbreviations, with or
  without a REFERENCE.csv (which then decides the labels).

Each reader's docstring says what its file must look like. The record readers return the
signal as a float64 (12, N) array in millivolts, checked finite and within the float32 range
of the cache; an unusable file raises RecordError (``path: reason``). ``read_folder`` lists the
records of a folder in either form, with the bad ones and their reasons. preprocess.py splits
the records and writes the cache. Imports numpy, scipy.io (the .mat files), pandas (the label
tables) and tqdm (a progress bar over the headers).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import scipy.io
from tqdm import tqdm

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
REFERENCE_FILE = "REFERENCE.csv"
REFERENCE_COLUMNS = ("Recording", "First_label", "Second_label", "Third_label")
LABEL_COLUMNS = REFERENCE_COLUMNS[1:]
# The official CPSC2018 label file for all 6877 records (data/README.md says where it comes from).
OFFICIAL_REFERENCE = Path(__file__).resolve().parents[1] / "data" / "CPSC2018_REFERENCE.csv"
# Where to get CPSC2018: the end of the message for a records folder without records.
DOWNLOAD_HINT = (
    "run `python preprocess.py --download`, or put A0001.mat..A6877.mat and REFERENCE.csv there "
    "from the original CPSC2018 download (http://2018.icbeb.org/Challenge.html), or the .hea + .mat "
    "files of the PhysioNet/CinC 2020 copy of CPSC2018 'Training_WFDB' "
    "(https://physionet.org/content/challenge-2020/)"
)


class DataError(Exception):
    """A problem with a whole dataset: a records folder, a label file, or the cache preprocess.py
    builds from them (missing folder, bad label file, stale cache); the message names it."""


class RecordError(Exception):
    """One unusable record file: ``path`` names the file, ``reason`` says what is wrong with it
    (what preprocess reports when it skips the record); the message is ``path: reason``."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(path, reason)
        self.path, self.reason = Path(path), reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def _check_signal(signal: np.ndarray, path: Path) -> None:
    """Raise RecordError (naming ``path``) unless ``signal`` is a finite, non-empty 12 x N array."""
    if signal.ndim != 2:
        raise RecordError(path, f"signal has {signal.ndim} dimensions (shape {signal.shape}), expected 12 x N")
    if signal.shape[0] != len(LEAD_NAMES):
        raise RecordError(
            path, f"{signal.shape[0]} leads (shape {signal.shape[0]} x {signal.shape[1]}), expected 12"
        )
    if signal.shape[1] == 0:
        raise RecordError(path, "zero-length record (0 samples)")
    finite = np.isfinite(signal)
    if not finite.all():
        leads = [LEAD_NAMES[i] for i in np.flatnonzero(~finite.all(axis=1))]
        raise RecordError(path, f"NaN or inf samples in lead(s) {', '.join(leads)}")
    with np.errstate(over="ignore"):
        stored = np.isfinite(signal.astype(np.float32))  # the cache's dtype
    if not stored.all():
        leads = [LEAD_NAMES[i] for i in np.flatnonzero(~stored.all(axis=1))]
        raise RecordError(path, f"samples beyond the float32 range of the cache (|value| > "
                                f"{np.finfo(np.float32).max:.3g} mV) in lead(s) {', '.join(leads)}")


def _load_mat(mat_path: Path) -> dict:
    """scipy.io.loadmat with every failure turned into a RecordError."""
    if not mat_path.is_file():
        raise RecordError(mat_path, f"file {mat_path.name} not found")
    if mat_path.stat().st_size == 0:
        raise RecordError(mat_path, f"empty file {mat_path.name}")
    try:
        return scipy.io.loadmat(mat_path)
    except Exception as error:  # scipy raises many types on corrupt input
        raise RecordError(
            mat_path,
            f"unreadable .mat file {mat_path.name} (truncated or corrupt: {type(error).__name__}: {error})",
        ) from None


def _variables(contents: dict) -> str:
    names = [name for name in contents if not name.startswith("__")]
    return ", ".join(names) or "none"


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


# --------------------------------------------------------------------------- the original form


def read_original_record(mat_path: str | Path) -> tuple[np.ndarray, str, float]:
    """Read one record of the original CPSC2018 distribution.

    The file: a MATLAB .mat (any version scipy.io.loadmat reads) holding a 1x1 struct ``ECG``
    with fields data (12 x N real numbers, N >= 1, mV, leads in LEAD_NAMES order, 500 Hz),
    sex (char, optional) and age (a number, optional). Returns (signal float64 (12, N) in mV,
    sex ("" if absent), age (NaN if absent or not a number)). Raises RecordError naming the
    file for a missing, empty or corrupt file, no ``ECG`` struct, data that is not real
    numbers, not 12 leads, empty, NaN or inf, or beyond the float32 range.
    """
    mat_path = Path(mat_path)
    contents = _load_mat(mat_path)
    if "ECG" not in contents:
        raise RecordError(mat_path, f"no variable 'ECG' in {mat_path.name} (variables: {_variables(contents)})")
    ecg = contents["ECG"]
    fields = ecg.dtype.names or ()
    if "data" not in fields or ecg.size != 1:
        raise RecordError(mat_path, f"'ECG' in {mat_path.name} is not a 1x1 struct with a 'data' field")
    ecg = ecg.reshape(-1)[0]
    if np.iscomplexobj(ecg["data"]):  # converting would drop the imaginary part
        raise RecordError(mat_path, f"ECG.data in {mat_path.name} is complex-valued")
    try:
        signal = np.asarray(ecg["data"], dtype=np.float64)
    except (TypeError, ValueError):
        raise RecordError(mat_path, f"ECG.data in {mat_path.name} is not numeric") from None
    _check_signal(signal, mat_path)
    sex = "".join(np.asarray(ecg["sex"]).ravel().astype(str)) if "sex" in fields else ""
    age_values = np.asarray(ecg["age"]).ravel() if "age" in fields else np.array([])
    try:
        age = float(age_values[0]) if age_values.size == 1 else math.nan
    except (TypeError, ValueError):
        age = math.nan
    return signal, sex, age


# --------------------------------------------------------------------------- the WFDB form


@dataclass(frozen=True)
class WfdbHeader:
    """What the reader uses from a PhysioNet/CinC 2020 header."""

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


def read_wfdb_header(hea_path: str | Path) -> WfdbHeader:
    """Parse and check the header of a PhysioNet/CinC 2020 record.

    The file: WFDB header text (latin-1). The record line ``name 12 500 [N ...]`` (12 signals,
    500 Hz; N samples, optional); twelve signal lines ``name.mat fmt gain(baseline)/mV ...
    lead``, each naming the record's own .mat, in mV, with a gain >= 0 (0: WFDB's 200) and the
    leads in LEAD_NAMES order; ``#`` comment lines ``#Age: 57``, ``#Sex: Female``, ``#Dx:
    code,code`` (SNOMED CT codes or class abbreviations; none of them required). A small
    parser in place of wfdb.rdheader, which is much slower per header (benchmarks/README.md).
    Raises RecordError naming the header for a missing, empty, unreadable or malformed one, or
    one whose signals differ from the above.
    """
    hea_path = Path(hea_path)
    if not hea_path.is_file():
        raise RecordError(hea_path, f"header {hea_path.name} not found")
    if hea_path.stat().st_size == 0:
        raise RecordError(hea_path, f"empty file {hea_path.name}")
    try:
        text = hea_path.read_text(encoding="latin-1")
    except OSError as error:
        raise RecordError(hea_path, f"unreadable header {hea_path.name} ({error})") from None
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
        raise RecordError(hea_path, f"malformed header {hea_path.name}") from None
    if len(signals) != n_signals:
        raise RecordError(hea_path, f"header {hea_path.name} declares {n_signals} signals but describes "
                                    f"{len(signals)}")
    if n_signals != len(LEAD_NAMES):
        raise RecordError(hea_path, f"{n_signals} leads in header {hea_path.name}, expected 12")
    file_names, gains, baselines, units, lead_names = zip(*signals)
    if fs != FS:
        raise RecordError(hea_path, f"sampling frequency {fs:g} Hz in {hea_path.name}, expected {FS}")
    if tuple(lead_names) != LEAD_NAMES:
        raise RecordError(
            hea_path, f"leads {', '.join(lead_names)} in {hea_path.name}, expected {', '.join(LEAD_NAMES)}"
        )
    if set(file_names) != {f"{hea_path.stem}.mat"}:
        raise RecordError(
            hea_path,
            f"header {hea_path.name} names signal file(s) {', '.join(sorted(set(file_names)))}, expected {hea_path.stem}.mat",
        )
    if set(units) != {"mV"}:
        raise RecordError(hea_path, f"units {', '.join(sorted(set(units)))} in {hea_path.name}, expected mV")
    if min(gains) < 0:
        raise RecordError(hea_path, f"negative gain in {hea_path.name}")
    fields = {}
    for comment in comments:
        key, _, value = comment.partition(":")
        fields[key.strip().lower()] = value.strip()
    dx = tuple(code.strip() for code in fields.get("dx", "").split(",") if code.strip())
    try:
        age = float(fields.get("age", "nan"))
    except ValueError:
        age = math.nan
    return WfdbHeader(
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


def unknown_dx(dx: Sequence[str]) -> list[str]:
    """The Dx entries that are neither a SNOMED CT code nor a class abbreviation (typos)."""
    return [entry for entry in dx if entry not in ABBREVIATION_TO_CLASS and not _is_snomed_code(entry)]


def dx_labels(dx: Sequence[str]) -> list[int]:
    """Labels 1..9 of the Dx entries (codes or abbreviations) in header order; others dropped."""
    labels: list[int] = []
    for entry in dx:
        label = SNOMED_TO_CLASS.get(entry, ABBREVIATION_TO_CLASS.get(entry))
        if label is not None and label not in labels:
            labels.append(label)
    return labels


def read_wfdb_signal(header: WfdbHeader) -> np.ndarray:
    """The record's (12, N) float64 signal in mV: (val - baseline) / gain, checked against the header.

    The file ``header.mat_path``: a MATLAB .mat (the Challenge writes version 4) holding ``val``,
    a real numeric (12, N) array of ADC units (int16 in the Challenge files), N the header's
    sample count where it gives one. Raises RecordError naming the .mat file otherwise, or
    when the signal in mV is empty, NaN or inf, or beyond the float32 range.
    """
    mat_path = header.mat_path
    contents = _load_mat(mat_path)
    if "val" not in contents:
        raise RecordError(mat_path, f"no variable 'val' in {mat_path.name} (variables: {_variables(contents)})")
    values = contents["val"]
    if not np.issubdtype(values.dtype, np.number) or values.ndim != 2:
        raise RecordError(mat_path, f"'val' in {mat_path.name} is not a numeric 2-D array")
    if np.iscomplexobj(values):  # converting would drop the imaginary part
        raise RecordError(mat_path, f"'val' in {mat_path.name} is complex-valued")
    if values.shape[0] != header.n_signals or header.n_samples not in (None, values.shape[1]):
        raise RecordError(
            mat_path,
            f"header says {header.n_signals} x {header.n_samples or '?'} samples but "
            f"{mat_path.name} holds {values.shape[0]} x {values.shape[1]}",
        )
    signal = (values.astype(np.float64) - header.baselines[:, None]) / header.gains[:, None]
    _check_signal(signal, mat_path)
    return signal


def read_wfdb_record(hea_path: str | Path) -> tuple[np.ndarray, list[int], str, float]:
    """Read one PhysioNet/CinC 2020 record: ``read_wfdb_header``, then ``read_wfdb_signal``.

    Returns (signal float64 (12, N) in mV, labels 1..9 in header Dx order, sex, age; NaN if
    absent). Raises RecordError naming the file for an unusable header or .mat file (see
    those two functions), and naming the header for one whose Dx names none of the nine
    CPSC2018 classes.
    """
    header = read_wfdb_header(hea_path)
    labels = dx_labels(header.dx)
    if not labels:
        raise RecordError(hea_path, f"Dx {','.join(header.dx) or '(empty)'} names none of the 9 CPSC2018 classes")
    return read_wfdb_signal(header), labels, header.sex, header.age


# --------------------------------------------------------------------------- the records of a folder


@dataclass
class Inventory:
    """The records found in a records folder, before any signal is read (``read_folder``)."""

    source_format: str
    table: pd.DataFrame  # REFERENCE columns, one row per record with valid labels, in split order
    sources: dict[str, Path | WfdbHeader]  # Recording -> .mat path (original) or parsed header (WFDB)
    skipped: list[dict]
    warnings: list[dict]
    n_foreign: int


def record_issue(record: str, reason: str) -> dict:
    """An entry of the skipped records or of the warnings that preprocess reports (meta.json)."""
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
                skipped.append(record_issue(record or f"row {position + 1}", reason))
                reported.add(record)
    return reference.loc[keep].reset_index(drop=True)


def _missing_data_error(raw_dir: Path, problem: str) -> DataError:
    return DataError(f"{problem} in {raw_dir.as_posix().rstrip('/')}/: {DOWNLOAD_HINT}")


def read_folder(raw_dir: Path) -> Inventory:
    """Detect the distribution of the records in ``raw_dir``, read their labels and list the records to read.

    The folder: the original form's ``A*.mat`` files with their REFERENCE.csv, or the WFDB
    form's ``.hea`` + ``.mat`` pairs with or without one (only CPSC2018's ``A*`` records; those
    of the Challenge's other databases, or whose Dx names none of the nine classes, are
    counted in ``n_foreign``). REFERENCE.csv, where present, decides which records belong and
    their labels. A record that cannot be used (bad label row, missing or unreadable header,
    unknown diagnosis codes) goes to ``skipped`` with its reason; signals are not read here.
    Raises DataError for a missing folder, one without records, original records without
    REFERENCE.csv, or an unreadable REFERENCE.csv.
    """
    if not raw_dir.is_dir():
        raise _missing_data_error(raw_dir, "no CPSC2018 data (folder not found)")
    headers = {path.stem: path for path in sorted(raw_dir.glob("*.hea"))}
    mats = {path.stem: path for path in sorted(raw_dir.glob("*.mat"))}
    if not headers and not mats:
        raise _missing_data_error(raw_dir, "no CPSC2018 records (.mat or .hea files)")
    reference_path = raw_dir / REFERENCE_FILE
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
        skipped += [record_issue(name, "not in REFERENCE.csv") for name in mats if name not in listed]
        sources = {name: raw_dir / f"{name}.mat" for name in table["Recording"]}
        return Inventory("original", table, sources, skipped, warnings, 0)

    # WFDB: REFERENCE.csv, where present, decides which records belong and their labels;
    # otherwise the headers do, and records of other databases are only counted.
    n_foreign = 0
    parsed: dict[str, WfdbHeader] = {}
    for name, path in tqdm(headers.items(), desc="reading headers", unit="record", disable=None):
        if name not in listed and not name.startswith("A"):
            n_foreign += 1
            continue
        try:
            header = read_wfdb_header(path)
        except RecordError as error:
            if name not in invalid_in_reference:  # those were reported with their label problem
                skipped.append(record_issue(name, error.reason))
            continue
        if name in listed:
            parsed[name] = header
        elif not header.dx:
            skipped.append(record_issue(name, f"no diagnosis: the Dx line of {name}.hea is empty or missing"))
        elif not dx_labels(header.dx) and unknown_dx(header.dx):
            skipped.append(record_issue(name, f"unknown diagnosis code(s) {', '.join(unknown_dx(header.dx))} "
                                              f"in the Dx line of {name}.hea (Dx: {','.join(header.dx)})"))
        elif not dx_labels(header.dx):  # real codes of other diagnoses: another database
            n_foreign += 1
        elif reference is not None:
            skipped.append(record_issue(name, "not in REFERENCE.csv"))
        else:
            parsed[name] = header
    for name in sorted(mats.keys() - headers.keys() - listed):  # listed ones are reported below
        if name.startswith("A"):
            skipped.append(record_issue(name, f"{name}.mat has no header {name}.hea"))
        else:
            n_foreign += 1

    if table is not None:
        for row in table.itertuples(index=False):
            header = parsed.get(row.Recording)
            labels = {int(label) for label in row[1:] if not pd.isna(label)}
            if header is not None and set(dx_labels(header.dx)) != labels:
                warnings.append(
                    record_issue(
                        row.Recording,
                        f"header Dx {','.join(header.dx)} differs from REFERENCE.csv; REFERENCE.csv used",
                    )
                )
    else:
        rows = []
        for name, header in parsed.items():
            labels = dx_labels(header.dx)
            if unknown_dx(header.dx):
                warnings.append(record_issue(name, f"unknown diagnosis code(s) {', '.join(unknown_dx(header.dx))} "
                                                   "in Dx ignored"))
            if len(labels) > len(LABEL_COLUMNS):
                warnings.append(
                    record_issue(name, f"{len(labels)} labels in Dx; the first {len(LABEL_COLUMNS)} kept")
                )
            rows.append([name] + (labels + [pd.NA] * len(LABEL_COLUMNS))[: len(LABEL_COLUMNS)])
        table = pd.DataFrame(rows, columns=list(REFERENCE_COLUMNS))
        table[list(LABEL_COLUMNS)] = table[list(LABEL_COLUMNS)].astype("Int64")
    reported = {item["record"] for item in skipped}
    skipped += [
        record_issue(name, f"no header {name}.hea" + ("" if name in mats else f" and no signal file {name}.mat"))
        for name in table["Recording"]
        if name not in parsed and name not in reported
    ]
    sources = {name: parsed[name] for name in table["Recording"] if name in parsed}
    return Inventory("wfdb", table, sources, skipped, warnings, n_foreign)
