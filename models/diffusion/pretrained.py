"""Load a local copy of a diffusers DDPM (e.g. ``google/ddpm-cifar10-32``) as a ``DDPMUNet`` and a ``DiffusionSchedule``.

Nothing is downloaded: the user copies the public diffusers model onto disk once and points
``denoiser.directory`` at it (``conf/denoiser/ddpm_cifar10_pretrained.yaml``). Two layouts are accepted:

* a **model directory**: ``config.json`` + ``diffusion_pytorch_model.safetensors`` (or ``.bin``), optionally
  with the ``scheduler_config.json`` next to them (the flat layout of the ``google/ddpm-*`` hub repositories);
* a **pipeline directory**: ``model_index.json``, ``unet/`` (the model directory above) and
  ``scheduler/scheduler_config.json`` (what ``DDPMPipeline.save_pretrained`` writes).

The U-Net is built from ``config.json`` through ``DDPMUNet`` (so it has the project's ``forward(x_t, t) -> ε̂``),
with diffusers' own defaults for keys the file leaves out (old configs such as google/ddpm-cifar10-32's, written by
diffusers 0.0.4, have no ``dropout`` key: diffusers builds them with dropout 0.0, and so do we). Weights are read
without pickle code execution (``safetensors`` or ``torch.load(weights_only=True)``) and loaded strictly; attention
weights saved under the pre-0.9 names (``query``/``key``/``value``/``proj_attn``) are renamed to the current ones
(``to_q``/``to_k``/``to_v``/``to_out.0``) as ``diffusers.ModelMixin.from_pretrained`` does. Every problem is one
line: ``FileNotFoundError`` (what to put where), ``models.weights.CheckpointError`` (unusable weights) or
``ValueError`` (a model this project cannot use: not ε-prediction, learned variance, unsupported β schedule).
"""
from __future__ import annotations

import inspect
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from models.diffusion.schedule import DiffusionSchedule
from models.diffusion.unet import DDPMUNet
from models.weights import CheckpointError, read_state_dict

PUBLIC_MODEL = "google/ddpm-cifar10-32"
CONFIG_NAME = "config.json"
SCHEDULER_CONFIG_NAME = "scheduler_config.json"
#: Preferred first: safetensors cannot carry code.
WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

#: diffusers ``beta_schedule`` → ``DiffusionSchedule(kind=...)``.
BETA_SCHEDULES = {"linear": "linear", "squaredcos_cap_v2": "cosine"}
#: diffusers ``variance_type`` → ``DiffusionSchedule(variance=...)`` (the ``_log`` forms differ only in how the
#: log-variance is computed, not in σ_t²).
VARIANCE_TYPES = {"fixed_large": "beta", "fixed_large_log": "beta", "fixed_small": "posterior", "fixed_small_log": "posterior"}
#: ``config.json`` keys mapped onto ``DDPMUNet``'s own arguments; every other ``UNet2DModel`` argument is passed through.
_DDPMUNET_ARGS = {
    "sample_size": "image_size",
    "in_channels": "in_channels",
    "block_out_channels": "block_out_channels",
    "layers_per_block": "layers_per_block",
    "down_block_types": "down_block_types",
    "up_block_types": "up_block_types",
    "dropout": "dropout",
    "norm_num_groups": "norm_num_groups",
}
#: Pre-0.9 attention parameter names → current ones (diffusers' ``_fix_state_dict_keys_on_load``).
_DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _how_to_get(directory: Path) -> str:
    return (
        f"copy the diffusers model {PUBLIC_MODEL} there ({CONFIG_NAME} + {WEIGHTS_NAMES[0]} [+ {SCHEDULER_CONFIG_NAME}], "
        f"or a pipeline folder with unet/ and scheduler/), or set denoiser.directory to where it is"
    )


def _check_directory(directory: str | os.PathLike[str]) -> Path:
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"pretrained DDPM directory {path} not found: {_how_to_get(path)}")
    return path


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable JSON file: {type(err).__name__}: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} should hold a JSON object, got {type(data).__name__}")
    return data


def model_directory(directory: str | os.PathLike[str]) -> Path:
    """The folder holding the U-Net's ``config.json``: ``directory`` itself or its ``unet/`` subfolder."""
    root = _check_directory(directory)
    for candidate in (root, root / "unet"):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    raise FileNotFoundError(
        f"pretrained DDPM directory {root} has no {CONFIG_NAME} (nor unet/{CONFIG_NAME}): {_how_to_get(root)}"
    )


