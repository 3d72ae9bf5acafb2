"""Shared LightningDataModule logic: in-memory [0,1] tensors, seeded splits, fixed eval subsets.

Every dataset module only says how to *load* its train and test sets as tensors
(``load_split``); splitting, subsets, loaders and the "data is missing" error live here once.
Images are always float in [0, 1]: normalisation belongs to the victim so that ε is in pixels.
"""
from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Subset


class DatasetNotFoundError(FileNotFoundError):
    """Raised with one message that says where the data should be and how to get it."""


class TensorImageDataset(Dataset):
    """Images (N, C, H, W) float in [0, 1] with integer labels, plus an optional train transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable | None = None) -> None:
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.images = images
        self.labels = labels.long()
        self.transform = transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i]
        if self.transform is not None:
            x = self.transform(x)
        return x, self.labels[i]


def eval_subset_indices(n_test: int, n: int, chunk: int = 64) -> np.ndarray:
    """The fixed evaluation subset of DiffPure (Nie et al. 2022), generalised to any size.

    DiffPure's 512 CIFAR-10 images are ``np.random.RandomState(s).choice(10000, 64, replace=False)``
    for s = 0..7, concatenated; RAP evaluates on the same images. For ``n`` images we take
    ``ceil(n / 64)`` such chunks and keep the first ``n`` indices, so ``n = 512`` on a 10k test set
    reproduces their exact list and smaller subsets are prefixes of it.
    """
    if n <= 0:
        raise ValueError(f"eval_subset must be a positive number of images, got {n}")
    if n > n_test:
        raise ValueError(f"eval_subset={n} is larger than the test set ({n_test} images)")
    size = min(chunk, n_test)
    parts = [np.random.RandomState(s).choice(n_test, size, replace=False) for s in range(math.ceil(n / size))]
    return np.concatenate(parts)[:n]


#: ``dataset.shard``: ``i/n``, the i-th (0-based) of n shards.
SHARD_PATTERN = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(value: Any) -> tuple[int, int] | None:
    """``"i/n"`` → ``(i, n)`` with 0 ≤ i < n; ``None`` (or ``"null"``) → ``None`` (no sharding).

    0-based like a rank or a Slurm array index, so ``dataset.shard=0/4,1/4,2/4,3/4`` is a 4-shard multirun; a
    1-based reading (``4/4``) fails here in one line instead of silently evaluating the wrong images.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "null", "none")):
        return None
    match = SHARD_PATTERN.match(str(value)) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"dataset.shard must be 'i/n' (the i-th of n shards, 0 <= i < n, e.g. 0/4), got {value!r}")
    index, count = int(match[1]), int(match[2])
    if count < 1:
        raise ValueError(f"dataset.shard={index}/{count}: the number of shards n of 'i/n' must be at least 1")
    if index >= count:
        raise ValueError(f"dataset.shard={index}/{count} is out of range: shards of {count} are numbered 0/{count} … "
                         f"{count - 1}/{count} (0-based)")
    return index, count


@dataclass(frozen=True)
class Shard:
    """One shard of the evaluation set: whole batches ``[first_batch, stop_batch)`` of the unsharded run.

    Shards are contiguous runs of *whole* evaluation batches, never cuts inside a batch: the metric loop seeds each
    batch from (seed, batch index) and draws per batch, so a shard that keeps the unsharded run's batches and their
    indices scores exactly the same examples under exactly the same random numbers (``evaluation.loop.batch_seed``).
    Contiguous rather than strided: a shard is then one slice of the cached batch records and one range of images,
    and a table merges shards by concatenating them in order.
    """

    index: int
    count: int
    first_batch: int
    stop_batch: int
    n_batches: int  # of the whole (unsharded) evaluation set
    first_image: int
    stop_image: int
    n_images: int  # of the whole (unsharded) evaluation set

    def as_dict(self) -> dict[str, Any]:
        """What results.json records (``shard``): which part of which whole this run scored."""
        return {"index": self.index, "count": self.count, "batches": [self.first_batch, self.stop_batch],
                "n_batches": self.n_batches, "images": [self.first_image, self.stop_image], "n_images": self.n_images}


def shard_of(n_images: int, batch_size: int, index: int, count: int) -> Shard:
    """Shard ``index`` of ``count`` over ``n_images`` images served in batches of ``batch_size``.

    Batch ``b`` of ``B = ceil(n_images / batch_size)`` belongs to shard ``floor(b·count / B)``, i.e. shard i holds
    batches ``[floor(i·B/count), floor((i+1)·B/count))``: sizes differ by at most one batch. More shards than
    batches would leave some empty, which is refused (an empty shard is a mistake in the sweep, not a result).
    """
    n_batches = math.ceil(n_images / batch_size)
    first, stop = index * n_batches // count, (index + 1) * n_batches // count
    if first >= stop:
        raise ValueError(f"dataset.shard={index}/{count} is empty: the evaluation set has only {n_batches} batches of "
                         f"{batch_size} images ({n_images} images); use at most {n_batches} shards")
    return Shard(index, count, first, stop, n_batches, first * batch_size, min(stop * batch_size, n_images), n_images)


