"""Local diffusers DDPM loader (models/diffusion/pretrained.py) against tiny diffusers models written by the test."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from models.diffusion.pretrained import load_diffusers_denoiser, load_diffusers_schedule
from models.diffusion.unet import DDPMUNet
from models.weights import CheckpointError

# google/ddpm-cifar10-32's non-default keys (freq_shift 1, no sin/cos flip, padding 0, eps 1e-6), at toy width:
# if any of them were dropped on the way into DDPMUNet the outputs would differ.
TINY_UNET = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(8, 16),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=4,
    attention_head_dim=None,
    freq_shift=1,
    flip_sin_to_cos=False,
    downsample_padding=0,
    norm_eps=1e-6,
    act_fn="silu",
)


def tiny_unet(seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(**TINY_UNET).eval()
    with torch.no_grad():  # diffusers zero-initialises some output convs: make every weight matter
        for p in unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return unet


def tiny_scheduler(**kwargs):
    from diffusers import DDPMScheduler

    return DDPMScheduler(**{"num_train_timesteps": 100, "beta_start": 1e-4, "beta_end": 0.02,
                            "variance_type": "fixed_large", **kwargs})


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory, unet) -> Path:
    """``DDPMPipeline.save_pretrained`` layout: model_index.json, unet/, scheduler/."""
    from diffusers import DDPMPipeline

    root = tmp_path_factory.mktemp("pretrained") / "pipeline"
    DDPMPipeline(unet=unet, scheduler=tiny_scheduler()).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, unet) -> Path:
    """Model-only layout: config.json + diffusion_pytorch_model.safetensors (+ scheduler_config.json alongside)."""
    root = tmp_path_factory.mktemp("pretrained") / "model"
    unet.save_pretrained(root)
    tiny_scheduler().save_pretrained(root)
    return root


def same_output(loaded: DDPMUNet, unet, seed: int = 1) -> None:
    torch.manual_seed(seed)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 71])
    with torch.no_grad():
        expected = unet(x, t).sample
        got = loaded(x, t)
    assert torch.equal(got, expected), (got - expected).abs().max()


def test_pipeline_layout_loads_the_same_network(pipeline_dir, unet):
    assert (pipeline_dir / "model_index.json").is_file() and (pipeline_dir / "unet" / "config.json").is_file()
    loaded = load_diffusers_denoiser(pipeline_dir)
    assert isinstance(loaded, DDPMUNet) and not loaded.training and loaded.image_size == 32
    same_output(loaded, unet)


def test_model_only_layout_loads_the_same_network(model_dir, unet):
    assert (model_dir / "diffusion_pytorch_model.safetensors").is_file()
    same_output(load_diffusers_denoiser(model_dir), unet)


def test_schedule_betas_equal_the_diffusers_scheduler(pipeline_dir, model_dir):
    reference = tiny_scheduler().betas.double()
    for directory in (pipeline_dir, model_dir):
        schedule = load_diffusers_schedule(directory)
        assert schedule.num_steps == 100 and schedule.kind == "linear" and schedule.variance == "beta"  # fixed_large
        torch.testing.assert_close(schedule.betas.double(), reference, rtol=1e-6, atol=1e-9)
    assert load_diffusers_schedule(pipeline_dir, variance="posterior").variance == "posterior"


def test_cosine_and_fixed_small_schedules(tmp_path):
    ref = tiny_scheduler(beta_schedule="squaredcos_cap_v2", variance_type="fixed_small")
    ref.save_pretrained(tmp_path / "scheduler")
    schedule = load_diffusers_schedule(tmp_path)
    assert schedule.kind == "cosine" and schedule.variance == "posterior"
    torch.testing.assert_close(schedule.betas.double(), ref.betas.double(), rtol=1e-5, atol=1e-7)


def test_unsupported_beta_schedule_lists_the_supported_ones(tmp_path):
    tiny_scheduler(beta_schedule="scaled_linear").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"scaled_linear.*linear.*squaredcos_cap_v2"):
        load_diffusers_schedule(tmp_path)


def test_non_epsilon_model_is_refused(tmp_path, model_dir):
    directory = tmp_path / "vpred"
    shutil.copytree(model_dir, directory)
    tiny_scheduler(prediction_type="v_prediction").save_pretrained(directory)
    for load in (load_diffusers_denoiser, load_diffusers_schedule):
        with pytest.raises(ValueError, match="epsilon"):
            load(directory)


def test_missing_directory_says_what_to_put_there(tmp_path):
    missing = tmp_path / "nowhere" / "ddpm-cifar10-32"
    for load in (load_diffusers_denoiser, load_diffusers_schedule):
        with pytest.raises(FileNotFoundError) as info:
            load(missing)
        message = str(info.value)
        assert "\n" not in message and str(missing) in message
        assert "google/ddpm-cifar10-32" in message and "config.json" in message and "unet/" in message


def test_missing_files_say_what_is_missing(tmp_path, model_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_diffusers_denoiser(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        load_diffusers_schedule(tmp_path / "empty")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(model_dir / "config.json", no_weights / "config.json")
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        load_diffusers_denoiser(no_weights)


@pytest.mark.parametrize("name", ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"])
def test_corrupt_weights_file_is_a_checkpoint_error(tmp_path, model_dir, name):
    directory = tmp_path / "corrupt"
    directory.mkdir()
    shutil.copy(model_dir / "config.json", directory / "config.json")
    (directory / name).write_bytes(b"definitely not a weights file")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_diffusers_denoiser(directory)


def test_weights_of_another_architecture_are_a_checkpoint_error(tmp_path, model_dir):
    directory = tmp_path / "mismatch"
    shutil.copytree(model_dir, directory)
    config = json.loads((directory / "config.json").read_text())
    config["block_out_channels"] = [8, 24]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not match") as info:
        load_diffusers_denoiser(directory)
    assert "\n" not in str(info.value)


def test_legacy_bin_with_old_attention_names_and_no_dropout_key(tmp_path, unet):
    """google/ddpm-cifar10-32 was saved by diffusers 0.0.4: a .bin with query/key/value/proj_attn, no dropout key."""
    directory = tmp_path / "legacy"
    unet.save_pretrained(directory, safe_serialization=False)
    config = json.loads((directory / "config.json").read_text())
    config.pop("dropout")
    (directory / "config.json").write_text(json.dumps(config))
    old_names = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    state = {}
    for key, value in unet.state_dict().items():
        for new, old in old_names.items():
            key = key.replace(new, old)
        state[key] = value
    assert any(".query." in k for k in state)
    torch.save(state, directory / "diffusion_pytorch_model.bin")
    loaded = load_diffusers_denoiser(directory)
    assert loaded.net.config.dropout == 0.0  # diffusers' default, not DDPMUNet's 0.1
    same_output(loaded, unet)


def test_hydra_config_composes_and_instantiates(compose, pipeline_dir, unet):
    cfg = compose("train", ["denoiser=ddpm_cifar10_pretrained", f"denoiser.directory={pipeline_dir}"])
    assert cfg.denoiser.weights is None and cfg.denoiser.name == "ddpm_cifar10_pretrained"
    same_output(instantiate(cfg.denoiser.net), unet)
    schedule = instantiate(cfg.denoiser.schedule)
    assert schedule.num_steps == 100 and schedule.variance == "beta"

    # The default location is under the checkpoint folder (conf/paths has no pretrained key).
    default = compose("train", ["denoiser=ddpm_cifar10_pretrained"])
    assert default.denoiser.directory.endswith("checkpoints/pretrained/ddpm-cifar10-32")

    # Through a defense of evaluate.py: the denoiser arrives with its weights and the defense loads nothing more.
    cfg = compose("evaluate", ["dataset=fashion_mnist_rgb32", "victim=resnet18", "defense=diffpure",
                               "denoiser=ddpm_cifar10_pretrained", f"denoiser.directory={pipeline_dir}", "defense.purifier.t_star=5"])
    assert cfg.defense.purifier.weights is None
    purifier = instantiate(cfg.defense.purifier)
    same_output(purifier.denoiser, unet)
