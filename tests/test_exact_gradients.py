"""Exact gradients through the latent search (``latent_search(differentiable=True)``) and the
``gradient="exact"|"bpda"`` switch of DiffDefense and Defense-GAN.

Everything runs on tiny tensors and tiny untrained networks (an MLP generator, a 5 k-parameter DiffDefense
U-Net at 8×8, a width-4 Defense-GAN generator), mostly in float64 so that central finite differences are
a sharp check of the autograd gradient. Randomness is replayed with fixed ``torch.Generator`` seeds.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from attacks.wrappers import BPDA
from defenses.base import Defended
from defenses.defense_gan import DefenseGAN
from defenses.diffdefense import DiffDefense
from defenses.latent_search import GRADIENT_MODES, latent_search
from evaluation.threats import WhiteBoxAdaptive
from models.diffusion.schedule import DiffusionSchedule
from models.diffusion.unet import DiffDefenseUNet
from models.gan import DefenseGANGenerator

F64 = torch.float64
#: Relative tolerance of the finite-difference checks: central differences with h = 1e-6 in float64 agree
#: with autograd to ~1e-8 on these problems; 1e-5 leaves room for the curvature of Adam's normalisation.
FD_RTOL = 1e-5
FD_H = 1e-6


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: small convolutions on the shared 2-core machine are much faster that way."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape, seed: int, dtype=F64) -> torch.Tensor:
    return torch.randn(shape, generator=seeded(seed), dtype=dtype)


def directional_check(f, x: torch.Tensor, seed: int = 3, h: float = FD_H) -> tuple[float, float]:
    """(finite difference, autograd) of the scalar ``f`` at ``x`` along a random direction ``d``:
    (f(x + h d) − f(x − h d)) / 2h vs ∇f(x)·d."""
    d = randn(x.shape, seed, x.dtype)
    x_req = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(f(x_req), x_req)
    with torch.no_grad():
        fd = (f(x + h * d) - f(x - h * d)) / (2 * h)
    return float(fd), float((grad * d).sum())


def assert_fd_close(fd: float, ad: float, rtol: float = FD_RTOL) -> None:
    assert ad != 0.0
    assert abs(fd - ad) <= rtol * abs(ad), f"finite difference {fd!r} vs autograd {ad!r}"


def saved_bytes(fn):
    """``fn()`` and the bytes packed by autograd's saved-tensor hooks outside checkpointed regions. In exact
    mode all of it stays referenced by the output's graph until backward: the memory held in between."""
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


# -- latent_search on an MLP generator ------------------------------------------------------------------

LATENT, SHAPE = (6,), (1, 4, 4)


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(3)
    g = nn.Sequential(nn.Linear(6, 24), nn.Tanh(), nn.Linear(24, 16), nn.Sigmoid()).to(F64).requires_grad_(False)
    return lambda z: g(z).view(-1, *SHAPE)


@pytest.fixture(scope="module")
def target():
    return torch.rand(3, *SHAPE, generator=seeded(1), dtype=F64)


SEARCHES = {
    "adam_authors": {"optimizer": "adam"},  # the DiffDefense authors' rule: 0.02 then 25·0.1^(…)
    "adam_constant": {"optimizer": "adam", "lr": 0.1, "lr_schedule": "constant"},
    "sgd_decay_extra": {"optimizer": "sgd", "lr": 0.5, "lr_schedule": "decay", "extra_generation": True},
}


def _search(generate, x, seed=0, **kw):
    kw = {"iterations": 6, "restarts": 3, **kw}
    return latent_search(generate, x, LATENT, generator=seeded(seed), **kw)


