"""Tests of cpsc2018.py: the readers of REFERENCE.csv and of one record in either form, checked
against the real sample, the official label file and the wfdb library; a bad file's RecordError
names the file and the problem. Reading a whole folder is tested through preprocess in
test_preprocess.py."""

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.io

with warnings.catch_warnings():  # wfdb's import warns about pandas deprecations
    warnings.simplefilter("ignore")
    import wfdb

from databases.cpsc2018 import (CLASSES, DataError, RecordError, read_original_record, read_reference, read_wfdb_record,
                      read_wfdb_signal, read_wfdb_header)
from helpers import SAMPLE_COUNTS, write_original_record, write_wfdb_record


def wfdb_physical_signal(record_path: Path) -> np.ndarray:
    """The (12, N) mV signal as the wfdb library reads it: an independent reader."""
    return wfdb.rdrecord(str(record_path)).p_signal.T


def test_read_reference_types_and_counts(official_reference):
    reference = read_reference(official_reference)
    assert list(reference.columns) == ["Recording", "First_label", "Second_label", "Third_label"]
    assert len(reference) == 6877 and reference["Recording"].iloc[0] == "A0001"
    assert all(str(reference[column].dtype) == "Int64" for column in reference.columns[1:])
    assert reference["Second_label"].notna().sum() == 477
    assert reference["First_label"].between(1, 9).all()


def test_read_reference_rejects_a_non_integer_label(tmp_path):
    (tmp_path / "REFERENCE.csv").write_text("Recording,First_label,Second_label,Third_label\nA0001,AF,,\n")
    with pytest.raises(DataError, match=r"REFERENCE.csv.*'AF'.*A0001"):
        read_reference(tmp_path / "REFERENCE.csv")


def test_read_reference_rejects_missing_columns(tmp_path):
    (tmp_path / "REFERENCE.csv").write_text("Recording,First_label\nA0001,1\n")
    with pytest.raises(DataError, match="missing column.*Second_label"):
        read_reference(tmp_path / "REFERENCE.csv")


def test_sample_labels_are_the_official_ones(sample_dir, official_reference):
    labels = read_reference(sample_dir / "REFERENCE.csv")
    official = read_reference(official_reference).set_index("Recording")
    pd.testing.assert_frame_equal(labels.set_index("Recording"), official.loc[labels["Recording"]])
    assert sorted(path.stem for path in sample_dir.glob("*.hea")) == sorted(labels["Recording"])
    assert sorted(path.stem for path in sample_dir.glob("*.mat")) == sorted(labels["Recording"])


def test_wfdb_reader_on_the_real_sample(sample_dir):
    reference = read_reference(sample_dir / "REFERENCE.csv").set_index("Recording")
    headers = sorted(sample_dir.glob("*.hea"))
    assert len(headers) == 18
    first_labels = []
    for header in headers:
        signal, labels, sex, age = read_wfdb_record(header)
        row = reference.loc[header.stem]
        expected = [int(label) for label in row if not pd.isna(label)]
        assert set(labels) == set(expected), header.stem
        first_labels.append(CLASSES[expected[0] - 1])
        val = scipy.io.loadmat(header.with_suffix(".mat"))["val"]
        assert signal.dtype == np.float64 and signal.shape == (12, val.shape[1])
        np.testing.assert_array_equal(signal, val / 1000.0)
        assert 5000 <= signal.shape[1] <= 30000
        assert sex in ("Male", "Female") and 0 < age < 120
    assert pd.Series(first_labels).value_counts().to_dict() == SAMPLE_COUNTS
    assert read_wfdb_record(sample_dir / "A5432.hea")[1] == [6]  # SNOMED 284470004 = PAC


@pytest.mark.parametrize("record", ["A0001", "A5432"])
def test_wfdb_reader_agrees_with_the_wfdb_library(sample_dir, record):
    signal = read_wfdb_record(sample_dir / f"{record}.hea")[0]
    np.testing.assert_allclose(signal, wfdb_physical_signal(sample_dir / record), atol=1e-12)


