"""RAP's adversarial forward process (Alg. 1, ``models.rap.forward_process``): every x_t stays in the ε-ball and in
[0, 1] (L∞ and L2), the classifier's loss rises along the trajectory, one call yields a batch of mixed t, the random
starts have the documented sizes, the differentiable trajectory carries the exact derivative (projection and clamp
only; sign has none), train/eval modes come back as they went in, and bad settings fail in one line."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.rap.forward_process import AdversarialProcess, select

EPS = {"Linf": 0.3, "L2": 1.5}


def _dist(x: torch.Tensor, x0: torch.Tensor, norm: str) -> torch.Tensor:
    d = (x - x0).flatten(1)
    return d.abs().amax(1) if norm == "Linf" else d.norm(dim=1)


@pytest.fixture(scope="module")
def toy():
    """A small conv classifier, briefly fitted to 256 Fashion-MNIST-like images so that its CE is meaningful."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 5, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 12 * 12, 10))
    x = torch.rand(64, 1, 28, 28)
    y = torch.randint(0, 10, (64,))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), x[:16], y[:16]


@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.parametrize("start", ["uniform", "gaussian", "none"])
def test_trajectory_stays_in_the_ball_and_raises_the_loss(toy, norm, start):
    model, x, y = toy
    proc = AdversarialProcess(norm=norm, eps=EPS[norm], num_steps=8, random_start=start)
    traj = proc.trajectory(model, x, y, 8, generator=torch.Generator().manual_seed(0))
    assert len(traj) == 8 and all(v.shape == x.shape and not v.requires_grad for v in traj)
    for v in traj:
        assert float(v.min()) >= 0.0 and float(v.max()) <= 1.0
        assert float(_dist(v, x, norm).max()) <= EPS[norm] * (1 + 1e-5)
    with torch.no_grad():
        losses = [F.cross_entropy(model(v), y).item() for v in [x, *traj]]
    assert losses[-1] > losses[0] + 1.0, losses  # the attack works
    assert losses[-1] >= max(losses[1:4]), losses  # and keeps climbing, up to noise
    # the walk reaches the boundary of the ball (λ = 2.5ε/T lets T steps cross it)
    assert float(_dist(traj[-1], x, norm).median()) > 0.9 * EPS[norm]


