"""Every option of every config group composes (and, where cheap, instantiates) with the real config tree."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from attacks.base import Attack
from evaluation.cli import group_options
from evaluation.threats import ThreatModel

CONF = Path(__file__).resolve().parents[1] / "conf"
CIFAR_SHAPED = {"resnet18", "resnet56", "wrn_28_10", "mobilenet_v2", "shufflenet_v2"}
HEAVY = {"resnet50", "inception_resnet_v2", "robustbench", "wrn_28_10"}  # composed only (built in test_victims)


def test_every_group_has_options():
    for group in ("dataset", "victim", "defense", "attack", "threat", "trainer", "logger", "training", "model", "paths"):
        assert group_options(group), group


@pytest.mark.parametrize("name", group_options("dataset"))
def test_dataset_configs(compose, name):
    cfg = compose("evaluate", [f"dataset={name}"])
    dm = instantiate(cfg.dataset.datamodule)
    assert dm.eval_subset is None and len(cfg.dataset.image_shape) == 3
    assert cfg.dataset.eps.linf > 0 and len(cfg.dataset.mean) == cfg.dataset.image_shape[0]


@pytest.mark.parametrize("name", group_options("victim"))
def test_victim_configs(compose, name):
    dataset = "fashion_mnist_rgb32" if name in CIFAR_SHAPED | HEAVY else "fashion_mnist"
    cfg = compose("evaluate", [f"victim={name}", f"dataset={dataset}"])
    assert cfg.victim.name == name
    if name not in HEAVY:
        victim = instantiate(cfg.victim, weights=None)
        assert not victim.training


@pytest.mark.parametrize("name", group_options("attack"))
def test_attack_configs(compose, name):
    attack = instantiate(compose("evaluate", [f"attack={name}"]).attack)
    assert isinstance(attack, Attack) and attack.name == name
    assert attack.bounded == (attack.eps is not None)


@pytest.mark.parametrize("name", group_options("defense"))
def test_defense_configs(compose, name):
    node = compose("evaluate", [f"defense={name}"]).defense.purifier
    no_weights = {"weights": None} if "weights" in node else {}  # no trained weights in tests
    if node.get("classifier") is not None:  # a defense holding the protected model (distribution transfer)
        no_weights["classifier"] = {"weights": None}
    purifier = instantiate(node, **no_weights)
    assert isinstance(purifier.stochastic, bool) and isinstance(purifier.differentiable, bool)


@pytest.mark.parametrize("name", group_options("threat"))
def test_threat_configs(compose, name):
    overrides = [f"threat={name}"] + (["threat.surrogate.weights=null"] if name == "transfer" else [])
    threat = instantiate(compose("evaluate", overrides).threat.model)
    assert isinstance(threat, ThreatModel) and threat.name == name


def test_transfer_surrogate_is_classifier_b_with_its_own_weights(compose):
    cfg = compose("evaluate", ["threat=transfer", "victim_training=fgsm_at"])
    assert cfg.threat.surrogate.name == "classifier_b"
    assert cfg.threat.surrogate.weights.endswith("fashion_mnist/classifier_b-standard.pt")
    assert cfg.victim.weights.endswith("fashion_mnist/classifier_a-fgsm_at.pt")


@pytest.mark.parametrize("name", group_options("training"))
def test_training_configs_build_the_module(compose, name):
    cfg = compose("train", [f"training={name}", "logger=csv"])
    assert cfg.victim_training == name and cfg.victim.weights.endswith(f"classifier_a-{name}.pt")
    module = instantiate(cfg.model)
    assert module.loss is not None and module.model.training and module.export_path == cfg.victim.weights


def test_denoiser_model_config(compose):
    cfg = compose("train", ["model=denoiser", "logger=csv"])
    module = instantiate(cfg.model)
    assert module.export_path.endswith("fashion_mnist/denoiser-diffdefense_unet.pt")
    assert module.export().__class__.__name__ == "DiffDefenseUNet"


@pytest.mark.parametrize("name", group_options("trainer"))
def test_trainer_configs(compose, name):
    cfg = compose("train", [f"trainer={name}", "logger=csv"])
    if name != "gpu":
        # ddp asks for 2 devices: CPU processes here, but "auto" would ask a 1-GPU machine for 2 GPUs.
        cpu = {"accelerator": "cpu"} if name == "ddp" else {}
        trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False, **cpu)
        assert trainer.max_epochs == cfg.trainer.max_epochs


@pytest.mark.parametrize("name", group_options("logger"))
def test_logger_configs(compose, name):
    cfg = compose("train", [f"logger={name}"])
    assert "csv" in cfg.logger  # CSV is always on
    if "wandb" in cfg.logger:
        assert cfg.logger.wandb.mode == "offline"  # never syncs unless asked


@pytest.mark.parametrize("name", group_options("experiment"))
def test_experiment_configs(compose, name):
    cfg = compose("evaluate", [f"experiment={name}"])
    OmegaConf.to_container(cfg.dataset, resolve=True)
    assert cfg.table.name


@pytest.mark.parametrize("launcher", ["basic", "slurm", "slurm_local", "local", "submitit_slurm", "submitit_local"])
def test_hydra_launchers(tmp_path, data_dir, launcher):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose("evaluate", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    target = cfg.hydra.launcher._target_
    assert ("submitit" in target) == (launcher != "basic"), target
