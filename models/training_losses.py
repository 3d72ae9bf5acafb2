"""Training objectives for classifiers, as composable loss objects.

Every objective is a callable ``loss(model, x, y) -> (scalar, logs)``: ``scalar`` is the loss the
optimiser minimises (with a ``grad_fn`` when autograd is on) and ``logs`` a dict of detached
scalars for the logger (``adv_acc``, ``natural_loss``, ``robust_loss`` …). The LightningModule owns
the optimiser and the logging; the objective owns only the maths and the inner attack.

Adversarial objectives expose their inner maximisation as ``adversary(model, x, y) -> x_adv`` so it
can be checked on its own. Every adversary:

- runs with the whole model in eval mode (BatchNorm uses running statistics and does not update
  them, dropout is off) and restores the mode of *every* submodule afterwards, so a model with a
  frozen BatchNorm inside a training model comes back exactly as it went in;
- takes gradients w.r.t. the input only (``torch.autograd.grad``), never touching parameter
  ``.grad``, so it is safe inside Lightning's ``training_step`` between ``zero_grad`` and
  ``backward``;
- runs under ``inference_mode(False)`` + ``enable_grad`` (like ``attacks.base.Attack``), so it also
  works when the caller has disabled autograd (``torch.no_grad``, ``inference_mode``);
- returns a detached tensor on the input's device, inside the ℓ∞ ε-ball and in [0, 1].

FGSM-AT and PGD-AT reuse ``attacks.base.Attack`` around torchattacks' ``FGSM``/``PGD``. TRADES and
MART need the official codes' start (x + 0.001·N(0, 1)) and, for TRADES, a KL objective that
torchattacks lacks, so they share one small sign-gradient ascent, :func:`sign_gradient_ascent`.
MMA's adversary is a *margin* adversary (per-example ε found by bisection, up to 1.05·d_max), so it
lies in the ℓ∞ ball of its own ε rather than of a fixed one (:meth:`MMA.an_pgd`).

Inputs must be images in [0, 1] (ε is in pixel units); normalisation belongs inside the model.
"""
from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from typing import Literal

import torch
import torch.nn.functional as F
import torchattacks
from torch import Tensor, nn

from attacks.base import Attack, check_images, eval_mode

__all__ = [
    "TrainingLoss",
    "Standard",
    "FGSMAT",
    "PGDAT",
    "TRADES",
    "MART",
    "MMA",
    "soft_logit_margin",
    "logit_margin",
    "madry_alpha",
    "sign_gradient_ascent",
]

Logs = dict[str, Tensor]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def madry_alpha(eps: float, steps: int, alpha: float | None = None) -> float:
    """Step size of a ``steps``-step ℓ∞ PGD: ``alpha`` if given, else ``2.5 * eps / steps``.

    2.5·ε/k is the rule of thumb of Madry et al.'s lab (``robustness`` library): the walk can cover
    the ball's diameter from any start and still has steps left to move along its boundary.
    """
    if alpha is not None:
        return float(alpha)
    return 2.5 * float(eps) / int(steps)


def _accuracy(logits: Tensor, y: Tensor) -> Tensor:
    return (logits.detach().argmax(dim=1) == y).float().mean()


def _check_linf(name: str, eps: float, steps: int | None = None, alpha: float | None = None) -> None:
    if eps < 0:
        raise ValueError(f"{name}: eps must be >= 0, got {eps}")
    if steps is not None and steps < 1:
        raise ValueError(f"{name}: steps must be >= 1, got {steps}")
    if alpha is not None and alpha <= 0:
        raise ValueError(f"{name}: alpha must be > 0 (or null for 2.5*eps/steps), got {alpha}")


