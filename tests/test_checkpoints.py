"""plumbing/checkpoints.py: a checkpoint write that fails leaves the previous one, and the
fingerprint of the data a run trains on."""
import errno
import shutil

import pandas as pd
import pytest
import torch

from helpers import file_size_limit
from plumbing.checkpoints import data_fingerprint, save_atomic
from preprocess import load_cache


def test_a_full_disk_while_saving_names_the_checkpoint_and_keeps_the_previous_one(tmp_path):
    checkpoint = tmp_path / "last.pt"
    save_atomic({"epoch": 1, "model": torch.zeros(10)}, checkpoint)
    previous = checkpoint.read_bytes()
    with file_size_limit(len(previous) + 1000), pytest.raises(OSError, match=str(checkpoint)) as error:
        save_atomic({"epoch": 2, "model": torch.zeros(100_000)}, checkpoint)
    assert error.value.errno == errno.EFBIG
    assert checkpoint.read_bytes() == previous and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_the_data_fingerprint_tells_a_changed_cache_from_the_same_one(tiny_cache, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(tiny_cache, copy)
    original = data_fingerprint(load_cache(tiny_cache))
    assert data_fingerprint(load_cache(copy)) == original  # where it lies does not matter
    train = pd.read_csv(copy / "train.csv", dtype=str)
    train.iloc[:-1].to_csv(copy / "train.csv", index=False)  # a record leaves the training split
    changed = data_fingerprint(load_cache(copy))
    assert changed["splits_sha256"] != original["splits_sha256"]
    assert {key: changed[key] for key in ("records", "samples", "records_sha256")} == {
        key: original[key] for key in ("records", "samples", "records_sha256")}