def test_default_step_and_start_sizes():
    p = AdversarialProcess(norm="Linf", eps=8 / 255, num_steps=20)
    assert p.step_size == pytest.approx(1 / 255) and p.random_start == "uniform"
    x = torch.rand(4, 3, 32, 32)
    assert p.default_start_size(x) == pytest.approx(8 / 255)
    assert AdversarialProcess("Linf", 0.3, 20, random_start="gaussian").default_start_size(x) == pytest.approx(0.15)
    l2 = AdversarialProcess("L2", 0.5, 20)
    assert l2.step_size == pytest.approx(0.0625) and l2.default_start_size(x) == pytest.approx(0.5 * math.sqrt(3 / 3072))
    noise = l2.start_noise(torch.zeros(256, 3, 32, 32))  # ‖ζ‖₂ ≈ ε for the uniform L2 start (before projection)
    assert float(noise.flatten(1).norm(dim=1).mean()) == pytest.approx(0.5, rel=0.05)
    assert float(AdversarialProcess("Linf", 0.3, 5).start_noise(torch.zeros(10, 1, 28, 28)).abs().max()) <= 0.3
    assert not AdversarialProcess("Linf", 0.3, 5, random_start="none").stochastic
    assert not AdversarialProcess("Linf", 0.3, 5, start_size=0.0).stochastic
    assert torch.equal(AdversarialProcess("Linf", 0.3, 5, random_start="none").start_noise(x), torch.zeros_like(x))


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_sample_is_the_trajectory_at_each_images_own_t(toy, norm):
    """One call, mixed t: ``sample`` (images leave after their own t) equals ``select(trajectory, t)``."""
    model, x, y = toy
    proc = AdversarialProcess(norm=norm, eps=EPS[norm], num_steps=6)
    t = torch.tensor([1, 6, 3, 2, 6, 5, 4, 1, 2, 3, 4, 5, 6, 1, 1, 2])
    traj = proc.trajectory(model, x, y, 6, generator=torch.Generator().manual_seed(3))
    sampled = proc.sample(model, x, y, t, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(sampled, select(traj, t), rtol=0, atol=1e-6)
    for i, ti in enumerate(t.tolist()):
        torch.testing.assert_close(sampled[i], traj[ti - 1][i], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="t must lie in 1..6"):
        select(traj, torch.tensor([0, 7]))


def test_l2_steps_are_normalised_gradients(toy):
    model, x, y = toy
    proc = AdversarialProcess(norm="L2", eps=100.0, num_steps=1, step_size=0.2, random_start="none")
    x_mid = x.clamp(0.3, 0.7)  # away from the box: no clamp, so the step is exactly λ·∇/‖∇‖
    (x1,) = proc.trajectory(model, x_mid, y, 1)
    torch.testing.assert_close(_dist(x1, x_mid, "L2"), torch.full((len(x),), 0.2), rtol=1e-4, atol=1e-5)
    g = proc.loss_gradient(model, x_mid, y)
    cos = F.cosine_similarity((x1 - x_mid).flatten(1), g.flatten(1), dim=1)
    assert float(cos.min()) > 0.999


def test_differentiable_trajectory_carries_the_exact_derivative(toy):
    """sign(∇) is a constant of the graph; the derivative flows through the projection and the [0, 1] clamp only."""
    model, x, y = toy
    proc = AdversarialProcess(norm="Linf", eps=0.3, num_steps=4, random_start="none")
    x0 = x.clone().requires_grad_(True)
    traj = proc.trajectory(model, x0, y, 4, differentiable=True)
    (grad,) = torch.autograd.grad(traj[-1].sum(), x0)
    inside = (traj[-1] > 0) & (traj[-1] < 1)
    # ∂x_T/∂x₀ per pixel: 1 unless a [0, 1] clamp was active at some step (the ε-projection keeps x₀'s derivative 1).
    assert set(grad.unique().tolist()) <= {0.0, 1.0}
    assert float(grad[~inside].abs().max()) == 0.0 and float(grad[inside].mean()) > 0.9
    # finite difference along a small direction, values far from the clamps: x_T moves with x₀
    d = 1e-3 * torch.randn_like(x) * inside
    with torch.no_grad():
        moved = proc.trajectory(model, (x + d).clamp(0, 1), y, 4)[-1]
    same_signs = (moved - traj[-1].detach() - d).abs() < 1e-5
    assert same_signs.float().mean() > 0.95
    assert not proc.trajectory(model, x0, y, 2)[-1].requires_grad  # training mode: detached


class ModeSpy(nn.Module):
    """Records the train flag of each forward call; dropout inside, so train mode would change the outputs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.drop, self.seen = model, nn.Dropout(0.5), []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(self.training)
        return self.model(self.drop(x))


def test_attacks_in_eval_mode_and_restores_every_mode(toy):
    model, x, y = toy
    spy = ModeSpy(model).train()
    model.train()
    proc = AdversarialProcess(eps=0.3, num_steps=3)
    proc.trajectory(spy, x, y, 3)
    proc.sample(spy, x, y, torch.full((len(x),), 2))
    assert spy.seen and not any(spy.seen)
    assert spy.training and spy.drop.training and model.training  # each submodule's own mode is back
    model.eval()

    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    boom = Boom().train()
    with pytest.raises(RuntimeError, match="boom"):
        proc.trajectory(boom, x, y, 1)
    assert boom.training  # restored in finally


def test_runs_under_inference_mode_and_no_grad(toy):
    model, x, y = toy
    proc = AdversarialProcess(eps=0.3, num_steps=3, random_start="none")
    ref = proc.trajectory(model, x, y, 3)[-1]
    with torch.inference_mode():
        a = proc.trajectory(model, x, y, 3)[-1]
        b = proc.sample(model, x, y, torch.full((len(x),), 3))
    with torch.no_grad():
        c = proc.trajectory(model, x, y, 3, differentiable=True)[-1]
    for v in (a, b, c):
        torch.testing.assert_close(v, ref)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"norm": "L1"}, "unknown norm 'L1'; valid: Linf, L2"),
        ({"random_start": "normal"}, "unknown random_start 'normal'; valid: uniform, gaussian, none"),
        ({"eps": 0.0}, "eps must be > 0"),
        ({"step_size": -1.0}, "step_size must be > 0"),
        ({"num_steps": 0}, "num_steps must be >= 1"),
    ],
)
def test_bad_settings_fail_in_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")) as err:
        AdversarialProcess(**kwargs)
    assert "\n" not in str(err.value)


def test_rejects_images_outside_the_unit_box(toy):
    model, x, y = toy
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        AdversarialProcess().trajectory(model, x * 2, y, 1)