def scheduler_config_path(directory: str | os.PathLike[str]) -> Path | None:
    """``scheduler/scheduler_config.json`` (pipeline layout) or ``scheduler_config.json`` next to the model, if any."""
    root = Path(directory).expanduser()
    for candidate in (root / "scheduler" / SCHEDULER_CONFIG_NAME, root / SCHEDULER_CONFIG_NAME,
                      root.parent / "scheduler" / SCHEDULER_CONFIG_NAME if root.name == "unet" else None):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def _check_epsilon(config: dict[str, Any], path: Path) -> None:
    prediction = config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise ValueError(
            f"{path}: prediction_type is {prediction!r}, but the diffusion defenses need an ε-prediction model "
            f"(prediction_type 'epsilon', as {PUBLIC_MODEL})"
        )
    variance = config.get("variance_type")
    if variance in ("learned", "learned_range"):
        raise ValueError(
            f"{path}: variance_type {variance!r} means the U-Net also predicts its variance; only fixed-variance "
            f"ε-prediction models are supported ({', '.join(VARIANCE_TYPES)})"
        )


def _unet_kwargs(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """``DDPMUNet`` arguments from a diffusers ``config.json``: diffusers' defaults, overridden by the file."""
    from diffusers import UNet2DModel

    class_name = config.get("_class_name", "UNet2DModel")
    if class_name != "UNet2DModel":
        raise ValueError(f"{path}: _class_name is {class_name!r}; only diffusers UNet2DModel DDPMs are supported")
    params = inspect.signature(UNet2DModel.__init__).parameters
    accepted = {name: p.default for name, p in params.items() if name != "self" and p.default is not inspect.Parameter.empty}
    public = {k: v for k, v in config.items() if not k.startswith("_")}
    unknown = sorted(set(public) - set(accepted))
    if unknown:
        # diffusers itself ignores unknown keys with a warning; a key that changed the architecture shows up in the
        # strict weight check.
        warnings.warn(f"{path}: ignoring keys UNet2DModel does not take: {', '.join(unknown)}", stacklevel=3)
    merged = {**accepted, **{k: v for k, v in public.items() if k in accepted}}

    sample_size = merged["sample_size"]
    if isinstance(sample_size, (list, tuple)):
        if len(set(sample_size)) != 1:
            raise ValueError(f"{path}: non-square sample_size {list(sample_size)} is not supported")
        sample_size = int(sample_size[0])
    merged["sample_size"] = sample_size
    if merged["out_channels"] != merged["in_channels"]:
        raise ValueError(
            f"{path}: out_channels={merged['out_channels']} but in_channels={merged['in_channels']}; an ε-prediction "
            f"U-Net outputs as many channels as it takes (a learned-variance model outputs twice as many)"
        )
    if merged.get("class_embed_type") is not None or merged.get("num_class_embeds") is not None:
        raise ValueError(f"{path}: class-conditional U-Nets are not supported (forward(x_t, t) has no class label)")
    kwargs = {ours: merged.pop(theirs) for theirs, ours in _DDPMUNET_ARGS.items()}
    kwargs.update(merged)
    return kwargs


def _rename_deprecated_attention(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """``….query.weight`` → ``….to_q.weight`` etc., only where the old key is absent from the model and the new one expected."""
    renamed = {}
    for key, value in state.items():
        new_key = key
        if key not in expected:
            prefix, _, rest = key.rpartition(".")  # rest: weight / bias
            module_path, _, leaf = prefix.rpartition(".")
            if leaf in _DEPRECATED_ATTENTION:
                candidate = f"{module_path}.{_DEPRECATED_ATTENTION[leaf]}.{rest}"
                if candidate in expected and candidate not in state:
                    new_key = candidate
        renamed[new_key] = value
    return renamed


def _weights_file(model_dir: Path) -> Path:
    for name in WEIGHTS_NAMES:
        if (model_dir / name).is_file():
            return model_dir / name
    raise FileNotFoundError(
        f"pretrained DDPM directory {model_dir} has {CONFIG_NAME} but no weights ({' or '.join(WEIGHTS_NAMES)}): "
        f"{_how_to_get(model_dir)}"
    )


def load_diffusers_denoiser(directory: str | os.PathLike[str]) -> DDPMUNet:
    """The ε-prediction U-Net of a local diffusers DDPM, as a ``DDPMUNet`` in eval mode (weights loaded strictly).

    ``directory``: a model directory or a pipeline directory (module docstring). If a scheduler config is found
    next to the model, its ``prediction_type`` must be ``epsilon`` (a ``v``- or ``x_0``-prediction model would be
    silently wrong in every sampler of ``models.diffusion.schedule``).
    """
    root = _check_directory(directory)
    model_dir = model_directory(root)
    config_path = model_dir / CONFIG_NAME
    config = _read_json(config_path)
    scheduler_path = scheduler_config_path(root) or scheduler_config_path(model_dir)
    if scheduler_path is not None:
        _check_epsilon(_read_json(scheduler_path), scheduler_path)
    weights_path = _weights_file(model_dir)

    model = DDPMUNet(**_unet_kwargs(config, config_path))
    try:
        state = read_state_dict(weights_path, missing_hint=_how_to_get(root))
    except (CheckpointError, FileNotFoundError):
        raise
    except Exception as err:  # safetensors' SafetensorError is not one of the errors read_state_dict translates
        detail = str(err).strip().splitlines()[0] if str(err).strip() else "file is empty or truncated"
        raise CheckpointError(
            f"checkpoint {weights_path} is corrupt or not a weights file: {type(err).__name__}: {detail[:200]}"
        ) from err
    expected = model.net.state_dict()
    state = _rename_deprecated_attention(state, set(expected))
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    problems = [f"{label}: {', '.join(keys[:5])}" + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
                for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", shapes))
                if keys]
    if problems:
        raise CheckpointError(f"checkpoint {weights_path} does not match {config_path}: {'; '.join(problems)}")
    model.net.load_state_dict(state, strict=True)
    return model.eval()


def load_diffusers_schedule(directory: str | os.PathLike[str], variance: str | None = None) -> DiffusionSchedule:
    """The training noise schedule of a local diffusers DDPM as a ``DiffusionSchedule``.

    Reads ``scheduler/scheduler_config.json`` (pipeline layout) or ``scheduler_config.json`` next to the model:
    ``num_train_timesteps`` → T, ``beta_start`` / ``beta_end``, ``beta_schedule`` (``linear`` → ``kind="linear"``,
    ``squaredcos_cap_v2`` → ``kind="cosine"``), ``variance_type`` (``fixed_large`` → ``variance="beta"``,
    ``fixed_small`` → ``"posterior"``) unless ``variance`` is given.
    """
    root = _check_directory(directory)
    path = scheduler_config_path(root)
    if path is None:
        raise FileNotFoundError(
            f"pretrained DDPM directory {root} has no scheduler/{SCHEDULER_CONFIG_NAME} (nor {SCHEDULER_CONFIG_NAME}): "
            f"{_how_to_get(root)}"
        )
    config = _read_json(path)
    _check_epsilon(config, path)
    if config.get("trained_betas") is not None:
        raise ValueError(f"{path}: explicit trained_betas are not supported; use a beta_schedule ({', '.join(BETA_SCHEDULES)})")
    beta_schedule = config.get("beta_schedule", "linear")
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(
            f"{path}: beta_schedule {beta_schedule!r} is not supported; supported: "
            + ", ".join(f"{k} (→ kind={v})" for k, v in BETA_SCHEDULES.items())
        )
    if config.get("rescale_betas_zero_snr"):
        raise ValueError(f"{path}: rescale_betas_zero_snr=true is not supported")
    if variance is None:
        variance_type = config.get("variance_type", "fixed_small")  # diffusers' DDPMScheduler default
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(
                f"{path}: variance_type {variance_type!r} is not supported; supported: "
                + ", ".join(f"{k} (→ variance={v})" for k, v in VARIANCE_TYPES.items())
            )
        variance = VARIANCE_TYPES[variance_type]
    return DiffusionSchedule(
        num_steps=int(config.get("num_train_timesteps", 1000)),
        beta_start=float(config.get("beta_start", 1e-4)),
        beta_end=float(config.get("beta_end", 0.02)),
        kind=BETA_SCHEDULES[beta_schedule],
        variance=variance,
    )
