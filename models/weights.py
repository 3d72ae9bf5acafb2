"""Weights files: atomic saves and safe, clearly-failing loads (``weights_only=True``).

Checkpoint problems are the most common failure when running evaluations, so each one gets a single
message that says what is wrong and what to do, instead of a PyTorch traceback about pickles or keys.
Shared by victims, denoisers and every later trained component.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

_MAX_LISTED_KEYS = 5


class CheckpointError(RuntimeError):
    """A weights file that exists but cannot be used (corrupt, not a state dict, wrong model)."""
_NORMALIZATION_KEYS = ("mean", "std")

#: State-dict entry of a trained denoiser that records the data space it was trained in, ``tensor([lo, hi])``:
#: ``[0, 1]`` (raw images, the DiffDefense authors' DDPM) or ``[-1, 1]`` (``2x − 1``, the project's model space,
#: ``models.diffusion.schedule``). It describes the weights rather than holding any: ``load_weights`` removes it
#: before loading, checks it against the loader's ``data_range`` and returns it. A file without it (every
#: denoiser written before the entry existed, and every ``[-1, 1]`` export) counts as ``[-1, 1]``.
DATA_RANGE_KEY = "_meta_data_range"
#: The data space of a file that records none (see ``DATA_RANGE_KEY``).
DEFAULT_DATA_RANGE = (-1.0, 1.0)
#: Buffers whose name starts with this mark a variant of an architecture whose parameter shapes are those of another
#: variant (e.g. classifier B as DiffDefense released it vs Defense-GAN's: same shapes, other paddings), so that a file
#: of one variant never loads silently into the other; ``load_weights`` names them in one line when they differ.
VARIANT_PREFIX = "_variant_"


def _last(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def data_range_of(state: Mapping[str, torch.Tensor]) -> tuple[float, float]:
    """The data space a state dict records (``DATA_RANGE_KEY`` at any nesting level), else ``DEFAULT_DATA_RANGE``."""
    for key, value in state.items():
        if _last(key) == DATA_RANGE_KEY:
            lo, hi = (float(v) for v in value.flatten().tolist())
            return (lo, hi)
    return DEFAULT_DATA_RANGE


def format_range(data_range: tuple[float, float]) -> str:
    return f"[{data_range[0]:g}, {data_range[1]:g}]"


def train_hint(path: str | os.PathLike[str], model: str, default_name: str) -> str:
    """The ``train.py`` command that writes ``<checkpoint_dir>/<dataset>/<model>-<name>.pt``.

    Used in "weights not found" messages of denoisers, GANs and later trained components.
    """
    path = Path(path)
    command = f"python train.py model={model} dataset={path.parent.name}"
    prefix = f"{model}-"
    if path.stem.startswith(prefix) and path.stem[len(prefix):] != default_name:
        command += f" {model}={path.stem[len(prefix):]}"
    return f"train it first with `{command}`"


def save_weights(module: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write ``module.state_dict()`` to ``path`` atomically.

    The file is written next to its destination and moved into place with ``os.replace``, so a run that
    dies mid-write (timeout, pre-emption) never leaves a truncated checkpoint that a later evaluation
    would pick up.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    moved = False
    try:
        torch.save(module.state_dict(), tmp_name)
        os.replace(tmp_name, path)
        moved = True
    finally:
        if not moved:
            Path(tmp_name).unlink(missing_ok=True)
    return path


def read_state_dict(path: str | os.PathLike[str], missing_hint: str) -> dict[str, torch.Tensor]:
    """Load a state dict safely (``weights_only=True``; ``.safetensors`` also accepted), one message per failure."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found: {missing_hint}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, OSError) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else "file is empty or truncated"
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a weights file: {type(err).__name__}: {detail[:200]}"
        ) from err
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a weights file: expected a state dict of tensors "
            f"(torch.save(model.state_dict(), path)), got {type(state).__name__}"
        )
    return dict(state)


def load_weights(
    module: nn.Module,
    path: str | os.PathLike[str],
    missing_hint: str,
    data_range: tuple[float, float] | None = None,
) -> tuple[float, float]:
    """Load the state dict at ``path`` into ``module`` strictly, or raise one clear error.

    For a wrapper with a ``net`` attribute (e.g. ``models.victims.Normalized``), a state dict without ``net.``-prefixed keys is loaded into
    ``module.net`` (released weights of the bare architecture).

    ``data_range``: the data space the loader expects of a denoiser (``None`` = ``DEFAULT_DATA_RANGE``, what every
    loader assumed before the space was recorded). The file's recorded space (``DATA_RANGE_KEY``; none = the default)
    must equal it, else one line says so; the entry itself is never loaded into ``module``. Returns the file's space.
    """
    path = Path(path)
    state = read_state_dict(path, missing_hint)
    recorded = data_range_of(state)
    expected = DEFAULT_DATA_RANGE if data_range is None else (float(data_range[0]), float(data_range[1]))
    if recorded != expected:
        raise CheckpointError(
            f"checkpoint {path} holds a denoiser trained in data space {format_range(recorded)}, but it is loaded for data space "
            f"{format_range(expected)}: set the consumer's data_space to {format_range(recorded)} or load a denoiser trained in "
            f"{format_range(expected)}"
        )
    state = {k: v for k, v in state.items() if _last(k) != DATA_RANGE_KEY}
    target = module
    if isinstance(getattr(module, "net", None), nn.Module) and not any(k.startswith("net.") for k in state):
        target = module.net
    problems = _mismatches(target, state)
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match the model: {'; '.join(problems)}")
    target.load_state_dict(state, strict=True)
    return recorded


def _mismatches(module: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Describe missing/unexpected/mis-shaped keys (and a differing normalisation), first few of each."""
    expected = module.state_dict()
    # Variant marks (VARIANT_PREFIX) are reported on their own line, with both values.
    variants = [
        f"{k} = {_value(state.get(k))} in the file vs {_value(expected.get(k))} in the model"
        for k in sorted(set(expected) | set(state))
        if _last(k).startswith(VARIANT_PREFIX)
        and (k not in state or k not in expected or not torch.equal(state[k].cpu(), expected[k].cpu()))
    ]
    missing = [k for k in expected if k not in state and not _last(k).startswith(VARIANT_PREFIX)]
    unexpected = [k for k in state if k not in expected and not _last(k).startswith(VARIANT_PREFIX)]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    values = []
    if all(k in expected for k in _NORMALIZATION_KEYS):  # normalisation buffers (Normalized)
        values = [
            f"{k}={state[k].flatten().tolist()} vs config {expected[k].flatten().tolist()}"
            for k in _NORMALIZATION_KEYS
            if k in state and state[k].shape == expected[k].shape and not torch.allclose(state[k], expected[k])
        ]
    problems = [f"another variant of the architecture: {'; '.join(variants)}"] if variants else []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                        ("shape mismatch", shapes), ("normalisation differs", values)):
        if keys:
            more = f" (+{len(keys) - _MAX_LISTED_KEYS} more)" if len(keys) > _MAX_LISTED_KEYS else ""
            problems.append(f"{label}: {', '.join(keys[:_MAX_LISTED_KEYS])}{more}")
    return problems


def _value(t: torch.Tensor | None) -> str:
    return "none (not recorded)" if t is None else str(t.flatten().tolist())
