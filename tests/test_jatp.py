"""JATP (issue 14), first slice: the pre-processor (NRP's generator), full adversarial examples in the target's
feature space (Eq. 5) and the JATP loss / training (Eqs. 6–10, Alg. 1).

What could fail and is checked: a feature hook reading another layer than the one named (compared with a manual
forward through ResNet-18), adversaries that bypass the pre-processor (a spy pre-processor and a comparison with the
bare target's adversaries), loss terms with the wrong sign or scale (Eq. 7's BCE, FSM and the pixel term by hand), a
pre-processor that changes the shape or leaves [0, 1], a training step that does not learn or touches the frozen
target, configs that do not compose, and a missing weights file without its one-line "train it first".
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn

from defenses.base import Defended, Identity
from defenses.jatp import JATP
from models.jatp.attack import FeatureAttack, feature_distance, features_and_logits, resolve_layer
from models.jatp.losses import boosted_cross_entropy, feature_similarity, pixel_loss
from models.jatp.module import JATPModule
from models.jatp.networks import NRPGenerator
from models.weights import save_weights
from conftest import SpyPreprocessor

RGB_MEAN, RGB_STD = [0.2860] * 3, [0.3530] * 3


def tiny_net(in_nc: int = 3, seed: int = 0, **kwargs) -> NRPGenerator:
    torch.manual_seed(seed)
    return NRPGenerator(in_nc, in_nc, nf=8, nb=1, gc=4, **kwargs)


@pytest.fixture(scope="module")
def resnet():
    """ResNet-18 (random init, eval mode) behind the victims' normalisation wrapper, as conf/victim/resnet18 builds it."""
    from models.victims import build_victim
    from models.victims.cifar import resnet18

    torch.manual_seed(0)
    return build_victim(resnet18(), mean=RGB_MEAN, std=RGB_STD).requires_grad_(False)


