"""Named architectures from timm, torchvision and the RobustBench zoo — never downloaded.

Evaluation runs must be reproducible offline (and on clusters without internet), so pretrained
weights only ever come from a local file. Files are read with ``weights_only=True`` (or as
``.safetensors``), so a checkpoint cannot execute code.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import timm
import torchvision
from torch import nn

from models.robustbench_compat import import_robustbench
from models.weights import load_weights

_NO_DOWNLOAD = "weights are never downloaded: save the state dict (or .safetensors file) locally and pass its path"


def timm_model(
    name: str,
    pretrained: bool = False,
    num_classes: int = 1000,
    checkpoint_path: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """``timm.create_model(name, num_classes=..., **kwargs)``, weights from ``checkpoint_path`` if given.

    e.g. ``resnet50``, ``inception_resnet_v2``. ``pretrained=True`` only asserts that a checkpoint is
    given (it is an error without one, instead of a silent download). Extra kwargs (``in_chans``,
    ``drop_rate``, …) go to timm.
    """
    if pretrained and checkpoint_path is None:
        raise ValueError(f"timm_model({name!r}, pretrained=True) needs checkpoint_path: {_NO_DOWNLOAD}")
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    if checkpoint_path is not None:
        load_weights(model, checkpoint_path, missing_hint=f"{name} {_NO_DOWNLOAD}")
    return model


def torchvision_model(
    name: str, num_classes: int = 1000, weights: str | os.PathLike[str] | None = None
) -> nn.Module:
    """``torchvision.models.get_model(name, num_classes=...)`` with optional weights from a local file.

    ``weights`` is a path (not a torchvision ``Weights`` enum, which would download).
    """
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if weights is not None:
        load_weights(model, weights, missing_hint=f"{name} {_NO_DOWNLOAD}")
    return model


def robustbench_model(
    name: str,
    dataset: str = "cifar10",
    threat_model: str = "Linf",
    model_dir: str | os.PathLike[str] = "checkpoints/robustbench",
) -> nn.Module:
    """A RobustBench zoo model (e.g. ``Carmon2019Unlabeled``) from its checkpoint in ``model_dir``.

    RobustBench would download a missing checkpoint from Google Drive; we check first that every file
    it needs (``<model_dir>/<dataset>/<threat_model>/<name>.pt``, or ``<name>.pt_m<i>.pt`` for ensembles)
    exists and raise ``FileNotFoundError`` otherwise, so no network access is ever attempted.

    RobustBench models take [0, 1] inputs and normalise internally: build the victim with
    ``mean=None, std=None`` (``conf/victim/robustbench.yaml`` does), or inputs get normalised twice.
    """
    enums = import_robustbench("model_zoo.enums")
    zoo = import_robustbench("model_zoo")
    utils = import_robustbench("utils")
    try:
        dataset_ = enums.BenchmarkDataset(dataset)
        threat_ = enums.ThreatModel(enums.ThreatModel(threat_model).value.replace("_3d", ""))
    except ValueError as err:
        raise ValueError(
            f"RobustBench has no {dataset!r}/{threat_model!r}: datasets "
            f"{[d.value for d in enums.BenchmarkDataset]}, threat models {[t.value for t in enums.ThreatModel]}"
        ) from err
    entries = zoo.model_dicts[dataset_][threat_]
    if name not in entries:
        raise ValueError(f"{name!r} is not in RobustBench's {dataset_.value}/{threat_.value} zoo")
    gdrive = entries[name]["gdrive_id"]
    timm_name = f"{name.lower().replace('-', '_')}_{dataset_.value.lower()}_{threat_.value.lower()}"
    if not gdrive or timm.is_model(timm_name):
        raise ValueError(
            f"RobustBench model {name!r} is fetched from a model hub, which this offline loader does not support"
        )
    folder = Path(model_dir) / dataset_.value / threat_.value
    if isinstance(gdrive, list):  # ensembles: one file per member, named as robustbench's load_model expects
        needed = {folder / f"{name}.pt_m{i}.pt": member for i, member in enumerate(gdrive)}
    else:
        needed = {folder / f"{name}.pt": gdrive}
    for file, gdrive_id in needed.items():
        if not file.is_file():
            raise FileNotFoundError(
                f"RobustBench checkpoint {file} not found: download {name!r} (Google Drive id {gdrive_id}) "
                "from the RobustBench model zoo and put it at that path; nothing is downloaded automatically"
            )
    return utils.load_model(name, model_dir=str(model_dir), dataset=dataset_.value, threat_model=threat_.value).eval()
