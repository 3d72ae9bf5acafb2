"""Datamodules: shapes, [0,1] ranges, seeded splits and subsets, real loaders on generated files, clear errors."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import DatasetNotFoundError, eval_subset_indices
from datamodules.cifar import CIFAR10CDataModule, CIFAR10DataModule, SVHNDataModule
from datamodules.image_folder import ImageFolderDataModule
from datamodules.mnist_family import FashionMNISTRGB32DataModule, KMNISTDataModule, MNISTDataModule


def test_fashion_mnist_shapes_ranges_and_split(fmnist_dm):
    x, y = next(iter(fmnist_dm.train_dataloader()))
    assert x.shape == (128, 1, 28, 28) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.9
    assert y.dtype == torch.long and set(y.tolist()) <= set(range(10))
    assert len(fmnist_dm.train_set) == 8000 and len(fmnist_dm.val_set) == 5000 and len(fmnist_dm.test_set) == 10000
    assert not set(fmnist_dm.train_set.indices) & set(fmnist_dm.val_set.indices)


def test_rgb32_stand_in(data_dir):
    dm = FashionMNISTRGB32DataModule(data_dir=str(data_dir), eval_subset=16)
    dm.setup()
    x, _ = next(iter(dm.test_dataloader()))
    assert x.shape == (16, 3, 32, 32) and 0 <= x.min() and x.max() <= 1
    assert torch.equal(x[:, 0], x[:, 1])


def test_eval_subset_reproduces_diffpure_indices():
    idx = eval_subset_indices(10000, 512)
    expected = np.concatenate([np.random.RandomState(s).choice(10000, 64, replace=False) for s in range(8)])
    assert np.array_equal(idx, expected)
    assert np.array_equal(eval_subset_indices(10000, 100), expected[:100])
    with pytest.raises(ValueError, match="larger than the test set"):
        eval_subset_indices(50, 100)


def test_eval_subset_is_fixed_across_instances(data_dir):
    a = FashionMNISTRGB32DataModule(data_dir=str(data_dir), eval_subset=64, seed=1)
    b = FashionMNISTRGB32DataModule(data_dir=str(data_dir), eval_subset=64, seed=2)
    a.setup(), b.setup()
    assert a.test_set.indices == b.test_set.indices  # the eval subset never depends on the training seed


def _write_idx(folder: Path, prefix: str, n: int, rng: np.random.Generator) -> None:
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    (folder / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
    (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())


@pytest.mark.parametrize("cls,folder", [(MNISTDataModule, "MNIST"), (KMNISTDataModule, "KMNIST")])
def test_mnist_family_reads_torchvision_layout(tmp_path, cls, folder):
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    _write_idx(raw, "train", 300, rng)
    _write_idx(raw, "t10k", 50, rng)
    dm = cls(data_dir=str(tmp_path), val_size=50)
    dm.setup()
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (50, 1, 28, 28) and 0 <= x.min() and x.max() <= 1
    assert len(dm.train_set) + len(dm.val_set) == 300


@pytest.mark.parametrize(
    "cls,needle",
    [
        (MNISTDataModule, "MNIST not found"),
        (KMNISTDataModule, "KMNIST not found"),
        (CIFAR10DataModule, "CIFAR-10 not found"),
        (SVHNDataModule, "SVHN not found"),
        (CIFAR10CDataModule, "CIFAR-10 not found"),
    ],
)
def test_missing_dataset_says_how_to_get_it(tmp_path, cls, needle):
    with pytest.raises(DatasetNotFoundError, match=needle) as err:
        cls(data_dir=str(tmp_path)).setup()
    assert str(tmp_path) in str(err.value) and "download=true" in str(err.value)


def test_cifar10c_reads_npy_severity_block(tmp_path, monkeypatch):
    root = tmp_path / "CIFAR-10-C"
    root.mkdir()
    images = np.zeros((50000, 32, 32, 3), dtype=np.uint8)
    images[30000:40000] = 200  # severity 4
    np.save(root / "fog.npy", images)
    np.save(root / "labels.npy", np.arange(50000) % 10)
    dm = CIFAR10CDataModule(data_dir=str(tmp_path), corruption="fog", severity=4)
    test = dm.load_split(train=False)
    assert len(test) == 10000 and torch.allclose(test.images, torch.full_like(test.images, 200 / 255))
    with pytest.raises(DatasetNotFoundError, match="CIFAR-10-C not found"):
        CIFAR10CDataModule(data_dir=str(tmp_path), corruption="snow").load_split(train=False)
    with pytest.raises(ValueError, match="severity"):
        CIFAR10CDataModule(data_dir=str(tmp_path), severity=6)


def test_image_folder(tmp_path):
    for split in ("train", "test"):
        for c in ("cat", "dog", "eel"):
            d = tmp_path / split / c
            d.mkdir(parents=True)
            for i in range(4):
                Image.fromarray(np.full((40, 50, 3), 60 * i, dtype=np.uint8)).save(d / f"{i}.png")
    dm = ImageFolderDataModule(data_dir=str(tmp_path), image_size=32, val_size=2, eval_batch_size=12)
    dm.setup()
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (12, 3, 32, 32) and 0 <= x.min() and x.max() <= 1 and set(y.tolist()) == {0, 1, 2}
    with pytest.raises(DatasetNotFoundError, match="class sub-folders"):
        ImageFolderDataModule(data_dir=str(tmp_path / "nowhere")).setup()


def test_eval_split_val_serves_held_out_training_images(fmnist_dm, data_dir):
    from datamodules.mnist_family import FashionMNISTDataModule

    dm = FashionMNISTDataModule(data_dir=str(data_dir), eval_split="val", eval_subset=32)
    dm.setup()
    x, _ = next(iter(dm.test_dataloader()))
    val_images = torch.stack([dm.val_set[i][0] for i in range(len(dm.val_set))])
    assert x.shape[0] == 32 and all((val_images == img).flatten(1).all(1).any() for img in x[:4])
    with pytest.raises(ValueError, match="eval_split"):
        FashionMNISTDataModule(data_dir=str(data_dir), eval_split="train")
