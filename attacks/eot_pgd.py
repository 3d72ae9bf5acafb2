"""Batched PGD-EOT: L∞ PGD whose every step uses the loss gradient averaged over ``eot_samples`` draws.

Lee & Kim (ICCV 2023, "Robust evaluation of diffusion-based adversarial purification") evaluate
diffusion purification with PGD-EOT, 200 steps, 20 EOT samples, step size 0.007. torchattacks'
``EOTPGD`` runs the EOT draws as ``eot_iter`` sequential forward/backward passes; here the batch is
repeated ``eot_samples`` times and sent through the (stochastic) model in ONE pass
(images × samples), so each image gets ``eot_samples`` independent purifications at once. The loss
is the mean over draws of the per-draw cross-entropies, hence the input gradient is exactly the mean
of the per-draw loss gradients (``eot_loss_and_grad``). ``max_batch`` splits the draws into chunks
whose gradients are accumulated, for when images × samples does not fit in memory.

The attacked model must not be wrapped in ``attacks.wrappers.EOT`` again (``handles_eot``).
"""
from __future__ import annotations

from typing import Callable

import torch
from torchattacks.attack import Attack as TorchAttack

from attacks.pgd_dlr import LOSSES, per_example_loss


def eot_loss_and_grad(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    samples: int,
    loss: str = "ce",
    max_batch: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image EOT loss ``mean_k loss(model_k(x), y)`` (shape N) and its input gradient (shape of x).

    Draw ``k`` of image ``i`` is row ``k * N + i`` of the repeated batch, i.e. the same layout as
    ``attacks.wrappers.EOT``. With ``max_batch`` the ``samples`` draws are split into chunks of at
    most ``max_batch`` rows (but at least one full copy of the batch); gradients are summed, so the
    result does not depend on the chunking.
    """
    if samples < 1:
        raise ValueError(f"EOT needs samples >= 1, got {samples}")
    n = x.shape[0]
    per_chunk = samples if max_batch is None else max(1, min(samples, max_batch // max(n, 1)))
    x = x.detach()
    total_loss = torch.zeros(n, device=x.device)
    total_grad = torch.zeros_like(x)
    done = 0
    while done < samples:
        k = min(per_chunk, samples - done)
        xr = x.repeat(k, *([1] * (x.dim() - 1))).requires_grad_(True)
        losses = per_example_loss(model(xr), y.repeat(k), loss).view(k, n)
        grad = torch.autograd.grad(losses.sum() / samples, xr)[0]
        total_grad += grad.view(k, *x.shape).sum(0)
        total_loss += losses.detach().sum(0) / samples
        done += k
    return total_loss, total_grad


class BatchedEOTPGD(TorchAttack):
    """L∞ PGD on the EOT-averaged loss of a stochastic model (Athalye et al. 2018; Lee & Kim 2023).

    Args:
        model: (stochastic) classifier returning logits of images in [0, 1].
        eps: L∞ radius.
        alpha: step size.
        steps: PGD iterations.
        eot_samples: random draws per image and step, evaluated in one batched pass.
        random_start: start from a uniform point in the ε-ball.
        loss: ``ce`` (default) or ``dlr``.
        max_batch: most rows (images × draws) per forward pass; ``None`` = all draws at once.

    Returns the last iterate (the "best" iterate of a stochastic model is itself a random variable).

    Examples::
        >>> atk = BatchedEOTPGD(defended, eps=0.3, alpha=0.007, steps=200, eot_samples=20)
        >>> x_adv = atk(x, y)
    """

    def __init__(
        self,
        model,
        eps: float = 8 / 255,
        alpha: float = 0.007,
        steps: int = 200,
        eot_samples: int = 20,
        random_start: bool = True,
        loss: str = "ce",
        max_batch: int | None = None,
    ) -> None:
        super().__init__("BatchedEOTPGD", model)
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; valid: {', '.join(LOSSES)}")
        if eot_samples < 1:
            raise ValueError(f"eot_samples must be >= 1, got {eot_samples}")
        self.eps = eps
        self.alpha = alpha
        self.steps = steps
        self.eot_samples = int(eot_samples)
        self.random_start = random_start
        self.loss = loss
        self.max_batch = max_batch
        self.supported_mode = ["default"]

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        images = images.clone().detach().to(self.device)
        labels = labels.clone().detach().to(self.device)
        adv = images.clone()
        if self.random_start:
            adv = (adv + torch.empty_like(adv).uniform_(-self.eps, self.eps)).clamp(0, 1)
        for _ in range(self.steps):
            _, grad = eot_loss_and_grad(self.get_logits, adv, labels, self.eot_samples, self.loss, self.max_batch)
            adv = adv + self.alpha * grad.sign()
            adv = (images + (adv - images).clamp(-self.eps, self.eps)).clamp(0, 1).detach()
        return adv


__all__ = ["BatchedEOTPGD", "eot_loss_and_grad"]