@pytest.mark.parametrize("name", SEARCHES)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_exact_forward_equals_the_torch_optim_path(mlp, target, name, dtype):
    """Same seed → the unrolled Adam/SGD give the values of torch.optim (measured: bit-identical on CPU)."""
    g = lambda z: mlp(z.to(F64)).to(dtype)  # noqa: E731
    x = target.to(dtype)
    ref = _search(g, x, **SEARCHES[name])
    exact = _search(g, x.clone().requires_grad_(True), differentiable=True, **SEARCHES[name])
    assert exact.reconstruction.requires_grad and not ref.reconstruction.requires_grad
    for field in ("reconstruction", "mse_best", "mse_mean", "latent", "mse_all"):
        torch.testing.assert_close(getattr(exact, field).detach(), getattr(ref, field), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_exact_mode_without_a_gradient_is_the_default_path(mlp, target, context):
    """No gradient can be asked for → no graph, the default path's values."""
    ref = _search(mlp, target)
    x_req = target.clone().requires_grad_(True)
    with context():
        res = _search(mlp, x_req, differentiable=True)
    assert not res.reconstruction.requires_grad and not res.mse_mean.requires_grad
    torch.testing.assert_close(res.reconstruction, ref.reconstruction, rtol=0, atol=0)
    # Grad mode on but the target does not require grad: the default path too.
    plain = _search(mlp, target, differentiable=True)
    assert not plain.reconstruction.requires_grad
    torch.testing.assert_close(plain.reconstruction, ref.reconstruction, rtol=0, atol=0)


@pytest.mark.parametrize("name", SEARCHES)
def test_exact_gradient_matches_finite_differences(mlp, target, name):
    w = randn(target.shape, 2)

    def f(x):
        return (_search(mlp, x, differentiable=True, **SEARCHES[name]).reconstruction * w).sum()

    assert_fd_close(*directional_check(f, target))


def test_gradient_flows_through_the_selected_restart_only(mlp, target):
    """The argmin index is piecewise constant: the gradient equals that of a one-restart search started
    from each image's winning initial latent."""
    r = 3
    z0 = randn((target.shape[0] * r, *LATENT), 5)
    kw = {"iterations": 5, "optimizer": "adam", "lr": 0.1, "lr_schedule": "constant", "differentiable": True}
    w = randn(target.shape, 2)
    x = target.clone().requires_grad_(True)
    full = latent_search(mlp, x, LATENT, restarts=r, init=lambda s: z0.clone(), **kw)
    winners = full.mse_all.detach().argmin(1)
    assert winners.unique().numel() > 1  # the choice matters in this problem
    (g_full,) = torch.autograd.grad((full.reconstruction * w).sum(), x)

    z_win = z0.view(-1, r, *LATENT)[torch.arange(target.shape[0]), winners]
    x1 = target.clone().requires_grad_(True)
    alone = latent_search(mlp, x1, LATENT, restarts=1, init=lambda s: z_win.clone(), **kw)
    (g_alone,) = torch.autograd.grad((alone.reconstruction * w).sum(), x1)
    torch.testing.assert_close(alone.reconstruction, full.reconstruction, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_full, g_alone, rtol=1e-10, atol=1e-12)


def test_checkpointing_gives_the_same_gradient_and_replays_the_generators_noise(mlp, target):
    """``generate`` draws fresh noise from ``generator`` at every call (as DiffDefense's reverse steps do):
    the recomputed steps must see the same noise, and backward must not move the caller's generator."""
    rng = seeded(0)

    def noisy(z):
        noise = torch.randn(z.shape, generator=rng, dtype=z.dtype)
        return mlp(z + 0.3 * noise)

    def grad_and_state(checkpoint_steps: bool):
        rng.manual_seed(11)
        x = target.clone().requires_grad_(True)
        res = latent_search(noisy, x, LATENT, 8, 3, generator=rng, differentiable=True,
                            checkpoint_steps=checkpoint_steps)
        after_forward = rng.get_state()
        (grad,) = torch.autograd.grad((res.reconstruction * randn(target.shape, 2)).sum(), x)
        return res.reconstruction.detach(), grad, after_forward, rng.get_state()

    rec_on, g_on, fwd_on, bwd_on = grad_and_state(True)
    rec_off, g_off, fwd_off, _ = grad_and_state(False)
    torch.testing.assert_close(rec_on, rec_off, rtol=0, atol=0)
    torch.testing.assert_close(g_on, g_off, rtol=1e-12, atol=1e-14)
    assert g_on.abs().sum() > 0
    assert torch.equal(fwd_on, fwd_off) and torch.equal(bwd_on, fwd_on)


def test_adam_normalisation_has_a_finite_gradient_where_a_gradient_entry_is_zero(target):
    """A latent coordinate G ignores has ∇ = 0, so Adam's v = 0 there: √v must not turn the backward NaN."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 16).to(F64).requires_grad_(False)
    lin.weight[:, 5] = 0.0  # z[5] never matters

    def g(z):
        return torch.sigmoid(lin(z)).view(-1, *SHAPE)

    x = target.clone().requires_grad_(True)
    res = latent_search(g, x, LATENT, 5, 2, generator=seeded(0), differentiable=True, lr=0.1, lr_schedule="constant")
    (grad,) = torch.autograd.grad((res.reconstruction * randn(target.shape, 2)).sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


# -- DiffDefense ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unet():
    """A tiny untrained DiffDefense U-Net (5 k parameters, 1×8×8) in float64 with the config's T = 100 schedule."""
    torch.manual_seed(0)
    net = DiffDefenseUNet(1, base_channels=4, channel_mults=(1, 2), time_dim=8, image_size=8,
                          blocks_per_level=1, bottleneck_blocks=1).to(F64)
    return net, DiffusionSchedule()


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 1, 8, 8, generator=seeded(1), dtype=F64)