def sign_gradient_ascent(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    alpha: float,
    steps: int,
    objective: Literal["kl", "ce"],
) -> Tensor:
    """The inner maximisation of the official TRADES and MART codes (ℓ∞).

    Start at ``x + 0.001·N(0, 1)``, then ``steps`` times: ``x' ← Π_{B∞(x, ε)}(x' + α·sign ∇_{x'} L)``
    followed by a clamp to [0, 1], with the model in eval mode.

    ``objective="kl"`` (TRADES): ``L = Σ_i KL(p(x_i) || p(x'_i))``, clean prediction fixed.
    ``objective="ce"`` (MART):   ``L = Σ_i CE(f(x'_i), y_i)``.
    (Sum or mean only rescales the gradient; its sign is the same.)
    """
    if objective not in ("kl", "ce"):
        raise ValueError(f"unknown objective {objective!r}; valid: kl, ce")
    check_images(x)
    with torch.inference_mode(False), torch.enable_grad(), eval_mode(model):
        # clone() outside inference mode turns inference tensors into ordinary ones.
        x_nat, y_in = x.detach().clone(), y.detach().clone()
        if objective == "kl":
            with torch.no_grad():
                p_nat = F.softmax(model(x_nat), dim=1)
        x_adv = x_nat + 0.001 * torch.randn_like(x_nat)
        for _ in range(steps):
            x_adv.requires_grad_(True)
            logits = model(x_adv)
            if objective == "kl":
                loss = F.kl_div(F.log_softmax(logits, dim=1), p_nat, reduction="sum")
            else:
                loss = F.cross_entropy(logits, y_in, reduction="sum")
            (grad,) = torch.autograd.grad(loss, [x_adv])
            x_adv = x_adv.detach() + alpha * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x_nat - eps), x_nat + eps).clamp(0.0, 1.0)
        x_adv = x_adv.detach().clamp(0.0, 1.0)
    if not torch.isfinite(x_adv).all():
        raise RuntimeError("sign_gradient_ascent produced non-finite adversarial examples")
    return x_adv


# ----------------------------------------------------------------------------------------------
# objectives
# ----------------------------------------------------------------------------------------------
class TrainingLoss(ABC):
    """Base class: ``loss(model, x, y) -> (scalar to minimise, dict of detached logs)``.

    Subclasses that train on adversarial examples also implement ``adversary(model, x, y)``.
    The model is used in whatever train/eval mode the caller left it in (Lightning: train) for the
    outer loss; only the inner attack switches to eval mode, and it switches back.
    """

    name: str = "base"
    #: whether ``adversary`` is meaningful (False for ``Standard``).
    adversarial: bool = False

    @abstractmethod
    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Logs]:
        """The loss to minimise on (x, y) and extra logs."""

    def adversary(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        raise TypeError(f"{type(self).__name__} trains on clean inputs only: it has no adversary")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class Standard(TrainingLoss):
    """Empirical risk minimisation: ``L = mean_i CE(f(x_i), y_i)`` on clean inputs."""

    name = "standard"

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Logs]:
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        return loss, {"clean_acc": _accuracy(logits, y)}


class FGSMAT(TrainingLoss):
    """FGSM adversarial training (Goodfellow et al., 2015, "Explaining and Harnessing Adversarial
    Examples"; the FGSM-AT baseline of DiffDefense, Silva et al. 2023, Table 2).

    ``x_adv = clip_[0,1](x + ε·sign ∇_x CE(f(x), y))`` (model in eval mode), and each batch holds
    the clean and the adversarial copies, one forward pass over the 2N images:

        L = w · mean_i CE(f(x_i), y_i) + (1 − w) · mean_i CE(f(x_adv_i), y_i),   w = clean_weight

    Goodfellow et al. use w = α = 0.5.

    Args:
        eps: ℓ∞ radius in pixel units (0.3 for MNIST-family).
        clean_weight: weight w of the clean term, in [0, 1].
    """

    name = "fgsm_at"
    adversarial = True

    def __init__(self, eps: float = 0.3, clean_weight: float = 0.5) -> None:
        _check_linf("FGSMAT", eps)
        if not 0.0 <= clean_weight <= 1.0:
            raise ValueError(f"FGSMAT: clean_weight must lie in [0, 1], got {clean_weight}")
        self.eps = float(eps)
        self.clean_weight = float(clean_weight)
        self._attack = Attack("fgsm", functools.partial(torchattacks.FGSM, eps=self.eps), "Linf", self.eps)

    def adversary(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        with eval_mode(model):
            return self._attack(model, x, y)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Logs]:
        x_adv = self.adversary(model, x, y)
        n = x.shape[0]
        logits = model(torch.cat([x, x_adv], dim=0))
        logits_clean, logits_adv = logits[:n], logits[n:]
        clean_loss = F.cross_entropy(logits_clean, y)
        adv_loss = F.cross_entropy(logits_adv, y)
        loss = self.clean_weight * clean_loss + (1.0 - self.clean_weight) * adv_loss
        return loss, {
            "clean_loss": clean_loss.detach(),
            "adv_loss": adv_loss.detach(),
            "clean_acc": _accuracy(logits_clean, y),
            "adv_acc": _accuracy(logits_adv, y),
        }


