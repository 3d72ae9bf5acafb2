"""Victim classifiers: shapes and input gradients, normalisation, checkpoint round-trips and the one-line
errors for bad checkpoints, the RobustBench/AutoAttack compat shim, and Hydra instantiation of conf/victim."""
from __future__ import annotations

import importlib
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from models.robustbench_compat import import_robustbench
from models.victims import Normalized, build_victim
from models.weights import save_weights
from models.victims import cifar, mnist, zoo

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "victim"

FMNIST = {"name": "fashion_mnist", "image_shape": [1, 28, 28], "num_classes": 10, "mean": [0.2860], "std": [0.3530]}
CIFAR = {"name": "cifar10", "image_shape": [3, 32, 32], "num_classes": 10,
         "mean": [0.4914, 0.4822, 0.4465], "std": [0.2471, 0.2435, 0.2616]}
# Smallest input Inception-ResNet-v2 accepts; 30 classes like imagenet30.
SMALL_RGB = {"name": "tiny_rgb", "image_shape": [3, 75, 75], "num_classes": 30,
             "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
CONFIG_DATASET = {
    "classifier_a": FMNIST, "classifier_b": FMNIST, "classifier_b_defensegan": FMNIST, "mnist_cnn": FMNIST,
    "resnet18": CIFAR, "resnet56": CIFAR, "wrn_28_10": CIFAR, "mobilenet_v2": CIFAR, "shufflenet_v2": CIFAR,
    "resnet50": SMALL_RGB, "inception_resnet_v2": SMALL_RGB, "robustbench": CIFAR,
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Batches here are 1-4 images: intra-op threads buy nothing, and on a busy 2-core runner they
    oversubscribe the CPU (10-100x slower forwards). Restored afterwards for the rest of the session."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def assert_logits_with_input_grad(model: nn.Module, shape: tuple[int, ...], num_classes: int, n: int = 2) -> None:
    model.eval()
    x = torch.rand(n, *shape, requires_grad=True)
    logits = model(x)
    assert logits.shape == (n, num_classes)
    logits[:, 0].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("factory", "shape", "num_classes"),
    [
        (lambda: mnist.ClassifierA(), (1, 28, 28), 10),
        (lambda: mnist.ClassifierB(), (1, 28, 28), 10),
        (lambda: mnist.ClassifierBDefenseGAN(), (1, 28, 28), 10),
        (lambda: mnist.PyTorchExamplesCNN(), (1, 28, 28), 10),
        (lambda: mnist.ClassifierA(in_channels=3, num_classes=7, input_size=32), (3, 32, 32), 7),
        (lambda: mnist.ClassifierB(in_channels=3, num_classes=7, input_size=32), (3, 32, 32), 7),
        (lambda: mnist.ClassifierBDefenseGAN(in_channels=3, num_classes=7, input_size=32), (3, 32, 32), 7),
        (lambda: mnist.PyTorchExamplesCNN(in_channels=3, num_classes=7, input_size=32), (3, 32, 32), 7),
        (lambda: cifar.wide_resnet_28_10(num_classes=7, depth=10, widen_factor=1), (3, 32, 32), 7),
        (lambda: zoo.torchvision_model("resnet18", num_classes=7), (3, 32, 32), 7),
    ],
    ids=["A", "B", "B_defensegan", "mnist_cnn", "A_rgb32", "B_rgb32", "B_defensegan_rgb32", "mnist_cnn_rgb32", "wrn_10_1",
         "torchvision_resnet18"],
)
def test_forward_gives_logits_and_input_gradients(factory, shape, num_classes) -> None:
    """Other sizes/channels than the defaults; every config's victim is run in ``test_victim_config_instantiates``."""
    assert_logits_with_input_grad(factory(), shape, num_classes)


def test_paper_layer_details() -> None:
    """Flatten sizes of the released models: A 10x10x64 (unpadded convs), B 1x1x128, pytorch/examples 9216."""
    def first_fc(net: nn.Module) -> nn.Linear:
        return next(m for m in net.modules() if isinstance(m, nn.Linear))

    assert first_fc(mnist.ClassifierA()).in_features == 6400
    assert first_fc(mnist.ClassifierB()).in_features == 128
    assert first_fc(mnist.ClassifierBDefenseGAN()).in_features == 128
    assert first_fc(mnist.PyTorchExamplesCNN()).in_features == 9216
    assert sum(p.numel() for p in cifar.resnet56().parameters()) < 900_000  # ResNet-56 has ~0.85 M


def _conv_maps(net: nn.Module, size: int = 28) -> tuple[list[int], list[int]]:
    """(paddings, output side after each conv) of a classifier B variant on a size×size grey image."""
    pads, sides, x = [], [], torch.zeros(1, 1, size, size)
    for layer in net:
        if isinstance(layer, nn.Linear):
            break
        x = layer(x)
        if isinstance(layer, nn.Conv2d):
            pads.append(layer.padding[0])
            sides.append(x.shape[-1])
    return pads, sides


def test_classifier_b_is_the_diffdefense_release_and_defensegan_b_is_kept() -> None:
    """B as the DiffDefense authors released it (classifiers/classifier.py): conv1 unpadded, padding 1 on conv3,
    28→11→3→1; Defense-GAN's model B ("SAME" conv1 = pad 3, the others unpadded): 28→14→5→1. Both: logits (N, 10)."""
    authors, defensegan = mnist.ClassifierB().eval(), mnist.ClassifierBDefenseGAN().eval()
    assert _conv_maps(authors) == ([0, 0, 1], [11, 3, 1])
    assert _conv_maps(defensegan) == ([3, 0, 0], [14, 5, 1])
    assert [type(m) for m in authors] == [type(m) for m in defensegan]  # same layers, dropout .2 first and .5 last
    assert authors[0].p == 0.2 and authors[7].p == 0.5
    for net in (authors, defensegan):
        assert net(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    shapes = lambda net: [tuple(p.shape) for p in net.parameters()]  # noqa: E731
    assert shapes(authors) == shapes(defensegan)  # hence the variant buffer below
    assert authors.state_dict()["_variant_conv_padding"].tolist() == [0, 0, 1]
    assert not any("_variant_" in k for k in defensegan.state_dict())


def test_classifier_b_variants_never_load_each_others_weights(tmp_path: Path) -> None:
    """Same parameter shapes, other paddings: a file of one variant fails in one line naming the variant mark."""
    old = save_weights(build_victim(mnist.ClassifierBDefenseGAN(), [0.5], [0.5]), tmp_path / "b_defensegan.pt")
    new = save_weights(build_victim(mnist.ClassifierB(), [0.5], [0.5]), tmp_path / "b.pt")
    with pytest.raises(RuntimeError) as err:
        build_victim(mnist.ClassifierB(), [0.5], [0.5], weights=old)
    message = str(err.value)
    assert len(message.splitlines()) == 1 and message.startswith(f"checkpoint {old} does not match the model: ")
    assert "another variant of the architecture: net._variant_conv_padding = none (not recorded) in the file vs [0, 0, 1]" in message
    with pytest.raises(RuntimeError, match=r"net._variant_conv_padding = \[0, 0, 1\] in the file vs none"):
        build_victim(mnist.ClassifierBDefenseGAN(), [0.5], [0.5], weights=new)
    loaded = build_victim(mnist.ClassifierB(), [0.5], [0.5], weights=new)  # each loads its own
    assert loaded.net._variant_conv_padding.tolist() == [0, 0, 1]
    build_victim(mnist.ClassifierBDefenseGAN(), [0.5], [0.5], weights=old)


def test_cifar_variants_keep_resolution() -> None:
    """The stride changes leave a 4x4 map before pooling on 32x32 inputs (torchvision's originals: 1x1)."""
    x = torch.rand(1, 3, 32, 32)
    assert cifar.mobilenet_v2().features(x).shape[-2:] == (4, 4)
    net = cifar.shufflenet_v2()
    assert net.conv5(net.stage4(net.stage3(net.stage2(net.maxpool(net.conv1(x)))))).shape[-2:] == (4, 4)


def test_normalized_applies_mean_and_std() -> None:
    victim = Normalized(nn.Identity(), mean=[0.5, 0.25], std=[0.5, 0.25])
    assert victim.mean.shape == victim.std.shape == (1, 2, 1, 1)
    assert isinstance(victim.net, nn.Identity)
    x = torch.rand(3, 2, 4, 4)
    expected = (x - torch.tensor([0.5, 0.25]).view(1, 2, 1, 1)) / torch.tensor([0.5, 0.25]).view(1, 2, 1, 1)
    torch.testing.assert_close(victim(x), expected)
    with pytest.raises(ValueError, match="channels"):
        Normalized(nn.Identity(), mean=[0.5, 0.5], std=[0.5])


def test_build_victim_without_mean_is_the_bare_net_in_eval_mode() -> None:
    net = mnist.ClassifierA().train()
    victim = build_victim(net, mean=None, std=None)
    assert victim is net and not victim.training
    assert not build_victim(mnist.ClassifierA(), [0.5], [0.5]).training


def test_weights_round_trip_through_save_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trained = build_victim(mnist.ClassifierA(), [0.2860], [0.3530])
    path = save_weights(trained, tmp_path / "fashion_mnist" / "classifier_a.pt")
    assert sorted(p.name for p in path.parent.iterdir()) == ["classifier_a.pt"]  # no temp file left
    torch.manual_seed(1)
    loaded = build_victim(mnist.ClassifierA(), [0.2860], [0.3530], weights=str(path), name="classifier_a")
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(loaded(x), trained(x))


def test_save_weights_leaves_nothing_when_writing_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_weights(mnist.ClassifierA(), tmp_path / "a.pt")
    assert list(tmp_path.iterdir()) == []


def test_bare_net_state_dict_loads_into_normalized_victim(tmp_path: Path) -> None:
    """Released weights of the bare architecture (torchvision/timm files) load without conversion."""
    net = mnist.ClassifierB()
    torch.save(net.state_dict(), tmp_path / "b.pt")
    victim = build_victim(mnist.ClassifierB(), [0.5], [0.5], weights=tmp_path / "b.pt")
    torch.testing.assert_close(victim.net[1].weight, net[1].weight)


def test_missing_weights_say_how_to_train(tmp_path: Path) -> None:
    path = tmp_path / "fashion_mnist" / "classifier_a-pgd_at.pt"
    with pytest.raises(FileNotFoundError) as err:
        build_victim(mnist.ClassifierA(), [0.2860], [0.3530], weights=str(path), name="classifier_a")
    assert str(path) in str(err.value)
    hint = "train it first with `python train.py victim=classifier_a dataset=fashion_mnist training=pgd_at`"
    assert hint in str(err.value)


@pytest.mark.parametrize(
    "content", [b"\x00garbage\xff" * 50, b"", b"PK\x03\x04not a zip"], ids=["garbage", "empty", "bad_zip"]
)
def test_corrupt_weights_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "a.pt"
    path.write_bytes(content)
    with pytest.raises(RuntimeError, match=f"checkpoint {path} is corrupt or not a weights file: "):
        build_victim(mnist.ClassifierA(), [0.5], [0.5], weights=path)


def test_non_state_dict_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "a.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(RuntimeError, match="is corrupt or not a weights file: expected a state dict"):
        build_victim(mnist.ClassifierA(), [0.5], [0.5], weights=path)


def test_mismatched_state_dict_names_the_keys(tmp_path: Path) -> None:
    path = save_weights(build_victim(mnist.ClassifierA(), [0.5], [0.5]), tmp_path / "a.pt")
    with pytest.raises(RuntimeError) as err:
        build_victim(mnist.ClassifierB(), [0.5], [0.5], weights=path)
    message = str(err.value)
    assert message.startswith(f"checkpoint {path} does not match the model: ")
    assert "net.1.weight" in message  # B's first conv sits after its input dropout
    with pytest.raises(RuntimeError, match=r"shape mismatch: net.9.weight \(10, 128\) vs model \(5, 128\)"):
        build_victim(mnist.ClassifierA(num_classes=5), [0.5], [0.5], weights=path)


def test_checkpoint_with_other_normalisation_is_refused(tmp_path: Path) -> None:
    path = save_weights(build_victim(mnist.ClassifierA(), [0.5], [0.5]), tmp_path / "a.pt")
    with pytest.raises(RuntimeError, match="normalisation differs: mean"):
        build_victim(mnist.ClassifierA(), [0.2860], [0.5], weights=path)


def test_robustbench_imports_with_autoattack_aliased_to_pyautoattack() -> None:
    robustbench = import_robustbench()
    assert robustbench.__name__ == "robustbench" and hasattr(robustbench, "load_model")
    pyautoattack = importlib.import_module("pyautoattack")
    assert importlib.import_module("autoattack") is pyautoattack
    assert importlib.import_module("autoattack.state") is importlib.import_module("pyautoattack.state")
    assert import_robustbench("model_zoo.architectures.wide_resnet").__name__.endswith("wide_resnet")


def test_robustbench_model_needs_a_local_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    utils = import_robustbench("utils")

    def no_download(*args, **kwargs):
        raise AssertionError("robustbench_model tried to download")

    # robustbench 1.1.1 wheels differ in their download helpers (download_gdrive, download_gdrive_new …).
    for name in [n for n in dir(utils) if n.startswith("download")]:
        monkeypatch.setattr(utils, name, no_download)
    with pytest.raises(FileNotFoundError) as err:
        zoo.robustbench_model("Standard", dataset="cifar10", threat_model="Linf", model_dir=tmp_path)
    assert str(tmp_path / "cifar10" / "Linf" / "Standard.pt") in str(err.value)
    with pytest.raises(ValueError, match="not in RobustBench"):
        zoo.robustbench_model("NoSuchModel2099", model_dir=tmp_path)
    with pytest.raises(ValueError, match="RobustBench has no"):
        zoo.robustbench_model("Standard", dataset="fashion_mnist", model_dir=tmp_path)


def test_timm_and_torchvision_weights_come_only_from_local_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="never downloaded"):
        zoo.timm_model("resnet18", pretrained=True)
    reference = zoo.timm_model("resnet18", num_classes=3)
    torch.save(reference.state_dict(), tmp_path / "r18.pt")
    loaded = zoo.timm_model("resnet18", pretrained=True, num_classes=3, checkpoint_path=tmp_path / "r18.pt")
    torch.testing.assert_close(loaded.fc.weight, reference.fc.weight)
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        zoo.torchvision_model("resnet18", num_classes=3, weights=tmp_path / "missing.pt")


def _victim_cfg(name: str, checkpoint_dir: Path):
    dataset = CONFIG_DATASET[name]
    root = OmegaConf.create(
        {"dataset": dataset, "paths": {"checkpoint_dir": str(checkpoint_dir)}, "victim_training": "standard"}
    )
    root.victim = OmegaConf.load(CONF_DIR / f"{name}.yaml")
    return root, dataset


def test_every_victim_config_has_a_dataset_entry() -> None:
    assert sorted(p.stem for p in CONF_DIR.glob("*.yaml")) == sorted(CONFIG_DATASET)


@pytest.mark.parametrize("name", sorted(set(CONFIG_DATASET) - {"robustbench"}))
def test_victim_config_instantiates(name: str, tmp_path: Path) -> None:
    cfg, dataset = _victim_cfg(name, tmp_path)
    assert cfg.victim.name == name
    assert cfg.victim.weights == f"{tmp_path}/{dataset['name']}/{name}-standard.pt"
    if name == "wrn_28_10":  # 36 M parameters: check the config with a WRN-10-1 to keep the suite fast
        cfg.victim.net.depth, cfg.victim.net.widen_factor = 10, 1
    victim = hydra.utils.instantiate(cfg.victim, weights=None)
    assert isinstance(victim, Normalized) and not victim.training
    assert_logits_with_input_grad(victim, tuple(dataset["image_shape"]), dataset["num_classes"], n=1)
    # Evaluation (weights from the config) without a trained checkpoint: the one clear message survives Hydra.
    with pytest.raises(Exception, match=f"python train.py victim={name} dataset={dataset['name']} training=standard"):
        hydra.utils.instantiate(cfg.victim)


def test_robustbench_config_is_unnormalised_and_offline(tmp_path: Path) -> None:
    cfg, _ = _victim_cfg("robustbench", tmp_path)
    assert cfg.victim.mean is None and cfg.victim.std is None and cfg.victim.weights is None
    with pytest.raises(Exception, match="Standard.pt not found"):
        hydra.utils.instantiate(cfg.victim)
