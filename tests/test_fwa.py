"""FWA, the Frank-Wolfe Wasserstein attack (attacks/fwa.py), and how the evaluation checks a Wasserstein ball.

The ball is checked three ways: on the attack's own transport plan (cost, marginals, sign), by an exact transport
LP on a few images (scipy's HiGHS: the true Wasserstein distance between x and x_adv), and by the evaluation's
necessary conditions (evaluation.loop.constraint_violations), which must flag real violations and say, in the
results, that passing them is not a certificate.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from scipy.optimize import linprog
from scipy.sparse import coo_matrix
from torch import nn

from attacks.base import Attack
from attacks.fwa import (
    FrankWolfeWasserstein,
    entropic_lmo,
    identity_plan,
    image_to_plan,
    inside_mask,
    normalised_cost,
    offset_costs,
    plan_to_image,
    repair_box,
)
from attacks.registry import attack_config
from evaluation.loop import constraint_violations, evaluate, wasserstein_lower_bound
from evaluation.runner import check_threat_model

K = 5
EPS_MNIST = 0.5  # the reference's MNIST radius (bash/test_frank_wolfe.sh); CIFAR-10's 0.005 barely moves 28×28 digits


def exact_wasserstein(x: torch.Tensor, x_adv: torch.Tensor, kernel_size: int = K) -> float:
    """Exact local-window transport cost between two (C, H, W) images of equal per-channel mass, / total mass.

    One LP per channel: variables π[i, o] for in-image offsets, rows Σ_o π[i, o] = x_i and Σ_{i+o=j} π[i, o] =
    x_adv_j, cost Euclidean offset length. ``x_adv`` is rescaled to ``x``'s mass per channel (float32 sums differ
    by ~1e-7 relative, which would make the LP infeasible)."""
    _, h, w = x.shape
    inside = inside_mask(h, w, kernel_size).numpy()
    cost = offset_costs(kernel_size).numpy().astype(np.float64)
    r = kernel_size // 2
    src, off = np.nonzero(inside)
    dst = (src // w + off // kernel_size - r) * w + (src % w + off % kernel_size - r)
    n = len(src)
    rows, cols = np.concatenate([src, h * w + dst]), np.tile(np.arange(n), 2)
    a_eq = coo_matrix((np.ones(2 * n), (rows, cols)), shape=(2 * h * w, n))
    total = 0.0
    for c in range(x.shape[0]):
        a, b = x[c].double().numpy().ravel(), x_adv[c].double().numpy().ravel()
        b = b * (a.sum() / b.sum())
        res = linprog(cost[off], A_eq=a_eq.tocsr(), b_eq=np.concatenate([a, b]), bounds=(0, None), method="highs")
        assert res.status == 0, res.message
        total += res.fun
    return total / float(x.sum())


class TinyCNN(nn.Module):
    def __init__(self, channels: int = 1, side: int = 28) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, 8, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(16 * ((side + 3) // 4) ** 2, 10),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.fixture(scope="module")
def fitted(fmnist_test_batch, fit_on_batch):
    """A tiny CNN fitted to 24 Fashion-MNIST test images (100 % accuracy there: it has something to lose)."""
    x, y = fmnist_test_batch
    x, y = x[:24], y[:24]
    torch.manual_seed(0)
    return fit_on_batch(TinyCNN(), x, y), x, y


def fwa_attack(eps: float, steps: int, **builder) -> Attack:
    """conf/attack/fwa.yaml with its radius and budget set (the top-level ε and the builder's together)."""
    cfg = attack_config("fwa", builder_overrides={"steps": steps, **builder})
    cfg.eps = eps
    return instantiate(cfg)


# --------------------------------------------------------------------------------------------- plan geometry
def test_plan_image_maps_are_adjoint_local_and_start_at_the_identity():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 9, 7)
    pi = torch.rand(2, 3, 63, K * K) * inside_mask(9, 7, K)
    g = torch.randn(2, 3, 9, 7)
    # ⟨fold(π), g⟩ = ⟨π, unfold(g)⟩: the plan gradient the attack uses is the exact one
    assert torch.allclose((plan_to_image(pi, K, 9, 7) * g).sum(), (pi * image_to_plan(g, K)).sum(), rtol=1e-5)
    assert torch.equal(plan_to_image(identity_plan(x, K), K, 9, 7), x)
    # a plan with every in-image entry 1 delivers to pixel j one unit per in-image source within the window
    counts = plan_to_image(inside_mask(9, 7, K).float().expand(1, 1, 63, K * K), K, 9, 7)
    assert counts[0, 0, 4, 3] == K * K and counts[0, 0, 0, 0] == 9  # interior: full window; corner: 3 × 3
    assert offset_costs(3).tolist() == pytest.approx([2**0.5, 1, 2**0.5, 1, 0, 1, 2**0.5, 1, 2**0.5])


