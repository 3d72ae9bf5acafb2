"""FWA: the Frank-Wolfe Wasserstein attack (Wu, Wang & Yu, ICML 2020, "Stronger and Faster Wasserstein
Adversarial Attacks"; reference code ``watml/fast-wasserstein-adversarial``, ``frank_wolfe.py`` + ``lmo.py``).

Threat model: the Wasserstein ball of Wong et al. (2019). An image is a non-negative mass on its pixel grid, one
distribution per channel (mass never moves between channels). A *transport plan* π ≥ 0 moves mass from pixel i to
the pixels of the k×k window around it, at a cost of the Euclidean distance between the two pixels (in pixels); the
adversarial image is the plan's other marginal. The constraint is on the plan:

    π 1 = x  (every pixel ships exactly its own mass),      Σ_{c,i,o} π_{c,i,o} · C_o ≤ ε · Σ_{c,h,w} x,

i.e. ε is a *normalised* transport cost: the budget is ε times the total mass of the image (all channels together,
as the reference's ``normalization = X.sum(dim=(1, 2, 3))``). The perturbation therefore keeps each channel's mass,
only moves it locally, and is not inside any L∞/L2 ball (``norm: wasserstein`` in the config; see
``evaluation.loop.constraint_violations`` for what the evaluation can and cannot check from pixels alone).

The attack maximises the cross-entropy of ``model(clamp(x_adv, 0, 1))`` over the plan by Frank-Wolfe:

    π_0 = diag(x);  for t = 0 … steps−1:  G = ∇_π loss / ‖∇_π loss‖∞ (per image);
                                           π̂ = argmax_{feasible π'} ⟨π', G⟩ + γ·H(π')     (entropic LMO)
                                           π ← π + s_t (π̂ − π),   s_t = 2/(t+2)  (or a fixed ``step``).

The entropic LMO has the closed form π̂_{c,i,·} = x_{c,i} · softmax((G_{c,i,·} − λ C)/γ) over the window; the
dual variable λ ≥ 0 (one per image) is found by bisection so the plan's cost meets the budget, keeping the end
of the bracket on the *feasible* side (as the reference's ``bisection_search`` returns ``b``). Every iterate is a
convex combination of feasible plans, hence feasible: the attack never leaves its ball.

The plan is stored densely as (N, C, H·W, k²); ``F.fold`` turns it into the image and ``F.unfold`` turns an image
gradient into the plan gradient (∂loss/∂π_{c,i,o} = ∂loss/∂x_adv at pixel i + o), so no sparse extension is needed.

[0, 1]: the transported image can exceed 1 where mass piles up. The reference evaluates the model on the clamped
image during the attack, and at the end (CIFAR-10 script: ``postprocess=1``) projects the plan onto plans whose
image stays ≤ 1 (``dual_capacity_constrained_projection``, 5 000 dual-ascent iterations) and clamps. ``box``:

- ``repair`` (default): pull back, for each pixel above 1, just enough of the mass flowing *into* it to its source
  pixels (onto their zero-cost diagonal), repeated until no pixel exceeds 1. The plan stays a plan of ``x`` (mass
  conserved per channel exactly), its cost only decreases, and its image lies in [0, 1]. A cheaper substitute for
  the reference's projection: not the Euclidean-closest such plan, but as feasible.
- ``clamp``: clamp the transported image to [0, 1] (the reference without post-processing, its MNIST setting);
  mass above 1 is destroyed, so the image is no longer the marginal of the plan.

Defaults are the reference's CIFAR-10 script (``bash/test_frank_wolfe.sh``): ε = 0.005, 5×5 kernel, γ = 1e-3,
50 bisection steps, tolerances 1e-4; ``steps`` = 20 is the JATP paper's count (the reference runs 300).

Shapes: x (N, C, H, W) in [0, 1], y (N,) → x_adv (N, C, H, W) in [0, 1].

Example::
    >>> atk = FrankWolfeWasserstein(model, eps=0.005, steps=20, kernel_size=5)
    >>> x_adv = atk(x, y)
    >>> pi, x_adv = atk.plan(x, y)            # the transport plan as well
    >>> normalised_cost(pi, 5, x)             # ≤ 0.005 per image
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BOXES = ("repair", "clamp")


# ------------------------------------------------------------------------------------------------ plan geometry
def offset_costs(kernel_size: int, device: torch.device | None = None) -> Tensor:
    """(k²,) Euclidean length of each window offset, in ``F.unfold``'s order (row-major, centre at k²//2)."""
    r = kernel_size // 2
    d = torch.arange(-r, r + 1, dtype=torch.float32, device=device)
    return (d[:, None] ** 2 + d[None, :] ** 2).sqrt().flatten()