# -- the pre-processor ---------------------------------------------------------------------------------------
def test_nrp_generator_is_nrps_architecture_and_keeps_shape_and_range():
    full = NRPGenerator()  # NRP(3, 3, 64, 3)
    convs = [m for m in full.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 3 * 3 * 5 + 1  # conv 3→64, 3 RRDB × 3 dense blocks × 5 convs, conv 64→3
    assert (convs[0].in_channels, convs[0].out_channels, convs[-1].in_channels, convs[-1].out_channels) == (3, 64, 64, 3)
    rdb = full.RRDB_trunk[0].RDB1
    assert [c.out_channels for c in (rdb.conv1, rdb.conv2, rdb.conv3, rdb.conv4, rdb.conv5)] == [32, 32, 32, 32, 64]
    assert rdb.conv5.in_channels == 64 + 4 * 32 and rdb.lrelu.negative_slope == 0.2
    assert {"conv_first.weight", "RRDB_trunk.2.RDB3.conv5.bias", "trunk_conv.weight"} <= set(full.state_dict())  # NRP's keys

    x = torch.rand(4, 3, 32, 32)
    for output in ("clamp", "sigmoid"):
        net = tiny_net(output=output)
        out = net(x)
        assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1
        assert torch.equal(out, net(x))  # deterministic
    net = tiny_net()
    with torch.no_grad():
        net.trunk_conv.bias.fill_(2.0)  # push the raw output above 1: the clamp keeps the image in range
    assert float(net.raw(x).max()) > 1 and float(net(x).max()) == 1.0
    torch.testing.assert_close(net(x), net.raw(x).clamp(0, 1))
    assert tiny_net(in_nc=1)(torch.rand(2, 1, 28, 28)).shape == (2, 1, 28, 28)
    with pytest.raises(ValueError, match="unknown output 'tanh'; valid: clamp, sigmoid"):
        NRPGenerator(output="tanh")
    with pytest.raises(ValueError, match="in_nc .* must equal out_nc"):
        NRPGenerator(3, 1)


def test_skip_starts_near_the_identity_init_scale_is_basicsrs_and_the_form_is_in_the_file(tmp_path):
    x = torch.rand(4, 3, 32, 32)
    torch.manual_seed(0)
    with_skip = NRPGenerator(3, 3, nf=16, nb=1)  # the default: x + NRP(x)
    torch.manual_seed(0)
    release = NRPGenerator(3, 3, nf=16, nb=1, skip=False)  # NRP's release, same weights
    torch.testing.assert_close(with_skip.raw(x), release.raw(x) + x)
    # At init the release maps images to ≈ 0 (MSE ≈ E[x²] ≈ 1/3 on uniform noise); the skip form to ≈ x.
    assert float(F.mse_loss(with_skip(x), x)) < 0.25 * float(F.mse_loss(release(x), x))
    assert set(release.state_dict()) == set(with_skip.state_dict()) - {"_variant_skip"}  # release: NRP's keys only
    with pytest.raises(Exception, match="another variant of the architecture: _variant_skip"):
        from models.weights import load_weights

        load_weights(release, save_weights(with_skip, tmp_path / "skip.pt"), missing_hint="")
    # init_scale: BasicSR's initialize_weights(dense-block convs, s) — Kaiming-normal (fan-in) × s, zero biases.
    torch.manual_seed(0)
    scaled = NRPGenerator(3, 3, nf=64, nb=1, init_scale=0.1)
    conv = scaled.RRDB_trunk[0].RDB2.conv5
    fan_in = conv.weight[0].numel()
    assert float(conv.weight.std()) == pytest.approx(0.1 * math.sqrt(2 / fan_in), rel=0.05)
    assert float(conv.bias.abs().max()) == 0.0
    assert float(scaled.conv_first.bias.abs().max()) > 0  # outside the dense blocks: PyTorch's init, as BasicSR
    with pytest.raises(ValueError, match="init_scale must be > 0 or null"):
        NRPGenerator(init_scale=0.0)


def test_purifier_is_deterministic_differentiable_and_weakens_to_identity(resnet):
    jatp = JATP(tiny_net(seed=1))
    assert (jatp.stochastic, jatp.differentiable) == (False, True) and isinstance(jatp.weakened(), Identity)
    x = torch.rand(3, 3, 32, 32)
    out = jatp(x)
    assert out.shape == x.shape and 0 <= float(out.min()) and float(out.max()) <= 1
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(Defended(jatp, resnet)(xg), torch.tensor([0, 1, 2])), xg)
    assert torch.isfinite(grad).all()
    jatp.train()
    assert jatp.training and not jatp.net.training and not any(p.requires_grad for p in jatp.parameters())


# -- Eq. 5: the feature hook and the full adversaries -------------------------------------------------------
def test_feature_hook_returns_the_chosen_layer_map(resnet):
    x = torch.rand(2, 3, 32, 32)
    layer = resolve_layer(resnet, "layer2.0.conv2")  # found through the Normalized wrapper (victim.net)
    assert layer is resnet.net.layer2[0].conv2
    feats, logits = features_and_logits(resnet, layer, x)
    with torch.no_grad():  # the same map by a manual forward up to the second conv of the third BasicBlock
        net = resnet.net
        h = F.relu(net.bn1(net.conv1((x - resnet.mean) / resnet.std)))
        h = net.layer1(h)
        block = net.layer2[0]
        manual = block.conv2(F.relu(block.bn1(block.conv1(h))))
        torch.testing.assert_close(feats, manual)
        torch.testing.assert_close(logits, resnet(x))
    assert feats.shape == (2, 128, 16, 16)
    assert not layer._forward_hooks  # the hook is removed after the pass
    end3, _ = features_and_logits(resnet, resolve_layer(resnet, "layer3"), x)
    assert end3.shape == (2, 256, 8, 8)  # the other reading: the end of the third stage
    assert resolve_layer(resnet, "net.layer3") is resnet.net.layer3  # a full dotted name works too
    with pytest.raises(ValueError, match="feature layer 'layer9' not found"):
        resolve_layer(resnet, "layer9")