def victim() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).to(F64)


def _dd(unet, **kw) -> DiffDefense:
    net, schedule = unet
    return DiffDefense(net, schedule, **{"t_star": 3, "iterations": 4, "restarts": 2, **kw})


def test_diffdefense_gradient_flag_and_routing(unet):
    exact, bpda = _dd(unet), _dd(unet, gradient="bpda")
    assert exact.gradient == "exact" and exact.differentiable is True and exact.stochastic is True
    assert bpda.differentiable is False and bpda.stochastic is True
    # Checkpointing by default only where a step's graph holds U-Net activations.
    assert exact.checkpoint is False and _dd(unet, grad_through_denoiser=True).checkpoint is True
    assert Defended(exact, victim()).differentiable is True
    assert Defended(bpda, victim()).differentiable is False
    # WhiteBoxAdaptive attacks the exact purifier end to end and the bpda one through BPDA.
    attack = SimpleNamespace(handles_eot=False, kind="gradient")  # what attacked_model reads of an attack
    threat = WhiteBoxAdaptive(eot_samples=1)
    assert threat.attacked_model(Defended(exact, victim()), attack).purifier is exact
    assert isinstance(threat.attacked_model(Defended(bpda, victim()), attack).purifier, BPDA)
    with pytest.raises(ValueError, match=r"unknown gradient 'full': use one of \('exact', 'bpda'\)"):
        _dd(unet, gradient="full")
    assert GRADIENT_MODES == ("exact", "bpda")


