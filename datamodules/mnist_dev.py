"""Write the real-MNIST development subset (``../shared/data/mnist-dev.npz``) as a torchvision MNIST folder.

    python -m datamodules.mnist_dev [--src ../shared/data/mnist-dev.npz] [--out <paths.data_dir>] [--train 4000] [--seed 0] [--force]

The npz holds 5,000 real MNIST images (``x``: uint8 N×28×28, ``y``: labels). They are shuffled with ``--seed`` and
split into ``--train`` training images (default 4,000) and the rest as the test split (1,000), written as the four
IDX files torchvision's ``datasets.MNIST`` reads offline (``<out>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``),
so ``dataset=mnist`` runs on it unchanged (``datamodules.mnist_family.MNISTDataModule``; its seeded validation split
holds out min(val_size, train/5) = 800 of the 4,000 training images: tune on ``dataset.eval_split=val`` only).

It is a **development subset, not MNIST**: 5,000 of MNIST's 70,000 images, with its own train/test split. Numbers
measured on it are not MNIST numbers. A ``DEV_SUBSET.txt`` file beside the IDX files says so and marks the folder as
ours; a folder that holds MNIST files without that mark (a real MNIST download) is never overwritten unless ``--force``.
"""
from __future__ import annotations

import argparse
import os
import struct
import sys
from pathlib import Path

import numpy as np

#: The npz of the development subset, relative to the project root (where every command runs).
DEFAULT_SRC = "../shared/data/mnist-dev.npz"
#: Marks a ``MNIST/raw`` folder written by this command (and says what it holds).
MARKER = "DEV_SUBSET.txt"
#: The files torchvision's MNIST reads (``_check_exists`` / ``_load_data``).
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class RealMNISTFolderError(FileExistsError):
    """The output folder already holds MNIST files that this command did not write."""


def default_data_dir() -> Path:
    """``paths.data_dir`` as conf/paths/default.yaml resolves it: $PURIFY_DATA_DIR, else $PROJECT_ROOT/data (root ``.``)."""
    if os.environ.get("PURIFY_DATA_DIR"):
        return Path(os.environ["PURIFY_DATA_DIR"])
    return Path(os.environ.get("PROJECT_ROOT", ".")) / "data"


def _idx_images(images: np.ndarray) -> bytes:
    """IDX3 (magic 2051, big-endian sizes) of uint8 images N×H×W."""
    n, h, w = images.shape
    return struct.pack(">IIII", 0x00000803, n, h, w) + np.ascontiguousarray(images, dtype=np.uint8).tobytes()


def _idx_labels(labels: np.ndarray) -> bytes:
    """IDX1 (magic 2049) of uint8 labels."""
    return struct.pack(">II", 0x00000801, labels.shape[0]) + np.ascontiguousarray(labels, dtype=np.uint8).tobytes()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _check_not_real_mnist(mnist_dir: Path, force: bool) -> None:
    """Refuse (one line) to overwrite MNIST files this command did not write, unless ``force``."""
    raw = mnist_dir / "raw"
    ours = (raw / MARKER).is_file()
    found = [p.name for p in sorted(raw.glob("*-ubyte*"))] if raw.is_dir() else []
    # torchvision loads processed/training.pt + test.pt (the legacy layout) in preference to raw/: it would shadow ours.
    legacy = [p.name for p in (mnist_dir / "processed" / "training.pt", mnist_dir / "processed" / "test.pt") if p.is_file()]
    if legacy:
        raise RealMNISTFolderError(
            f"{mnist_dir} holds torchvision's legacy processed/{' and '.join(legacy)}, which torchvision would load instead of "
            f"raw/: move {mnist_dir} away (it is probably real MNIST) or choose another --out"
        )
    if found and not ours and not force:
        raise RealMNISTFolderError(
            f"{raw} already holds MNIST files ({', '.join(found[:4])}{' …' if len(found) > 4 else ''}) not written by this "
            "command — probably real MNIST; refusing to overwrite them with the development subset: pass --force, "
            "or choose another --out"
        )