class ImageDataModule(LightningDataModule, ABC):
    """Base of every dataset module.

    Args:
        data_dir: root folder holding the torchvision layout of the dataset.
        batch_size / eval_batch_size: training and evaluation batch sizes.
        num_workers: DataLoader workers (0 keeps tests and CPU runs simple and deterministic).
        val_size: images held out of the training split (seeded) for validation and for tuning
            defense hyper-parameters — never tune on the test set.
        train_subset: keep only this many training images (seeded), for quick runs and tests.
        eval_subset: evaluate on this many test images chosen by ``eval_subset_indices``.
        eval_split: ``test`` (default) or ``val``: what ``test_dataloader`` serves. Defense
            hyper-parameters (DiffDefense's T*, L, R …) are tuned with ``val``, never on the test set.
        seed: seed of the train/val split and the train subset.
        download: let torchvision download the data (needs internet; off by default here).
    """

    #: Human name and how to get the files, used in the "not found" message.
    display_name: str = "dataset"
    how_to_get: str = ""

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        val_size: int = 5000,
        train_subset: int | None = None,
        eval_subset: int | None = None,
        seed: int = 0,
        download: bool = False,
        eval_split: str = "test",
    ) -> None:
        super().__init__()
        self.data_dir = str(data_dir)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.val_size = val_size
        self.train_subset = train_subset
        self.eval_subset = eval_subset
        self.seed = seed
        self.download = download
        if eval_split not in ("test", "val"):
            raise ValueError(f"eval_split must be 'test' or 'val', got {eval_split!r}")
        self.eval_split = eval_split
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    # -- what subclasses provide -------------------------------------------------------------
    @abstractmethod
    def load_split(self, train: bool) -> TensorImageDataset | Dataset:
        """Return the full train or test split (images in [0, 1])."""

    def train_transform(self) -> Callable | None:
        """Augmentation applied to training images only (none by default)."""
        return None

    # -- shared logic ------------------------------------------------------------------------
    def not_found(
        self, where: str, cause: Exception | None = None, name: str | None = None, how_to_get: str | None = None
    ) -> DatasetNotFoundError:
        name, how_to_get = name or self.display_name, how_to_get or self.how_to_get
        msg = f"{name} not found under {where}. {how_to_get}".strip()
        if not self.download:
            msg += " (or pass dataset.datamodule.download=true on a machine with internet)"
        err = DatasetNotFoundError(msg)
        err.__cause__ = cause
        return err

    def prepare_data(self) -> None:
        self.load_split(train=True)
        self.load_split(train=False)

    def setup(self, stage: str | None = None) -> None:
        if self.test_set is not None and self.train_set is not None:
            return
        full_train = self.load_split(train=True)
        gen = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(len(full_train), generator=gen)
        val_size = min(self.val_size, len(full_train) // 5)
        val_idx, train_idx = perm[:val_size], perm[val_size:]
        if self.train_subset is not None:
            train_idx = train_idx[: self.train_subset]
        transform = self.train_transform()
        train_view = full_train
        if transform is not None and isinstance(full_train, TensorImageDataset):
            train_view = TensorImageDataset(full_train.images, full_train.labels, transform)
        self.train_set = Subset(train_view, train_idx.tolist())
        self.val_set = Subset(full_train, val_idx.tolist())
        test = self.val_set if self.eval_split == "val" else self.load_split(train=False)
        if self.eval_subset is not None:
            test = Subset(test, eval_subset_indices(len(test), int(self.eval_subset)).tolist())
        self.test_set = test

    def _loader(self, ds: Dataset | None, batch_size: int, shuffle: bool) -> DataLoader:
        assert ds is not None, "setup() builds every split"
        gen = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers, generator=gen)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_set, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.test_set, self.eval_batch_size, shuffle=False)

    def test_shard_dataloader(self, index: int, count: int) -> tuple[DataLoader, Shard]:
        """The batches of shard ``index`` of ``count`` of ``test_dataloader()`` (see ``Shard``), and the shard.

        The loader serves exactly the images, in the same order and the same batches, that the unsharded loader
        serves as its batches ``shard.first_batch`` … ``shard.stop_batch − 1``; the caller numbers them from
        ``shard.first_batch`` (``evaluation.loop.evaluate(first_batch=…)``) so every batch keeps its seed.
        """
        self.setup()
        assert self.test_set is not None, "setup() builds every split"
        shard = shard_of(len(self.test_set), self.eval_batch_size, index, count)
        part = Subset(self.test_set, list(range(shard.first_image, shard.stop_image)))
        return self._loader(part, self.eval_batch_size, shuffle=False), shard