class PGDAT(TrainingLoss):
    """PGD adversarial training (Madry et al., 2018, "Towards Deep Learning Models Resistant to
    Adversarial Attacks"): the saddle-point problem

        min_θ E_(x,y) [ max_{‖δ‖∞ ≤ ε} CE(f_θ(x + δ), y) ],

    the inner max approximated by ℓ∞ PGD (torchattacks.PGD: uniform random start in the ball,
    ``steps`` sign steps of size α, projection, clamp to [0, 1]; model in eval mode). The outer
    loss is CE on the adversarial examples only: ``L = mean_i CE(f(x_adv_i), y_i)``.
    ``norm="L2"``: the same with the ℓ2 ball (torchattacks.PGDL2: normalised-gradient steps, ℓ2
    projection) — the AT(ℓ2) baseline of RAP's Table 4.

    Args:
        eps: radius in pixel units (ℓ∞ or ℓ2, by ``norm``).
        alpha: step size; ``None`` → 2.5·ε/steps (see :func:`madry_alpha`; the same rule in ℓ2).
        steps: PGD iterations.
        random_start: random start in the ε-ball (Madry et al.) instead of at x.
        norm: ``"Linf"`` or ``"L2"``.
    """

    name = "pgd_at"
    adversarial = True
    NORMS = {"Linf": torchattacks.PGD, "L2": torchattacks.PGDL2}

    def __init__(self, eps: float, alpha: float | None = None, steps: int = 10, random_start: bool = True, norm: str = "Linf") -> None:
        _check_linf("PGDAT", eps, steps, alpha)
        if norm not in self.NORMS:
            raise ValueError(f"PGDAT: unknown norm {norm!r}; valid: {', '.join(self.NORMS)}")
        self.eps = float(eps)
        self.steps = int(steps)
        self.alpha = madry_alpha(self.eps, self.steps, alpha)
        self.random_start = bool(random_start)
        self.norm = norm
        builder = functools.partial(
            self.NORMS[norm], eps=self.eps, alpha=self.alpha, steps=self.steps, random_start=self.random_start
        )
        self._attack = Attack("pgd" if norm == "Linf" else "pgd_l2", builder, norm, self.eps)

    def adversary(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        with eval_mode(model):
            return self._attack(model, x, y)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Logs]:
        x_adv = self.adversary(model, x, y)
        logits_adv = model(x_adv)
        loss = F.cross_entropy(logits_adv, y)
        return loss, {"adv_acc": _accuracy(logits_adv, y)}


