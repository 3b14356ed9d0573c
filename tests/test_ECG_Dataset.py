import numpy as np
import pandas as pd
import pytest
import torch

from ECG_Dataset import LEADS, ClassBalancedSampler, ECGDataset, get_dataloaders, scale_leads
from preprocess import Cache


def make_cache(lengths, labels, seed=0, zero_lead=None) -> Cache:
    """A cache of random 12-lead records with known content (what preprocess.py writes)."""
    rng = np.random.default_rng(seed)
    names = [f"A{i + 1:04d}" for i in range(len(lengths))]
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    signals = rng.normal(0, 0.5, (12, int(sum(lengths)))).astype(np.float32)
    if zero_lead is not None:
        signals[zero_lead, offsets[0]:offsets[0] + lengths[0]] = 0
    records = pd.DataFrame({"Recording": names, "First_label": labels, "Second_label": pd.NA,
                            "Third_label": pd.NA, "offset": offsets, "length": lengths}).set_index(
        "Recording", drop=False)
    table = records[["Recording", "First_label", "Second_label", "Third_label"]].reset_index(drop=True)
    return Cache(signals=signals, records=records, splits={"train": table}, meta={})


def expected_scaled(cache, index, max_length):
    raw = cache.signals[list(LEADS), cache.records["offset"].iloc[index]:][:, :min(
        cache.records["length"].iloc[index], max_length)].astype(np.float64)
    return raw / np.abs(raw).max(axis=1, keepdims=True)


def test_scale_leads_gives_unit_peak_and_keeps_zero_leads():
    signal = np.array([[0.5, -2.0, 1.0], [0.0, 0.0, 0.0], [3.0, 1.5, -0.75]])
    scaled = scale_leads(signal)
    np.testing.assert_allclose(scaled[0], [0.25, -1.0, 0.5])
    np.testing.assert_array_equal(scaled[1], [0.0, 0.0, 0.0])
    np.testing.assert_allclose(np.abs(scaled[[0, 2]]).max(axis=1), 1.0)


def test_evaluation_item_is_right_aligned_scaled_and_masked():
    cache = make_cache([3000, 5000], [1, 2])
    dataset = ECGDataset(cache, cache.splits["train"], max_length=4096, padded_length=6144)
    for index, length in [(0, 3000), (1, 4096)]:  # the second record is truncated to 4096
        x, y, mask = dataset[index]
        assert x.shape == (8, 6144) and mask.shape == (1, 6144) and x.dtype == torch.float32
        assert y.item() == index  # First_label 1, 2 -> classes 0, 1
        assert torch.all(mask[0, -length:] == 1) and torch.all(mask[0, :-length] == 0)
        assert torch.all(x[:, :-length] == 0)
        np.testing.assert_allclose(x[:, -length:].numpy(), expected_scaled(cache, index, 4096), rtol=1e-6)
        assert torch.all(x.abs() <= 1)


def test_truncation_keeps_the_first_max_length_samples():
    cache = make_cache([6000], [1])
    x, _, _ = ECGDataset(cache, cache.splits["train"], max_length=3072, padded_length=4096)[0]
    raw = cache.signals[list(LEADS), :3072].astype(np.float64)
    np.testing.assert_allclose(x[:, -3072:].numpy(), raw / np.abs(raw).max(axis=1, keepdims=True), rtol=1e-6)


def test_all_zero_lead_stays_zero():
    cache = make_cache([3000], [1], zero_lead=7)  # lead 7 = V2, the 4th kept lead
    x, _, _ = ECGDataset(cache, cache.splits["train"], max_length=4096, padded_length=5120)[0]
    assert torch.all(x[3] == 0) and torch.isfinite(x).all()
    assert torch.all(x[[0, 1, 2, 4, 5, 6, 7]].abs().amax(dim=1) == 1)


def test_random_pad_shifts_left_by_0_to_pad_minus_1():
    torch.manual_seed(0)
    cache = make_cache([2000], [1])
    dataset = ECGDataset(cache, cache.splits["train"], max_length=3072, padded_length=6144, random_pad=3072)
    starts = []
    for _ in range(400):
        x, _, mask = dataset[0]
        start = int(torch.nonzero(mask[0])[0])
        assert mask[0].sum() == 2000
        np.testing.assert_allclose(x[:, start:start + 2000].numpy(), expected_scaled(cache, 0, 3072), rtol=1e-6)
        starts.append(start)
    shifts = 6144 - 2000 - np.array(starts)
    assert shifts.min() >= 0 and shifts.max() <= 3071
    # uniform over 0..3071: 400 draws cover both ends of the range and the middle
    assert shifts.min() < 100 and shifts.max() > 2970 and 1200 < np.median(shifts) < 1900


