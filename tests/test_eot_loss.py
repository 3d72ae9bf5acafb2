"""Loss-averaging EOT: every gradient attack wrapped by the threat model follows E_k[∇ℓ(f_k(x), y)].

The old EOT averaged logits, so PGD followed ∇CE(mean logits); these tests fail on it: the gradient
identity is exact only for the tied-replica construction, and PGD through the threat model's EOT
reproduces BatchedEOTPGD (which averages per-draw loss gradients by construction) pixel for pixel.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
import torchattacks
from torch import nn

from attacks.base import Attack
from attacks.eot_pgd import BatchedEOTPGD
from attacks.pgd_dlr import dlr_loss
from attacks.registry import load_attack
from attacks.wrappers import EOT, TiedReplicaError
from defenses.base import Defended
from defenses.gaussian_noise import GaussianNoise
from evaluation.threats import WhiteBoxAdaptive


class NoisyNet(nn.Module):
    """``net(tanh(3·(x + σ·noise)))``, noise from a private generator so a test can replay it."""

    stochastic = True

    def __init__(self, seed: int = 0, sigma: float = 0.5) -> None:
        super().__init__()
        torch.manual_seed(1234)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 5))
        self.sigma, self.gen, self.draws = sigma, torch.Generator().manual_seed(seed), []

    def f(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return 4 * self.net(torch.tanh(3 * (x + self.sigma * noise)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=self.gen)
        self.draws.append(noise)
        return self.f(x, noise)


class GradientProbe:
    """An 'attack' that records the input gradient of ``loss(model(x), y)`` and returns x unchanged."""

    seen: list[torch.Tensor] = []

    def __init__(self, model: nn.Module, loss) -> None:
        self.model, self.loss = model, loss

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x.clone().requires_grad_(True)
        GradientProbe.seen.append(torch.autograd.grad(self.loss(self.model(x), y), x)[0])
        return x.detach()


LOSSES = {
    "ce_mean": lambda z, y: F.cross_entropy(z, y),
    "dlr_sum": lambda z, y: dlr_loss(z, y).sum(),
    "margin_sum": lambda z, y: (z.masked_fill(F.one_hot(y, 5).bool(), -1e9).amax(1) - z.gather(1, y[:, None]).squeeze(1)).clamp_min(-1).sum(),
}


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_attack_on_loss_eot_gets_the_mean_of_per_draw_loss_gradients(loss):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(6, 1, 4, 4, generator=g), torch.randint(0, 5, (6,), generator=g)
    model, k, n = NoisyNet(seed=3), 4, 6
    GradientProbe.seen.clear()
    atk = Attack("probe", functools.partial(GradientProbe, loss=LOSSES[loss]), "Linf", 0.1)
    assert torch.equal(atk(EOT(model, samples=k), x, y), x)  # replica 0 handed back
    (grad,) = GradientProbe.seen
    assert grad.shape[0] == k * n and len(model.draws) == 1 and model.draws[0].shape[0] == k * n  # one batched pass
    noise = model.draws[0].view(k, n, *x.shape[1:])

    def draw_loss(z: torch.Tensor, j: int) -> torch.Tensor:
        # the attack's loss over the replicated batch, restricted to the rows of draw j (CE's mean runs over k·n rows)
        return LOSSES[loss](model.f(z, noise[j]), y) / (k if loss == "ce_mean" else 1)

    expected = torch.zeros_like(x)
    for j in range(k):
        z = x.clone().requires_grad_(True)
        expected += torch.autograd.grad(draw_loss(z, j), z)[0]
    for r in range(k):  # every replica receives the total, replica 0 moves with it
        assert torch.allclose(grad[r * n : (r + 1) * n], expected, atol=1e-6)
    # …which is not the gradient of the loss of the mean logits (what the old EOT computed)
    z = x.clone().requires_grad_(True)
    mean_logits = torch.stack([model.f(z, noise[j]) for j in range(k)]).mean(0)
    old = torch.autograd.grad(LOSSES[loss](mean_logits, y), z)[0]
    assert not torch.allclose(old / old.norm(), expected / expected.norm(), atol=1e-2)


def test_threat_pgd_reproduces_batched_eot_pgd_and_logit_averaging_does_not(trained_victim, fmnist_test_batch):
    """Same seed, no random start: torchattacks' PGD on the loss-EOT model takes BatchedEOTPGD's exact steps."""
    x, y = fmnist_test_batch[0][:48], fmnist_test_batch[1][:48]
    defended = Defended(GaussianNoise(0.35), trained_victim).eval()
    pgd = Attack("pgd", functools.partial(torchattacks.PGD, eps=0.1, alpha=0.02, steps=5, random_start=False), "Linf", 0.1)
    ref = Attack(
        "eot", functools.partial(BatchedEOTPGD, eps=0.1, alpha=0.02, steps=5, eot_samples=4, random_start=False),
        "Linf", 0.1, handles_eot=True,
    )
    torch.manual_seed(5)
    expected = ref(WhiteBoxAdaptive(4).attacked_model(defended, ref), x, y)
    torch.manual_seed(5)
    attacked = WhiteBoxAdaptive(4).attacked_model(defended, pgd)
    assert isinstance(attacked, EOT) and attacked.reduction == "loss"
    assert torch.equal(pgd(attacked, x, y), expected)
    torch.manual_seed(5)
    old = pgd(EOT(defended, 4, reduction="logits").eval(), x, y)
    assert (old != expected).float().mean() > 0.02  # the old estimator walks elsewhere


def test_linearising_attacks_average_logits_and_subset_attacks_fail_loudly(trained_victim, fmnist_test_batch):
    x, y = fmnist_test_batch[0][:8], fmnist_test_batch[1][:8]
    defended = Defended(GaussianNoise(0.2), trained_victim).eval()
    deepfool = load_attack("deepfool", builder_overrides={"steps": 3})
    assert deepfool.eot == "logits"
    assert WhiteBoxAdaptive(3).attacked_model(defended, deepfool).reduction == "logits"
    assert load_attack("fab").eot == "logits" and load_attack("pgd").eot == "loss"
    forced = Attack(deepfool.name, deepfool.builder, deepfool.norm, None, kind="minimal", eot="loss")
    with pytest.raises(TiedReplicaError, match="eot: logits"):
        forced(WhiteBoxAdaptive(3).attacked_model(defended, forced), x, y)
    with pytest.raises(ValueError, match="valid: loss, logits, probs"):
        Attack("x", deepfool.builder, eot="median")
