"""Full adversarial examples in a feature space of the target (JATP Eq. 5), through the *full* model target∘P:

    x̃* = argmax_{x̃ ∈ B_ε(x)} d( t*(P(x̃)), t*(P(x)) )

t*(·) is the feature map of an internal layer of the target, read by a forward hook on the (wrapped) victim — never a
rewritten ResNet; the reference t*(P(x)) is the *pre-processed* natural image's (the issue's reading of Eq. 5: the
adversary attacks the full model F = T∘P, whose features at the clean input are t*(P(x))), held constant during the
attack. The maximisation is PGD in the L∞ ball (CAFD's feature attack, the same first author's code): a uniform
random start in the ε-box, ``steps`` sign-gradient steps of ``step_size`` (the paper: 0.01), each followed by the
projection onto the ε-box around x and the clamp to [0, 1].

The layer ("the last convolution layer in the third basic block") is a dotted submodule name, looked up on the
victim and, failing that, on its wrapped ``net`` (``models.victims.Normalized``): ``layer2.0.conv2`` is the second
convolution of ResNet-18's third BasicBlock (layer1.0, layer1.1, layer2.0), our default; ``layer3`` (the end of the
third stage) is the other reading. The hook reads the module's *output* (for a convolution: before its BatchNorm).

Gradients are taken with ``torch.autograd.grad`` with respect to the input only (never touching parameter ``.grad``),
under ``inference_mode(False)`` + ``enable_grad`` (so it also runs inside Lightning's validation loop), with every
submodule of P and of the target in eval mode and each one's own mode restored afterwards (``attacks.base.eval_mode``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attacks.base import check_images, eval_mode  # as models.training_losses: one definition of each

DISTANCES = ("l2", "cosine")


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule ``name`` (dotted, e.g. ``layer2.0.conv2``) of ``model`` or of its wrapped ``model.net``."""
    candidates = [model]
    if isinstance(getattr(model, "net", None), nn.Module):
        candidates.append(model.net)
    for root in candidates:
        try:
            return root.get_submodule(name)
        except AttributeError:
            continue
    tops = ", ".join(n for n, _ in candidates[-1].named_children())
    raise ValueError(f"feature layer {name!r} not found in {type(model).__name__} (top-level modules: {tops})")


def features_and_logits(model: nn.Module, layer: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(t*(x), model(x))``: the output of ``layer`` (a submodule of ``model``) during one forward pass, and the logits."""
    captured: list[Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _inp, out: captured.append(out))
    try:
        logits = model(x)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"feature layer ran {len(captured)} times in one forward pass (expected once): pick another layer")
    return captured[0], logits


def feature_distance(f: Tensor, ref: Tensor, distance: str = "l2") -> Tensor:
    """Per-image d(f, ref): squared L2 over all feature entries (``l2``) or 1 − cosine similarity (``cosine``)."""
    a, b = f.flatten(1), ref.flatten(1)
    if distance == "l2":
        return (a - b).pow(2).sum(dim=1)
    if distance == "cosine":
        return 1.0 - F.cosine_similarity(a, b, dim=1, eps=1e-12)
    raise ValueError(f"unknown feature distance {distance!r}; valid: {', '.join(DISTANCES)}")


class FeatureAttack:
    """Eq. 5 as ``attack(preprocessor, target, x) -> x̃*`` (detached), see the module docstring.

    Args:
        layer: dotted name of the target's feature layer (default ``layer2.0.conv2``).
        distance: d — ``"l2"`` (squared Euclidean distance of the feature maps; the sign step is the same as for the
            plain norm, a monotone function of it per image) or ``"cosine"`` (1 − cosine similarity).
        eps: L∞ radius in pixel units (the paper: 8/255; configs pass ``dataset.eps.linf``).
        step_size: the sign-step size (the paper: 0.01).
        steps: number of iterations (the paper gives none; CAFD's feature attack: 100, our default).
        random_start: start from x + U(−ε, ε) (clamped to [0, 1]), as CAFD; ``False`` starts at x.
    """

    def __init__(
        self,
        layer: str = "layer2.0.conv2",
        distance: str = "l2",
        eps: float = 8 / 255,
        step_size: float = 0.01,
        steps: int = 100,
        random_start: bool = True,
    ) -> None:
        if distance not in DISTANCES:
            raise ValueError(f"FeatureAttack: unknown distance {distance!r}; valid: {', '.join(DISTANCES)}")
        if not eps > 0 or not step_size > 0:
            raise ValueError(f"FeatureAttack: eps and step_size must be > 0, got eps={eps}, step_size={step_size}")
        if int(steps) < 1:
            raise ValueError(f"FeatureAttack: steps must be >= 1, got {steps}")
        self.layer = str(layer)
        self.distance = distance
        self.eps = float(eps)
        self.step_size = float(step_size)
        self.steps = int(steps)
        self.random_start = bool(random_start)

    def __repr__(self) -> str:
        return (f"FeatureAttack(layer={self.layer}, distance={self.distance}, eps={self.eps:g}, step_size={self.step_size:g}, "
                f"steps={self.steps}, random_start={self.random_start})")

    def project(self, x_adv: Tensor, x: Tensor) -> Tensor:
        return torch.min(torch.max(x_adv, x - self.eps), x + self.eps).clamp(0.0, 1.0)

    def __call__(self, preprocessor: nn.Module, target: nn.Module, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        check_images(x.detach())
        layer = resolve_layer(target, self.layer)
        with torch.inference_mode(False), torch.enable_grad(), eval_mode(preprocessor), eval_mode(target):
            x = x.detach().clone()  # clone() outside inference mode turns an inference tensor into an ordinary one
            with torch.no_grad():
                ref, _ = features_and_logits(target, layer, preprocessor(x))
            x_adv = x
            if self.random_start:
                noise = torch.rand(x.shape, generator=generator, dtype=x.dtype, device="cpu" if generator else x.device)
                x_adv = self.project(x + self.eps * (2 * noise.to(x.device) - 1), x)
            for _ in range(self.steps):
                xg = x_adv.detach().requires_grad_(True)
                feats, _ = features_and_logits(target, layer, preprocessor(xg))
                (grad,) = torch.autograd.grad(feature_distance(feats, ref, self.distance).sum(), [xg])
                x_adv = self.project(x_adv.detach() + self.step_size * grad.sign(), x)
        x_adv = x_adv.detach()
        if not torch.isfinite(x_adv).all():
            raise RuntimeError("FeatureAttack produced non-finite images")
        return x_adv
