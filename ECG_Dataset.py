"""Dataset, class-balanced sampler and data loaders (PROTOCOL section 3).

A record becomes one sample: its 8 independent leads (I, II, V1..V6), truncated to
``max_length`` samples, each lead scaled by its own maximum absolute value, zero-padded
to ``padded_length`` with a mask that is 1 on the signal. Evaluation right-aligns the
signal; training with ``random_pad`` shifts it left by a uniform 0..random_pad-1 samples.
Scaling is done once, when the dataset is built, not per access.

The variable-length mode (``get_dataloaders(..., bucket=True)``, for resnet18a_vl) takes
that shift modulo 1024: resnet18a_vl gives the same logits for shifts that differ by a
multiple of 1024. The augmentation is the same, while each record reaches less far into the
padding (with the paper's random_pad of 3072, a mean shift of 511.5 samples instead of
1535.5) and batches cropped to their longest record are narrower.
"""
from __future__ import annotations

import signal
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, SequentialSampler, default_collate

from databases.cpsc2018 import LEADS
from ECG_CNN import DOWNSAMPLE, MIN_LENGTH
from preprocess import Cache, load_cache

MAX_LENGTH = 30720
RANDOM_PAD = 3072
PADDED_LENGTH = MAX_LENGTH + RANDOM_PAD  # 33792


def scale_leads(signal: np.ndarray) -> np.ndarray:
    """Divide each lead (row) by its maximum absolute value; an all-zero lead stays zero."""
    peak = np.abs(signal).max(axis=1, keepdims=True)
    return signal / np.where(peak > 0, peak, 1)


class ECGDataset(Dataset):
    """The records of one split as padded, masked, scaled tensors.

    Items are ``(x, y, mask)``: x float32 (len(leads), padded_length), y int64 class index
    0..8 (First_label - 1), mask float32 (1, padded_length). With ``shift_modulo`` the
    random shift (drawn as without it) is reduced modulo that many samples.
    """

    def __init__(self, cache: Cache, split: pd.DataFrame, max_length: int = MAX_LENGTH,
                 padded_length: int = PADDED_LENGTH, random_pad: int = 0,
                 leads: Sequence[int] = LEADS, shift_modulo: int | None = None):
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        if random_pad < 0:
            raise ValueError(f"random_pad must be >= 0, got {random_pad}")
        if shift_modulo is not None and shift_modulo < 1:
            raise ValueError(f"shift_modulo must be >= 1 or None, got {shift_modulo}")
        if padded_length < max_length + random_pad:
            raise ValueError(f"padded_length {padded_length} is shorter than max_length "
                             f"{max_length} + random_pad {random_pad}")
        self.padded_length = padded_length
        self.random_pad = random_pad
        self.shift_modulo = shift_modulo
        self.names = list(split["Recording"])
        self.labels = split["First_label"].to_numpy(dtype=np.int64) - 1
        rows = cache.records.loc[self.names]
        self.lengths = np.minimum(rows["length"].to_numpy(dtype=np.int64), max_length)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
        # One contiguous float32 block for the split: cheap to share with worker processes.
        self.signals = np.empty((len(leads), int(self.lengths.sum())), dtype=np.float32)
        lead_index = np.asarray(leads)
        for start, source, length in zip(self.offsets, rows["offset"].to_numpy(), self.lengths):
            raw = np.asarray(cache.signals[lead_index, source:source + length], dtype=np.float64)
            self.signals[:, start:start + length] = scale_leads(raw)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        length, offset = int(self.lengths[index]), int(self.offsets[index])
        shift = int(torch.randint(self.random_pad, ())) if self.random_pad else 0
        if self.shift_modulo:
            shift %= self.shift_modulo
        start = self.padded_length - length - shift
        x = torch.zeros(self.signals.shape[0], self.padded_length)
        x[:, start:start + length] = torch.from_numpy(self.signals[:, offset:offset + length])
        mask = torch.zeros(1, self.padded_length)
        mask[:, start:start + length] = 1.0
        return x, torch.tensor(self.labels[index]), mask


