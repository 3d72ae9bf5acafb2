"""CIFAR-10, CIFAR-10-C and SVHN (32×32 RGB), loaded into memory as [0, 1] tensors."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torchvision import datasets
from torchvision.transforms import v2

from datamodules.base import ImageDataModule, TensorImageDataset


def _hwc_uint8_to_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float().div_(255.0)


class _AugmentedRGB(ImageDataModule):
    """Standard CIFAR augmentation (pad-4 random crop + horizontal flip), switchable off."""

    def __init__(self, *args, augment: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.augment = augment

    def train_transform(self) -> Callable | None:
        if not self.augment:
            return None
        return v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()])


CIFAR10_HOW_TO_GET = "Unpack cifar-10-python.tar.gz into <data_dir> (giving <data_dir>/cifar-10-batches-py/)."


class CIFAR10DataModule(_AugmentedRGB):
    display_name = "CIFAR-10"
    how_to_get = CIFAR10_HOW_TO_GET

    def load_split(self, train: bool) -> TensorImageDataset:
        try:
            ds = datasets.CIFAR10(self.data_dir, train=train, download=self.download)
        except RuntimeError as e:
            where = str(Path(self.data_dir) / "cifar-10-batches-py")
            raise self.not_found(where, e, name="CIFAR-10", how_to_get=CIFAR10_HOW_TO_GET) from e
        return TensorImageDataset(_hwc_uint8_to_tensor(ds.data), torch.tensor(ds.targets))


class CIFAR10CDataModule(CIFAR10DataModule):
    """CIFAR-10-C (Hendrycks & Dietterich 2019): the test split is one corruption at one severity.

    The release stores ``<corruption>.npy`` (50000×32×32×3, severities 1–5 stacked in blocks of
    10000) and ``labels.npy``; training (if any) uses clean CIFAR-10.
    """

    display_name = "CIFAR-10-C"
    how_to_get = "Unpack CIFAR-10-C.tar into <data_dir> (giving <data_dir>/CIFAR-10-C/<corruption>.npy and labels.npy)."

    def __init__(self, *args, corruption: str = "gaussian_noise", severity: int = 5, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not 1 <= severity <= 5:
            raise ValueError(f"CIFAR-10-C severity must be in 1..5, got {severity}")
        self.corruption = corruption
        self.severity = severity

    def load_split(self, train: bool) -> TensorImageDataset:
        if train:
            return super().load_split(train=True)
        root = Path(self.data_dir) / "CIFAR-10-C"
        images_path, labels_path = root / f"{self.corruption}.npy", root / "labels.npy"
        if not images_path.exists() or not labels_path.exists():
            raise self.not_found(str(images_path))
        block = slice((self.severity - 1) * 10000, self.severity * 10000)
        images = np.load(images_path, mmap_mode="r")[block]
        labels = np.load(labels_path)[block]
        return TensorImageDataset(_hwc_uint8_to_tensor(images), torch.from_numpy(labels.astype(np.int64)))


class SVHNDataModule(_AugmentedRGB):
    display_name = "SVHN"
    how_to_get = "Put train_32x32.mat and test_32x32.mat in <data_dir>/svhn/."

    def __init__(self, *args, augment: bool = False, **kwargs) -> None:
        # Horizontal flips change digits' meaning: no augmentation by default.
        super().__init__(*args, augment=augment, **kwargs)

    def load_split(self, train: bool) -> TensorImageDataset:
        root = Path(self.data_dir) / "svhn"
        try:
            ds = datasets.SVHN(str(root), split="train" if train else "test", download=self.download)
        except RuntimeError as e:
            raise self.not_found(str(root), e) from e
        images = torch.from_numpy(ds.data).float().div_(255.0)  # already (N, 3, 32, 32)
        return TensorImageDataset(images, torch.from_numpy(ds.labels.astype(np.int64)))
