"""ImageNet30-style image folders: ``<root>/<train_dir>/<class>/*.jpg`` and ``<root>/<test_dir>/…``.

Images stay on disk (ImageNet-sized sets do not fit in memory as float tensors) and are resized
and centre-cropped to ``image_size``; values in [0, 1].
"""
from __future__ import annotations

from pathlib import Path

import torch
from torchvision import datasets
from torchvision.transforms import v2

from datamodules.base import ImageDataModule


class ImageFolderDataModule(ImageDataModule):
    display_name = "image folder"

    def __init__(
        self,
        *args,
        root: str | None = None,
        train_dir: str = "train",
        test_dir: str = "test",
        image_size: int = 224,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.root = Path(root) if root is not None else Path(self.data_dir)
        self.train_dir, self.test_dir = train_dir, test_dir
        self.image_size = image_size
        self.how_to_get = (
            f"Expected class sub-folders of images under {self.root}/{train_dir}/ and {self.root}/{test_dir}/ "
            "(ImageNet30: one folder per class); set dataset.datamodule.root to where they are."
        )

    def load_split(self, train: bool) -> datasets.ImageFolder:
        folder = self.root / (self.train_dir if train else self.test_dir)
        if not folder.is_dir():
            raise self.not_found(str(folder))
        resize = int(round(self.image_size * 256 / 224))
        transform = v2.Compose(
            [v2.ToImage(), v2.Resize(resize, antialias=True), v2.CenterCrop(self.image_size), v2.ToDtype(torch.float32, scale=True)]
        )
        try:
            return datasets.ImageFolder(str(folder), transform=transform)
        except FileNotFoundError as e:  # no class folders / no images
            raise self.not_found(str(folder), e) from e