class ClassBalancedSampler(Sampler[int]):
    """Each epoch visits every class ``largest class size`` times, interleaving the classes.

    Smaller classes are cycled (repeated). The class order and the order inside each class
    are drawn from a RNG seeded with (seed, epoch), so an epoch can be replayed exactly
    (resume) and every rank of a distributed run sees the same sequence. With
    ``num_replicas > 1`` each rank takes every num_replicas-th element of that sequence,
    the sequence wrapped around so that all ranks get the same number of samples.
    """

    def __init__(self, labels: Sequence[int], seed: int = 0, num_replicas: int = 1, rank: int = 0):
        labels = np.asarray(labels)
        self.classes = np.unique(labels)
        self.members = [np.flatnonzero(labels == c) for c in self.classes]
        self.per_class = max(len(m) for m in self.members)
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's sequence; ``start`` skips this rank's first samples (resume)."""
        self.epoch = epoch
        self.start = start

    def epoch_indices(self) -> np.ndarray:
        """The whole epoch's sequence (all ranks together)."""
        rng = np.random.RandomState([self.seed, self.epoch])
        order = rng.permutation(len(self.classes))
        table = np.stack([np.resize(rng.permutation(self.members[c]), self.per_class) for c in order])
        return table.T.reshape(-1)  # one sample of each class in turn

    def rank_indices(self) -> np.ndarray:
        """This rank's share of the whole epoch, none skipped."""
        indices = self.epoch_indices()
        per_rank = -(-len(indices) // self.num_replicas)
        indices = np.resize(indices, per_rank * self.num_replicas)
        return indices[self.rank::self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.rank_indices()[self.start:].tolist())

    def __len__(self) -> int:
        return max(0, -(-len(self.classes) * self.per_class // self.num_replicas) - self.start)


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of records of similar length, for the variable-length mode (``resnet18a_vl``).

    The sampler's epoch sequence is cut into chunks of ``chunk_batches`` batches (one chunk
    when None); each chunk is sorted by record length and cut into batches, so the epoch keeps
    the sampler's multiset of samples and number of batches (a ClassBalancedSampler's class
    balance then holds per chunk, not per batch). With ``shuffle`` the batch order is drawn
    from a RNG seeded with (seed, epoch), a stream apart from ClassBalancedSampler's; without
    it batches come in length order. Pair it with ``crop_collate``.
    """

    def __init__(self, sampler: Sampler[int], lengths: Sequence[int], batch_size: int,
                 chunk_batches: int | None = 50, shuffle: bool = True, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if chunk_batches is not None and chunk_batches < 1:
            raise ValueError(f"chunk_batches must be >= 1 or None, got {chunk_batches}")
        self.sampler = sampler
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.chunk_batches = chunk_batches
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch (passed on to the sampler) and skip its first start // batch_size batches.

        ``start`` counts samples, as for ClassBalancedSampler.set_epoch (the harness passes
        batches done x batch_size). The sampler still gives the whole epoch: batches are formed
        before skipping, so a resumed epoch goes on with the batches it would have had.
        """
        if start < 0 or start % self.batch_size:
            raise ValueError(f"start must be a non-negative multiple of the batch size "
                             f"{self.batch_size}, got {start}")
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        self.epoch, self.skip = epoch, start // self.batch_size

    def epoch_batches(self) -> list[np.ndarray]:
        """All of the epoch's batches (arrays of dataset indices), none skipped."""
        indices = np.fromiter(iter(self.sampler), dtype=np.int64)
        chunk = len(indices) if self.chunk_batches is None else self.chunk_batches * self.batch_size
        batches: list[np.ndarray] = []
        for begin in range(0, len(indices), max(chunk, 1)):  # a handful of chunks per epoch
            part = indices[begin:begin + chunk]
            part = part[np.argsort(self.lengths[part], kind="stable")]
            batches += np.split(part, range(self.batch_size, len(part), self.batch_size))
        if self.shuffle:
            order = np.random.RandomState([self.seed, self.epoch, 1]).permutation(len(batches))
            batches = [batches[i] for i in order]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter([batch.tolist() for batch in self.epoch_batches()[self.skip:]])

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size) - self.skip


