"""Tests for synthetic.py: the original CPSC2018 file layout, and that every class carries its
defining feature, measured with a small ECG toolkit written here (band-pass QRS detector,
median beat, QRS width from the spatial velocity, PR, ST level) that knows nothing of the
generator. The same toolkit run on the real CPSC2018 sample shows the same class differences,
which checks the instruments themselves."""
from __future__ import annotations

import errno
import io
import re
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.io
from scipy import signal as sps
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from databases import synthetic
from databases.cpsc2018 import CLASSES, read_original_record
from databases.synthetic import AF, IAVB, LBBB, NORMAL, PAC, PVC, RBBB, STD, STE, generate_dataset, synthesize_record

FS = 500
INDEPENDENT_LEADS = [0, 1, 6, 7, 8, 9, 10, 11]  # I, II, V1..V6
WINDOW_SAMPLES = 4000  # 8 s, what the demo may truncate records to
RECORDS_PER_CLASS = 20


# ----------------------------------------------------------------------------- measuring toolkit

_QRS_BAND = sps.butter(2, [5, 30], btype="bandpass", fs=FS, output="sos")
_LOWPASS_40 = sps.butter(2, 40, fs=FS, output="sos")
_LOWPASS_15 = sps.butter(2, 15, fs=FS, output="sos")
_BEFORE, _AFTER = int(0.6 * FS), int(0.55 * FS)  # median-beat window around each detection


def detect_beats(ecg: np.ndarray) -> np.ndarray:
    """QRS sample indices: peaks of the smoothed 5-30 Hz spatial envelope of the 8 independent leads."""
    envelope = np.sqrt((sps.sosfiltfilt(_QRS_BAND, ecg[INDEPENDENT_LEADS], axis=1) ** 2).sum(axis=0))
    smooth = int(0.05 * FS)
    envelope = np.convolve(envelope, np.ones(smooth) / smooth, mode="same")
    peaks, _ = sps.find_peaks(envelope, height=0.2 * np.percentile(envelope, 99), distance=int(0.25 * FS))
    return peaks


def measure(ecg: np.ndarray) -> dict:
    """Rhythm and median-beat measurements of one (12, n) ECG in mV."""
    beats = detect_beats(ecg)
    rr = np.diff(beats) / FS
    inside = beats[(beats >= _BEFORE) & (beats + _AFTER <= ecg.shape[1])]
    beat = np.median(np.stack([ecg[:, b - _BEFORE:b + _AFTER] for b in inside]), axis=0)  # (12, W)
    # QRS = where the spatial velocity of the median beat exceeds 15% of its peak, near the detection
    velocity = np.sqrt((np.diff(sps.sosfiltfilt(_LOWPASS_40, beat[INDEPENDENT_LEADS], axis=1), axis=1) ** 2).sum(0))
    near = int(0.12 * FS)
    around = velocity[_BEFORE - near:_BEFORE + near]
    above = np.nonzero(around > 0.15 * around.max())[0]
    onset, end = _BEFORE - near + above[0], _BEFORE - near + above[-1]
    baseline = beat[:, onset - int(0.02 * FS):onset - int(0.01 * FS)].mean(axis=1)  # PR segment
    st = beat[:, end + int(0.04 * FS)] - baseline  # 40 ms after the J point
    # P wave: the last clear peak of lead II (15 Hz low-pass) in the 0.42 s before the QRS
    lead_ii = sps.sosfiltfilt(_LOWPASS_15, beat[1])[onset - int(0.42 * FS):onset]
    p_peaks, _ = sps.find_peaks(lead_ii, prominence=0.03)
    return {
        "rr_cv": rr.std() / rr.mean(),
        "prematurity": (rr[:-1] / rr[1:]).min(),  # shortest interval over the next one: ~1 in sinus rhythm
        "qrs_width": (end - onset) / FS,
        "p_to_qrs": (lead_ii.size - p_peaks[-1]) / FS if p_peaks.size else np.nan,
        "st_min": st.min(),
        "st_max": st.max(),
        "beat": beat[INDEPENDENT_LEADS, -500:].reshape(8, 25, 20).mean(axis=2).ravel(),  # -0.45..+0.55 s at 25 Hz
    }


