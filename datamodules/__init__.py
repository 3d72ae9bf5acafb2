"""LightningDataModules: images in [0, 1] and labels, one module per dataset family."""
from datamodules.base import DatasetNotFoundError, ImageDataModule, TensorImageDataset, eval_subset_indices

__all__ = ["DatasetNotFoundError", "ImageDataModule", "TensorImageDataset", "eval_subset_indices"]