class TRADES(TrainingLoss):
    """TRADES (Zhang et al., 2019, "Theoretically Principled Trade-off between Robustness and
    Accuracy"), as the official code ``trades.py`` computes it:

        L = mean_i CE(f(x_i), y_i) + β · (1/N) Σ_i KL( p(x_i) || p(x_adv_i) ),
        x_adv = argmax_{x' ∈ B∞(x, ε)} KL( p(x) || p(x') )

    (``nn.KLDivLoss(size_average=False)(log p(x_adv), p(x)) / N`` — "batchmean"; the paper writes
    the regulariser as KL(f(x), f(x')), i.e. the clean distribution is the reference.) The clean
    distribution is *not* detached in the outer loss, as in the official code: gradients flow
    through both arguments. Inner max: start x + 0.001·N(0, 1), ``steps`` sign steps of size α,
    projection, clamp to [0, 1], model in eval mode (:func:`sign_gradient_ascent`, ``"kl"``).

    Args:
        eps: ℓ∞ radius in pixel units.
        alpha: step size; ``None`` → 2.5·ε/steps.
        steps: inner iterations.
        beta: trade-off β = 1/λ (official: 6.0 on CIFAR-10, 1.0 on MNIST).
    """

    name = "trades"
    adversarial = True

    def __init__(self, eps: float, alpha: float | None = None, steps: int = 10, beta: float = 6.0) -> None:
        _check_linf("TRADES", eps, steps, alpha)
        if beta < 0:
            raise ValueError(f"TRADES: beta must be >= 0, got {beta}")
        self.eps = float(eps)
        self.steps = int(steps)
        self.alpha = madry_alpha(self.eps, self.steps, alpha)
        self.beta = float(beta)

    def adversary(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return sign_gradient_ascent(model, x, y, self.eps, self.alpha, self.steps, "kl")

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Logs]:
        x_adv = self.adversary(model, x, y)
        logits = model(x)
        logits_adv = model(x_adv)
        natural_loss = F.cross_entropy(logits, y)
        robust_loss = F.kl_div(
            F.log_softmax(logits_adv, dim=1), F.softmax(logits, dim=1), reduction="batchmean"
        )
        loss = natural_loss + self.beta * robust_loss
        return loss, {
            "natural_loss": natural_loss.detach(),
            "robust_loss": robust_loss.detach(),
            "clean_acc": _accuracy(logits, y),
            "adv_acc": _accuracy(logits_adv, y),
        }


class MART(TrainingLoss):
    """MART (Wang et al., 2020, "Improving Adversarial Robustness Requires Revisiting Misclassified
    Examples"), as the official code ``mart.py`` computes it:

        BCE_i = CE(f(x_adv_i), y_i) − log(1.0001 − max_{k≠y_i} p_k(x_adv_i) + 1e-12)
        KL_i  = Σ_k p_k(x_i) · (log p_k(x_i) − log(p_k(x_adv_i) + 1e-12))
        L     = mean_i BCE_i + λ · (1/N) Σ_i KL_i · (1.0000001 − p_{y_i}(x_i))

    The inner maximisation is CE-PGD, as in the paper (x' = argmax CE(h(x'), y)) and the official
    code: start x + 0.001·N(0, 1), ``steps`` sign steps of size α, projection, clamp to [0, 1],
    model in eval mode (:func:`sign_gradient_ascent`, ``"ce"``). Nothing is detached in the outer
    loss (official code): the clean distribution and the weight 1 − p_y(x) carry gradients.

    Args:
        eps: ℓ∞ radius in pixel units.
        alpha: step size; ``None`` → 2.5·ε/steps.
        steps: inner iterations.
        beta: λ, the weight of the misclassification-aware KL term (official: 6.0).
    """

    name = "mart"
    adversarial = True

    def __init__(self, eps: float, alpha: float | None = None, steps: int = 10, beta: float = 6.0) -> None:
        _check_linf("MART", eps, steps, alpha)
        if beta < 0:
            raise ValueError(f"MART: beta must be >= 0, got {beta}")
        self.eps = float(eps)
        self.steps = int(steps)
        self.alpha = madry_alpha(self.eps, self.steps, alpha)
        self.beta = float(beta)

    def adversary(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return sign_gradient_ascent(model, x, y, self.eps, self.alpha, self.steps, "ce")

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Logs]:
        x_adv = self.adversary(model, x, y)
        logits = model(x)
        logits_adv = model(x_adv)
        adv_probs = F.softmax(logits_adv, dim=1)
        # largest wrong-class probability on x_adv (official: second of argsort when top-1 == y).
        is_true = F.one_hot(y, num_classes=adv_probs.shape[1]).bool()
        top_wrong = adv_probs.masked_fill(is_true, float("-inf")).max(dim=1).values
        bce = F.cross_entropy(logits_adv, y) - torch.log(1.0001 - top_wrong + 1e-12).mean()
        nat_probs = F.softmax(logits, dim=1)
        true_probs = nat_probs.gather(1, y.unsqueeze(1)).squeeze(1)
        # kl_div(input=log q, target=p) = p·(log p − log q), with 0·log 0 = 0 as the official code.
        kl = F.kl_div(torch.log(adv_probs + 1e-12), nat_probs, reduction="none").sum(dim=1)
        robust_loss = (kl * (1.0000001 - true_probs)).mean()
        loss = bce + self.beta * robust_loss
        return loss, {
            "adv_loss": bce.detach(),
            "robust_loss": robust_loss.detach(),
            "clean_acc": _accuracy(logits, y),
            "adv_acc": _accuracy(logits_adv, y),
        }