@pytest.fixture(scope="module")
def measured() -> pd.DataFrame:
    """RECORDS_PER_CLASS 8-second records per class with their measurements (one row each)."""
    rows = []
    for label in range(1, 10):
        rng = np.random.default_rng(1000 + label)
        for _ in range(RECORDS_PER_CLASS):
            rows.append({"label": label, **measure(synthesize_record(label, WINDOW_SAMPLES, rng))})
    return pd.DataFrame(rows)


def _values(measured: pd.DataFrame, label: int, column: str) -> np.ndarray:
    return measured.loc[measured.label == label, column].to_numpy(dtype=float)


def _auc_against_normal(measured: pd.DataFrame, label: int, column: str, higher: bool) -> float:
    """Probability that a record of ``label`` measures higher (or lower) than a Normal one."""
    sick, normal = _values(measured, label, column), _values(measured, NORMAL, column)
    scores = np.r_[sick, normal] * (1 if higher else -1)
    return roc_auc_score(np.r_[np.ones(sick.size), np.zeros(normal.size)], scores)


# ----------------------------------------------------------------------------- file format


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    out_dir = tmp_path_factory.mktemp("synthetic") / "train"
    table = generate_dataset(out_dir, records_per_class=2, seed=3, min_seconds=6.0, max_seconds=8.0,
                             multilabel_fraction=0.2)
    return out_dir, table


def test_files_have_the_original_cpsc2018_layout(dataset):
    out_dir, table = dataset
    assert sorted(path.stem for path in out_dir.glob("*.mat")) == list(table.Recording)
    for path in out_dir.glob("*.mat"):
        assert path.read_bytes()[:10] == b"MATLAB 5.0"
        contents = scipy.io.loadmat(path)
        assert [name for name in contents if not name.startswith("__")] == ["ECG"]
        ecg = contents["ECG"]
        assert ecg.shape == (1, 1) and ecg.dtype.names == ("sex", "age", "data")
        record = ecg[0, 0]
        assert str(record["sex"][0]) in {"Male", "Female"}
        assert record["age"].shape == (1, 1) and record["age"].dtype == np.float64
        assert 18 <= record["age"][0, 0] <= 95
        data = record["data"]
        assert data.dtype == np.float64 and data.ndim == 2 and data.shape[0] == 12
        assert 0.2 < np.percentile(np.abs(data), 99) < 5.0  # millivolts, not microvolts or volts


def test_files_are_savemat_output_with_a_faster_compression(dataset):
    out_dir, table = dataset
    path = out_dir / f"{table.Recording[0]}.mat"
    record = scipy.io.loadmat(path)["ECG"][0, 0]
    ecg = np.empty((1, 1), dtype=[("sex", object), ("age", object), ("data", object)])
    ecg[0, 0] = (str(record["sex"][0]), float(record["age"][0, 0]), record["data"])
    plain = io.BytesIO()
    scipy.io.savemat(plain, {"ECG": ecg}, do_compression=False)
    written = path.read_bytes()
    assert np.frombuffer(written[128:132], "<u4")[0] == 15  # miCOMPRESSED
    assert zlib.decompress(written[136:]) == plain.getvalue()[128:]


def test_reference_csv_columns_labels_and_multilabel_rows(dataset):
    out_dir, table = dataset
    text = (out_dir / "REFERENCE.csv").read_text().splitlines()
    assert text[0] == "Recording,First_label,Second_label,Third_label"
    assert all(line.count(",") == 3 for line in text)
    written = pd.read_csv(out_dir / "REFERENCE.csv", dtype={"Recording": str})
    assert all(line.endswith(",,") for line, second in zip(text[1:], written.Second_label) if pd.isna(second))
    assert list(written.Recording) == [f"A{i:04d}" for i in range(1, 19)]
    labels = written[["First_label", "Second_label", "Third_label"]]
    present = labels.to_numpy(float).ravel()
    present = present[~np.isnan(present)]
    assert ((present >= 1) & (present <= 9) & (present % 1 == 0)).all()
    assert written.First_label.value_counts().to_dict() == {label: 2 for label in range(1, 10)}
    multi = written[written.Second_label.notna()]
    assert len(multi) == round(0.2 * 18)
    assert written.loc[written.Second_label.isna(), "Third_label"].isna().all()
    for row in multi.itertuples():
        row_labels = [int(v) for v in (row.First_label, row.Second_label, row.Third_label) if not pd.isna(v)]
        assert len(set(row_labels)) == len(row_labels) and NORMAL not in row_labels
        assert not {LBBB, RBBB} <= set(row_labels) and not {STD, STE} <= set(row_labels)
    pd.testing.assert_frame_equal(written.astype({column: "Int64" for column in labels}), table)


