"""MNIST, KMNIST, Fashion-MNIST (28×28 grey) and the 32×32 RGB Fashion-MNIST stand-in.

All read torchvision's on-disk layout (``<data_dir>/<Name>/raw/*-ubyte``) into memory once: a
60k×28×28 uint8 array is 47 MB, and tensor indexing is far faster than PIL per item.
"""
from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path
from typing import Callable

import torch.nn.functional as F
from torchvision import datasets
from torchvision.transforms import v2

from datamodules.base import ImageDataModule, TensorImageDataset


class _TorchvisionGreyDataModule(ImageDataModule):
    """Loads one of torchvision's MNIST-format datasets into [0, 1] tensors."""

    dataset_cls: type = datasets.MNIST

    def raw_folder(self) -> Path:
        return Path(self.data_dir) / self.dataset_cls.__name__ / "raw"

    def load_split(self, train: bool) -> TensorImageDataset:
        try:
            ds = self.dataset_cls(self.data_dir, train=train, download=self.download)
        except RuntimeError as e:  # torchvision: "Dataset not found. You can use download=True …"
            raise self.not_found(str(self.raw_folder()), e) from e
        images = ds.data.unsqueeze(1).float().div_(255.0)
        return TensorImageDataset(images, ds.targets)


class MNISTDataModule(_TorchvisionGreyDataModule):
    dataset_cls = datasets.MNIST
    display_name = "MNIST"
    how_to_get = (
        "Put train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
        "t10k-labels-idx1-ubyte (gunzipped) in <data_dir>/MNIST/raw/, or set paths.data_dir to a folder that has them."
    )


class KMNISTDataModule(_TorchvisionGreyDataModule):
    dataset_cls = datasets.KMNIST
    display_name = "KMNIST"
    how_to_get = (
        "Put the Kuzushiji-MNIST IDX files (train-images-idx3-ubyte, …, gunzipped) in <data_dir>/KMNIST/raw/, "
        "or set paths.data_dir to a folder that has them."
    )


class FashionMNISTDataModule(_TorchvisionGreyDataModule):
    """Fashion-MNIST: the offline default.

    Besides torchvision's layout it accepts Debian's ``dataset-fashion-mnist`` package
    (``/usr/share/datasets/fashion-mnist/*.gz``): the gzipped IDX files are unpacked once into
    ``<data_dir>/FashionMNIST/raw/``, where torchvision reads them.
    """

    dataset_cls = datasets.FashionMNIST
    display_name = "Fashion-MNIST"
    how_to_get = "Install it with `apt-get install -y dataset-fashion-mnist` (or `make install`)."

    def __init__(self, *args, system_dir: str | None = "/usr/share/datasets/fashion-mnist", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.system_dir = system_dir

    def load_split(self, train: bool) -> TensorImageDataset:
        self._unpack_system_copy()
        return super().load_split(train)

    def _unpack_system_copy(self) -> None:
        if self.system_dir is None or not Path(self.system_dir).is_dir():
            return
        raw = self.raw_folder()
        for gz in sorted(Path(self.system_dir).glob("*-ubyte.gz")):
            target = raw / gz.name[: -len(".gz")]
            if target.exists():
                continue
            raw.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(f".{os.getpid()}.tmp")  # per process: parallel jobs may unpack at once
            with gzip.open(gz, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            tmp.replace(target)  # atomic: a half-written file is never read


class FashionMNISTRGB32DataModule(FashionMNISTDataModule):
    """Fashion-MNIST resized to 32×32 and repeated to 3 channels.

    A clearly labelled *stand-in* so that CIFAR-shaped pipelines (ResNet-18, WRN, 32×32 U-Nets)
    run end to end on this offline machine. Its numbers are never comparable with CIFAR-10 ones.

    ``augment``: CIFAR's pad-4 random crop + horizontal flip on training images (``datamodules.cifar``), off by
    default (the stand-in's victims were trained without it); on for recipes that prescribe it on CIFAR-10 (JATP).
    """

    display_name = "Fashion-MNIST (RGB 32×32 stand-in)"

    def __init__(self, *args, augment: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.augment = bool(augment)

    def train_transform(self) -> Callable | None:
        if not self.augment:
            return None
        return v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()])

    def load_split(self, train: bool) -> TensorImageDataset:
        ds = super().load_split(train)
        images = F.interpolate(ds.images, size=(32, 32), mode="bilinear", align_corners=False)
        return TensorImageDataset(images.clamp_(0, 1).repeat(1, 3, 1, 1), ds.labels)
