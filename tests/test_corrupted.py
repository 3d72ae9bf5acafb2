"""Generated corruptions (datamodules/corrupted.py): the CIFAR-10-C stand-in, on tiny generated 32×32 images."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

import datamodules.corrupted as corrupted
from datamodules.base import ImageDataModule, TensorImageDataset
from datamodules.corrupted import CORRUPTIONS, CorruptedDataModule, corrupt_images, from_uint8_hwc, to_uint8_hwc


def smooth_images(n: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) in [0, 1]: gradients plus a bright square — natural-image-like, so that blur and JPEG
    act as they do on photos (on white noise every severity of glass blur destroys the image equally)."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, size)
    images = []
    for _ in range(n):
        a, b, c = torch.rand(3, generator=g)
        img = (0.2 + 0.5 * a * ramp[None, :, None] + 0.3 * b * ramp[None, None, :]).expand(3, size, size).clone()
        top, left = (torch.randint(4, size - 12, (2,), generator=g)).tolist()
        img[:, top:top + 8, left:left + 8] = 0.9 * c
        img[1] *= 0.8  # not grey
        images.append(img)
    return torch.stack(images).clamp(0, 1)


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


@pytest.fixture(scope="module")
def clean() -> np.ndarray:
    return to_uint8_hwc(smooth_images())


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_every_corruption_works_at_32px_and_grows_with_severity(clean, corruption):
    mild = corrupt_images(clean, corruption, 1)
    harsh = corrupt_images(clean, corruption, 5)
    assert mild.shape == harsh.shape == clean.shape and mild.dtype == harsh.dtype == np.uint8
    assert mad(mild, clean) > 0.5, corruption
    assert mad(harsh, clean) > mad(mild, clean), (corruption, mad(mild, clean), mad(harsh, clean))


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_reproducible_per_image_and_seeded(clean, corruption):
    first = corrupt_images(clean, corruption, 3, seed=0)
    assert np.array_equal(first, corrupt_images(clean, corruption, 3, seed=0))
    # Image i depends on (seed, i) only: corrupting a prefix gives the same images.
    assert np.array_equal(first[:2], corrupt_images(clean[:2], corruption, 3, seed=0))
    if corruption != "jpeg_compression":  # deterministic
        assert not np.array_equal(first, corrupt_images(clean, corruption, 3, seed=1))


def test_numpy_global_state_is_left_alone(clean):
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    corrupt_images(clean, "impulse_noise", 2)
    assert np.random.rand() == expected


def test_unknown_corruption_lists_the_valid_ones(clean):
    with pytest.raises(ValueError) as info:
        corrupt_images(clean, "fog", 3)
    assert all(name in str(info.value) for name in CORRUPTIONS)
    with pytest.raises(ValueError, match="1..5"):
        corrupt_images(clean, "shot_noise", 6)
    with pytest.raises(ValueError, match="fog"):
        CorruptedDataModule(base=TinyDataModule(), corruption="fog")


def test_small_images_are_refused_clearly():
    with pytest.raises(ValueError, match="at least 32"):
        corrupt_images(to_uint8_hwc(smooth_images(size=28)), "gaussian_noise", 1)


class TinyDataModule(ImageDataModule):
    """In-memory 32×32 RGB stand-in: 40 training and 6 test images."""

    display_name = "tiny"

    def load_split(self, train: bool) -> TensorImageDataset:
        images = smooth_images(40 if train else 6, seed=1 if train else 2)
        return TensorImageDataset(images, torch.arange(len(images)) % 10)


def test_datamodule_corrupts_the_test_split_only_and_reuses_its_cache(tmp_path, monkeypatch):
    dm = CorruptedDataModule(base=TinyDataModule(data_dir=str(tmp_path), val_size=8, batch_size=8),
                             corruption="glass_blur", severity=2, dataset_name="tiny")
    assert dm.cache_path == tmp_path / "generated-corruptions" / "tiny" / "glass_blur-2.npy"
    dm.setup()
    clean_test = TinyDataModule().load_split(train=False)
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (6, 3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert torch.equal(y, clean_test.labels)
    assert (x - clean_test.images).abs().mean() > 0.005
    train_clean = TinyDataModule(val_size=8).load_split(train=True).images
    assert torch.equal(dm.train_set.dataset.images, train_clean) and len(dm.train_set) == 32 and len(dm.val_set) == 8
    assert dm.cache_path.is_file() and dm.cache_path.with_suffix(".json").is_file()
    assert "NOT CIFAR-10-C" in dm.cache_path.with_suffix(".json").read_text()

    def must_not_run(*args, **kwargs):
        raise AssertionError("the cached corruption should have been reused")

    monkeypatch.setattr(corrupted, "corrupt_images", must_not_run)
    again = CorruptedDataModule(base=TinyDataModule, data_dir=str(tmp_path), val_size=8,
                                corruption="glass_blur", severity=2, dataset_name="tiny")
    again.setup()
    assert torch.equal(again.test_set.images, dm.test_set.images)
    # Another severity is another file.
    with pytest.raises(AssertionError, match="reused"):
        CorruptedDataModule(base=TinyDataModule(data_dir=str(tmp_path)), corruption="glass_blur", severity=3,
                            dataset_name="tiny").setup()


def test_cache_of_other_clean_images_is_regenerated(tmp_path):
    dm = CorruptedDataModule(base=TinyDataModule(data_dir=str(tmp_path)), corruption="shot_noise", severity=1,
                             dataset_name="tiny")
    first = dm.load_split(train=False).images
    clean = to_uint8_hwc(TinyDataModule().load_split(train=False).images)
    np.save(dm.cache_path, np.zeros_like(clean))  # a stale file from other clean images: the sidecar no longer matches
    meta = dm.cache_path.with_suffix(".json")
    meta.write_text(meta.read_text().replace('"clean_sha256": "', '"clean_sha256": "0'))
    assert torch.equal(dm.load_split(train=False).images, first)
    assert np.array_equal(from_uint8_hwc(np.load(dm.cache_path)), first)


def test_dataset_config_composes_and_builds_the_stand_in(compose, data_dir, tmp_path):
    cfg = compose("evaluate", ["dataset=fashion_mnist_rgb32_c", "victim=resnet18", "dataset.severity=1",
                               "victim.weights=${paths.checkpoint_dir}/${dataset.clean_name}/${victim.name}-${victim_training}.pt"])
    assert cfg.dataset.name == "fashion_mnist_rgb32_c" and cfg.dataset.corruption == "gaussian_noise"
    assert cfg.victim.weights.endswith("fashion_mnist_rgb32/resnet18-standard.pt")
    dm = instantiate(cfg.dataset.datamodule)
    assert isinstance(dm, CorruptedDataModule) and dm.severity == 1 and dm.eval_subset is None
    assert dm.cache_path == data_dir / "generated-corruptions" / "fashion_mnist_rgb32" / "gaussian_noise-1.npy"
    assert type(dm.base).__name__ == "FashionMNISTRGB32DataModule" and dm.base.system_dir == cfg.paths.fashion_mnist_system_dir
    clean = compose("evaluate", ["dataset=fashion_mnist_rgb32"]).dataset
    assert set(clean) <= set(cfg.dataset)
    assert cfg.dataset.tuned == clean.tuned  # hyper-parameters tuned on the clean stand-in's validation split
