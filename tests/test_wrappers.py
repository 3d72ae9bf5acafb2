"""EOT and BPDA wrappers and the batched EOT-PGD gradient: exact gradient identities, checked against
manual per-draw loops with the randomness replayed from seeded generators."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attacks.eot_pgd import BatchedEOTPGD, eot_loss_and_grad
from attacks.wrappers import BPDA, EOT


class SeededNoiseNet(nn.Module):
    """``net(tanh(3·(x + σ·noise)))`` with the noise drawn from a private, seeded generator.

    ``replay(seed)`` rewinds the generator, so a manual loop can redraw exactly the noise a batched
    call used; ``f(x, noise)`` is the same network with the noise given explicitly.
    """

    def __init__(self, seed: int = 0, sigma: float = 0.3, in_features: int = 16, classes: int = 5) -> None:
        super().__init__()
        torch.manual_seed(1234)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, 12), nn.Tanh(), nn.Linear(12, classes))
        self.sigma = sigma
        self.gen = torch.Generator().manual_seed(seed)
        self.draws: list[torch.Tensor] = []

    def replay(self, seed: int = 0) -> None:
        self.gen.manual_seed(seed)
        self.draws.clear()

    def f(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.net(torch.tanh(3 * (x + self.sigma * noise)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=self.gen)
        self.draws.append(noise)
        return self.f(x, noise)


def _input_grad(fn, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    return torch.autograd.grad(fn(x), x)[0]


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(7)
    x = torch.rand(6, 1, 4, 4, generator=g)
    y = torch.randint(0, 5, (6,), generator=g)
    weights = torch.randn(6, 5, generator=g)  # a random linear functional of the logits
    return x, y, weights


@pytest.mark.parametrize("samples", [1, 4])
def test_eot_gradient_is_mean_of_per_draw_gradients(data, samples):
    x, _, w = data
    model = SeededNoiseNet(seed=3)
    eot_grad = _input_grad(lambda z: (EOT(model, samples=samples)(z) * w).sum(), x)

    # replay: one batched draw of (samples·N, …) noise, split per draw (row k·N + i = draw k of image i)
    model.replay(3)
    noise = torch.randn((samples * len(x), *x.shape[1:]), generator=model.gen).view(samples, *x.shape)
    per_draw = [_input_grad(lambda z, n=n: (model.f(z, n) * w).sum(), x) for n in noise]
    assert torch.allclose(eot_grad, torch.stack(per_draw).mean(0), atol=1e-6)
    if samples > 1:  # the draws differ, so EOT is not just one of them
        assert not torch.allclose(per_draw[0], per_draw[1], atol=1e-4)


def test_eot_probs_reduction_is_log_of_mean_softmax(data):
    x, _, _ = data
    model = SeededNoiseNet(seed=5)
    out = EOT(model, samples=3, reduction="probs")(x)
    draws = model.draws[0].view(3, *x.shape)
    expected = torch.log(torch.stack([model.f(x, n).softmax(-1) for n in draws]).mean(0))
    assert torch.allclose(out, expected, atol=1e-6)


def test_eot_of_deterministic_model_is_the_model(data):
    x, _, w = data
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 5))
    assert torch.allclose(EOT(model, samples=5)(x), model(x), atol=1e-6)
    assert torch.allclose(EOT(model, samples=5, reduction="probs")(x), F.log_softmax(model(x), -1), atol=1e-5)
    g_eot = _input_grad(lambda z: (EOT(model, samples=5)(z) * w).sum(), x)
    assert torch.allclose(g_eot, _input_grad(lambda z: (model(z) * w).sum(), x), atol=1e-6)
    with pytest.raises(ValueError, match="samples"):
        EOT(model, samples=0)
    with pytest.raises(ValueError, match="reduction"):
        EOT(model, reduction="median")


class Rounding(nn.Module):
    """8-bit quantisation: the true gradient is zero almost everywhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * 255) / 255


def test_rounding_really_has_zero_gradient(data):
    x, _, _ = data
    assert torch.equal(_input_grad(lambda z: (Rounding()(z) ** 2).sum(), x), torch.zeros_like(x))


