"""Fixed-step L∞ PGD on a choice of loss (CE or DLR), with restarts that keep the worst case per image.

- ``loss='dlr'`` is the JATP paper's "PGD-DLR": Madry et al.'s fixed-step PGD, but maximising the
  Difference of Logits Ratio of Croce & Hein (ICML 2020, Eq. 5) instead of cross-entropy. DLR is
  invariant to shifting and rescaling the logits, so it does not suffer from the vanishing CE
  gradients of over-confident (or temperature-scaled) models.
- ``restarts > 1`` is the DiffDefense authors' "PGD with 5 restarts": every restart starts from a
  fresh uniform point in the ε-ball, and per image we keep a misclassified restart if there is one,
  otherwise the restart with the highest loss (torchattacks' ``MultiAttack`` would hand back the
  *clean* image for images that no restart fools).

Unlike torchattacks' APGD this touches no global seed: randomness comes from the global generator.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchattacks.attack import Attack as TorchAttack

LOSSES = ("ce", "dlr")


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Untargeted DLR loss per example (Croce & Hein 2020, Eq. 5); higher = more adversarial.

    ``-(z_y - max_{i≠y} z_i) / (z_π1 - z_π3 + 1e-12)`` with ``z_π1 ≥ z_π2 ≥ z_π3`` the sorted logits.
    Needs at least three classes.
    """
    if logits.shape[1] < 3:
        raise ValueError(f"the DLR loss needs at least 3 classes, got {logits.shape[1]}")
    z_sorted, idx_sorted = logits.sort(dim=1)
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    top_is_y = (idx_sorted[:, -1] == y).float()
    # the largest logit among the other classes: the second largest when y is on top
    z_other = z_sorted[:, -2] * top_is_y + z_sorted[:, -1] * (1.0 - top_is_y)
    return -(z_y - z_other) / (z_sorted[:, -1] - z_sorted[:, -3] + 1e-12)


def madry_step(eps: float, steps: int) -> float:
    """Madry et al.'s step size 2.5·ε/steps: the iterates can cross the ε-ball 2.5 times."""
    return 2.5 * float(eps) / max(int(steps), 1)


def per_example_loss(logits: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """``ce`` or ``dlr`` loss of every example (no reduction)."""
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if loss == "dlr":
        return dlr_loss(logits, y)
    raise ValueError(f"unknown loss {loss!r}; valid: {', '.join(LOSSES)}")


class LossPGD(TorchAttack):
    """L∞ PGD with fixed step ``alpha`` on the CE or DLR loss, optionally restarted.

    Args:
        model: classifier returning logits of images in [0, 1].
        eps: L∞ radius.
        alpha: step size; ``None`` = Madry et al.'s rule 2.5·ε/steps, so steps × α reaches 2.5 ε whatever ε is
            (40 × 0.01875 at ε = 0.3, 10 × 2/255 at 8/255).
        steps: iterations per restart.
        random_start: start from a uniform point in the ε-ball (always true for restarts after the first).
        loss: ``ce`` (Madry et al. 2018) or ``dlr`` (Croce & Hein 2020).
        restarts: independent runs; the worst case per image is returned.

    Examples::
        >>> atk = LossPGD(model, eps=0.3, alpha=0.01, steps=20, loss="dlr")
        >>> x_adv = atk(x, y)
    """

    def __init__(
        self,
        model,
        eps: float = 0.3,
        alpha: float | None = 0.01,
        steps: int = 20,
        random_start: bool = True,
        loss: str = "ce",
        restarts: int = 1,
    ) -> None:
        super().__init__("LossPGD", model)
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; valid: {', '.join(LOSSES)}")
        if restarts < 1:
            raise ValueError(f"restarts must be >= 1, got {restarts}")
        self.eps = eps
        self.alpha = madry_step(eps, steps) if alpha is None else alpha
        self.steps = steps
        self.random_start = random_start
        self.loss = loss
        self.restarts = int(restarts)
        self.supported_mode = ["default"]

    def _single_run(self, images: torch.Tensor, labels: torch.Tensor, random_start: bool) -> torch.Tensor:
        adv = images.clone()
        if random_start:
            adv = (adv + torch.empty_like(adv).uniform_(-self.eps, self.eps)).clamp(0, 1)
        for _ in range(self.steps):
            adv.requires_grad_(True)
            cost = per_example_loss(self.get_logits(adv), labels, self.loss).sum()
            grad = torch.autograd.grad(cost, adv)[0]
            adv = adv.detach() + self.alpha * grad.sign()
            adv = (images + (adv - images).clamp(-self.eps, self.eps)).clamp(0, 1).detach()
        return adv

    @torch.no_grad()
    def _score(self, adv: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.get_logits(adv)
        return logits.argmax(1) != labels, per_example_loss(logits, labels, self.loss)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        images = images.clone().detach().to(self.device)
        labels = labels.clone().detach().to(self.device)
        best = self._single_run(images, labels, self.random_start)
        if self.restarts == 1:
            return best
        best_fooled, best_loss = self._score(best, labels)
        for _ in range(self.restarts - 1):
            adv = self._single_run(images, labels, True)
            fooled, loss = self._score(adv, labels)
            # better = fools where the best so far does not, or ties on fooling with a higher loss
            better = (fooled & ~best_fooled) | ((fooled == best_fooled) & (loss > best_loss))
            best[better] = adv[better]
            best_fooled = torch.where(better, fooled, best_fooled)
            best_loss = torch.where(better, loss, best_loss)
        return best
