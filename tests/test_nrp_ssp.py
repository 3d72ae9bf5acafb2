"""NRP as a baseline (issue 14): NRP's generator trained on self-supervised perturbations (``models.jatp.nrp_ssp``) and
put in front of the victim by ``defenses.nrp``.

What could fail and is checked: an SSP adversary that leaves the 16/255 ball or [0, 1], or that does not raise the
feature distortion (and is not the release's ``ssp.py`` loop); VGG-16 weights read from the wrong keys, a missing VGG
file without its one-line "where to put it"; training steps that do not lower the loss; a defense that does not load
what training exported; configs that do not compose.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torchvision.models import vgg as tv_vgg

from defenses.base import Identity
from defenses.jatp import JATP
from defenses.nrp import NRP
from models.jatp.networks import NRPGenerator
from models.jatp.nrp_ssp import (VGG16_FILE, NRPDiscriminator, NRPSSPModule, SSPAttack, VGGFeatures,
                                 relativistic_average_losses)
from models.weights import CheckpointError, save_weights


@pytest.fixture(scope="module")
def random_vgg() -> VGGFeatures:
    return VGGFeatures("vgg16_random", layers=16)


def test_ssp_is_the_releases_loop_stays_in_the_ball_and_raises_the_feature_distortion(fmnist_test_batch, random_vgg):
    x = fmnist_test_batch[0][:8]  # grey 28×28: repeated to 3 channels inside the feature network
    eps = 16 / 255
    gen = torch.Generator().manual_seed(7)
    adv = SSPAttack(eps=eps, step_size=0.01, steps=10)(random_vgg, x, generator=gen)
    assert adv.shape == x.shape and float((adv - x).abs().max()) <= eps + 1e-6
    assert 0 <= float(adv.min()) and float(adv.max()) <= 1
    # ssp.py written out: adv = randn; 10 × (MSE(VGG(norm(adv)), VGG(norm(img))) sign step 0.01, project, clamp).
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    vgg = lambda t: random_vgg.net((t.expand(-1, 3, -1, -1) - mean) / std)  # noqa: E731
    manual = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = vgg(x)
    for _ in range(10):
        manual = manual.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.mse_loss(vgg(manual), ref), [manual])
        manual = manual.detach() + 0.01 * g.sign()
        manual = torch.where(manual > x + eps, x + eps, manual)
        manual = torch.where(manual < x - eps, x - eps, manual).clamp(0, 1)
    torch.testing.assert_close(adv, manual, rtol=0, atol=1e-6)
    # It raises the feature distortion well above that of uniform noise of the same budget.
    with torch.no_grad():
        d_adv = float(F.mse_loss(random_vgg(adv), ref))
        noise = (x + eps * (2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) - 1)).clamp(0, 1)
        d_noise = float(F.mse_loss(random_vgg(noise), ref))
    assert d_adv > 2 * d_noise, (d_adv, d_noise)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        SSPAttack(steps=0)


def test_vgg_weights_come_from_a_torchvision_state_dict_and_a_missing_file_is_one_line(tmp_path, random_vgg):
    # A torchvision-format VGG-16 state dict ("features.<i>.*" + a classifier), here with random values.
    torch.manual_seed(0)
    features = tv_vgg.make_layers(tv_vgg.cfgs["D"])
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state["classifier.6.bias"] = torch.zeros(1000)
    path = tmp_path / VGG16_FILE
    torch.save(state, path)
    loaded = VGGFeatures("vgg16", str(path), layers=16)
    assert len(loaded.net) == 16 and isinstance(loaded.net[-1], torch.nn.ReLU) and loaded.net[14].out_channels == 256
    torch.testing.assert_close(loaded.net[14].weight, features[14].weight)  # conv3_3, the last of features[:16]
    assert not any(p.requires_grad for p in loaded.parameters())
    loaded.train()
    assert not loaded.training
    # A missing file: one line with the path, torchvision's file name and the fallback.
    with pytest.raises(FileNotFoundError) as err:
        VGGFeatures("vgg16", str(tmp_path / "nowhere" / VGG16_FILE))
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "nowhere" / VGG16_FILE) in message
    assert "model.feature_net=vgg16_random" in message and "IMAGENET1K_V1" in message
    # Another network's file: one line too.
    other = tmp_path / "nrp.pt"
    save_weights(NRPGenerator(3, 3, nf=8, nb=1, gc=4), other)
    with pytest.raises(CheckpointError, match="not torchvision's VGG-16 state dict: no features.0.bias"):
        VGGFeatures("vgg16", str(other))
    with pytest.raises(ValueError, match="unknown feature_net 'resnet'; valid: vgg16, vgg16_random"):
        VGGFeatures("resnet")
    # The random VGG is seeded: every run (and the export's training) builds the same one.
    torch.testing.assert_close(VGGFeatures("vgg16_random", layers=16).net[14].weight, random_vgg.net[14].weight)


def test_relativistic_average_losses_by_hand():
    real, fake = torch.tensor([[2.0], [0.0]]), torch.tensor([[1.0], [-1.0]])
    d_loss, g_loss = relativistic_average_losses(real, fake)
    s = torch.sigmoid
    # E D(fake) = 0, E D(real) = 1: real − E fake = (2, 0), fake − E real = (0, −2).
    by_hand_d = (-(torch.log(s(torch.tensor(2.0))) + torch.log(s(torch.tensor(0.0)))) / 2
                 - (torch.log(1 - s(torch.tensor(0.0))) + torch.log(1 - s(torch.tensor(-2.0)))) / 2) / 2
    by_hand_g = (-(torch.log(1 - s(torch.tensor(2.0))) + torch.log(1 - s(torch.tensor(0.0)))) / 2
                 - (torch.log(s(torch.tensor(0.0))) + torch.log(s(torch.tensor(-2.0)))) / 2) / 2
    assert float(d_loss) == pytest.approx(float(by_hand_d), rel=1e-5)
    assert float(g_loss) == pytest.approx(float(by_hand_g), rel=1e-5)


def make_module(**kwargs) -> NRPSSPModule:
    """A CPU-sized NRP trainer: tiny generator and discriminator, VGG-16 features[:4] (conv1_1 … relu1_2), Adam 1e-3."""
    torch.manual_seed(0)
    options = dict(feature_net="vgg16_random", feature_layers=4, discriminator=NRPDiscriminator(1, 28, width=8),
                   discriminator_optimizer=lambda p: torch.optim.Adam(p, 1e-3, betas=(0.5, 0.999)))
    options.update(kwargs)
    return NRPSSPModule(NRPGenerator(1, 1, nf=8, nb=1, gc=4, skip=False), SSPAttack(steps=3),
                        generator_optimizer=lambda p: torch.optim.Adam(p, 1e-3, betas=(0.5, 0.999)), **options)


def test_a_few_nrp_steps_lower_the_loss_and_bring_p_of_the_adversary_towards_x(fmnist_test_batch):
    x = fmnist_test_batch[0][:16]
    module = make_module()
    gen_opt, disc_opt = module.configure_optimizers()
    assert {id(p) for p in gen_opt.param_groups[0]["params"]} == {id(p) for p in module.preprocessor.parameters()}
    assert {id(p) for p in disc_opt.param_groups[0]["params"]} == {id(p) for p in module.discriminator.parameters()}
    assert not any(p.requires_grad for p in module.features.parameters())
    torch.manual_seed(1)
    x_adv = module.adversaries(x)
    before, logs0 = module.generator_loss(x, x_adv)
    module.train()
    for _ in range(40):
        disc_opt.zero_grad()
        module.discriminator_loss(x, x_adv).backward()
        disc_opt.step()
        gen_opt.zero_grad()
        loss, logs = module.generator_loss(x, x_adv)
        loss.backward()
        gen_opt.step()
    assert all(math.isfinite(float(v)) for v in logs.values()) and float(logs["adv"]) > 0
    module.eval()
    after, logs1 = module.generator_loss(x, x_adv)
    assert float(after) < 0.5 * float(before), (float(before), float(after))
    # P(x') is closer to x than it started, in the feature space and in pixels.
    assert float(logs1["feat"]) < 0.5 * float(logs0["feat"]) and float(logs1["pix"]) < float(logs0["pix"])
    # Each term switches off; without the GAN term there is no discriminator.
    plain = make_module(adv_weight=0.0, discriminator=None, discriminator_optimizer=None)
    assert plain.discriminator is None and isinstance(plain.configure_optimizers(), torch.optim.Adam)
    assert float(plain.generator_loss(x, x_adv)[1]["adv"]) == 0.0
    with pytest.raises(ValueError, match="adv_weight > 0 needs a discriminator"):
        make_module(discriminator=None)
    with pytest.raises(ValueError, match="not all 0"):
        make_module(feature_weight=0.0, pixel_weight=0.0, adv_weight=0.0)


def test_configs_compose_with_nrps_settings(compose, missing_weights_message):
    cfg = compose("train", ["model=nrp", "model.feature_net=vgg16_random", "logger=csv"])
    assert cfg.model.export_path.endswith("fashion_mnist_rgb32/nrp-vgg16_random.pt")
    module = instantiate(cfg.model)
    p, a = module.preprocessor, module.attack
    assert (p.nf, p.nb, p.gc, p.skip) == (64, 3, 32, False)  # NRP's block, 3 of them, the release's form
    assert (a.eps, a.step_size, a.steps) == (pytest.approx(16 / 255), 0.01, 100)
    assert (module.feature_weight, module.pixel_weight, module.adv_weight) == (1.0, 0.01, 0.005)
    assert module.features.layers == 16 and module.features.feature_net == "vgg16_random"
    gen_opt, disc_opt = module.configure_optimizers()
    assert isinstance(gen_opt, torch.optim.Adam) and gen_opt.defaults["lr"] == 1e-4 and gen_opt.defaults["betas"] == (0.5, 0.999)
    # The default (NRP's ImageNet VGG-16) without its file: one line saying where to put it.
    default = compose("train", ["model=nrp"])
    assert default.model.vgg_weights.endswith(f"pretrained/{VGG16_FILE}")
    with pytest.raises(Exception) as err:
        instantiate(default.model)
    cause = err.value
    while cause.__cause__ is not None:
        cause = cause.__cause__
    assert isinstance(cause, FileNotFoundError) and "\n" not in str(cause) and "vgg16_random" in str(cause)
    # The defense: JATP's purifier class with NRP's file and message.
    ev = compose("evaluate", ["defense=nrp", "dataset=fashion_mnist_rgb32", "victim=resnet18"])
    assert ev.defense.name == "nrp-vgg16" and ev.defense.purifier.weights.endswith("fashion_mnist_rgb32/nrp-vgg16.pt")
    message = missing_weights_message(ev)
    assert "python train.py model=nrp dataset=fashion_mnist_rgb32`" in message and "nrp-vgg16.pt" in message
    rnd = compose("evaluate", ["defense=nrp", "defense.purifier.feature_net=vgg16_random", "dataset=fashion_mnist_rgb32"])
    assert "model.feature_net=vgg16_random" in missing_weights_message(rnd)
    with pytest.raises(ValueError, match="valid: vgg16, vgg16_random"):
        NRP(NRPGenerator(3, 3, nf=8, nb=1, gc=4, skip=False), feature_net="vgg19")


def test_train_py_fits_exports_and_the_defense_loads_it(compose):
    """train.py end to end on one batch, twice (random VGG, tiny generator, reused SSP examples): the export lands where
    defense=nrp looks."""
    from train import train

    cfg = compose("train", ["model=nrp", "model.feature_net=vgg16_random", "model.feature_layers=4", "logger=csv",
                            "model.preprocessor.nf=8", "model.preprocessor.nb=1", "model.preprocessor.gc=4",
                            "model.discriminator.width=8", "model.attack.steps=1", "trainer.max_epochs=2",
                            "trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
                            "dataset.datamodule.train_subset=16", "dataset.datamodule.batch_size=16",
                            "dataset.datamodule.eval_batch_size=8", "test_after_training=false",
                            "model.reuse_adversaries=true"])
    metrics, objects = train(cfg)
    assert {"train/feat", "train/pix", "train/adv", "train/d_loss", "val/loss", "val/feat_adv"} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())
    # Epoch 2 visits the same 16 images: every SSP example is the stored one (model.reuse_adversaries=true).
    assert metrics["train/adv_reused"] == 1.0 and len(objects["module"].adversary_cache) == 16
    ev = compose("evaluate", ["defense=nrp", "defense.purifier.feature_net=vgg16_random", "dataset=fashion_mnist_rgb32",
                              "victim=resnet18", "defense.purifier.net.nf=8", "defense.purifier.net.nb=1",
                              "defense.purifier.net.gc=4"])
    assert ev.defense.purifier.weights == cfg.model.export_path and Path(cfg.model.export_path).is_file()
    nrp = instantiate(ev.defense.purifier)
    assert isinstance(nrp, NRP) and isinstance(nrp, JATP) and nrp.weights == cfg.model.export_path
    assert (nrp.stochastic, nrp.differentiable) == (False, True) and isinstance(nrp.weakened(), Identity)
    x = torch.rand(2, 3, 32, 32)
    trained = objects["module"].export()
    torch.testing.assert_close(nrp(x), trained(x))
    assert 0 <= float(nrp(x).min()) and float(nrp(x).max()) <= 1
