"""RAP's adversarial "forward process" (Alg. 1 of "From Malicious to Marvelous: the Art of Adversarial Attack as
Diffusion"): a clean image degraded by signed-gradient steps on a classifier's loss, every intermediate kept.

    x̃   = Π_ε(x₀ + ζ) clamped to [0, 1],    ζ ~ U(−c, c) (Alg. 1) or N(0, σ²) (§3.1) or 0
    x_t = clamp_[0,1](Π_ε(x_{t−1} + λ·ξ_t)),  ξ_t = sign(∇_x L(f(x_{t−1}), y))      (L∞, Alg. 1 lines 7–8)
                                               ξ_t = ∇ / ‖∇‖₂ per image                 (L2 variant)

with x_0 := x̃ for the first step and Π_ε the projection onto the ε-ball around the *clean* x₀. One call of
``trajectory(f, x₀, y, steps)`` returns ``[x_1, …, x_steps]``, so one batch of training images yields every t at
once (``select`` picks each image's own t). Reading of the step count: x_t is the image after t sign steps, the
random start folded into the first (Alg. 1 draws ζ in its t = 0 iteration); t ∈ {1, …, T}.

Why its own module (and not ``models.training_losses.sign_gradient_ascent``): RAP needs every intermediate, the
L2 variant, Alg. 1's uniform/Gaussian start and, at inference (Alg. 2), a trajectory the attacker can
differentiate through: ``differentiable=True`` keeps x₀ in the graph. The signs ξ_t are piecewise constant in x
(zero derivative almost everywhere), so they are computed on detached copies and the exact derivative flows only
through the projection and the clamp — that is the derivative of the function, not an approximation.

Gradients are taken with ``torch.autograd.grad`` with respect to the input only (never touching parameter
``.grad``), under ``inference_mode(False)`` + ``enable_grad`` (so it also works inside Lightning's validation
loop), with every submodule of the classifier in eval mode and each one's own mode restored in ``finally``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attacks.base import check_images, eval_mode  # as models.training_losses: one definition of each

NORMS = ("Linf", "L2")
STARTS = ("uniform", "gaussian", "none")


def _per_image_norm(v: Tensor) -> Tensor:
    return v.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (v.dim() - 1)))


class AdversarialProcess:
    """Alg. 1 as a reusable degradation ``trajectory(classifier, x₀, y, steps) -> [x_1, …, x_steps]``.

    Args:
        norm: ``"Linf"`` (sign steps, box projection; Alg. 1) or ``"L2"`` (normalised-gradient steps, L2-ball
            projection; the paper's second RAP model, Table 4).
        eps: radius ε of the ball around the clean image, in pixel units.
        num_steps: T, the longest trajectory; only used to derive the default step size.
        step_size: λ; ``None`` = 2.5·ε/T (Madry et al.'s rule: the T-step walk can cross the ball and still move
            along its boundary; 1/255 for ε = 8/255 and T = 20).
        random_start: ``"uniform"`` (Alg. 1: ζ ~ U(−c, c) per pixel), ``"gaussian"`` (§3.1: ζ ~ N(0, σ²)) or
            ``"none"`` (Alg. 2 at inference: "no randomness").
        start_size: c (uniform) or σ (Gaussian), per pixel; ``None`` = the defaults of ``default_start_size``.
    """

    def __init__(
        self,
        norm: str = "Linf",
        eps: float = 8 / 255,
        num_steps: int = 20,
        step_size: float | None = None,
        random_start: str = "uniform",
        start_size: float | None = None,
    ) -> None:
        if norm not in NORMS:
            raise ValueError(f"AdversarialProcess: unknown norm {norm!r}; valid: {', '.join(NORMS)}")
        if random_start not in STARTS:
            raise ValueError(f"AdversarialProcess: unknown random_start {random_start!r}; valid: {', '.join(STARTS)}")
        if not eps > 0:
            raise ValueError(f"AdversarialProcess: eps must be > 0, got {eps}")
        if int(num_steps) < 1:
            raise ValueError(f"AdversarialProcess: num_steps must be >= 1, got {num_steps}")
        if step_size is not None and not step_size > 0:
            raise ValueError(f"AdversarialProcess: step_size must be > 0 (or null for 2.5*eps/num_steps), got {step_size}")
        if start_size is not None and start_size < 0:
            raise ValueError(f"AdversarialProcess: start_size must be >= 0 (or null for the default), got {start_size}")
        self.norm = norm
        self.eps = float(eps)
        self.num_steps = int(num_steps)
        self.step_size = 2.5 * self.eps / self.num_steps if step_size is None else float(step_size)
        self.random_start = random_start
        self.start_size = None if start_size is None else float(start_size)

    @property
    def stochastic(self) -> bool:
        """Whether a trajectory draws randomness (the random start)."""
        return self.random_start != "none" and self.start_size != 0.0

    def __repr__(self) -> str:
        return (f"AdversarialProcess(norm={self.norm}, eps={self.eps:g}, step_size={self.step_size:g}, "
                f"random_start={self.random_start}, start_size={self.start_size})")

    def default_start_size(self, x: Tensor) -> float:
        """c or σ when ``start_size`` is null. L∞: c = ε (Madry et al.'s start fills the ball), σ = ε/2. L2 (per pixel,
        d = pixels per image): c = ε·√(3/d), so that ‖ζ‖₂ ≈ ε, and σ = ε/(2√d), so that ‖ζ‖₂ ≈ ε/2 — the L∞ choices
        carried over by the norm of the start rather than per pixel."""
        if self.start_size is not None:
            return self.start_size
        uniform = self.random_start == "uniform"
        if self.norm == "Linf":
            return self.eps if uniform else self.eps / 2
        d = x[0].numel()
        return self.eps * math.sqrt(3.0 / d) if uniform else self.eps / (2.0 * math.sqrt(d))

    # -- the pieces --------------------------------------------------------------------------------
    def start_noise(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """ζ of Alg. 1 line 4 (uniform) or §3.1 (Gaussian), drawn on the CPU from ``generator`` when given."""
        if not self.stochastic:
            return torch.zeros_like(x)
        size = self.default_start_size(x)
        if self.random_start == "uniform":
            noise = torch.rand(x.shape, generator=generator, dtype=x.dtype, device="cpu" if generator else x.device) * 2 - 1
        else:
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu" if generator else x.device)
        return (size * noise).to(x.device)

    def project(self, x: Tensor, x0: Tensor) -> Tensor:
        """Π_ε around ``x0`` (box for L∞, ball for L2), then the clamp to [0, 1] (which stays inside either)."""
        delta = x - x0
        if self.norm == "Linf":
            delta = delta.clamp(-self.eps, self.eps)
        else:
            delta = delta * torch.clamp(self.eps / _per_image_norm(delta), max=1.0)
        return (x0 + delta).clamp(0.0, 1.0)

    def direction(self, grad: Tensor) -> Tensor:
        """ξ: sign of the gradient (L∞) or the gradient over its per-image L2 norm."""
        return grad.sign() if self.norm == "Linf" else grad / _per_image_norm(grad)

    def loss_gradient(self, classifier: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """∇_x Σ_i CE(f(x_i), y_i) at a detached copy of ``x`` (summed: per-image gradients, unscaled by N)."""
        xg = x.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(classifier(xg), y, reduction="sum"), [xg])
        return grad

    # -- Alg. 1 --------------------------------------------------------------------------------------
    def trajectory(
        self,
        classifier: nn.Module,
        x0: Tensor,
        y: Tensor,
        steps: int,
        differentiable: bool = False,
        generator: torch.Generator | None = None,
    ) -> list[Tensor]:
        """``[x_1, …, x_steps]`` of Alg. 1 on ``classifier``'s CE with labels ``y`` (``steps = 0`` → ``[]``).

        ``differentiable=False`` (training): every x_t is detached. ``True`` (the inference-time re-degradation of
        Alg. 2 inside an attacked defense): x₀'s graph is kept, through the start, every projection and clamp;
        the directions ξ_t are constants of that graph (their exact derivative is zero almost everywhere).
        """
        steps = int(steps)
        if steps < 0:
            raise ValueError(f"trajectory: steps must be >= 0, got {steps}")
        check_images(x0.detach())
        if steps == 0:
            return []
        keep_graph = differentiable and torch.is_grad_enabled() and x0.requires_grad
        with torch.inference_mode(False), torch.enable_grad(), eval_mode(classifier):
            # clone() outside inference mode turns inference tensors into ordinary ones.
            anchor = x0 if keep_graph else x0.detach().clone()
            y = y.detach().clone()
            x = self.project(anchor + self.start_noise(anchor, generator), anchor)
            out = []
            for _ in range(steps):
                xi = self.direction(self.loss_gradient(classifier, x, y))
                x = self.project(x + self.step_size * xi, anchor)
                out.append(x if keep_graph else x.detach())
        if not all(torch.isfinite(v).all() for v in out):
            raise RuntimeError("AdversarialProcess produced non-finite images")
        return out

    def __call__(self, classifier: nn.Module, x0: Tensor, y: Tensor, steps: int, **kwargs) -> list[Tensor]:
        return self.trajectory(classifier, x0, y, steps, **kwargs)

    def sample(
        self, classifier: nn.Module, x0: Tensor, y: Tensor, t: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """x_{t_i} for every image i (t_i ∈ {1, …}), detached: ``select(trajectory(…, max t), t)`` without the wasted
        steps — image i leaves the batch after its own t_i steps (the classifier is in eval mode, so an image's
        gradient never depends on the others), which halves the cost of a uniform t ~ U{1, …, T} (training)."""
        t = t.to(device=x0.device, dtype=torch.long)
        if t.shape != (x0.shape[0],) or int(t.min()) < 1:
            raise ValueError(f"sample: t must be of shape ({x0.shape[0]},) with values >= 1, got {tuple(t.shape)}")
        check_images(x0.detach())
        with torch.inference_mode(False), torch.enable_grad(), eval_mode(classifier):
            anchor, y = x0.detach().clone(), y.detach().clone()
            x = self.project(anchor + self.start_noise(anchor, generator), anchor)
            for k in range(1, int(t.max()) + 1):
                active = (t >= k).nonzero(as_tuple=True)[0]
                xa, x0a = x[active], anchor[active]
                xi = self.direction(self.loss_gradient(classifier, xa, y[active]))
                x = x.index_copy(0, active, self.project(xa + self.step_size * xi, x0a))
        x = x.detach()
        if not torch.isfinite(x).all():
            raise RuntimeError("AdversarialProcess produced non-finite images")
        return x


def select(trajectory: list[Tensor], t: Tensor) -> Tensor:
    """Image i of ``trajectory[t_i − 1]`` for every i (t ∈ {1, …, len(trajectory)}): one batch with mixed t."""
    if not trajectory:
        raise ValueError("select: empty trajectory")
    t = t.to(torch.long)
    if int(t.min()) < 1 or int(t.max()) > len(trajectory):
        raise ValueError(f"select: t must lie in 1..{len(trajectory)}, got range [{int(t.min())}, {int(t.max())}]")
    stacked = torch.stack(trajectory)  # (steps, N, C, H, W)
    return stacked[t.to(stacked.device) - 1, torch.arange(stacked.shape[1], device=stacked.device)]