def test_entropic_lmo_returns_a_feasible_plan_on_the_budget():
    torch.manual_seed(1)
    x = torch.rand(3, 2, 10, 10)
    grad = torch.randn(3, 2, 100, K * K)
    grad = grad / grad.flatten(1).abs().amax(1).view(-1, 1, 1, 1)
    budget = torch.tensor([0.01, 0.1, 0.5]) * x.sum(dim=(1, 2, 3))
    pi, steps = entropic_lmo(grad, x, K, budget, gamma=1e-3)
    cost = normalised_cost(pi, K, x)
    assert (pi >= 0).all() and steps <= 50
    assert torch.allclose(pi.sum(-1), x.flatten(2), atol=1e-6)  # every pixel ships exactly its mass
    assert (pi * ~inside_mask(10, 10, K)).abs().max() == 0  # none leaves the image
    assert (cost <= torch.tensor([0.01, 0.1, 0.5]) * (1 + 1e-6)).all()  # the bracket's feasible end
    assert (cost >= torch.tensor([0.01, 0.1, 0.5]) * (1 - 1e-2)).all()  # and the budget is used: a vertex


def test_repair_keeps_the_plan_and_puts_its_image_in_the_unit_box():
    torch.manual_seed(2)
    x = torch.rand(4, 1, 12, 12) ** 0.2  # bright: transported mass piles up above 1
    grad = torch.randn(4, 1, 144, K * K)
    pi, _ = entropic_lmo(grad / grad.abs().amax(), x, K, 0.3 * x.sum(dim=(1, 2, 3)), gamma=1e-3)
    assert plan_to_image(pi, K, 12, 12).max() > 1.5
    fixed = repair_box(pi, K, 12, 12)
    assert plan_to_image(fixed, K, 12, 12).max() <= 1 + 1e-5
    assert (fixed >= 0).all() and torch.allclose(fixed.sum(-1), x.flatten(2), atol=1e-5)
    assert (normalised_cost(fixed, K, x) <= normalised_cost(pi, K, x) + 1e-7).all()


# --------------------------------------------------------------------------------------------- the attack
def test_fwa_stays_in_its_wasserstein_ball_and_lowers_accuracy(fitted, acc):
    model, x, y = fitted
    attack = fwa_attack(EPS_MNIST, steps=10)
    assert attack.norm == "wasserstein" and attack.eps == EPS_MNIST and attack.kind == "gradient"
    x_adv = attack(model, x, y)
    pi, x_plan = FrankWolfeWasserstein(model, eps=EPS_MNIST, steps=10).plan(x, y)  # deterministic: the same run
    assert torch.equal(x_adv, x_plan)

    # the plan: feasible, on the budget, and its image is what the attack returned
    assert (pi >= 0).all() and torch.allclose(pi.sum(-1), x.flatten(2), atol=1e-5)
    assert (normalised_cost(pi, K, x) <= EPS_MNIST * (1 + 1e-4)).all()
    assert torch.allclose(plan_to_image(pi, K, 28, 28), x_adv, atol=2e-5)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert torch.allclose(x_adv.sum(dim=(2, 3)), x.sum(dim=(2, 3)), rtol=1e-5)  # mass kept per channel
    # the evaluation's lower bound never exceeds the plan's cost; the exact distance lies between them
    lower = wasserstein_lower_bound(x, x_adv)
    assert (lower <= normalised_cost(pi, K, x) + 1e-5).all()
    for i in range(2):
        w = exact_wasserstein(x[i], x_adv[i])
        assert float(lower[i]) - 1e-5 <= w <= EPS_MNIST * (1 + 1e-4), (float(lower[i]), w)

    clean, adv = acc(model, x, y), acc(model, x_adv, y)
    assert clean == 1.0 and adv <= clean - 0.4, (clean, adv)


