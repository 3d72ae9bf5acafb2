"""One uniform attack callable: ``attack(model, x, y) -> x_adv``.

torchattacks builds an attack around a model (``torchattacks.PGD(model, eps=…)``); our threat
models decide *which* model an attack sees (victim, surrogate, or the EOT/BPDA-wrapped
``Defended``) only at run time. So each attack config stores a *partial* builder
(``_partial_: true``) and ``Attack`` binds it to the model on every call.

``Attack`` also fixes four traps once for every attack:
- a loss-averaging ``attacks.wrappers.EOT`` model is attacked on tied replicas of the batch, so the
  attack follows the gradient of the expected loss whatever loss it uses;
- Lightning's ``trainer.test``/``validate`` and ``torch.inference_mode`` disable autograd; attacks
  need input gradients, so the call runs under ``inference_mode(False)`` + ``enable_grad``.
- the model is attacked in eval mode and *each submodule's own* train/eval mode is restored in
  ``finally`` (restoring only the top-level flag would flip a freshly built EOT/BPDA wrapper's
  ``training=True`` onto the wrapped victim and switch its dropout on).
- inputs must be images in [0, 1] (ε is in pixel units); outputs are checked to be finite.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

from attacks.wrappers import EOT, REDUCTIONS

AttackBuilder = Callable[[nn.Module], Callable[..., Any]]

NORMS = ("Linf", "L2", "L1", "wasserstein", "none")
KINDS = ("gradient", "query", "minimal", "noise")


class Attack:
    """A configured attack, independent of the model it will be run against.

    Args:
        name: config name (``pgd``, ``fgsm`` …), used in results files.
        builder: ``model -> callable(x, y)``; usually ``functools.partial(torchattacks.X, **kwargs)``.
        norm: threat-model norm of the ε-ball (``none`` for unbounded/minimal-norm attacks; ``wasserstein`` for
            FWA's transport-cost ball, which the evaluation can only check by necessary conditions:
            ``evaluation.loop.constraint_violations``).
        eps: radius of the ε-ball in pixel units (``wasserstein``: transport cost / image mass), or ``None`` for
            unbounded attacks (DeepFool, CW…).
        kind: ``gradient`` (white-box), ``query`` (score-based, no gradients), ``minimal``
            (minimal-norm, unbounded), ``noise`` (random, no model access).
        handles_eot: the attack averages gradients over randomness itself (EOT-PGD, the rand
            AutoAttack), so the threat model must not wrap a stochastic defense in
            ``attacks.wrappers.EOT`` again.
        eot: how the threat model's ``EOT`` averages draws for this attack: ``loss`` (default: the
            attack follows the gradient of the expected loss) or ``logits`` / ``probs`` (for the
            linearising attacks that evaluate subsets of their batch, DeepFool and FAB).
        outside_threat_model: the attack is *declared* to leave the [0, 1] image box (a paper-protocol preset
            such as ``fgsm_unclipped``, the DiffDefense authors' FGSM). The evaluation then records its box
            violations loudly in results.json instead of refusing to write results; it still refuses ε-ball
            violations (``evaluation.runner.check_threat_model``). Default ``False``: every violation is an error.

    Example:
        >>> atk = Attack("pgd", functools.partial(torchattacks.PGD, eps=0.3, alpha=0.01, steps=20), "Linf", 0.3)
        >>> x_adv = atk(model, x, y)
    """

    def __init__(
        self,
        name: str,
        builder: AttackBuilder,
        norm: str = "Linf",
        eps: float | None = None,
        kind: str = "gradient",
        handles_eot: bool = False,
        eot: str = "loss",
        outside_threat_model: bool = False,
    ) -> None:
        if norm not in NORMS:
            raise ValueError(f"attack {name!r}: unknown norm {norm!r}; valid: {', '.join(NORMS)}")
        if kind not in KINDS:
            raise ValueError(f"attack {name!r}: unknown kind {kind!r}; valid: {', '.join(KINDS)}")
        self.name = name
        self.builder = builder
        self.norm = norm
        self.eps = None if eps is None else float(eps)
        self.kind = kind
        if eot not in REDUCTIONS:
            raise ValueError(f"attack {name!r}: unknown eot {eot!r}; valid: {', '.join(REDUCTIONS)}")
        self.handles_eot = handles_eot
        self.eot = eot
        self.outside_threat_model = bool(outside_threat_model)
        warn_if_cannot_reach_eps(self)

    @property
    def bounded(self) -> bool:
        """True when adversarial examples must lie in the ε-ball of ``norm``."""
        return self.eps is not None and self.norm != "none"

    def __repr__(self) -> str:
        return f"Attack(name={self.name!r}, norm={self.norm}, eps={self.eps}, kind={self.kind})"

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        check_images(x)
        with torch.inference_mode(False), torch.enable_grad(), eval_mode(model):
            # clone() outside inference mode turns inference tensors into ordinary ones.
            x_in, y_in = x.detach().clone(), y.detach().clone()
            if isinstance(model, EOT):
                out = model.run_attack(lambda m, xs, ys: self.builder(m)(xs, ys), x_in, y_in)
            else:
                out = self.builder(model)(x_in, y_in)
        x_adv = out[0] if isinstance(out, (tuple, list)) else out
        x_adv = x_adv.detach()
        if x_adv.shape != x.shape:
            raise RuntimeError(f"attack {self.name!r} returned shape {tuple(x_adv.shape)} for input {tuple(x.shape)}")
        if not torch.isfinite(x_adv).all():
            raise RuntimeError(f"attack {self.name!r} produced non-finite adversarial examples")
        return x_adv


class WeakAttackWarning(UserWarning):
    """An iterative attack whose steps × step size is below its ε: it cannot reach the ε-ball's boundary."""


_WARNED: set[tuple] = set()


def warn_if_cannot_reach_eps(attack: Attack) -> None:
    """Warn once per setting when ``steps × alpha < eps`` (e.g. 20 × 0.01 at ε = 0.3): a weak preset, not a default."""
    keywords = getattr(attack.builder, "keywords", {}) or {}
    steps, alpha = keywords.get("steps"), keywords.get("alpha")
    if not attack.bounded or not isinstance(steps, int) or not isinstance(alpha, (int, float)) or steps < 1:
        return
    key = (attack.name, steps, float(alpha), attack.eps)
    if steps * alpha < attack.eps and key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(
            f"attack {attack.name!r}: steps × alpha = {steps} × {alpha:g} = {steps * alpha:g} < eps = {attack.eps:g}: "
            "it cannot reach its own ε (standard strength is steps × alpha ≥ 2.5·eps)",
            WeakAttackWarning,
            stacklevel=3,
        )


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode; restore each one's own mode on exit (even on error)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, training in modes:
            m.training = training


def check_images(x: torch.Tensor) -> None:
    """Raise one clear error unless ``x`` is a finite (N, C, H, W) batch in [0, 1]."""
    if x.dim() != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("input images contain NaN or Inf")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"input images must lie in [0, 1] (normalisation belongs inside the victim); got range [{lo:.3f}, {hi:.3f}]"
        )