def test_wfdb_reader_uses_gain_and_baseline_and_maps_codes(tmp_path):
    values = np.random.default_rng(2).integers(-500, 500, size=(12, 700)).astype(np.int16)
    gains = [1000, 200, 500, 1000, 1000, 100, 1000, 1000, 2000, 1000, 1000, 250]
    baselines = [0, 5, -12, 0, 0, 7, 0, 0, 3, 0, 0, -1]
    write_wfdb_record(tmp_path, "A0001", values, "59118001,AF,10370003", gains=gains, baselines=baselines)
    signal, labels, sex, age = read_wfdb_record(tmp_path / "A0001.hea")
    expected = (values - np.array(baselines)[:, None]) / np.array(gains)[:, None]
    np.testing.assert_allclose(signal, expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(signal, wfdb_physical_signal(tmp_path / "A0001"), atol=1e-12)
    assert labels == [5, 2] and sex == "Female" and age == 57.0  # code outside the 9 dropped, order kept


def test_wfdb_reader_rejects_a_record_of_none_of_the_classes(tmp_path):
    write_wfdb_record(tmp_path, "A0001", np.zeros((12, 600), np.int16), "164890007")
    with pytest.raises(RecordError, match="none of the 9"):
        read_wfdb_record(tmp_path / "A0001.hea")


def test_original_reader_round_trip(tmp_path):
    data = np.random.default_rng(3).normal(size=(12, 1234))
    write_original_record(tmp_path, "A0001", data, sex="Female", age=47.0)
    signal, sex, age = read_original_record(tmp_path / "A0001.mat")
    assert signal.dtype == np.float64
    np.testing.assert_array_equal(signal, data)
    assert (sex, age) == ("Female", 47.0)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_header(directory: Path, old: str, new: str) -> None:
    path = directory / "A0001.hea"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def _nan_data() -> np.ndarray:
    data = np.ones((12, 600))
    data[4, 10] = np.nan
    return data


# name: (damage to a good record A0001 in the folder, the file named, what the message says)
ORIGINAL_BAD_FILES = {
    "missing": (lambda d: (d / "A0001.mat").unlink(), "file A0001.mat not found"),
    "empty": (lambda d: (d / "A0001.mat").write_bytes(b""), "empty file A0001.mat"),
    "truncated": (lambda d: _truncate(d / "A0001.mat"), "unreadable .mat file A0001.mat (truncated or corrupt"),
    "no ECG": (lambda d: scipy.io.savemat(d / "A0001.mat", {"val": np.ones((12, 9))}),
               "no variable 'ECG' in A0001.mat (variables: val)"),
    "no data field": (lambda d: scipy.io.savemat(d / "A0001.mat", {"ECG": {"sex": "Male"}}),
                      "'ECG' in A0001.mat is not a 1x1 struct with a 'data' field"),
    "11 leads": (lambda d: write_original_record(d, "A0001", np.ones((11, 600))), "11 leads (shape 11 x 600), expected 12"),
    "zero length": (lambda d: write_original_record(d, "A0001", np.ones((12, 0))), "zero-length record (0 samples)"),
    "NaN": (lambda d: write_original_record(d, "A0001", _nan_data()), "NaN or inf samples in lead(s) aVL"),
    "complex": (lambda d: write_original_record(d, "A0001", np.ones((12, 600)) * (1 + 1j)),
                "ECG.data in A0001.mat is complex-valued"),
}


@pytest.mark.parametrize("case", ORIGINAL_BAD_FILES)
def test_original_reader_names_the_file_and_the_problem(tmp_path, case):
    damage, reason = ORIGINAL_BAD_FILES[case]
    write_original_record(tmp_path, "A0001", np.ones((12, 600)))
    damage(tmp_path)
    with pytest.raises(RecordError) as refused:
        read_original_record(tmp_path / "A0001.mat")
    assert refused.value.path == tmp_path / "A0001.mat" and refused.value.reason.startswith(reason)
    assert str(refused.value) == f"{tmp_path / 'A0001.mat'}: {refused.value.reason}"


# name: (damage to a good record A0001 in the folder, the file named, what the message says)
WFDB_BAD_FILES = {
    "missing header": (lambda d: (d / "A0001.hea").unlink(), "hea", "header A0001.hea not found"),
    "empty header": (lambda d: (d / "A0001.hea").write_text(""), "hea", "empty file A0001.hea"),
    "malformed header": (lambda d: (d / "A0001.hea").write_text("A0001 twelve\n"), "hea", "malformed header A0001.hea"),
    "11 signals": (lambda d: write_wfdb_record(d, "A0001", np.zeros((11, 600), np.int16), "AF"), "hea",
                   "11 leads in header A0001.hea, expected 12"),
    "13 declared, 12 described": (lambda d: _edit_header(d, "A0001 12 500", "A0001 13 500"), "hea",
                                  "header A0001.hea declares 13 signals but describes 12"),
    "250 Hz": (lambda d: _edit_header(d, "A0001 12 500", "A0001 12 250"), "hea",
               "sampling frequency 250 Hz in A0001.hea, expected 500"),
    "leads out of order": (lambda d: _edit_header(d, " 0 0 V6", " 0 0 V5"), "hea",
                           "leads I, II, III, aVR, aVL, aVF, V1, V2, V3, V4, V5, V5 in A0001.hea, expected I, II"),
    "another signal file": (lambda d: _edit_header(d, "A0001.mat 16+24 1000(0)/mV 16 0 0 0 0 V6",
                                                   "A0002.mat 16+24 1000(0)/mV 16 0 0 0 0 V6"), "hea",
                            "header A0001.hea names signal file(s) A0001.mat, A0002.mat, expected A0001.mat"),
    "microvolts": (lambda d: _edit_header(d, "(0)/mV 16 0 0 0 0 V6", "(0)/uV 16 0 0 0 0 V6"), "hea",
                   "units mV, uV in A0001.hea, expected mV"),
    "negative gain": (lambda d: _edit_header(d, "1000(0)/mV 16 0 0 0 0 V6", "-1000(0)/mV 16 0 0 0 0 V6"), "hea",
                      "negative gain in A0001.hea"),
    "no class": (lambda d: write_wfdb_record(d, "A0001", np.zeros((12, 600), np.int16), "164890007"), "hea",
                 "Dx 164890007 names none of the 9 CPSC2018 classes"),
    "missing .mat": (lambda d: (d / "A0001.mat").unlink(), "mat", "file A0001.mat not found"),
    "truncated .mat": (lambda d: _truncate(d / "A0001.mat"), "mat", "unreadable .mat file A0001.mat"),
    "no val": (lambda d: scipy.io.savemat(d / "A0001.mat", {"signal": np.ones((12, 9))}, format="4"), "mat",
               "no variable 'val' in A0001.mat (variables: signal)"),
    "header longer than .mat": (lambda d: _edit_header(d, "A0001 12 500 600", "A0001 12 500 7500"), "mat",
                                "header says 12 x 7500 samples but A0001.mat holds 12 x 600"),
    "gain 1e-300": (lambda d: write_wfdb_record(d, "A0001", np.ones((12, 600), np.int16), "AF", gains=[1e-300] * 12),
                    "mat", "samples beyond the float32 range of the cache (|value| > 3.4e+38 mV) in lead(s) I, II"),
}


@pytest.mark.parametrize("case", WFDB_BAD_FILES)
def test_wfdb_reader_names_the_file_and_the_problem(tmp_path, case):
    damage, suffix, reason = WFDB_BAD_FILES[case]
    write_wfdb_record(tmp_path, "A0001", np.zeros((12, 600), np.int16), "AF")
    damage(tmp_path)
    with pytest.raises(RecordError) as refused:
        read_wfdb_record(tmp_path / "A0001.hea")
    assert refused.value.path == tmp_path / f"A0001.{suffix}" and refused.value.reason.startswith(reason)
    assert str(refused.value) == f"{tmp_path / f'A0001.{suffix}'}: {refused.value.reason}"


def test_wfdb_record_is_its_header_then_its_signal(sample_dir):
    header = read_wfdb_header(sample_dir / "A0001.hea")
    assert header.mat_path == sample_dir / "A0001.mat" and header.n_signals == 12 and header.dx == ("RBBB",)
    signal, labels, sex, age = read_wfdb_record(sample_dir / "A0001.hea")
    np.testing.assert_array_equal(read_wfdb_signal(header), signal)
    assert (labels, sex, age) == ([5], header.sex, header.age)
