"""Fixtures shared by the test modules."""

from pathlib import Path

import pytest

CPSC2018_SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cpsc2018"


@pytest.fixture(scope="session")
def cpsc2018_dir() -> Path:
    """The real CPSC2018 test data (REFERENCE.csv, wfdb_sample/); skips the test when absent."""
    if not (CPSC2018_SHARED / "REFERENCE.csv").is_file() or not (CPSC2018_SHARED / "wfdb_sample").is_dir():
        pytest.skip(f"real CPSC2018 sample not found at {CPSC2018_SHARED}")
    return CPSC2018_SHARED


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """A preprocessed synthetic dataset in CPSC2018's original format: 6 records per class,
    6-20 s, 1 per class for validation and 2 for test (the rest trains)."""
    from preprocess import preprocess
    from synthetic import generate_dataset

    root = tmp_path_factory.mktemp("tiny_cpsc")
    generate_dataset(root / "train", records_per_class=6, seed=0, min_seconds=6, max_seconds=20)
    preprocess(root / "train", root / "processed", val_per_class=1, test_per_class=2)
    return root / "processed"
