"""Build a victim from a config: architecture + normalisation + (optionally) trained weights."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from models.victims.normalize import Normalized
from models.weights import load_weights


def build_victim(
    net: nn.Module,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    weights: str | os.PathLike[str] | None = None,
    name: str = "victim",
) -> nn.Module:
    """Return ``Normalized(net, mean, std)`` (or ``net`` itself when ``mean`` is None) in eval mode.

    ``mean=None`` is for nets that normalise internally, e.g. RobustBench zoo models, which already take
    [0, 1] inputs. ``weights`` is a state dict written by :func:`save_weights`; by the config convention it
    lives at ``<checkpoint_dir>/<dataset>/<name>-<training>.pt``, which is how the "train it first" hint
    knows the dataset and training recipe. A state dict of the bare ``net`` (e.g. torchvision's or timm's
    released ImageNet weights) is accepted too, so pretrained files can be dropped in unchanged. ``name``
    only labels error messages (it is the ``name`` key of ``conf/victim/<name>.yaml``).
    """
    if (mean is None) != (std is None):
        raise ValueError(f"{name}: give both mean and std, or neither (got mean={mean}, std={std})")
    victim = net if mean is None else Normalized(net, mean, std)
    if weights is not None:
        load_weights(victim, weights, missing_hint=_train_hint(name, Path(weights)))
    return victim.eval()


def _train_hint(name: str, path: Path) -> str:
    """The command that would produce ``path`` under the ``<dataset>/<name>-<training>.pt`` convention."""
    command = f"python train.py victim={name} dataset={path.parent.name}"
    if path.stem.startswith(f"{name}-"):
        command += f" training={path.stem[len(name) + 1:]}"
    return f"train it first with `{command}`"