def crop_collate(batch: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Collate ECGDataset items, then crop the batch from the left to its longest record.

    A record reaches its length plus its random shift from the right end (signals are
    right-aligned); the batch keeps the last samples up to the longest such extent, rounded up
    to a multiple of 1024 and at least 3072 (the CNN's input rule), so no signal sample is cut.
    With a padded length that is a multiple of 1024, every signal keeps its offset modulo 1024,
    so resnet18a_vl gives the same logits as on the uncropped batch.
    """
    x, y, mask = default_collate(batch)
    padded = mask.shape[-1]
    first_signal = mask[:, 0].argmax(dim=1)  # the first maximum: each record's first signal sample
    extent = padded - int(first_signal.min())
    length = min(padded, max(MIN_LENGTH, -(-extent // DOWNSAMPLE) * DOWNSAMPLE))
    return x[..., -length:].contiguous(), y, mask[..., -length:].contiguous()


def set_loader_epoch(loader: DataLoader, epoch: int, start: int = 0) -> None:
    """Select a training loader's epoch and resume offset (in samples), bucketed or not.

    A bucketed loader's ``sampler`` attribute is DataLoader's stand-in; its batch sampler
    holds the epoch.
    """
    if isinstance(loader.batch_sampler, BucketBatchSampler):
        loader.batch_sampler.set_epoch(epoch, start)
    else:
        loader.sampler.set_epoch(epoch, start)


def batch_records(loader: DataLoader, batch: int) -> list[str]:
    """The recording ids of batch number ``batch`` (counted from the start of the epoch) of a
    training loader's current epoch, this process's share: the epoch's order is seeded, so it is
    replayed without drawing from any RNG."""
    if isinstance(loader.batch_sampler, BucketBatchSampler):
        indices = loader.batch_sampler.epoch_batches()[batch]
    else:
        size = loader.batch_size
        indices = loader.sampler.rank_indices()[batch * size:(batch + 1) * size]
    return [loader.dataset.names[i] for i in indices]


def _ignore_interrupts(worker_id: int) -> None:
    """Ctrl-C reaches loader workers too; the training process alone decides how to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def get_dataloaders(data: str | Path | Cache, batch_size: int = 64, eval_batch_size: int = 64,
                    max_length: int = MAX_LENGTH, random_pad: int = RANDOM_PAD,
                    seed: int = 0, num_workers: int = 0, pin_memory: bool = False,
                    splits: Sequence[str] = ("train", "val", "test"),
                    num_replicas: int = 1, rank: int = 0,
                    bucket: bool = False) -> dict[str, DataLoader]:
    """Loaders for the splits of ``data`` (a cache folder, or the Cache loaded from one): the
    training one class-balanced with random padding, the others in file order, right-aligned.
    Every split uses T = max_length + random_pad.

    ``bucket`` (variable-length mode, for resnet18a_vl) batches every split by length with
    BucketBatchSampler (training: the class-balanced epoch sorted in chunks of 50 batches,
    batches shuffled; the others: sorted by length) and crops each batch with crop_collate,
    so T varies between batches, and takes the training shift modulo 1024 (the same
    augmentation for resnet18a_vl, less padding). Select a bucketed training loader's epoch
    with ``set_loader_epoch`` (its ``sampler`` attribute is not the class-balanced sampler).
    """
    cache = data if isinstance(data, Cache) else load_cache(data)
    padded_length = max_length + random_pad
    if bucket and padded_length % DOWNSAMPLE:
        raise ValueError(f"bucket=True needs max_length + random_pad ({padded_length}) to be a "
                         f"multiple of {DOWNSAMPLE}")
    loaders = {}
    for name in splits:
        training = name == "train"
        dataset = ECGDataset(cache, cache.splits[name], max_length, padded_length,
                             random_pad if training else 0,
                             shift_modulo=DOWNSAMPLE if bucket and training else None)
        sampler = ClassBalancedSampler(dataset.labels, seed, num_replicas, rank) if training else None
        size = batch_size if training else eval_batch_size
        batching: dict = dict(batch_size=size, sampler=sampler)
        if bucket:
            batch_sampler = BucketBatchSampler(sampler if training else SequentialSampler(dataset),
                                               dataset.lengths, size, 50 if training else None,
                                               shuffle=training, seed=seed)
            batching = dict(batch_sampler=batch_sampler, collate_fn=crop_collate)
        # The loader's own generator seeds its workers, so starting an epoch does not draw
        # from the global RNG that the losses use (and its state can be checkpointed).
        loaders[name] = DataLoader(dataset, **batching, num_workers=num_workers,
                                   worker_init_fn=_ignore_interrupts if num_workers else None,
                                   pin_memory=pin_memory, persistent_workers=num_workers > 0,
                                   generator=torch.Generator().manual_seed(seed + rank))
    return loaders