def test_full_adversaries_go_through_the_preprocessor(resnet):
    torch.manual_seed(0)
    x = torch.rand(4, 3, 32, 32)
    attack = FeatureAttack(layer="layer2.0.conv2", eps=8 / 255, step_size=0.01, steps=3)
    spy = SpyPreprocessor()
    torch.manual_seed(5)
    ours = attack(spy, resnet, x)
    # One pass on the natural images (the reference t*(P(x)), no gradient), then one per step through P.
    assert (spy.with_grad, spy.without_grad) == (3, 1) and torch.equal(spy.inputs[0], x)
    assert float((ours - x).abs().max()) <= 8 / 255 + 1e-6 and 0 <= float(ours.min()) and float(ours.max()) <= 1
    # Exactly Eq. 5 on the full model, written out: reference t*(P(x)) of the pre-processed natural image, uniform
    # start in the ε-box, 3 sign steps of 0.01 on d(t*(P(x̃)), t*(P(x))), projection and clamp after each.
    layer = resolve_layer(resnet, attack.layer)
    with torch.no_grad():
        ref, _ = features_and_logits(resnet, layer, 1 - x)
    torch.manual_seed(5)
    manual = (x + (8 / 255) * (2 * torch.rand(x.shape) - 1)).clamp(x - 8 / 255, x + 8 / 255).clamp(0, 1)
    for _ in range(3):
        xg = manual.clone().requires_grad_(True)
        d = ((features_and_logits(resnet, layer, 1 - xg)[0] - ref) ** 2).flatten(1).sum(1).sum()
        (g,) = torch.autograd.grad(d, [xg])
        manual = (manual + 0.01 * g.sign()).clamp(x - 8 / 255, x + 8 / 255).clamp(0, 1)
    torch.testing.assert_close(ours, manual, rtol=0, atol=1e-6)
    # Not the adversaries of the bare target (same seed, same random start): P = 1 − x flips the gradient.
    torch.manual_seed(5)
    bare = attack(nn.Identity(), resnet, x)
    assert (ours - bare).abs().mean() > 0.01
    # The attack raises d(t*(P(x̃)), t*(P(x))) of the full model well above its random start.
    with torch.no_grad():
        d_adv = feature_distance(features_and_logits(resnet, layer, 1 - ours)[0], ref).mean()
        torch.manual_seed(5)
        start = FeatureAttack(eps=8 / 255, step_size=1e-9, steps=1)(nn.Identity(), resnet, x)
        d_start = feature_distance(features_and_logits(resnet, layer, 1 - start)[0], ref).mean()
    assert d_adv > 1.5 * d_start, (float(d_adv), float(d_start))
    # Cosine distance: the same machinery, bounded in [0, 2].
    cos = FeatureAttack(distance="cosine", steps=2)(spy, resnet, x)
    assert cos.shape == x.shape
    with pytest.raises(ValueError, match="unknown distance 'l3'"):
        FeatureAttack(distance="l3")


def test_training_adversaries_come_from_the_modules_own_preprocessor(resnet):
    spy = SpyPreprocessor()
    module = JATPModule(spy, copy.deepcopy(resnet), FeatureAttack(steps=2), optimizer=lambda p: torch.optim.SGD(p, 0.1))
    module.adversaries(torch.rand(2, 3, 32, 32))
    assert (spy.with_grad, spy.without_grad) == (2, 1)
    assert not module.victim.training and not any(p.requires_grad for p in module.victim.parameters())