def test_clamp_box_is_the_references_clipping(fitted):
    model, x, y = fitted
    x, y = x[:6], y[:6]
    pi, x_adv = FrankWolfeWasserstein(model, eps=EPS_MNIST, steps=4, box="clamp").plan(x, y)
    assert torch.equal(x_adv, plan_to_image(pi, K, 28, 28).clamp(0, 1))
    assert (x_adv.sum(dim=(2, 3)) <= x.sum(dim=(2, 3)) * (1 + 1e-6)).all()  # clamping only destroys mass
    assert not constraint_violations(x, x_adv, fwa_attack(EPS_MNIST, steps=4, box="clamp")).any()


def test_fwa_rejects_bad_settings_with_the_valid_values():
    with pytest.raises(ValueError, match="valid: repair, clamp"):
        FrankWolfeWasserstein(nn.Identity(), box="project")
    with pytest.raises(ValueError, match="odd"):
        FrankWolfeWasserstein(nn.Identity(), kernel_size=4)
    with pytest.raises(ValueError, match=r"null \(2/\(t\+2\)\) or in \(0, 1\]"):
        FrankWolfeWasserstein(nn.Identity(), step=1.5)
    with pytest.raises(ValueError, match="wasserstein"):
        Attack("x", FrankWolfeWasserstein, "W1", 0.005)


# --------------------------------------------------------------------------------------------- the evaluation's check
def test_evaluation_flags_what_leaves_the_ball_and_reports_the_check_as_necessary_only(fitted):
    model, x, y = fitted
    x, y = x[:8], y[:8]
    attack = fwa_attack(EPS_MNIST, steps=3)
    out = evaluate(model, [(x, y)], attack, progress=False)
    assert out["violations"] == 0 and 0 < out["max_perturbation"] <= EPS_MNIST * (1 + 1e-4)
    assert out["robust_acc"] < out["clean_acc"]
    check_threat_model(attack, out)  # passes, and says what it checked
    assert out["threat_model_check"] == "necessary" and "necessary conditions only" in out["threat_model_note"]

    tight = fwa_attack(0.02, steps=3)
    created = x.clone()
    created[:, :, 10:12, 10:12] = 1.0  # mass out of nowhere: no transport plan gives it
    shifted = x.roll(6, dims=-2)  # the garment 6 rows down: far more transport than 0.02 of the mass allows
    assert (wasserstein_lower_bound(x, shifted) > 0.02).all()
    assert constraint_violations(x, created, tight).all()
    assert constraint_violations(x, shifted, tight).all()
    with pytest.raises(RuntimeError, match="broke the threat model.*wasserstein"):
        check_threat_model(tight, {"violations": 8, "n_images": 8, "max_perturbation": 0.4})

    # necessary only: a little mass carried far passes the pixel check although its exact cost exceeds ε
    img = torch.full((1, 1, 12, 12), 0.2)
    far = img.clone()
    far[0, 0, 0, 0], far[0, 0, 11, 11] = 0.0, 0.4  # 0.2 of mass carried ~15.6 pixels (a chain of 5×5 windows)
    assert not constraint_violations(img, far, fwa_attack(0.01, steps=1)).any()
    assert float(wasserstein_lower_bound(img, far)) <= 0.01 < exact_wasserstein(img[0], far[0])


# --------------------------------------------------------------------------------------------- config
def test_fwa_config_composes_for_evaluate(compose):
    cfg = compose("evaluate", ["attack=fwa"])
    attack = instantiate(cfg.attack)
    assert isinstance(attack, Attack) and attack.name == "fwa" and attack.bounded
    assert attack.norm == "wasserstein" and attack.eps == pytest.approx(0.005)  # the reference's CIFAR-10 radius
    assert attack.builder.keywords == {
        "eps": pytest.approx(0.005), "steps": 20, "kernel_size": 5, "gamma": 1e-3, "step": None,
        "dual_max_iter": 50, "tol": 1e-4, "box": "repair",
    }  # fmt: skip
    per_dataset = instantiate(compose("evaluate", ["attack=fwa", "+dataset.eps.wasserstein=0.5"]).attack)
    assert per_dataset.eps == 0.5 and per_dataset.builder.keywords["eps"] == 0.5