def write_mnist_dev(
    src: str | os.PathLike[str] = DEFAULT_SRC,
    out: str | os.PathLike[str] | None = None,
    n_train: int = 4000,
    seed: int = 0,
    force: bool = False,
) -> dict[str, object]:
    """Write the subset's seeded ``n_train`` / rest split under ``<out>/MNIST/raw`` and return what was written.

    Raises ``FileNotFoundError`` (no npz), ``ValueError`` (bad npz or split) or ``RealMNISTFolderError`` (the folder
    holds MNIST files this command did not write, and ``force`` is off), each with one line.
    """
    src = Path(src)
    out = default_data_dir() if out is None else Path(out)
    if not src.is_file():
        raise FileNotFoundError(f"development subset {src} not found (expected an npz with x: uint8 N×28×28 and y)")
    with np.load(src) as data:
        if "x" not in data or "y" not in data:
            raise ValueError(f"{src} must hold arrays 'x' (uint8 N×28×28) and 'y' (labels), found {sorted(data.files)}")
        x, y = np.asarray(data["x"]), np.asarray(data["y"])
    if x.ndim != 3 or x.dtype != np.uint8 or y.shape != (x.shape[0],):
        raise ValueError(f"{src}: expected x uint8 (N, H, W) and y (N,), got x {x.dtype} {x.shape} and y {y.shape}")
    if y.min() < 0 or y.max() > 255 or not np.array_equal(y, y.astype(np.int64)):
        raise ValueError(f"{src}: labels must be integers in [0, 255], got range [{y.min()}, {y.max()}]")
    n = x.shape[0]
    if not 0 < int(n_train) < n:
        raise ValueError(f"--train must be between 1 and {n - 1} (the subset has {n} images), got {n_train}")
    mnist_dir = out / "MNIST"
    _check_not_real_mnist(mnist_dir, force)

    perm = np.random.RandomState(seed).permutation(n)
    train_idx, test_idx = perm[: int(n_train)], perm[int(n_train):]
    raw = mnist_dir / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    y8 = y.astype(np.uint8)
    for prefix, idx in (("train", train_idx), ("t10k", test_idx)):
        _write_atomic(raw / f"{prefix}-images-idx3-ubyte", _idx_images(x[idx]))
        _write_atomic(raw / f"{prefix}-labels-idx1-ubyte", _idx_labels(y8[idx]))
    (raw / MARKER).write_text(
        f"Development subset of real MNIST, NOT the MNIST dataset: {n} images from {src.name}, shuffled with seed {seed}, "
        f"{len(train_idx)} written as the train split and {len(test_idx)} as the test split "
        "(python -m datamodules.mnist_dev). Numbers measured on it are not MNIST numbers.\n"
    )
    return {"folder": str(raw), "n_train": int(len(train_idx)), "n_test": int(len(test_idx)), "seed": int(seed), "src": str(src)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m datamodules.mnist_dev",
        description="Write the 5,000-image real-MNIST development subset as a torchvision MNIST folder (dataset=mnist).",
    )
    parser.add_argument("--src", default=DEFAULT_SRC, help=f"the subset's npz (default {DEFAULT_SRC})")
    parser.add_argument("--out", default=None, help="paths.data_dir to write <out>/MNIST/raw into (default: $PURIFY_DATA_DIR or ./data)")
    parser.add_argument("--train", type=int, default=4000, help="images in the train split; the rest is the test split (default 4000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/test shuffle (default 0)")
    parser.add_argument("--force", action="store_true", help="overwrite MNIST files this command did not write (a real MNIST folder)")
    args = parser.parse_args(argv)
    try:
        info = write_mnist_dev(args.src, args.out, args.train, args.seed, args.force)
    except (FileNotFoundError, ValueError, RealMNISTFolderError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"wrote {info['n_train']} train + {info['n_test']} test images (seed {info['seed']}) from {info['src']} to {info['folder']}; "
        f"this is a DEVELOPMENT SUBSET of real MNIST ({info['n_train'] + info['n_test']:,} images), NOT MNIST: dataset=mnist now loads it, and its numbers "
        "are not MNIST numbers (tune on dataset.eval_split=val)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