def soft_logit_margin(logits: Tensor, y: Tensor) -> Tensor:
    """Per example ``logsumexp_{j≠y} z_j − z_y`` (advertorch's ``SoftLogitMarginLoss``, MMA's attack and search
    loss). It is ≥ 0 exactly when p_y ≤ ½: the "soft" misclassification the MMA reference bisects on."""
    is_true = F.one_hot(y, num_classes=logits.shape[1]).bool()
    return torch.logsumexp(logits.masked_fill(is_true, float("-inf")), dim=1) - logits.gather(1, y[:, None]).squeeze(1)


def logit_margin(logits: Tensor, y: Tensor) -> Tensor:
    """Per example ``max_{j≠y} z_j − z_y`` (advertorch's ``elementwise_margin``): ≥ 0 exactly when argmax ≠ y
    (ties count)."""
    is_true = F.one_hot(y, num_classes=logits.shape[1]).bool()
    return logits.masked_fill(is_true, float("-inf")).amax(dim=1) - logits.gather(1, y[:, None]).squeeze(1)


class MMA(TrainingLoss):
    """MMA training (Ding et al., ICLR 2020, "MMA Training: Direct Input Space Margin Maximization through
    Adversarial Training"), as the official code ``BorealisAI/mma_training`` (``trainer.py``, ``anpgd.py``) computes
    it, ℓ∞:

        L = c · mean_i CE(f(x_i), y_i)
            + (1 − c) · (1/N) [ Σ_{i correct, ε_i < d_max} CE(f(x_i + δ_i), y_i) + Σ_{i wrong} CE(f(x_i), y_i) ]

    with c = ``clean_loss_coeff`` (1/3; 0 gives the paper's OMMA), "correct" = soft logit margin of the clean
    logits < 0 (p_y > ½), and δ_i the AN-PGD *margin* adversary: PGD at the example's current ε, then a bisection
    on ε along that PGD direction for the smallest ε whose image is (softly) misclassified, in [0, 1.05·d_max].
    Maximising the margin ε_i is done by minimising CE at the boundary point, only while ε_i < d_max (the hinge).
    The reference combines the gradients of the two terms with weights c and 1 − c after two backward passes;
    the gradient of the weighted sum returned here is the same.

    What is simplified or chosen here (recorded in docs/decisions.md):

    - **ε memory**: the reference remembers each training example's last ε by dataset index and starts its PGD there
      (never below ``mineps``). Objectives here see (x, y) only (and augmentation changes x every epoch), so every
      correct example starts from the mean ε found on the previous batch (``mineps`` at first, never below it).
    - **which end of the bracket**: the reference returns the bisection's last midpoint, which can sit on the
      correct side of the boundary; here the bracket's upper end, which was seen to misclassify (or 1.05·d_max if
      nothing did, which the hinge then drops). They differ by at most 1.05·d_max / 2^search_steps.
    - the bisection runs in eval mode without gradients (the reference's runs in train mode: its BatchNorm
      statistics also absorbed the 10 search batches), and the adversary is clamped to [0, 1] (the reference
      returns x + ε·unit unclamped while it searched on clamped images).

    Args:
        eps: the threat model's ℓ∞ radius (``dataset.eps.linf``): the unit of the default ``hinge_maxeps``.
        hinge_maxeps: d_max; ``None`` → 4·eps (MMA-32 = 32/255 at ε = 8/255, the reference's largest CIFAR-10 ℓ∞
            model; MMA-12 and MMA-20 are 1.5·eps and 2.5·eps).
        mineps: the smallest starting ε of AN-PGD (reference: 0.005 for ℓ∞ CIFAR-10, 0.1 for MNIST).
        steps: PGD iterations (reference CIFAR-10: 10), step ``eps_iter_scale`` · ε_i / steps (reference 2.5).
        search_steps: bisection steps (reference: 10).
        clean_loss_coeff: c, the clean-loss weight (reference: 1/3).
        maxeps_factor: the search's upper end is this × d_max (reference: 1.05).
        search_loss: ``slm`` (reference: the bisection and the PGD maximise the soft logit margin) or ``lm`` (the
            hard logit margin: "misclassified" then means argmax ≠ y).
    """

    name = "mma"
    adversarial = True
    MARGINS = {"slm": soft_logit_margin, "lm": logit_margin}

    def __init__(
        self,
        eps: float,
        hinge_maxeps: float | None = None,
        mineps: float = 0.005,
        steps: int = 10,
        eps_iter_scale: float = 2.5,
        search_steps: int = 10,
        clean_loss_coeff: float = 1.0 / 3.0,
        maxeps_factor: float = 1.05,
        search_loss: str = "slm",
    ) -> None:
        _check_linf("MMA", eps, steps)
        if search_loss not in self.MARGINS:
            raise ValueError(f"MMA: unknown search_loss {search_loss!r}; valid: {', '.join(self.MARGINS)}")
        hinge = 4.0 * float(eps) if hinge_maxeps is None else float(hinge_maxeps)
        if not hinge > 0:
            raise ValueError(f"MMA: hinge_maxeps (d_max) must be > 0 (or null for 4·eps), got {hinge_maxeps}")
        if maxeps_factor < 1:
            raise ValueError(f"MMA: maxeps_factor must be >= 1 (the search must reach d_max), got {maxeps_factor}")
        if not 0 <= mineps < hinge * maxeps_factor:
            raise ValueError(
                f"MMA: mineps must lie in [0, maxeps_factor·d_max) = [0, {hinge * maxeps_factor:g}), got {mineps}"
            )
        if not 0.0 <= clean_loss_coeff <= 1.0:
            raise ValueError(f"MMA: clean_loss_coeff must lie in [0, 1], got {clean_loss_coeff}")
        if search_steps < 1 or eps_iter_scale <= 0:
            raise ValueError(
                f"MMA: search_steps must be >= 1 and eps_iter_scale > 0, got {search_steps}, {eps_iter_scale}"
            )
        self.eps = float(eps)
        self.hinge_maxeps = hinge
        self.maxeps = hinge * float(maxeps_factor)
        self.mineps = float(mineps)
        self.steps = int(steps)
        self.eps_iter_scale = float(eps_iter_scale)
        self.search_steps = int(search_steps)
        self.clean_loss_coeff = float(clean_loss_coeff)
        self.search_loss = search_loss
        self._margin = self.MARGINS[search_loss]
        self._warm_eps = self.mineps

    def an_pgd(self, model: nn.Module, x: Tensor, y: Tensor, prev_eps: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """AN-PGD: per-example margin adversaries (x_adv, ε) of ``(x, y)`` (the reference's ``ANPGD.perturb``).

        ℓ∞ PGD at ε⁰_i = ``prev_eps`` (default: the warm start) maximising the search margin — uniform random start,
        ``steps`` sign steps of ``eps_iter_scale``·ε⁰_i/steps, projection, clamp to [0, 1] — gives a direction
        u_i = δ_i/ε⁰_i (‖u_i‖∞ ≤ 1); a bisection over ε ∈ [0, maxeps] on the margin of clamp(x_i + ε u_i) then
        returns the smallest ε seen to misclassify (maxeps if none) and x_adv = clamp(x + ε u), so ‖x_adv − x‖∞ ≤ ε_i
        ≤ 1.05·d_max. Eval mode throughout; gradients w.r.t. the input only.
        """
        check_images(x)
        margin = self._margin
        with torch.inference_mode(False), torch.enable_grad(), eval_mode(model):
            x_nat, y_in = x.detach().clone(), y.detach().clone()
            if prev_eps is None:
                prev_eps = torch.full((x.shape[0],), self._warm_eps)
            prev = prev_eps.detach().to(x_nat).clamp(self.mineps, self.maxeps).clone()
            view = (-1,) + (1,) * (x.dim() - 1)
            radius = prev.view(view)
            step = (self.eps_iter_scale * prev / self.steps).view(view)
            delta = (torch.rand_like(x_nat) * 2 - 1) * radius
            delta = (x_nat + delta).clamp(0.0, 1.0) - x_nat
            for _ in range(self.steps):
                delta.requires_grad_(True)
                loss = margin(model(x_nat + delta), y_in).sum()
                (grad,) = torch.autograd.grad(loss, [delta])
                delta = torch.max(torch.min(delta.detach() + step * grad.sign(), radius), -radius)
                delta = (x_nat + delta).clamp(0.0, 1.0) - x_nat
            unit = delta / (radius + 1e-12)
            with torch.no_grad():
                lo, hi = torch.zeros_like(prev), torch.full_like(prev, self.maxeps)
                cur, m = prev, margin(model(x_nat + delta), y_in)
                for i in range(self.search_steps + 1):
                    fooled = m >= 0
                    lo = torch.where(fooled, lo, torch.max(lo, cur))
                    hi = torch.where(fooled, torch.min(hi, cur), hi)
                    if i == self.search_steps:  # the last midpoint's margin also narrows the bracket
                        break
                    cur = (lo + hi) / 2
                    m = margin(model((x_nat + cur.view(view) * unit).clamp(0.0, 1.0)), y_in)
                x_adv = (x_nat + hi.view(view) * unit).clamp(0.0, 1.0)
        if not torch.isfinite(x_adv).all():
            raise RuntimeError("MMA's AN-PGD produced non-finite adversarial examples")
        return x_adv.detach(), hi.detach()

    def adversary(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """The images the MMA term trains on: the AN-PGD margin adversary of each (softly) correctly classified
        example, the clean image of the others (correctness judged in eval mode here; in ``__call__`` on the
        training-mode clean logits, as the reference)."""
        with torch.inference_mode(False), torch.no_grad(), eval_mode(model):
            correct = self._margin(model(x.detach().clone()), y) < 0
        x_out = x.detach().clone()
        if correct.any():
            x_out[correct] = self.an_pgd(model, x[correct], y[correct])[0]
        return x_out

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Logs]:
        logits_clean = model(x)
        clean_loss = F.cross_entropy(logits_clean, y)
        correct = self._margin(logits_clean.detach(), y) < 0
        x_mix, eps = x.detach().clone(), x.new_zeros(x.shape[0])
        if correct.any():
            x_adv, eps_c = self.an_pgd(model, x[correct], y[correct])
            x_mix[correct], eps[correct] = x_adv, eps_c
            self._warm_eps = max(self.mineps, float(eps_c.mean()))
        logits_mix = model(x_mix)
        ce = F.cross_entropy(logits_mix, y, reduction="none")
        used = correct & (eps < self.hinge_maxeps)
        mma_loss = (ce[used].sum() + ce[~correct].sum()) / x.shape[0]
        loss = self.clean_loss_coeff * clean_loss + (1.0 - self.clean_loss_coeff) * mma_loss
        n_correct = correct.sum().clamp_min(1)
        return loss, {
            "clean_loss": clean_loss.detach(),
            "mma_loss": mma_loss.detach(),
            "clean_acc": _accuracy(logits_clean, y),
            "adv_acc": _accuracy(logits_mix, y),
            "margin_eps": (eps * correct).sum() / n_correct,
            "in_hinge": used.float().sum() / n_correct,
        }