def test_lengths_stay_within_the_requested_bounds(dataset):
    out_dir, table = dataset
    lengths = [scipy.io.loadmat(out_dir / f"{name}.mat")["ECG"][0, 0]["data"].shape[1] for name in table.Recording]
    assert min(lengths) >= 6 * FS and max(lengths) <= 8 * FS and len(set(lengths)) > 1


def test_default_lengths_are_cpsc2018_like():
    lengths = synthetic._record_lengths(4000, 6.0, 60.0, np.random.default_rng(0)) / FS
    assert lengths.min() >= 6.0 and lengths.max() <= 60.0
    assert 11.0 <= np.median(lengths) <= 14.0
    assert 0.8 <= np.mean(lengths <= 20.0) <= 0.95 and (lengths > 40.0).any()


def test_limb_leads_follow_from_i_and_ii_to_the_quantization(dataset):
    out_dir, table = dataset
    half_quantum = 0.0005 + 1e-9
    for name in table.Recording:
        data = scipy.io.loadmat(out_dir / f"{name}.mat")["ECG"][0, 0]["data"]
        lead_i, lead_ii, lead_iii, avr, avl, avf = data[:6]
        assert np.abs(lead_iii - (lead_ii - lead_i)).max() <= half_quantum
        assert np.abs(avr + (lead_i + lead_ii) / 2).max() <= half_quantum
        assert np.abs(avl - (lead_i - lead_ii / 2)).max() <= half_quantum
        assert np.abs(avf - (lead_ii - lead_i / 2)).max() <= half_quantum
        assert np.abs(data * 1000 - np.rint(data * 1000)).max() < 1e-6  # multiples of 0.001 mV


def test_same_seed_same_dataset_other_seed_other_dataset(dataset, tmp_path):
    out_dir, table = dataset
    again = generate_dataset(tmp_path / "again", records_per_class=2, seed=3, min_seconds=6.0, max_seconds=8.0,
                             multilabel_fraction=0.2)
    other = generate_dataset(tmp_path / "other", records_per_class=2, seed=4, min_seconds=6.0, max_seconds=8.0,
                             multilabel_fraction=0.2)
    pd.testing.assert_frame_equal(again, table)
    assert not other.equals(table)
    for name in table.Recording[:3]:
        first = scipy.io.loadmat(out_dir / f"{name}.mat")["ECG"][0, 0]
        second = scipy.io.loadmat(tmp_path / "again" / f"{name}.mat")["ECG"][0, 0]
        np.testing.assert_array_equal(first["data"], second["data"])
        assert first["sex"][0] == second["sex"][0] and first["age"][0, 0] == second["age"][0, 0]
    np.testing.assert_array_equal(synthesize_record(AF, 1000, np.random.default_rng(5)),
                                  synthesize_record(AF, 1000, np.random.default_rng(5)))


def test_regenerating_replaces_its_own_files_and_refuses_foreign_ones(tmp_path):
    generate_dataset(tmp_path / "demo", records_per_class=2, seed=0, max_seconds=7.0)
    generate_dataset(tmp_path / "demo", records_per_class=1, seed=0, max_seconds=7.0)
    assert len(list((tmp_path / "demo").glob("*.mat"))) == 9
    foreign = tmp_path / "real"
    foreign.mkdir()
    (foreign / "A0001.mat").write_bytes(b"not ours")
    with pytest.raises(FileExistsError, match="not written by synthetic.py"):
        generate_dataset(foreign, records_per_class=1)
    assert (foreign / "A0001.mat").read_bytes() == b"not ours"


def test_preprocess_reads_the_files(dataset):
    out_dir, table = dataset
    signal, sex, age = read_original_record(out_dir / f"{table.Recording[0]}.mat")
    stored = scipy.io.loadmat(out_dir / f"{table.Recording[0]}.mat")["ECG"][0, 0]
    np.testing.assert_array_equal(signal, stored["data"])
    assert sex == stored["sex"][0] and age == stored["age"][0, 0]