class UnclippedFGSM:
    """``model -> callable(x, y)``: the DiffDefense authors' FGSM, cleverhans' ``fast_gradient_method(model, x,
    eps=0.3, norm=np.inf)`` as ``attackpipeline.FGSM_Attack_CH`` calls it — x* = x + ε·sign(∇_x CE(model(x), ŷ)),
    **not clipped to [0, 1]** (cleverhans clips only when given ``clip_min``/``clip_max``; they gave neither), so
    x* lies in [−ε, 1 + ε]. That is outside every threat model here: its config declares
    ``outside_threat_model: true``, and results.json records the violations (``evaluation.runner.check_threat_model``).

    Args:
        eps: L∞ step.
        labels: ``"predicted"`` (cleverhans without ``y``, as the authors: ŷ = argmax model(x), "to avoid label
            leaking") or ``"true"`` (ŷ = y, as torchattacks' FGSM).
        train_mode: run the model in training mode for the predictions and the gradient (dropout on). The authors'
            classifiers were never put in eval mode before this attack (``getClassifier`` only loads the state
            dict), so their FGSM ran with dropout on; ``False`` (default) attacks the model as every attack here does.
    """

    def __init__(self, model: nn.Module, eps: float = 0.3, labels: str = "predicted", train_mode: bool = False) -> None:
        if labels not in ("predicted", "true"):
            raise ValueError(f"labels must be 'predicted' or 'true', got {labels!r}")
        self.model, self.eps, self.labels, self.train_mode = model, float(eps), labels, bool(train_mode)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        modes = [(m, m.training) for m in self.model.modules()]
        try:
            if self.train_mode:
                self.model.train()
            x = x.clone().detach().requires_grad_(True)
            if self.labels == "predicted":
                with torch.no_grad():
                    y = self.model(x).argmax(1)
            loss = torch.nn.functional.cross_entropy(self.model(x), y)
            (grad,) = torch.autograd.grad(loss, x)
        finally:
            for m, training in modes:
                m.training = training
        return (x + self.eps * grad.sign()).detach()
