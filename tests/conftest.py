"""Fixtures shared by the test modules."""

from pathlib import Path

import pytest

from preprocess import OFFICIAL_REFERENCE

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "data" / "sample"


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The 18 real CPSC2018 records in the repository (WFDB form, 2 per class, REFERENCE.csv)."""
    assert (SAMPLE_DIR / "REFERENCE.csv").is_file(), f"{SAMPLE_DIR} is part of the repository"
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def official_reference() -> Path:
    """The official CPSC2018 REFERENCE.csv of all 6877 records."""
    assert OFFICIAL_REFERENCE.is_file(), f"{OFFICIAL_REFERENCE} is part of the repository"
    return OFFICIAL_REFERENCE


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
