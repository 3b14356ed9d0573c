"""ECG_Dataset.py: scaling, placement and padding of records, the class-balanced sampler, the
loaders, and length-bucketed batching (variable-length mode: BucketBatchSampler, crop_collate,
bucket=True)."""
import numpy as np
import pandas as pd
import pytest
import torch

from databases.cpsc2018 import FS, LEADS
from ECG_CNN import build_model
from ECG_Dataset import (PADDED_LENGTH, RANDOM_PAD, BucketBatchSampler, ClassBalancedSampler,
                         ECGDataset, batch_records, crop_collate, get_dataloaders, scale_leads, set_loader_epoch)
from preprocess import Cache, load_cache


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
    loader = get_dataloaders(str(tiny_cache), batch_size=4, max_length=2048, random_pad=1024,
                             splits=("train",), bucket=bucket)["train"]
    fetched = []
    get_item = ECGDataset.__getitem__
    monkeypatch.setattr(ECGDataset, "__getitem__", lambda self, i: fetched.append(i) or get_item(self, i))
    for start_batch in (0, 2):  # from the epoch's start, and resumed at its third batch
        set_loader_epoch(loader, 1, start=start_batch * 4)
        for batch, (x, y, mask) in enumerate(loader, start=start_batch):
            assert batch_records(loader, batch) == [loader.dataset.names[i] for i in fetched[-len(y):]]


# --- length-bucketed batching (variable-length mode) -----------------------------------------

# CPSC2018's single-label records per class (REFERENCE.csv), divided by 10: unequal classes
# as in the real epoch.
CLASS_SIZES = (92, 98, 69, 18, 153, 53, 61, 78, 18)


def cpsc_like_lengths(count: int, rng: np.random.RandomState) -> np.ndarray:
    """Record lengths like CPSC2018's: 6-60 s at 500 Hz, median 12 s, mean ~16 s, cut at 30720."""
    seconds = np.clip(rng.lognormal(np.log(12.0), 0.75, count), 6.0, 60.0)
    return np.minimum((seconds * FS).astype(np.int64), 30720)


def cpsc_like_epoch(batch_size: int = 64) -> tuple[ClassBalancedSampler, BucketBatchSampler, np.ndarray]:
    rng = np.random.RandomState(0)
    labels = np.repeat(np.arange(9), CLASS_SIZES)
    lengths = cpsc_like_lengths(len(labels), rng)
    sampler = ClassBalancedSampler(labels, seed=7)
    return sampler, BucketBatchSampler(sampler, lengths, batch_size, seed=7), lengths


def masked_items(lengths: np.ndarray, shifts: np.ndarray, padded: int = PADDED_LENGTH) -> list:
    """ECGDataset-like items (x, y, mask) placed as ECGDataset places them; x is the mask itself
    (one lead; views of one tensor: this machine pays dearly for many fresh allocations)."""
    position = torch.arange(padded)
    stops = torch.as_tensor(padded - shifts)[:, None]
    masks = ((position >= stops - torch.as_tensor(lengths)[:, None]) & (position < stops)).float()
    return [(masks[i:i + 1], torch.tensor(0), masks[i:i + 1]) for i in range(len(masks))]