@pytest.mark.parametrize("grad_through_denoiser", [False, True])
def test_diffdefense_exact_forward_equals_bpda_forward(unet, images, grad_through_denoiser):
    kw = {"grad_through_denoiser": grad_through_denoiser}
    ref = _dd(unet, gradient="bpda", **kw).reconstruct(images, generator=seeded(0))
    out = _dd(unet, **kw).reconstruct(images.clone().requires_grad_(True), generator=seeded(0))
    assert out.reconstruction.requires_grad and not ref.reconstruction.requires_grad
    torch.testing.assert_close(out.reconstruction.detach(), ref.reconstruction, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.mse_mean.detach(), ref.mse_mean, rtol=1e-6, atol=1e-9)
    # forward() under the global RNG: the same values for both modes.
    torch.manual_seed(4)
    a = _dd(unet, **kw)(images.clone().requires_grad_(True))
    torch.manual_seed(4)
    with torch.no_grad():
        b = _dd(unet, gradient="bpda", **kw)(images)
    torch.testing.assert_close(a.detach(), b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_diffdefense_exact_gradient_matches_finite_differences(unet, images, optimizer):
    """With ``grad_through_denoiser=True`` the whole chain is differentiated, so the gradient is that of the
    computed function (at ``grad_through_denoiser=False`` ε_θ is a constant to the attack as to the search)."""
    lr = 0.1 if optimizer == "adam" else 20.0
    dd = _dd(unet, optimizer=optimizer, lr=lr, lr_schedule="constant", grad_through_denoiser=True)
    w = randn(images.shape, 2)

    def f(x):
        return (dd.reconstruct(x, generator=seeded(0)).reconstruction * w).sum()

    assert_fd_close(*directional_check(f, images))


@pytest.mark.parametrize("grad_through_denoiser", [False, True])
def test_diffdefense_exact_gradient_is_nonzero_and_not_the_bpda_identity(unet, images, grad_through_denoiser):
    """At the authors' settings (Adam, lr 0.02 then 25·0.1^(…), sigmoid output)."""
    w = randn(images.shape, 2)

    def grad(purifier):
        x = images.clone().requires_grad_(True)
        torch.manual_seed(0)
        (g,) = torch.autograd.grad((purifier(x) * w).sum(), x)
        return g

    bpda = _dd(unet, gradient="bpda", grad_through_denoiser=grad_through_denoiser)
    g_bpda = grad(BPDA(bpda, bpda.bpda_approximation))
    g_exact = grad(_dd(unet, grad_through_denoiser=grad_through_denoiser))
    torch.testing.assert_close(g_bpda, w)  # identity backward
    assert torch.isfinite(g_exact).all() and g_exact.abs().sum() > 0
    assert not torch.allclose(g_exact, g_bpda, rtol=0.1, atol=0)


def test_diffdefense_checkpointing_same_gradient_less_saved_memory(unet, images):
    """L unrolled steps through the U-Net: checkpointing on gives the gradient of checkpointing off and
    keeps only each step's inputs between forward and backward."""
    w = randn(images.shape, 2)

    def run(checkpoint: bool):
        dd = _dd(unet, iterations=5, grad_through_denoiser=True, checkpoint=checkpoint)
        x = images.clone().requires_grad_(True)
        res, held = saved_bytes(lambda: dd.reconstruct(x, generator=seeded(0)))
        (g,) = torch.autograd.grad((res.reconstruction * w).sum(), x)
        return res.reconstruction.detach(), g, held

    rec_on, g_on, held_on = run(True)
    rec_off, g_off, held_off = run(False)
    torch.testing.assert_close(rec_on, rec_off, rtol=0, atol=0)
    torch.testing.assert_close(g_on, g_off, rtol=1e-10, atol=1e-14)
    print(f"bytes saved for backward: checkpoint on {held_on}, off {held_off}")
    assert held_on * 10 < held_off


# -- Defense-GAN ------------------------------------------------------------------------------------


def _gan(**kw) -> DefenseGAN:
    torch.manual_seed(0)
    gen = DefenseGANGenerator(latent_dim=8, width=4).to(F64)
    with torch.no_grad():
        for p in gen.parameters():  # an untrained G is nearly constant: make it vary with z
            p.mul_(3.0)
    return DefenseGAN(gen, **{"iterations": 6, "restarts": 2, "lr": 2.0, **kw})


@pytest.fixture(scope="module")
def gan_images():
    return torch.rand(2, 1, 28, 28, generator=seeded(1), dtype=F64)


def test_defense_gan_gradient_flag_and_routing():
    exact, bpda = _gan(), _gan(gradient="bpda")
    assert exact.differentiable is True and bpda.differentiable is False
    assert exact.stochastic is True and bpda.stochastic is True
    clf = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).to(F64)
    assert Defended(exact, clf).differentiable is True and Defended(bpda, clf).differentiable is False
    with pytest.raises(ValueError, match=r"unknown gradient 'identity': use one of \('exact', 'bpda'\)"):
        _gan(gradient="identity")


def test_defense_gan_exact_forward_equals_bpda_forward(gan_images):
    ref = _gan(gradient="bpda").reconstruct(gan_images, generator=seeded(0))
    out = _gan().reconstruct(gan_images.clone().requires_grad_(True), generator=seeded(0))
    assert out.reconstruction.requires_grad
    torch.testing.assert_close(out.reconstruction.detach(), ref.reconstruction, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.mse_all.detach(), ref.mse_all, rtol=1e-6, atol=1e-9)


def test_defense_gan_exact_gradient_matches_finite_differences_and_is_not_identity(gan_images):
    gan = _gan()
    w = randn(gan_images.shape, 2)

    def f(x):
        return (gan.reconstruct(x, generator=seeded(0)).reconstruction * w).sum()

    assert_fd_close(*directional_check(f, gan_images))
    x = gan_images.clone().requires_grad_(True)
    torch.manual_seed(0)
    (g,) = torch.autograd.grad((gan(x) * w).sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    assert not torch.allclose(g, w, rtol=0.1, atol=0)  # BPDA's identity gradient would be w