# -- Eqs. 6–10: each loss term by hand ----------------------------------------------------------------------
def test_boosted_cross_entropy_is_eq7_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    y = torch.tensor([0, 2])
    p = torch.softmax(logits, 1)
    # image 0: y = 0, the strongest other class is 1; image 1: y = 2, the strongest other class is 1.
    by_hand = ((-math.log(p[0, 0]) - math.log(1 - p[0, 1])) + (-math.log(p[1, 2]) - math.log(1 - p[1, 1]))) / 2
    assert float(boosted_cross_entropy(logits, y)) == pytest.approx(by_hand, rel=1e-6)
    # Above CE (the second term is positive), and lower when the true class gains probability.
    assert float(boosted_cross_entropy(logits, y)) > float(F.cross_entropy(logits, y))
    better = logits.clone()
    better[1, 2] += 2.0
    assert float(boosted_cross_entropy(better, y)) < float(boosted_cross_entropy(logits, y))
    # A confident correct prediction costs almost nothing.
    assert float(boosted_cross_entropy(torch.tensor([[20.0, 0.0, 0.0]]), torch.tensor([0]))) < 1e-6
    # A confidently wrong one (gap 60: 1 − p_k rounds to 0 in float32) is still exact, with its gradient: by hand,
    # −log p_y − log(1 − p_k) = (lse − z_y) − (log(e^{z_y} + e^{z_other}) − lse) in float64.
    wrong = torch.tensor([[0.0, 60.0, 1.0]], requires_grad=True)
    z = wrong.detach().double()[0]
    lse = torch.logsumexp(z, 0)
    by_hand = float((lse - z[0]) - (torch.logsumexp(z[[0, 2]], 0) - lse))
    value = boosted_cross_entropy(wrong, torch.tensor([0]))
    assert float(value) == pytest.approx(by_hand, rel=1e-5)  # ≈ 119, where the clamped probability form gave 87.6
    (grad,) = torch.autograd.grad(value, wrong)
    assert float(grad[0, 1]) == pytest.approx(2.0, abs=1e-4)  # d/dz_k of both terms: p_k + p_k ≈ 2


def test_feature_similarity_and_pixel_terms_by_hand():
    f_adv = torch.zeros(2, 2, 2, 1)
    f_nat = torch.zeros(2, 2, 2, 1)
    f_adv[0] = 1.0  # image 0: every entry off by 1 → MSE 1; image 1: off by 2 in one of its 4 entries → MSE 1
    f_adv[1, 0, 0, 0] = 2.0
    weight = torch.tensor([0.5, 0.25])  # 1 − p_y(P(x)) of each image
    assert float(feature_similarity(f_adv, f_nat, weight)) == pytest.approx((1 * 0.5 + 1 * 0.25) / 2)
    assert float(feature_similarity(f_adv, f_nat)) == pytest.approx(1.0)
    assert float(feature_similarity(f_nat, f_nat, weight)) == 0.0
    x = torch.full((2, 3, 2, 2), 0.5)
    out = x + 0.1  # 12 pixels each off by 0.1
    assert float(pixel_loss(out, x, "l2")) == pytest.approx(0.1 * math.sqrt(12), rel=1e-5)  # ‖·‖₂ per image, not squared
    assert float(pixel_loss(out, x, "mse")) == pytest.approx(0.01, rel=1e-5)
    with pytest.raises(ValueError, match="unknown pixel loss 'l1'"):
        pixel_loss(out, x, "l1")