def test_an_epoch_keeps_the_class_balanced_multiset_and_the_batch_count():
    sampler, bucketed, _ = cpsc_like_epoch()
    bucketed.set_epoch(3)
    batches = list(bucketed)
    epoch = list(sampler)  # set_epoch(3) was passed on to the class-balanced sampler
    assert len(epoch) == 9 * max(CLASS_SIZES)
    assert sorted(i for batch in batches for i in batch) == sorted(epoch)
    assert len(batches) == len(bucketed) == -(-len(epoch) // 64)
    assert sorted(len(batch) for batch in batches)[1:] == [64] * (len(batches) - 1)


def test_epochs_replay_exactly_and_differ_from_each_other():
    _, bucketed, _ = cpsc_like_epoch()
    bucketed.set_epoch(1)
    first = list(bucketed)
    bucketed.set_epoch(2)
    second = list(bucketed)
    bucketed.set_epoch(1)
    assert list(bucketed) == first
    assert second != first


def test_resume_continues_with_the_remaining_batches_of_the_epoch():
    _, bucketed, _ = cpsc_like_epoch()
    bucketed.set_epoch(4)
    batches = list(bucketed)
    bucketed.set_epoch(4, start=5 * 64)  # as the harness: batches done x batch size
    assert list(bucketed) == batches[5:]
    assert len(bucketed) == len(batches) - 5
    with pytest.raises(ValueError, match="multiple of the batch size 64"):
        bucketed.set_epoch(4, start=100)


def batch_width(extents: np.ndarray) -> int:
    """crop_collate's rule: the longest extent rounded up to a multiple of 1024, at least 3072."""
    return max(3072, -(-int(np.max(extents)) // 1024) * 1024)


def test_batches_are_length_homogeneous_and_cropping_never_cuts_signal():
    """On CPSC-like lengths with the paper's random shifts (0..3071), bucketed batches carry far
    less padding than the paper's fixed T = 33792 or than its batches cropped to their longest
    record (with 64 random records that is nearly always ~30000 samples). What is left is
    mostly the shift (up to 3071 samples) and the rounding to 1024."""
    sampler, bucketed, lengths = cpsc_like_epoch()
    bucketed.set_epoch(0)
    batches, epoch = list(bucketed), np.fromiter(sampler, np.int64)
    shifts = np.random.RandomState(3).randint(0, RANDOM_PAD, len(lengths))  # one draw per record
    extents = lengths + shifts
    widths = [batch_width(extents[batch]) for batch in batches]
    # crop_collate itself on the narrowest and the widest batch (fresh memory is slow on the
    # shared test machine, so not on all of them)
    for batch in (batches[int(np.argmin(widths))], batches[int(np.argmax(widths))]):
        _, _, mask = crop_collate(masked_items(lengths[batch], shifts[batch]))
        assert mask.shape[-1] == batch_width(extents[batch])
        assert mask.sum(dim=(1, 2)).tolist() == lengths[batch].tolist()  # no signal sample cut
    signal = lengths[epoch].sum()
    bucketed_area = sum(width * len(batch) for width, batch in zip(widths, batches))
    random_area = sum(batch_width(extents[epoch[i:i + 64]]) * len(epoch[i:i + 64])
                      for i in range(0, len(epoch), 64))  # the paper's batches, cropped
    fixed_padding = 1 - signal / (PADDED_LENGTH * len(epoch))
    random_padding, bucketed_padding = 1 - signal / random_area, 1 - signal / bucketed_area
    assert fixed_padding > 0.7 and random_padding > 0.7
    assert bucketed_padding < 0.4 and bucketed_area < 0.4 * PADDED_LENGTH * len(epoch)


def test_crop_collate_keeps_every_signal_sample_of_real_items(tiny_cache):
    cache = load_cache(tiny_cache)
    torch.manual_seed(0)
    dataset = ECGDataset(cache, cache.splits["train"], max_length=6144, padded_length=8192,
                         random_pad=2048)
    items = [dataset[i] for i in range(8)]
    x, y, mask = crop_collate(items)
    full_x, full_y, full_mask = torch.utils.data.default_collate(items)
    width = x.shape[-1]
    assert width % 1024 == 0 and 3072 <= width <= 8192
    assert torch.equal(mask.sum(dim=(1, 2)), full_mask.sum(dim=(1, 2)))
    assert torch.equal(x, full_x[..., -width:]) and torch.equal(y, full_y)
    extent = int((8192 - full_mask[:, 0].argmax(dim=1)).max())  # the furthest first signal sample
    assert width == max(3072, -(-extent // 1024) * 1024)  # the shortest array that fits
    short = crop_collate([(torch.ones(8, 8192) * m, torch.tensor(0), m)
                          for m in [torch.cat([torch.zeros(1, 7192), torch.ones(1, 1000)], dim=1)]])
    assert short[0].shape == (1, 8, 3072) and short[2].sum() == 1000


def test_get_dataloaders_bucket_option(tiny_cache):
    settings = dict(batch_size=4, eval_batch_size=4, max_length=6144, random_pad=2048, seed=0)
    plain = get_dataloaders(str(tiny_cache), **settings)
    bucketed = get_dataloaders(str(tiny_cache), **settings, bucket=True)
    assert isinstance(plain["train"].sampler, ClassBalancedSampler)  # default: the paper's loaders
    for loaders in (plain, bucketed):
        set_loader_epoch(loaders["train"], 2)
    batch_sampler = bucketed["train"].batch_sampler
    assert sorted(sum(batch_sampler, [])) == sorted(plain["train"].sampler)
    widths = {x.shape[-1] for x, _, _ in bucketed["train"]}
    assert all(w % 1024 == 0 and 3072 <= w <= 8192 for w in widths) and len(widths) > 1
    set_loader_epoch(bucketed["train"], 2, start=4)
    assert len(bucketed["train"]) == len(plain["train"]) - 1
    eval_order = sum(bucketed["val"].batch_sampler, [])
    lengths = bucketed["val"].dataset.lengths
    assert sorted(eval_order) == list(range(len(lengths))) and list(lengths[eval_order]) == sorted(lengths)
    with pytest.raises(ValueError, match="multiple of 1024"):
        get_dataloaders(str(tiny_cache), max_length=6000, random_pad=2048, bucket=True)


def test_bucketed_evaluation_gives_resnet18a_vl_the_same_logits(tiny_cache):
    """Cropping keeps each signal's offset modulo 1024, so the variable-length model cannot tell."""
    torch.manual_seed(0)
    model = build_model("resnet18a_vl").eval()
    settings = dict(max_length=6144, random_pad=2048, splits=("val",), eval_batch_size=3)
    plain = get_dataloaders(str(tiny_cache), **settings)["val"]
    bucketed = get_dataloaders(str(tiny_cache), **settings, bucket=True)["val"]
    with torch.no_grad():
        expected = torch.cat([model(x, mask) for x, _, mask in plain])
        logits = torch.cat([model(x, mask) for x, _, mask in bucketed])
        widths = [x.shape[-1] for x, _, _ in bucketed]
    assert max(widths) < 8192  # the crop really happened
    order = sum(bucketed.batch_sampler, [])
    torch.testing.assert_close(logits, expected[order], rtol=1e-5, atol=1e-5)


def test_bucketed_training_shift_is_the_papers_modulo_1024_and_the_same_for_resnet18a_vl(
        tiny_cache):
    """The same draws place each record 0..2047 samples from the right end without the modulo
    and 0..1023 with it; resnet18a_vl gives the same logits on the cropped modulo batch."""
    cache = load_cache(tiny_cache)
    settings = dict(max_length=6144, padded_length=8192, random_pad=2048)
    paper = ECGDataset(cache, cache.splits["train"], **settings)
    modulo = ECGDataset(cache, cache.splits["train"], **settings, shift_modulo=1024)
    with pytest.raises(ValueError, match="shift_modulo"):
        ECGDataset(cache, cache.splits["train"], **settings, shift_modulo=0)
    torch.manual_seed(5)
    paper_items = [paper[i % len(paper)] for i in range(12)]
    torch.manual_seed(5)
    modulo_items = [modulo[i % len(modulo)] for i in range(12)]

    def shifts(items):
        return np.array([8192 - int(mask[0].nonzero().max()) - 1 for _, _, mask in items])

    assert shifts(paper_items).max() >= 1024  # the draws do reach past 1024
    assert shifts(modulo_items).tolist() == (shifts(paper_items) % 1024).tolist()
    torch.manual_seed(0)
    model = build_model("resnet18a_vl").eval()
    x, _, mask = crop_collate(modulo_items)
    assert x.shape[-1] < 8192
    with torch.no_grad():
        expected = model(*(torch.stack(parts) for parts in zip(*[(x, m) for x, _, m in paper_items])))
        torch.testing.assert_close(model(x, mask), expected, rtol=1e-5, atol=1e-5)


def test_get_dataloaders_bucket_takes_the_training_shift_modulo_1024(tiny_cache):
    settings = dict(batch_size=4, max_length=6144, random_pad=2048, splits=("train",))
    assert get_dataloaders(str(tiny_cache), **settings)["train"].dataset.shift_modulo is None
    bucketed = get_dataloaders(str(tiny_cache), **settings, bucket=True)["train"]
    assert bucketed.dataset.shift_modulo == 1024
    set_loader_epoch(bucketed, 0)
    torch.manual_seed(1)
    for _, _, mask in bucketed:
        last = mask.shape[-1] - 1 - mask[:, 0].flip(1).argmax(dim=1)
        assert (mask.shape[-1] - 1 - last < 1024).all()