def inside_mask(height: int, width: int, kernel_size: int, device: torch.device | None = None) -> Tensor:
    """(H·W, k²) bool: the offset from pixel i lands inside the image (mass may not leave the image)."""
    ones = torch.ones(1, 1, height, width, device=device)
    cols = F.unfold(ones, kernel_size, padding=kernel_size // 2)  # (1, k², H·W), 0 where the window is padding
    return cols[0].t() > 0.5


def plan_to_image(pi: Tensor, kernel_size: int, height: int, width: int) -> Tensor:
    """The plan's destination marginal: x_adv[c, j] = Σ_{i, o: i + o = j} π[c, i, o]. (N, C, H·W, k²) → (N, C, H, W)."""
    n, c, hw, k2 = pi.shape
    cols = pi.permute(0, 1, 3, 2).reshape(n, c * k2, hw)
    return F.fold(cols, (height, width), kernel_size, padding=kernel_size // 2)


def image_to_plan(g: Tensor, kernel_size: int) -> Tensor:
    """Adjoint of :func:`plan_to_image`: G[c, i, o] = g[c, i + o], 0 outside the image. (N, C, H, W) → (N, C, H·W, k²)."""
    n, c, h, w = g.shape
    cols = F.unfold(g, kernel_size, padding=kernel_size // 2)  # (N, C·k², H·W)
    return cols.view(n, c, kernel_size**2, h * w).permute(0, 1, 3, 2)


def identity_plan(x: Tensor, kernel_size: int) -> Tensor:
    """π_0 = diag(x): every pixel keeps its mass (cost 0, image x)."""
    n, c, h, w = x.shape
    pi = x.new_zeros(n, c, h * w, kernel_size**2)
    pi[..., kernel_size**2 // 2] = x.reshape(n, c, h * w)
    return pi


def transport_cost(pi: Tensor, kernel_size: int) -> Tensor:
    """(N,) Σ π·C: the plan's total transport cost, in pixel-distance × mass units."""
    return (pi * offset_costs(kernel_size, pi.device)).sum(dim=(1, 2, 3))


def normalised_cost(pi: Tensor, kernel_size: int, x: Tensor) -> Tensor:
    """(N,) the plan's cost divided by the image's total mass: the quantity the radius ε bounds."""
    return transport_cost(pi, kernel_size) / x.sum(dim=(1, 2, 3)).clamp_min(1e-12)


# ------------------------------------------------------------------------------------------------ oracles
def entropic_lmo(
    grad: Tensor,
    x: Tensor,
    kernel_size: int,
    budget: Tensor,
    gamma: float,
    max_iter: int = 50,
    tol: float = 1e-4,
) -> tuple[Tensor, int]:
    """argmax_π ⟨π, G⟩ + γ·H(π)  s.t.  π ≥ 0, π 1 = x, ⟨π, C⟩ ≤ budget  (the reference's ``entr_support_func``).

    Closed form π_λ[c, i, ·] = x[c, i] · softmax((G[c, i, ·] − λ C)/γ) over the in-image offsets; the cost of π_λ
    decreases in λ, and λ is found by bisection on [0, λ_max] with λ_max = 2‖G‖∞ + γ·log(Σ_{c,i,o} x_{c,i} C_o /
    budget), at which the cost is provably below the budget (the reference's "sharper bound"). The upper end of the
    bracket is returned, so the plan is always feasible. Stops when every image's cost is within ``tol``·budget of
    it or the bracket is narrower than ``tol``.

    Args:
        grad: (N, C, H·W, k²) ascent direction on the plan.
        x: (N, C, H, W) source image (the plan's fixed marginal).
        budget: (N,) transport-cost budget in absolute units (ε × the image's mass).
        gamma: entropic regularisation γ > 0.
    Returns:
        The plan (N, C, H·W, k²) and the number of bisection steps taken.
    """
    n, c, h, w = x.shape
    cost = offset_costs(kernel_size, x.device)
    inside = inside_mask(h, w, kernel_size, x.device)
    mass = x.reshape(n, c, h * w, 1)

    base = (grad / gamma).masked_fill(~inside, float("-inf"))  # mass may not leave the image
    scaled_cost = cost / gamma

    def weights(lam: Tensor) -> Tensor:  # each pixel's split of its mass over the window at dual λ
        return torch.softmax(base - lam.view(-1, 1, 1, 1) * scaled_cost, dim=-1)

    reach = (mass * (cost * inside)).sum(dim=(1, 2, 3))  # cost if every pixel sent all its mass everywhere at once
    safe_budget = budget.clamp_min(1e-12)
    hi = 2 * grad.flatten(1).abs().amax(1) + gamma * torch.log(reach.clamp_min(1e-12) / safe_budget)
    hi = hi.clamp_min(0.0) + 1e-6
    lo = torch.zeros_like(hi)
    steps = 0
    for steps in range(1, max_iter + 1):
        mid = (lo + hi) / 2
        excess = (mass[..., 0] * (weights(mid) @ cost)).sum(dim=(1, 2)) - budget
        over = excess > 0
        lo = torch.where(over, mid, lo)
        hi = torch.where(over, hi, mid)
        if (excess.abs() <= tol * safe_budget).all() or (hi - lo).max() < tol:
            break
    return mass * weights(hi), steps


def repair_box(pi: Tensor, kernel_size: int, height: int, width: int, max_iter: int = 200, tol: float = 1e-5) -> Tensor:
    """Make the plan's image ≤ 1 by returning, for each pixel j above 1, a fraction (m_j − 1)/(inflow_j) of the
    mass flowing into j from *other* pixels to its sources' diagonal (the source keeps it).

    Invariants: π ≥ 0, π 1 = x (each source still ships its own mass), the cost never increases (mass moves onto
    zero-cost entries). Because π_jj ≤ x_j ≤ 1, the returned fraction is at most 1, and after a pass pixel j holds
    1 plus whatever its own outflow got returned; repeating converges in a few passes in practice (``max_iter`` caps
    it, and the caller's final clamp removes the float-level remainder).
    """
    centre = kernel_size**2 // 2
    pi = pi.clone()
    for _ in range(max_iter):
        image = plan_to_image(pi, kernel_size, height, width)
        over = (image - 1.0).clamp_min(0.0)
        if float(over.max()) <= tol:
            break
        n, c = image.shape[:2]
        inflow = image.reshape(n, c, -1) - pi[..., centre]  # mass arriving from other pixels
        frac = (over.reshape(n, c, -1) / inflow.clamp_min(1e-12)).clamp(0.0, 1.0)
        back = pi * image_to_plan(frac.view(n, c, height, width), kernel_size)  # π[i, o] · frac[i + o]
        back[..., centre] = 0.0
        pi = pi - back
        pi[..., centre] += back.sum(-1)
    return pi


# ------------------------------------------------------------------------------------------------ the attack
class FrankWolfeWasserstein:
    """``model -> callable(x, y)``: FWA, untargeted, on the cross-entropy (module docstring for the maths).

    Args:
        model: classifier returning logits of images in [0, 1] (the threat model decides which model: adaptive
            attacks hand over the whole ``Defended``).
        eps: Wasserstein radius as a normalised transport cost (cost / total image mass). Reference CIFAR-10: 0.005.
        steps: Frank-Wolfe iterations (JATP: 20; the reference: 300).
        kernel_size: odd window side k: mass moves at most k//2 pixels per axis (reference: 5).
        gamma: entropic regularisation of the LMO (reference CIFAR-10 script: 1e-3).
        step: ``None`` → the Frank-Wolfe schedule 2/(t+2) (reference); a number in (0, 1] → that fixed step.
        dual_max_iter: bisection steps for the LMO's dual variable (reference: 50).
        tol: bisection tolerance (relative on the cost, absolute on λ; reference: 1e-4 each).
        box: ``repair`` or ``clamp`` (module docstring).
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float = 0.005,
        steps: int = 20,
        kernel_size: int = 5,
        gamma: float = 1e-3,
        step: float | None = None,
        dual_max_iter: int = 50,
        tol: float = 1e-4,
        box: str = "repair",
    ) -> None:
        if box not in BOXES:
            raise ValueError(f"FWA: unknown box {box!r}; valid: {', '.join(BOXES)}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"FWA: kernel_size must be an odd integer >= 1 (3, 5, 7 …), got {kernel_size}")
        if not eps >= 0 or not math.isfinite(eps):
            raise ValueError(f"FWA: eps must be a finite number >= 0, got {eps}")
        if steps < 1 or dual_max_iter < 1:
            raise ValueError(f"FWA: steps and dual_max_iter must be >= 1, got {steps}, {dual_max_iter}")
        if not gamma > 0:
            raise ValueError(f"FWA: gamma must be > 0, got {gamma}")
        if step is not None and not 0 < step <= 1:
            raise ValueError(f"FWA: step must be null (2/(t+2)) or in (0, 1], got {step}")
        self.model = model
        self.eps = float(eps)
        self.steps = int(steps)
        self.kernel_size = int(kernel_size)
        self.gamma = float(gamma)
        self.step = None if step is None else float(step)
        self.dual_max_iter = int(dual_max_iter)
        self.tol = float(tol)
        self.box = box

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        return self.plan(x, y)[1]

    def plan(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The final transport plan (N, C, H·W, k²) and the adversarial images it gives (after ``box``)."""
        x = x.detach()
        n, c, h, w = x.shape
        k = self.kernel_size
        budget = self.eps * x.sum(dim=(1, 2, 3))
        pi = identity_plan(x, k)
        for t in range(self.steps):
            with torch.enable_grad():  # also when called directly under no_grad (attacks.base.Attack does this too)
                x_adv = plan_to_image(pi, k, h, w).requires_grad_(True)
                loss = F.cross_entropy(self.model(x_adv.clamp(0.0, 1.0)), y, reduction="sum")
                (grad_img,) = torch.autograd.grad(loss, [x_adv])
            grad = image_to_plan(grad_img.detach(), k)
            grad = grad / (grad.flatten(1).abs().amax(1).view(-1, 1, 1, 1) + 1e-8)  # reference: per-image ‖·‖∞ scaling
            vertex, _ = entropic_lmo(grad, x, k, budget, self.gamma, self.dual_max_iter, self.tol)
            s = 2.0 / (t + 2.0) if self.step is None else self.step
            pi = pi + s * (vertex - pi)
        if self.box == "repair":
            pi = repair_box(pi, k, h, w)
        return pi, plan_to_image(pi, k, h, w).clamp(0.0, 1.0).detach()