@pytest.mark.parametrize("kwargs, message", [
    ({"records_per_class": 0}, "records_per_class"),
    ({"min_seconds": 10.0, "max_seconds": 8.0}, "min_seconds"),
    ({"min_seconds": 0.5}, "min_seconds"),
    ({"multilabel_fraction": 0.9}, "multilabel_fraction"),
])
def test_bad_settings_raise_value_error(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_dataset(tmp_path, **kwargs)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("label", [0, 10, 2.5, "AF", (NORMAL, AF), (LBBB, RBBB), (STD, STE), (AF, IAVB),
                                   (PAC, PAC), ()])
def test_unknown_or_incompatible_labels_raise_value_error(label):
    with pytest.raises(ValueError, match="label"):
        synthesize_record(label, 1000, np.random.default_rng(0))


def test_synthesize_record_shape_and_bad_length():
    assert synthesize_record(STE, 1234, np.random.default_rng(0)).shape == (12, 1234)
    for bad_length in (0, 100.0):
        with pytest.raises(ValueError, match="n_samples"):
            synthesize_record(STE, bad_length, np.random.default_rng(0))


def test_cli_prints_counts_and_size_and_says_synthetic(tmp_path, capsys):
    assert synthetic.main(["--out-dir", str(tmp_path / "d"), "--records-per-class", "1", "--max-seconds", "7"]) == 0
    out = capsys.readouterr().out
    assert "SYNTHETIC" in out and "not CPSC2018" in out and "MB" in out
    assert all(name in out for name in CLASSES) and re.search(r"total\s+9\b", out)


def test_cli_error_is_one_line_and_a_nonzero_exit(tmp_path, capsys):
    assert synthetic.main(["--out-dir", str(tmp_path), "--min-seconds", "9", "--max-seconds", "7"]) != 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and "min_seconds" in captured.err
    assert captured.err.count("\n") == 1


def test_cli_takes_no_abbreviated_flag(tmp_path, capsys):
    assert synthetic.main(["--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: unrecognized arguments: --out {tmp_path}\n"
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("flags", [["--records_per_class", "many"], ["--seed", "1.5"], ["--seed", "-1"],
                                   ["--records_per_class", "0"], ["--max-seconds"]])
def test_cli_bad_flag_value_is_one_error_line_and_status_2(tmp_path, capsys, flags):
    assert synthetic.main(["--out_dir", str(tmp_path / "d"), *flags]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1 and captured.err.startswith("error: ")
    assert not (tmp_path / "d").exists()


def test_cli_refuses_an_empty_out_dir_rather_than_write_into_the_current_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert synthetic.main(["--out_dir", "", "--records_per_class", "1", "--max_seconds", "7"]) == 2
    assert capsys.readouterr().err == "error: argument --out_dir/--out-dir: an empty path names no folder\n"
    assert not any(tmp_path.iterdir())


def test_cli_refuses_a_folder_of_other_ecg_files_with_status_2(tmp_path, capsys):
    (tmp_path / "A0001.mat").write_bytes(b"not ours")
    assert synthetic.main(["--out_dir", str(tmp_path), "--records_per_class", "1", "--max_seconds", "7"]) == 2
    assert capsys.readouterr().err.startswith("error: ") and (tmp_path / "A0001.mat").read_bytes() == b"not ours"


def test_cli_write_failure_while_running_is_status_1(tmp_path, capsys, monkeypatch):
    written = []

    def disk_full_after_two(path, *record):
        if len(written) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        written.append(path)

    monkeypatch.setattr(synthetic, "_save_record", disk_full_after_two)
    assert synthetic.main(["--out_dir", str(tmp_path / "d"), "--records_per_class", "1", "--max_seconds", "7"]) == 1
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: [Errno 28] No space left on device")


# ----------------------------------------------------------------------------- class features


def test_af_has_irregular_rr(measured):
    assert np.median(_values(measured, AF, "rr_cv")) > 0.12 > 0.05 > np.median(_values(measured, NORMAL, "rr_cv"))
    assert _auc_against_normal(measured, AF, "rr_cv", higher=True) >= 0.95


@pytest.mark.parametrize("label", [PAC, PVC])
def test_an_eight_second_window_holds_a_premature_beat(measured, label):
    assert np.mean(_values(measured, label, "prematurity") < 0.85) >= 0.95
    assert np.mean(_values(measured, NORMAL, "prematurity") > 0.85) >= 0.95


def test_pvc_coupling_is_shorter_and_its_pause_compensatory(measured):
    # PVC: coupling then full compensatory pause (short/long ~ c / (2 - c)); PAC resets the sinus node
    assert np.median(_values(measured, PVC, "prematurity")) < np.median(_values(measured, PAC, "prematurity"))


@pytest.mark.parametrize("label", [LBBB, RBBB])
def test_bundle_branch_blocks_widen_the_qrs(measured, label):
    assert 0.05 <= np.median(_values(measured, NORMAL, "qrs_width")) <= 0.11
    assert np.mean(_values(measured, label, "qrs_width") >= 0.12) >= 0.9
    assert _auc_against_normal(measured, label, "qrs_width", higher=True) >= 0.95


def test_first_degree_av_block_has_a_long_pr(measured):
    block, normal = _values(measured, IAVB, "p_to_qrs"), _values(measured, NORMAL, "p_to_qrs")
    assert np.nanmedian(block) > 0.22 and np.nanmedian(normal) < 0.18  # P peak to QRS onset, s
    assert np.nanpercentile(block, 10) > np.nanpercentile(normal, 90)


def test_st_is_depressed_in_std_and_elevated_in_ste(measured):
    assert abs(np.median(_values(measured, NORMAL, "st_min"))) < 0.06
    assert abs(np.median(_values(measured, NORMAL, "st_max"))) < 0.06
    assert np.median(_values(measured, STD, "st_min")) <= -0.1
    assert np.median(_values(measured, STE, "st_max")) >= 0.1
    assert _auc_against_normal(measured, STD, "st_min", higher=False) >= 0.95
    assert _auc_against_normal(measured, STE, "st_max", higher=True) >= 0.95


def test_a_simple_classifier_separates_the_nine_classes(measured):
    hand = measured[["rr_cv", "prematurity", "qrs_width", "p_to_qrs", "st_min", "st_max"]].to_numpy(float)
    features = np.nan_to_num(np.hstack([hand, np.stack(measured["beat"].to_numpy())]))
    labels = measured.label.to_numpy()
    train = np.arange(len(labels)) % 2 == 0  # alternate records: both halves hold every class
    forest = RandomForestClassifier(n_estimators=200, random_state=0).fit(features[train], labels[train])
    assert balanced_accuracy_score(labels[~train], forest.predict(features[~train])) >= 0.75  # chance: 0.11


def test_multi_label_records_carry_both_features():
    rng = np.random.default_rng(7)
    both = pd.DataFrame([measure(synthesize_record((AF, RBBB), WINDOW_SAMPLES, rng)) for _ in range(8)])
    assert np.median(both.rr_cv) > 0.12 and np.median(both.qrs_width) >= 0.12


def test_the_toolkit_finds_the_same_differences_in_real_cpsc2018(sample_dir):
    reference = pd.read_csv(sample_dir / "REFERENCE.csv")
    single = reference[reference.Second_label.isna()]
    rows = [{"label": row.First_label,
             **measure(scipy.io.loadmat(sample_dir / f"{row.Recording}.mat")["val"][:, :5000] / 1000)}  # 10 s, mV
            for row in single.itertuples()]
    real = pd.DataFrame(rows)
    median = real.groupby("label")[["rr_cv", "prematurity", "qrs_width", "p_to_qrs", "st_max"]].median()
    assert median.rr_cv[AF] > 2 * median.rr_cv[NORMAL]
    assert median.prematurity[PAC] < 0.85 and median.prematurity[PVC] < 0.85 < median.prematurity[NORMAL]
    assert median.qrs_width[LBBB] > median.qrs_width[NORMAL] + 0.03
    assert median.qrs_width[RBBB] > median.qrs_width[NORMAL] + 0.015
    assert median.p_to_qrs[IAVB] > median.p_to_qrs[NORMAL] + 0.03
    assert median.st_max[STE] > median.st_max[NORMAL] + 0.1