def test_jatp_loss_is_bce_plus_alpha_fsm_plus_beta_pix_and_each_term_switches_off(fitted):
    victim, x, y = fitted
    xb, yb = x[:8], y[:8]
    x_adv = (xb + 0.05 * torch.randn_like(xb)).clamp(0, 1)
    net = tiny_net(in_nc=1, seed=2)
    make = lambda **kw: JATPModule(net, victim, FeatureAttack(layer="0", eps=0.1, steps=1),  # noqa: E731
                                   optimizer=lambda p: torch.optim.SGD(p, 0.1), **kw)
    loss, logs = make().jatp_loss(xb, yb, x_adv)
    f_adv, logits_adv = features_and_logits(victim, victim[0], net(x_adv))
    f_nat, logits_nat = features_and_logits(victim, victim[0], net(xb))
    p_y = torch.softmax(logits_nat, 1).gather(1, yb[:, None]).squeeze(1)
    bce = boosted_cross_entropy(logits_adv, yb)
    fsm = ((f_adv - f_nat) ** 2).flatten(1).mean(1).mul(1 - p_y).mean()
    pix = ((net.raw(x_adv) - xb) ** 2).mean()  # the default pixel term: MSE on NRP's unclamped output
    assert float(logs["bce"]) == pytest.approx(float(bce), rel=1e-5)
    assert float(logs["fsm"]) == pytest.approx(float(fsm), rel=1e-5)
    assert float(logs["pix"]) == pytest.approx(float(pix), rel=1e-5)
    assert float(loss) == pytest.approx(float(bce + 5 * fsm + 3 * pix), rel=1e-5)  # α = 5, β = 3
    norm_pix = (net.raw(x_adv) - xb).flatten(1).norm(dim=1).mean()  # pixel=l2: Eq. 6's norm read literally
    assert float(make(pixel="l2").jatp_loss(xb, yb, x_adv)[1]["pix"]) == pytest.approx(float(norm_pix), rel=1e-5)
    for off, term in (({"alpha": 0.0}, "fsm"), ({"beta": 0.0}, "pix"), ({"bce_weight": 0.0}, "bce")):
        loss_off, logs_off = make(**off).jatp_loss(xb, yb, x_adv)
        assert float(logs_off[term]) == 0.0
        removed = {"fsm": 5 * fsm, "pix": 3 * pix, "bce": bce}[term]
        assert float(loss_off) == pytest.approx(float(bce + 5 * fsm + 3 * pix - removed), rel=1e-5)
    # The (1 − p_y) weight carries its gradient (MART's code) unless weight_gradient=false.
    grads = {}
    for wg in (True, False):
        m = make(weight_gradient=wg, beta=0.0, bce_weight=0.0)
        (grads[wg],) = torch.autograd.grad(m.jatp_loss(xb, yb, x_adv)[0], [net.conv_first.weight])
    # Their difference is exactly the gradient of mean_i MSE_i (held constant) · (1 − p_y(P(x_i))).
    mse_i = ((f_adv - f_nat) ** 2).flatten(1).mean(1).detach()
    logits_w = victim(net(xb))
    p_w = torch.softmax(logits_w, 1).gather(1, yb[:, None]).squeeze(1)
    (through_weight,) = torch.autograd.grad(5 * (mse_i * (1 - p_w)).mean(), [net.conv_first.weight])
    assert float(through_weight.abs().max()) > 0
    torch.testing.assert_close(grads[True] - grads[False], through_weight, rtol=1e-3, atol=1e-9)
    with pytest.raises(ValueError, match="not all 0"):
        make(alpha=0.0, beta=0.0, bce_weight=0.0)
    with pytest.raises(ValueError, match="needs target_export_path"):
        make(update_target=True)


def test_a_few_jatp_steps_lower_the_loss(fitted, tmp_path):
    victim, x, y = fitted
    xb, yb = x[:16], y[:16]
    module = JATPModule(tiny_net(in_nc=1, seed=3), copy.deepcopy(victim), FeatureAttack(layer="0", eps=0.1, steps=2),
                        optimizer=lambda p: torch.optim.Adam(p, 3e-3))
    opt = module.configure_optimizers()
    trained = {id(p) for p in opt.param_groups[0]["params"]}
    assert trained == {id(p) for p in module.preprocessor.parameters()}

    def loss_at_seed() -> float:
        torch.manual_seed(0)
        return float(module.jatp_loss(xb, yb)[0].detach())

    before = loss_at_seed()
    module.train()
    assert not module.victim.training
    for _ in range(15):
        opt.zero_grad()
        loss, logs = module.step((xb, yb), "train")
        loss.backward()
        opt.step()
    assert set(logs) == {"bce", "fsm", "pix", "adv_acc"}
    after = loss_at_seed()
    assert after < 0.8 * before, (before, after)
    assert all(p.grad is None for p in module.victim.parameters())
    exported = module.export()
    assert isinstance(exported, NRPGenerator) and not exported.training
    assert "acc" in module.step((xb, yb), "val")[1]
    assert not any(k.startswith("layer.") for k in module.state_dict())  # the hooked layer is not stored twice

    # JATP′: the target trains too, and is written at the end of fitting.
    prime = JATPModule(tiny_net(in_nc=1), copy.deepcopy(victim), FeatureAttack(layer="0", eps=0.1, steps=1),
                       optimizer=lambda p: torch.optim.SGD(p, 0.1), update_target=True,
                       target_export_path=str(tmp_path / "target.pt"))
    params = {id(p) for p in prime.configure_optimizers().param_groups[0]["params"]}
    assert {id(p) for p in prime.victim.parameters()} <= params
    prime.train()
    assert prime.victim.training
    prime.step((xb, yb), "train")[0].backward()
    assert all(p.grad is not None for p in prime.victim.parameters())
    prime.on_fit_end()
    assert (tmp_path / "target.pt").is_file()


