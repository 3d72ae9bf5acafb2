"""JATP's pre-processor baselines as real defenses (issue 14, item 5): APE-GAN and HGD, each trained against a frozen
target on oblivious or full adversarial examples (``models.jatp.adversaries``).

What could fail and is checked: full adversaries that bypass the pre-processor or oblivious ones that run it (a spy
pre-processor, and a comparison of the two sources under one seed), networks that change the shape or leave [0, 1],
an HGD output that is not x + D(x), losses that are not the releases' (by hand), training that does not learn, the
wrong G/D update schedule or a target that moves, purifiers that are not deterministic / differentiable or do not
load what training exports, configs that do not compose or name the weights file without its variant, and a
missing weights file without its one-line "train it first".
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from defenses.ape_gan import APEGAN
from defenses.base import Defended, Identity
from defenses.hgd import HGD
from evaluation.cli import root_cause
from models.jatp.adversaries import AdversaryCache, AdversarySource, usable_cache
from models.jatp.ape_gan import APEGANDiscriminator, APEGANGenerator, APEGANModule
from models.jatp.hgd import HGDDenoiser, HGDModule, release_lr_schedule
from models.weights import save_weights
from conftest import SpyPreprocessor

TINY_HGD = {"fwd_out": (8, 8, 8, 8), "num_fwd": (1, 1, 1, 1), "back_out": (8, 8, 8), "num_back": (1, 1, 1)}
TINY_OVERRIDES = {
    "ape_gan": ["model.generator.width=8", "model.discriminator.width=8"],
    "hgd": ["model.denoiser.fwd_out=[8,8,8,8]", "model.denoiser.num_fwd=[1,1,1,1]", "model.denoiser.back_out=[8,8,8]",
            "model.denoiser.num_back=[1,1,1]"],
}
TINY_DEFENSE = {
    "ape_gan": ["defense.purifier.net.width=8"],
    "hgd": [o.replace("model.denoiser.", "defense.purifier.net.") for o in TINY_OVERRIDES["hgd"]],
}


def tiny_generator(channels: int = 1, seed: int = 0, **kwargs) -> APEGANGenerator:
    torch.manual_seed(seed)
    return APEGANGenerator(channels, width=8, **kwargs)


def tiny_denoiser(channels: int = 1, seed: int = 0) -> HGDDenoiser:
    torch.manual_seed(seed)
    return HGDDenoiser(channels, **TINY_HGD)


def adam(lr: float):
    return lambda params: torch.optim.Adam(params, lr=lr, betas=(0.5, 0.999))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


# -- the adversary sources -------------------------------------------------------------------------------------
def test_full_adversaries_go_through_the_preprocessor_and_oblivious_ones_never_do(fitted):
    victim, x, y = fitted
    xb, yb = x[:32], y[:32]
    kw = {"eps": 0.1, "steps": 3, "alpha": 0.04}
    spy = SpyPreprocessor().train()

    torch.manual_seed(5)
    oblivious = AdversarySource("oblivious", **kw)(spy, victim, xb, yb)
    assert (spy.with_grad, spy.without_grad) == (0, 0)  # P never runs

    torch.manual_seed(5)
    full = AdversarySource("full", **kw)(spy, victim, xb, yb)
    assert (spy.with_grad, spy.without_grad) == (3, 0)  # one differentiated pass through P per PGD step
    assert spy.modes == [False] * 3 and spy.training  # P attacked in eval mode, its own mode restored
    for adv in (oblivious, full):
        assert float((adv - xb).abs().max()) <= 0.1 + 1e-6 and 0 <= float(adv.min()) and float(adv.max()) <= 1
        assert not adv.requires_grad

    # Same seed, same random start: with P = identity the full source is exactly the oblivious one; with P = 1 − x
    # (whose Jacobian flips the gradient) it is not. A source that bypassed P would give the oblivious images here.
    torch.manual_seed(5)
    through_identity = AdversarySource("full", **kw)(nn.Identity(), victim, xb, yb)
    assert torch.equal(through_identity, oblivious)
    assert float((full - oblivious).abs().mean()) > 0.02
    # Each source maximises the loss of its own model: oblivious that of T (and lowers its accuracy), full that of T∘P.
    full_model = nn.Sequential(SpyPreprocessor(), victim)
    with torch.no_grad():
        ce = lambda model, images: float(F.cross_entropy(model(images), yb))  # noqa: E731
        assert ce(victim, oblivious) > ce(victim, full) + 1.0
        assert ce(full_model, full) > ce(full_model, oblivious) + 1.0
    assert accuracy(victim, oblivious, yb) < accuracy(victim, xb, yb) - 0.3

    source = AdversarySource("full", eps=8 / 255, steps=10, alpha=None)
    assert source.alpha == pytest.approx(2.5 * (8 / 255) / 10)  # madry_alpha
    assert not any(p.requires_grad for p in victim.parameters()) and not victim.training
    with pytest.raises(ValueError, match="unknown adversaries 'both'; valid: oblivious, full"):
        AdversarySource("both")


def test_adversary_cache_attacks_each_image_once_and_returns_valid_examples(fitted):
    """The originals' fixed adversarial set: a second visit of an image gets its stored example back (no attack),
    new images are attacked, the examples stay in the ε-box and in [0, 1], and the store stops at its limit."""
    victim, x, y = fitted
    source = AdversarySource("oblivious", eps=0.1, steps=2, alpha=0.05)
    calls: list[int] = []

    def make(xb, yb):
        def craft(index):
            calls.append(len(index))
            return source(nn.Identity(), victim, xb[index], yb[index])
        return craft

    cache = AdversaryCache(eps=0.1, limit=24)
    first = cache(x[:16], make(x[:16], y[:16]))
    assert calls == [16] and len(cache) == 16 and cache.last_reused == 0.0
    # Images 8–15 again, with 8 new ones (16–23), shuffled: only the new ones are attacked.
    order = torch.tensor([16, 9, 17, 8, 18, 19, 10, 11, 20, 12, 21, 13, 22, 14, 23, 15])
    second = cache(x[order], make(x[order], y[order]))
    assert calls == [16, 8] and cache.last_reused == 0.5 and len(cache) == 24
    seen = order < 16
    assert float((second[seen] - first[order[seen]]).abs().max()) < 1e-4  # float16 δ: the same example
    # A fresh PGD from a new random start would differ: reuse is what makes them equal.
    refreshed = source(nn.Identity(), victim, x[:16], y[:16])
    assert float((refreshed - first).abs().max()) > 0.01
    for adv, clean in ((first, x[:16]), (second, x[order])):
        assert float((adv - clean).abs().max()) <= 0.1 + 1e-6 and 0 <= float(adv.min()) and float(adv.max()) <= 1
    # Full store: new images are still attacked, never stored.
    cache(x[24:28], make(x[24:28], y[24:28]))
    assert calls[-1] == 4 and len(cache) == 24
    cache(x[24:28], make(x[24:28], y[24:28]))
    assert calls[-1] == 4 and cache.last_reused == 0.0
    with pytest.raises(ValueError, match="eps must be > 0"):
        AdversaryCache(eps=0.0)
    # A random augmentation makes every view a new image: the modules drop the cache at fit start, saying why.
    augmented, plain = (type("T", (), {"datamodule": type("D", (), {"augment": a})()})() for a in (True, False))
    assert usable_cache(cache, plain) is cache
    with pytest.warns(UserWarning, match="augment=true"):
        assert usable_cache(cache, augmented) is None


@pytest.mark.parametrize("kind", ["ape_gan", "hgd"])
def test_reused_adversaries_only_in_training_and_only_when_oblivious(fitted, kind):
    victim, x, y = fitted
    xb, yb = x[:8], y[:8]
    attack = {"eps": 0.1, "steps": 2, "alpha": 0.05}

    def module(adversaries: str, reuse: bool):
        if kind == "ape_gan":
            return APEGANModule(tiny_generator(), APEGANDiscriminator(1, 28, 8), victim, adam(1e-3), adam(1e-3),
                                adversaries=adversaries, attack=attack, reuse_adversaries=reuse)
        return HGDModule(tiny_denoiser(), victim, adam(1e-3), adversaries=adversaries, attack=attack,
                         reuse_adversaries=reuse)

    reusing = module("oblivious", True).train()
    a, b = reusing.make_adversaries(xb, yb), reusing.make_adversaries(xb, yb)
    assert float((a - b).abs().max()) < 1e-4 and reusing.adversary_cache.last_reused == 1.0
    reusing.eval()  # validation crafts afresh (a new random start)
    assert float((reusing.make_adversaries(xb, yb) - a).abs().max()) > 0.01
    fresh = module("oblivious", False).train()
    assert fresh.adversary_cache is None
    assert float((fresh.make_adversaries(xb, yb) - fresh.make_adversaries(xb, yb)).abs().max()) > 0.01
    # Full adversaries follow P's weights: never reused, whatever the flag says.
    assert module("full", True).adversary_cache is None


# -- APE-GAN -------------------------------------------------------------------------------------------------
def test_ape_gan_networks_are_the_releases_and_keep_shape_and_range():
    g, d = APEGANGenerator(), APEGANDiscriminator()
    convs = [(m.in_channels, m.out_channels, m.kernel_size, m.stride) for m in (g.conv1, g.conv2, g.deconv1, g.deconv2)]
    assert convs == [(3, 64, (5, 5), (2, 2)), (64, 128, (5, 5), (2, 2)), (128, 64, (5, 5), (2, 2)), (64, 3, (5, 5), (2, 2))]
    assert isinstance(g.deconv1, nn.ConvTranspose2d) and isinstance(g.deconv2, nn.ConvTranspose2d)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in g.modules()) == 3  # g_bn0, g_bn1, g_bn2
    assert [d.conv1.out_channels, d.conv2.out_channels, d.conv3.out_channels] == [64, 128, 256]
    assert d.linear.in_features == 4 * 4 * 256 and d(torch.rand(2, 3, 32, 32)).shape == (2,)

    for channels, size in ((1, 28), (3, 32)):
        x = torch.rand(4, channels, size, size)
        for output in ("tanh", "sigmoid"):
            net = tiny_generator(channels, output=output).eval()
            out = net(x)
            assert out.shape == x.shape and 0 < float(out.min()) and float(out.max()) < 1
            torch.testing.assert_close(net(x[:1]), out[:1])  # eval mode: an image's output ignores its batch
    net = tiny_generator(3).eval()
    x = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(net(x), torch.sigmoid(2 * net.logits(x)))  # (tanh(h) + 1)/2 = σ(2h)
    with pytest.raises(ValueError, match="unknown output 'relu'; valid: tanh, sigmoid"):
        APEGANGenerator(output="relu")


def test_ape_gan_losses_are_the_releases_by_hand(fitted):
    victim, x, _ = fitted
    xb = x[:8]
    x_adv = (xb + 0.05 * torch.randn_like(xb)).clamp(0, 1)
    module = APEGANModule(tiny_generator(), APEGANDiscriminator(1, 28, 8), victim, adam(2e-4), adam(2e-4))
    module.eval()
    g_loss, logs = module.generator_loss(xb, x_adv)
    fake = 2 * module.generator(x_adv) - 1
    p_fake = torch.sigmoid(module.discriminator(fake))
    adv = -torch.log(p_fake).mean()
    rmse = torch.sqrt(((fake - (2 * xb - 1)) ** 2).mean())  # in the release's [−1, 1] space
    assert float(logs["adv"]) == pytest.approx(float(adv), rel=1e-5)
    assert float(logs["rmse"]) == pytest.approx(float(rmse), rel=1e-5)
    assert float(g_loss) == pytest.approx(float(0.02 * adv + 0.9 * rmse), rel=1e-5)
    p_real = torch.sigmoid(module.discriminator(2 * xb - 1))
    d_by_hand = -torch.log(p_real).mean() - torch.log(1 - p_fake).mean()
    assert float(module.discriminator_loss(xb, x_adv)) == pytest.approx(float(d_by_hand), rel=1e-5)
    with pytest.raises(ValueError, match="unknown adversaries 'static'; valid: oblivious, full"):
        APEGANModule(tiny_generator(), APEGANDiscriminator(1, 28, 8), victim, adam(2e-4), adam(2e-4), adversaries="static")


def test_ape_gan_training_runs_g_twice_per_d_step_and_lowers_the_loss(fitted, tmp_path):
    victim, x, y = fitted
    xb, yb = x[:16], y[:16]
    victim_before = copy.deepcopy(victim.state_dict())
    torch.manual_seed(0)
    module = APEGANModule(tiny_generator(seed=1), APEGANDiscriminator(1, 28, 8), victim, adam(2e-3), adam(2e-4),
                          adversaries="full", attack={"eps": 0.1, "steps": 2, "alpha": 0.05})
    torch.manual_seed(1)
    fixed_adv = AdversarySource("oblivious", eps=0.1, steps=2, alpha=0.05)(nn.Identity(), victim, xb, yb)

    def rmse() -> float:
        module.generator.eval()
        with torch.no_grad():
            return float(module.generator_loss(xb, fixed_adv)[1]["rmse"])

    before = rmse()
    batches = 25
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, max_epochs=batches, num_sanity_val_steps=0,
                        check_val_every_n_epoch=batches)
    train = DataLoader(TensorDataset(xb, yb), batch_size=16)
    trainer.fit(module, train_dataloaders=train, val_dataloaders=DataLoader(TensorDataset(x[16:24], y[16:24]), batch_size=8))

    gen_opt, disc_opt = (o.optimizer for o in module.optimizers())
    steps = lambda opt: int(next(iter(opt.state.values()))["step"])  # noqa: E731
    assert (steps(disc_opt), steps(gen_opt), trainer.global_step) == (batches, 2 * batches, 3 * batches)
    assert {id(p) for g in gen_opt.param_groups for p in g["params"]} == {id(p) for p in module.generator.parameters()}
    after = rmse()
    assert after < 0.6 * before, (before, after)
    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/d_loss", "train/adv", "train/rmse", "val/loss", "val/acc", "val/clean_acc", "val/rmse"):
        assert key in metrics and torch.isfinite(metrics[key]), key
    # The target never moved and never collected gradients.
    assert all(torch.equal(v, victim_before[k]) for k, v in victim.state_dict().items())
    assert all(p.grad is None for p in victim.parameters()) and not victim.training
    exported = module.export()
    assert isinstance(exported, APEGANGenerator) and not exported.training and exported is not module.generator


# -- HGD -----------------------------------------------------------------------------------------------------
def test_hgd_output_is_x_plus_d_of_x_and_its_dunet_is_the_releases_shrunk():
    net = HGDDenoiser()  # ours: the release's DUNET minus its deepest stage (32×32)
    assert [len(s) for s in net.fwd] == [2, 3, 3, 3] and [len(s) for s in net.back] == [2, 3, 3]
    assert [s[0].conv.stride for s in net.fwd] == [(1, 1), (2, 2), (2, 2), (2, 2)]
    assert [s[0].conv.out_channels for s in net.fwd] == [64, 128, 256, 256]
    assert [s[0].conv.in_channels for s in net.back] == [128 + 64, 256 + 128, 256 + 256]  # lateral concatenations
    assert (net.final.in_channels, net.final.out_channels, net.final.kernel_size, net.final.bias) == (64, 3, (1, 1), None)
    assert all(m.bias is None and m.kernel_size == (3, 3) for s in [*net.fwd, *net.back] for b in s for m in [b.conv])

    for channels, size in ((1, 28), (3, 32)):
        den = tiny_denoiser(channels).eval()
        x = torch.rand(4, channels, size, size)
        out = den(x)
        assert out.shape == x.shape and 0 <= float(out.min()) and float(out.max()) <= 1
        torch.testing.assert_close(den.raw(x), x + den.residual(x))
        torch.testing.assert_close(out, (x + den.residual(x)).clamp(0, 1))
        with torch.no_grad():
            den.final.weight.zero_()  # D ≡ 0 → the identity
        assert torch.equal(den(x), x)
        with torch.no_grad():
            den.final.weight.fill_(5.0)
        assert float(den.raw(x).abs().max()) > 1 and 0 <= float(den(x).min()) and float(den(x).max()) <= 1
    with pytest.raises(ValueError, match="one stage fewer than fwd_out"):
        HGDDenoiser(fwd_out=(8, 8, 8), num_fwd=(1, 1, 1), back_out=(8, 8, 8), num_back=(1, 1, 1))
    sched = release_lr_schedule(torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=1.0), epochs=10)
    factors = []
    for _ in range(10):
        factors.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    assert factors == pytest.approx([1.0] * 6 + [0.1] * 3 + [0.01])  # release get_lr: ≤ 60 %, ≤ 90 %, rest


def test_hgd_lgd_loss_by_hand_and_a_few_steps_lower_it(fitted):
    victim, x, y = fitted
    xb, yb = x[:16], y[:16]
    module = HGDModule(tiny_denoiser(seed=2), victim, optimizer=lambda p: torch.optim.Adam(p, 3e-3),
                       attack={"eps": 0.1, "steps": 2, "alpha": 0.05})
    x_adv = module.make_adversaries(xb, yb)
    loss, logits = module.lgd_loss(xb, x_adv)
    by_hand = (victim(module.denoiser(x_adv)) - victim(xb)).abs().mean()  # L1 between the target's logits
    assert float(loss) == pytest.approx(float(by_hand), rel=1e-5)
    opt = module.configure_optimizers()
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in module.denoiser.parameters()}

    def loss_at_seed() -> float:
        torch.manual_seed(0)
        module.denoiser.eval()
        with torch.no_grad():
            return float(module.lgd_loss(xb, module.make_adversaries(xb, yb))[0])

    before = loss_at_seed()
    module.train()
    assert module.denoiser.training and not module.victim.training
    for _ in range(25):
        opt.zero_grad()
        step_loss, logs = module.step((xb, yb), "train")
        step_loss.backward()
        opt.step()
    assert set(logs) == {"acc"} and "clean_acc" in module.step((xb, yb), "val")[1]
    after = loss_at_seed()
    assert after < 0.75 * before, (before, after)
    assert all(p.grad is None for p in victim.parameters())


# -- the purifiers -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["ape_gan", "hgd"])
def test_purifiers_are_deterministic_differentiable_and_weaken_to_identity(fitted, kind, tmp_path):
    victim, x, y = fitted
    cls, net = (APEGAN, tiny_generator(seed=3)) if kind == "ape_gan" else (HGD, tiny_denoiser(seed=3))
    purifier = cls(net)
    assert (purifier.stochastic, purifier.differentiable) == (False, True) and isinstance(purifier.weakened(), Identity)
    xb = x[:4]
    out = purifier(xb)
    assert out.shape == xb.shape and 0 <= float(out.min()) and float(out.max()) <= 1
    assert torch.equal(out, purifier(xb))
    xg = xb.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(Defended(purifier, victim)(xg), y[:4]), xg)
    assert torch.isfinite(grad).all() and float(grad.abs().sum()) > 0
    purifier.train()
    assert purifier.training and not purifier.net.training and not any(p.requires_grad for p in purifier.parameters())
    other = tiny_denoiser() if kind == "ape_gan" else tiny_generator()
    with pytest.raises(TypeError, match=f"{cls.__name__}: net must be"):
        cls(other)
    with pytest.raises(ValueError, match="unknown adversaries 'mixed'; valid: oblivious, full"):
        cls(net, adversaries="mixed")

    # The defense loads what the training module exports (BatchNorm running statistics included).
    if kind == "ape_gan":
        module = APEGANModule(tiny_generator(seed=4), APEGANDiscriminator(1, 28, 8), victim, adam(1e-3), adam(1e-3))
        trained = module.generator
    else:
        module = HGDModule(tiny_denoiser(seed=4), victim, optimizer=adam(1e-3))
        trained = module.denoiser
    trained.train()
    with torch.no_grad():
        trained(x[:32])  # move the running statistics away from their initial values
    path = save_weights(module.export(), tmp_path / "fashion_mnist" / f"{kind}-tiny-trades-full.pt")
    fresh = tiny_generator(seed=9) if kind == "ape_gan" else tiny_denoiser(seed=9)
    loaded = cls(fresh, weights=str(path), adversaries="full")
    torch.testing.assert_close(loaded(xb), trained.eval()(xb))


# -- configs, weights, messages ------------------------------------------------------------------------------------
def test_configs_compose_instantiate_and_name_the_variant(compose):
    for model, module_cls, purifier_cls in (("ape_gan", APEGANModule, APEGAN), ("hgd", HGDModule, HGD)):
        cfg = compose("train", [f"model={model}", "logger=csv"])
        assert (cfg.dataset.name, cfg.victim.name, cfg.victim_training) == ("fashion_mnist_rgb32", "resnet18", "trades")
        assert cfg.model.export_path.endswith(f"fashion_mnist_rgb32/{model}-resnet18-trades-oblivious.pt")
        assert cfg.model.victim.weights.endswith("fashion_mnist_rgb32/resnet18-trades.pt")
        full = compose("train", [f"model={model}", "model.adversaries=full"])
        assert full.model.export_path.endswith(f"fashion_mnist_rgb32/{model}-resnet18-trades-full.pt")
        module = instantiate(full.model, victim={"weights": None})
        assert isinstance(module, module_cls) and module.adversaries == "full" and module.source.kind == "full"
        s = module.source
        assert (s.steps, s.alpha, s.random_start) == (40, 0.007, True) and s.eps == pytest.approx(8 / 255)

        ev = compose("evaluate", [f"defense={model}", "dataset=fashion_mnist_rgb32", "victim=resnet18",
                                  "defense.purifier.adversaries=full"])
        assert ev.defense.name == f"{model}-full" and ev.defense.purifier.weights == full.model.export_path
        purifier = instantiate(ev.defense.purifier, weights=None)
        assert isinstance(purifier, purifier_cls) and purifier.adversaries == "full"
        # The defense builds the same network as training exports (one spec in conf/preprocessor/).
        exported, evaluated = module.export().state_dict(), purifier.net.state_dict()
        assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in evaluated.items()}

        with pytest.raises(Exception) as err:
            instantiate(compose("train", [f"model={model}", "model.adversaries=both"]).model, victim={"weights": None})
        assert isinstance(root_cause(err.value), ValueError) and "valid: oblivious, full" in str(root_cause(err.value))

    ape = instantiate(compose("train", ["model=ape_gan"]).model, victim={"weights": None})
    assert (ape.adv_weight, ape.rmse_weight, ape.generator_steps) == (0.02, 0.9, 2)
    assert ape.generator.output == "tanh" and ape.generator.width == 64 and ape.discriminator.width == 64
    for opt in ape.configure_optimizers():
        assert isinstance(opt, torch.optim.Adam) and opt.defaults["lr"] == 2e-4 and opt.defaults["betas"] == (0.5, 0.999)
    hgd = instantiate(compose("train", ["model=hgd"]).model, victim={"weights": None})
    opt = hgd.configure_optimizers()
    assert isinstance(opt["optimizer"], torch.optim.Adam) and opt["optimizer"].defaults["lr"] == 0.01
    assert isinstance(opt["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.LambdaLR)
    assert hgd.denoiser.fwd_out == [64, 128, 256, 256] and hgd.denoiser.back_out == [64, 128, 256]


@pytest.mark.parametrize("model,adversaries", [("ape_gan", "full"), ("hgd", "oblivious")])
def test_missing_checkpoint_is_one_line_saying_how_to_train_it(compose, missing_weights_message, model, adversaries):
    cfg = compose("evaluate", [f"defense={model}", "dataset=fashion_mnist_rgb32", "victim=resnet18",
                               f"defense.purifier.adversaries={adversaries}"])
    message = missing_weights_message(cfg)
    assert (f"python train.py model={model} dataset=fashion_mnist_rgb32 victim=resnet18 victim_training=trades "
            f"model.adversaries={adversaries}") in message
    assert f"{model}-resnet18-trades-{adversaries}.pt" in message


@pytest.mark.parametrize("model", ["ape_gan", "hgd"])
def test_train_py_fits_and_exports_where_the_defense_loads(compose, model):
    """train.py end to end on one batch (random target weights: plumbing only), full adversaries: Lightning runs the
    module's optimisation, the weights land where defense=<model> defense.purifier.adversaries=full looks."""
    from train import train

    cfg = compose("train", [f"model={model}", "logger=csv", "model.adversaries=full", "model.attack.steps=1",
                            *TINY_OVERRIDES[model], "trainer.max_epochs=1", "trainer.limit_train_batches=1",
                            "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
                            "dataset.datamodule.train_subset=16", "dataset.datamodule.batch_size=4",
                            "dataset.datamodule.eval_batch_size=4", "test_after_training=false"])
    save_weights(instantiate(cfg.victim, weights=None), cfg.victim.weights)
    metrics, _ = train(cfg)
    assert {"train/loss", "val/acc", "val/clean_acc"} <= set(metrics) and all(math.isfinite(v) for v in metrics.values())
    ev = compose("evaluate", [f"defense={model}", "dataset=fashion_mnist_rgb32", "victim=resnet18",
                              "defense.purifier.adversaries=full", *TINY_DEFENSE[model]])
    assert ev.defense.purifier.weights == cfg.model.export_path and Path(cfg.model.export_path).is_file()
    purifier = instantiate(ev.defense.purifier)  # loads the exported file
    assert purifier.weights == cfg.model.export_path