def test_bpda_identity_passes_the_downstream_gradient_at_the_exact_output(data):
    x, _, w = data
    torch.manual_seed(0)
    head = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 5))
    bpda = BPDA(Rounding())
    assert torch.equal(bpda(x), Rounding()(x))  # forward: the real module
    g_bpda = _input_grad(lambda z: (head(bpda(z)) * w).sum(), x)
    # straight through: ∂/∂x = ∇head evaluated at the *rounded* input
    g_manual = _input_grad(lambda r: (head(r) * w).sum(), Rounding()(x))
    assert torch.allclose(g_bpda, g_manual, atol=1e-7)
    assert not torch.allclose(g_bpda, _input_grad(lambda r: (head(r) * w).sum(), x), atol=1e-7)


def test_bpda_custom_approximation_chains_its_jacobian(data):
    x, _, w = data
    torch.manual_seed(0)
    head = nn.Sequential(nn.Flatten(), nn.Linear(16, 5))
    bpda = BPDA(Rounding(), approximation=lambda z: z**2)
    assert torch.allclose(bpda(x), Rounding()(x))
    g_bpda = _input_grad(lambda z: (torch.tanh(head(bpda(z))) * w).sum(), x)
    upstream = _input_grad(lambda r: (torch.tanh(head(r)) * w).sum(), Rounding()(x))
    assert torch.allclose(g_bpda, upstream * 2 * x, atol=1e-6)  # d(z²)/dz = 2z, upstream at the exact output


@pytest.mark.parametrize("max_batch", [None, 12])
def test_batched_eot_pgd_gradient_is_mean_of_per_draw_loss_gradients(data, max_batch):
    x, y, _ = data
    model = SeededNoiseNet(seed=11)
    loss, grad = eot_loss_and_grad(model, x, y, samples=5, max_batch=max_batch)
    if max_batch is None:
        assert [len(d) for d in model.draws] == [30]  # images × samples in ONE forward pass
    else:
        assert [len(d) for d in model.draws] == [12, 12, 6]
    noise = torch.cat(model.draws).view(5, *x.shape)  # the noise every draw actually used
    per_draw = [_input_grad(lambda z, n=n: F.cross_entropy(model.f(z, n), y, reduction="sum"), x) for n in noise]
    per_loss = [F.cross_entropy(model.f(x, n), y, reduction="none") for n in noise]
    assert torch.allclose(grad, torch.stack(per_draw).mean(0), atol=1e-6)
    assert torch.allclose(loss, torch.stack(per_loss).mean(0), atol=1e-6)


def test_batched_eot_pgd_step_follows_the_eot_gradient(data):
    x, y, _ = data
    model = SeededNoiseNet(seed=2)
    atk = BatchedEOTPGD(model, eps=0.05, alpha=0.01, steps=1, eot_samples=4, random_start=False)
    x_adv = atk(x, y)
    noise = model.draws[0].view(4, *x.shape)
    grad = torch.stack(
        [_input_grad(lambda z, n=n: F.cross_entropy(model.f(z, n), y, reduction="sum"), x) for n in noise]
    ).mean(0)
    assert torch.allclose(x_adv, (x + 0.01 * grad.sign()).clamp(0, 1), atol=1e-7)


def test_a_stochastic_bpda_approximation_sees_the_same_draw_as_the_module():
    """Forward the module, backward the approximation: both under the same random draw, so the gradient is that
    of the very output the attack sees (here the approximation *is* the module: the gradient is then exact)."""
    class Jitter(torch.nn.Module):
        def forward(self, x):
            return x * (1.0 + torch.randn_like(x))

    module = Jitter()
    x = torch.rand(3, 5, requires_grad=True)
    torch.manual_seed(4)
    out = BPDA(module, module)(x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    torch.manual_seed(4)
    expected = x.detach() * (1.0 + torch.randn_like(x))
    assert torch.allclose(out, expected)
    assert torch.allclose(grad, expected / x.detach())  # d/dx of x·(1 + n) for the same n