def test_gradient_clipping_rescales_to_the_configured_norm(fitted):
    victim, x, y = fitted
    make = lambda **kw: JATPModule(tiny_net(in_nc=1, seed=6), copy.deepcopy(victim),  # noqa: E731
                                   FeatureAttack(layer="0", eps=0.1, steps=1), optimizer=lambda p: torch.optim.SGD(p, 0.1), **kw)
    for clip in (1.0, None):
        module = make(grad_clip_norm=clip)
        opt = module.configure_optimizers()
        opt.zero_grad()
        module.jatp_loss(x[:16], y[:16])[0].mul(100.0).backward()  # a large gradient
        norm = lambda: float(torch.cat([p.grad.flatten() for p in module.preprocessor.parameters()]).norm())  # noqa: E731
        before = norm()
        returned = module.clip_gradient_norm(opt)
        if clip is None:
            assert returned is None and norm() == before
        else:
            assert before > 1.0 and float(returned) == pytest.approx(before, rel=1e-5)
            assert norm() == pytest.approx(1.0, rel=1e-4)
    with pytest.raises(ValueError, match="grad_clip_norm must be > 0 or null"):
        make(grad_clip_norm=0.0)


def test_paper_sgd_does_not_diverge(fitted, tmp_path):
    """The paper's optimiser (SGD lr 1e-2, momentum 0.9, wd 2e-4), α = 5, β = 3, in Lightning's own loop, 25 steps on
    32 real images: every step's loss finite and the pixel term ends below its start.

    Before the fix (no skip, no gradient clipping) this run was NaN at step 5: BCE through the fitted target gives
    gradient norms of 10²–10⁴, SGD pushes P's raw output to ±90, and the pixel term on it grows geometrically
    (0.47 → 0.13 → 90 → 3·10³ → 10¹⁴ → NaN). The module's defaults (``grad_clip_norm``) and P's (``skip``) hold it."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    victim, x, y = fitted
    xb, yb = x[:32], y[:32]
    torch.manual_seed(3)
    module = JATPModule(NRPGenerator(1, 1, nf=8, nb=1, gc=4), copy.deepcopy(victim),
                        FeatureAttack(layer="0", eps=8 / 255, step_size=0.01, steps=3),
                        optimizer=lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, weight_decay=2e-4))

    def terms() -> dict[str, float]:
        torch.manual_seed(0)
        with torch.no_grad():
            return {k: float(v) for k, v in module.jatp_loss(xb, yb)[1].items()}

    start = terms()
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
            losses.append(float(outputs["loss"]))

    steps = 25
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()],
                        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    trainer.fit(module, train_dataloaders=DataLoader(TensorDataset(xb.repeat(steps, 1, 1, 1), yb.repeat(steps)), batch_size=32))
    assert len(losses) == steps and all(math.isfinite(v) for v in losses), losses  # BCE, FSM, pix ≥ 0: each finite
    end = terms()
    assert all(math.isfinite(v) for v in end.values()), end
    assert end["pix"] < start["pix"], (start, end)
    assert max(p.abs().max() for p in module.preprocessor.parameters()) < 10  # no runaway weights


def test_stand_in_augmentation_is_pad4_crop_and_flip_and_off_by_default(data_dir, compose):
    """The paper's "4-pixel padding, random crop, horizontal flip" for fashion_mnist_rgb32: each augmented image is
    the original or its mirror image shifted by at most 4 pixels with zero fill; off unless switched on."""
    from datamodules.mnist_family import FashionMNISTRGB32DataModule

    assert not compose("train", ["model=jatp"]).dataset.datamodule.augment
    cfg = compose("train", ["model=jatp", "dataset.datamodule.augment=true", "dataset.datamodule.train_subset=4"])
    dm = instantiate(cfg.dataset.datamodule)
    assert isinstance(dm, FashionMNISTRGB32DataModule) and dm.augment
    assert FashionMNISTRGB32DataModule(data_dir=str(data_dir)).train_transform() is None
    dm.setup()
    raw = dm.train_set.dataset.images[dm.train_set.indices[0]]
    padded = {flip: F.pad(raw.flip(-1) if flip else raw, (4, 4, 4, 4)) for flip in (False, True)}
    seen = set()
    torch.manual_seed(0)
    for _ in range(30):
        out, _label = dm.train_set[0]
        match = [(flip, dy, dx) for flip in (False, True) for dy in range(9) for dx in range(9)
                 if torch.equal(out, padded[flip][:, dy:dy + 32, dx:dx + 32])]
        assert match, "not a ≤ 4-pixel shift of the image or of its mirror image"
        seen.add(match[0])
    assert len(seen) > 5 and {flip for flip, _, _ in seen} == {False, True}
    val_image, _ = dm.val_set[0]  # validation images are never augmented
    assert torch.equal(val_image, dm.val_set.dataset.images[dm.val_set.indices[0]])


# -- configs, weights, messages ----------------------------------------------------------------------------------
def test_configs_compose_and_instantiate(compose):
    cfg = compose("train", ["model=jatp", "logger=csv"])
    assert (cfg.dataset.name, cfg.victim.name, cfg.victim_training) == ("fashion_mnist_rgb32", "resnet18", "trades")
    assert cfg.model.export_path.endswith("fashion_mnist_rgb32/jatp-resnet18-trades.pt")
    assert cfg.model.victim.weights.endswith("fashion_mnist_rgb32/resnet18-trades.pt")
    module = instantiate(cfg.model, victim={"weights": None})
    assert isinstance(module, JATPModule) and isinstance(module.preprocessor, NRPGenerator)
    assert (module.preprocessor.nf, module.preprocessor.nb, module.preprocessor.output) == (64, 3, "clamp")
    assert (module.preprocessor.skip, module.preprocessor.init_scale, module.grad_clip_norm) == (True, None, 1.0)
    assert (module.alpha, module.beta, module.bce_weight, module.pixel, module.update_target) == (5.0, 3.0, 1.0, "mse", False)
    a = module.attack
    assert (a.layer, a.distance, a.steps, a.step_size, a.random_start) == ("layer2.0.conv2", "l2", 100, 0.01, True)
    assert a.eps == pytest.approx(8 / 255)
    opt = module.configure_optimizers()
    sgd, sched = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["lr"] == 0.01 and sgd.defaults["momentum"] == 0.9
    assert sgd.defaults["weight_decay"] == 2e-4
    assert isinstance(sched, torch.optim.lr_scheduler.MultiStepLR) and dict(sched.milestones) == {15: 1, 25: 1} and sched.gamma == 0.1
    assert module.layer is module.victim.net.layer2[0].conv2
    # Overrides on the command line beat the model config's defaults.
    cifar = compose("train", ["model=jatp", "dataset=cifar10", "model.update_target=true"])
    assert cifar.model.export_path.endswith("cifar10/jatp-resnet18-trades.pt") and cifar.dataset.datamodule.augment
    assert cifar.model.target_export_path.endswith("cifar10/resnet18-trades-jatp_prime.pt")

    ev = compose("evaluate", ["defense=jatp", "dataset=fashion_mnist_rgb32", "victim=resnet18"])
    assert ev.defense.name == "jatp" and ev.defense.purifier.weights.endswith("fashion_mnist_rgb32/jatp-resnet18-trades.pt")
    jatp = instantiate(ev.defense.purifier, weights=None)
    assert isinstance(jatp, JATP)
    # The defense builds the same network as training exports (both configs spell it out).
    exported, evaluated = module.export().state_dict(), jatp.net.state_dict()
    assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in evaluated.items()}
    assert jatp.net.output == module.preprocessor.output
    # Table 2: P trained against the TRADES target, evaluated in front of another variant.
    t2 = compose("evaluate", ["defense=jatp", "dataset=fashion_mnist_rgb32", "victim=resnet18", "victim_training=mart"])
    assert t2.victim.weights.endswith("resnet18-mart.pt") and t2.defense.purifier.weights.endswith("jatp-resnet18-trades.pt")


def test_missing_checkpoint_is_one_line_saying_how_to_train_it(compose, missing_weights_message):
    message = missing_weights_message(compose("evaluate", ["defense=jatp", "dataset=fashion_mnist_rgb32", "victim=resnet18"]))
    assert "python train.py model=jatp dataset=fashion_mnist_rgb32 victim=resnet18 victim_training=trades" in message
    assert "jatp-resnet18-trades.pt" in message


def test_weights_round_trip(tmp_path):
    net = tiny_net(seed=4)
    path = save_weights(net, tmp_path / "fashion_mnist_rgb32" / "jatp-resnet18-trades.pt")
    loaded = JATP(tiny_net(seed=5), weights=str(path))
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), net(x))


def test_train_py_fits_and_exports_a_tiny_jatp(compose):
    """train.py end to end on two batches (random target weights: plumbing only): Lightning runs the SGD + MultiStepLR
    configuration, the pre-processor is written where defense=jatp looks for it, JATP′ writes its target too."""
    from train import train

    cfg = compose("train", ["model=jatp", "logger=csv", "model.preprocessor.nf=8", "model.preprocessor.nb=1",
                            "model.attack.steps=1", "model.update_target=true", "trainer.max_epochs=1",
                            "trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
                            "dataset.datamodule.train_subset=32", "dataset.datamodule.batch_size=8",
                            "dataset.datamodule.eval_batch_size=8", "test_after_training=false"])
    save_weights(instantiate(cfg.victim, weights=None), cfg.victim.weights)
    metrics, _ = train(cfg)
    assert {"train/bce", "train/fsm", "train/pix", "val/acc"} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())
    ev = compose("evaluate", ["defense=jatp", "dataset=fashion_mnist_rgb32", "victim=resnet18",
                              "defense.purifier.net.nf=8", "defense.purifier.net.nb=1"])
    assert ev.defense.purifier.weights == cfg.model.export_path
    jatp = instantiate(ev.defense.purifier)  # loads the exported file
    assert jatp.weights == cfg.model.export_path
    from pathlib import Path

    assert Path(cfg.model.target_export_path).is_file()


def test_evaluate_finds_the_weights_and_attacks_through_the_preprocessor(compose):
    from evaluation.runner import run_evaluation

    cfg = compose("evaluate", ["defense=jatp", "defense.purifier.net.nf=8", "defense.purifier.net.nb=1", "attack=fgsm",
                               "dataset=fashion_mnist_rgb32", "victim=resnet18", "victim_training=trades",
                               "threat=white_box_adaptive", "dataset.eval_subset=8", "eval.max_batches=1", "eval.grid=false",
                               "eval.resume=false"])
    save_weights(instantiate(cfg.victim, weights=None), cfg.victim.weights)
    save_weights(instantiate(cfg.defense.purifier.net), cfg.defense.purifier.weights)
    result = run_evaluation(cfg)
    assert result["defense"] == "jatp" and result["n_images"] == 8 and result["threat"] == "white_box_adaptive"
    assert result["purifier"]["class"] == "JATP" and result["purifier"]["differentiable"] and not result["purifier"]["stochastic"]
