"""The paper's reference split and the preprocessed cache of CPSC2018 (PROTOCOL sections 1-2).

Reads every record of the 12-lead CPSC2018 training set in a folder, in either of its two
distributions, with the labels of its REFERENCE.csv or of the WFDB headers (the readers are
cpsc2018.py's). Bad records are skipped, counted and reported with their reason; the good ones
are split as in the paper (``reference_split``) and written to a cache (``signals.npy`` with
every record concatenated along time, ``records.csv`` with the offsets, the split CSVs and
``meta.json``) that ``load_cache`` reads back memory-mapped.

CLI: ``python preprocess.py [--raw_dir data/CPSC2018/train] [--out_dir data/CPSC2018/processed]
[--val_per_class 5] [--test_per_class 50] [--download [--url URL] [--sha256 HEX]]``; ``--download``
first fetches the records into --raw_dir and checks them (plumbing/download.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
from tqdm import tqdm

from databases.cpsc2018 import (CLASSES, FS, LABEL_COLUMNS, LEAD_NAMES, OFFICIAL_REFERENCE, REFERENCE_COLUMNS, DataError,
                      Inventory, RecordError, WfdbHeader, read_folder, read_original_record, read_reference,
                      read_wfdb_signal, record_issue)
from plumbing.download import CPSC2018_ARCHIVE_URL, DownloadError, fetch_cpsc2018
from plumbing.flags import ConfigError, OneLineParser, folder
from plumbing.safe_writes import FolderInUseError, lock_folder, remove_stale_temporaries, temporary_path, write_json

CACHE_VERSION = 1
# The shortest record the models classify: 2049 samples (4.1 s; CPSC2018's shortest is 6 s) always
# cover three of the trunk's 1024-sample cells, the window of one final position of resnet18a_vl
# (ECG_CNN.py: POOL_KERNEL - DOWNSAMPLE + 1; repeated here so that preprocessing does not import
# the model and torch, and tests/test_preprocess.py checks it against the model). A shorter record
# may have no valid final position, or only one position per channel where GroupNorm needs two.
MIN_RECORD_LENGTH = 2049

RECORDS_COLUMNS = REFERENCE_COLUMNS + ("offset", "length")
SPLIT_NAMES = ("train", "val", "test")
CACHE_FILES = ("signals.npy", "records.csv", "train.csv", "val.csv", "test.csv")
DEFAULT_RAW_DIR = "data/CPSC2018/train"
DEFAULT_OUT_DIR = "data/CPSC2018/processed"


# --------------------------------------------------------------------------- the split


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


# --------------------------------------------------------------------------- preprocessing


def _read_signal(source: Path | WfdbHeader) -> np.ndarray:
    """The checked (12, N) mV signal of one record of either distribution."""
    if isinstance(source, WfdbHeader):
        return read_wfdb_signal(source)
    return read_original_record(source)[0]


def too_short(length: int) -> str | None:
    """Why a record of ``length`` samples is not classified (shorter than MIN_RECORD_LENGTH), or None."""
    if length >= MIN_RECORD_LENGTH:
        return None
    return f"length {length}, shorter than the models' minimum of {MIN_RECORD_LENGTH} samples ({MIN_RECORD_LENGTH / FS:.1f} s)"


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
    inventory = read_folder(raw_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"--out_dir {out_dir}: cannot create the cache folder ({error.strerror})") from None
    with lock_folder(out_dir, "cache folder"):
        return _preprocess_into(raw_dir, out_dir, inventory, val_per_class, test_per_class)


def _preprocess_into(raw_dir: Path, out_dir: Path, inventory: Inventory, val_per_class: int,
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
            skipped.append(record_issue(record, error.reason))
            continue
        if short := too_short(signal.shape[1]):
            skipped.append(record_issue(record, short))
            continue
        lengths[record] = signal.shape[1]
        zero_leads = [LEAD_NAMES[i] for i in np.flatnonzero(~signal.any(axis=1))]
        if zero_leads:
            warnings.append(record_issue(record, f"all-zero lead(s) {', '.join(zero_leads)}"))
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
                raise DataError(f"{row.Recording} changed while preprocessing: {error.reason}") from None
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
    parser.add_flag("--sha256", help="the archive's SHA-256 digest (64 hexadecimal digits), checked before "
                                     "unpacking; implies --download")
    try:
        args = parser.parse_args(argv)
        if args.val_per_class < 0 or args.test_per_class < 0:
            raise ConfigError("--val_per_class and --test_per_class must be >= 0")
        if args.sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", args.sha256):
            raise ConfigError(f"--sha256 {args.sha256!r}: not a SHA-256 digest (64 hexadecimal digits)")
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.download or args.url or args.sha256:
        try:
            print(fetch_cpsc2018(Path(args.raw_dir), args.url or CPSC2018_ARCHIVE_URL, OFFICIAL_REFERENCE, args.sha256))
        except (DownloadError, OSError) as error:  # OSError: a file that could not be written
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