def test_padded_length_too_short_is_rejected():
    cache = make_cache([3000], [1])
    with pytest.raises(ValueError, match="padded_length"):
        ECGDataset(cache, cache.splits["train"], max_length=4096, padded_length=5120, random_pad=3072)


def test_sampler_epoch_is_balanced_interleaved_and_reshuffled():
    labels = np.array([0] * 7 + [1] * 3 + [2] * 1 + [3] * 5)
    sampler = ClassBalancedSampler(labels, seed=0)
    assert len(sampler) == 4 * 7
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        indices = np.array(list(sampler))
        assert len(indices) == 28
        classes = labels[indices]
        assert np.bincount(classes).tolist() == [7, 7, 7, 7]
        for block in classes.reshape(7, 4):  # one sample of each class in turn
            assert sorted(block) == [0, 1, 2, 3]
        assert all(block.tolist() == classes[:4].tolist() for block in classes.reshape(7, 4))
        # small classes are cycled: every member of a class appears, as evenly as possible
        for c in range(4):
            counts = np.bincount(indices[classes == c], minlength=len(labels))[labels == c]
            assert counts.max() - counts.min() <= 1 and counts.min() >= 1
        epochs.append(indices)
    assert not np.array_equal(epochs[0], epochs[1])
    sampler.set_epoch(1)
    np.testing.assert_array_equal(list(sampler), epochs[1])  # replayable


def test_sampler_epoch_length_on_the_reference_train_counts():
    counts = [863, 921, 631, 124, 1478, 477, 552, 729, 130]
    labels = np.repeat(np.arange(9), counts)
    sampler = ClassBalancedSampler(labels, seed=0)
    indices = np.array(list(sampler))
    assert len(sampler) == len(indices) == 13302
    assert np.bincount(labels[indices]).tolist() == [1478] * 9


def test_sampler_start_skips_the_first_samples():
    labels = np.arange(20) % 4
    sampler = ClassBalancedSampler(labels, seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, start=8)
    assert list(sampler) == full[8:] and len(sampler) == len(full) - 8


@pytest.mark.parametrize("replicas", [2, 3])
def test_distributed_shards_union_is_the_single_process_epoch(replicas):
    labels = np.array([0] * 5 + [1] * 2 + [2] * 4)
    single = ClassBalancedSampler(labels, seed=1)
    single.set_epoch(4)
    shards = []
    for rank in range(replicas):
        shard = ClassBalancedSampler(labels, seed=1, num_replicas=replicas, rank=rank)
        shard.set_epoch(4)
        shards.append(list(shard))
        assert len(shards[-1]) == len(shard)
    assert len({len(s) for s in shards}) == 1
    union = [i for group in zip(*shards) for i in group]
    full = list(single)
    assert union[:len(full)] == full  # interleaving the shards rebuilds the epoch
    assert union[len(full):] == full[:len(union) - len(full)]  # wrap-around padding only


def test_get_dataloaders_on_a_preprocessed_cache(tiny_cache):
    loaders = get_dataloaders(str(tiny_cache), batch_size=4, eval_batch_size=5, max_length=2048,
                              random_pad=1024)
    x, y, mask = next(iter(loaders["train"]))
    assert x.shape == (4, 8, 3072) and y.shape == (4,) and mask.shape == (4, 1, 3072)
    assert y.dtype == torch.int64 and mask.dtype == torch.float32
    assert len(loaders["val"].dataset) == 9 and len(loaders["test"].dataset) == 18
    x, y, mask = next(iter(loaders["test"]))
    assert torch.all(mask[:, :, -2048:] == 1)  # every synthetic record is >= 6 s > 2048 samples


@pytest.mark.parametrize("bucket", [False, True], ids=["fixed length", "bucketed"])
def test_batch_records_names_the_records_of_each_training_batch(tiny_cache, monkeypatch, bucket):
    from ECG_Dataset import batch_records, set_loader_epoch

    loader = get_dataloaders(str(tiny_cache), batch_size=4, max_length=2048, random_pad=1024,
                             splits=("train",), bucket=bucket)["train"]
    fetched = []
    get_item = ECGDataset.__getitem__
    monkeypatch.setattr(ECGDataset, "__getitem__", lambda self, i: fetched.append(i) or get_item(self, i))
    for start_batch in (0, 2):  # from the epoch's start, and resumed at its third batch
        set_loader_epoch(loader, 1, start=start_batch * 4)
        for batch, (x, y, mask) in enumerate(loader, start=start_batch):
            assert batch_records(loader, batch) == [loader.dataset.names[i] for i in fetched[-len(y):]]
