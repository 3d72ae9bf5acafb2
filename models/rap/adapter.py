"""RAP's adapter f̃_θ(x_t, t) → x̂₀ (Eq. 7–8) around the shared time-conditioned U-Net, and victim∘adapter.

The paper never specifies the network; its appendix code follows Cold Diffusion (Bansal et al. 2022), whose
``denoise_fn`` is a time-conditioned U-Net predicting the clean image ("Final" train routine), run in [−1, 1].
``RAPAdapter`` maps images in [0, 1] to that space (2x − 1), calls the U-Net (``models.diffusion.unet.DDPMUNet``:
the same diffusers U-Net as the CIFAR DDPM; Cold Diffusion's CIFAR model has the same widths 128·(1, 2, 2, 2),
2 residual blocks per level and attention at 16×16) and maps back:

* ``raw(x, t)``  — the prediction in [−1, 1] space, unclamped: what the reconstruction loss sees (the appendix's
  ``(x_start − x_recon).abs().mean()`` on the unclamped output);
* ``forward(x, t)`` — the prediction as an image, clamped to [0, 1]: what the victim sees (the appendix's
  ``clamp(x_recon·0.5 + 0.5, 0, 1)``) and what the purifier returns.

``t`` is the number of adversarial steps behind x_t, 1 … T (``models.rap.forward_process``); the embedding index
is t itself (Cold Diffusion indexes the same network by t − 1 from 0: a relabelling). T is stored with the weights
as a ``_variant_num_steps`` buffer, so a file trained for another T fails to load in one line
(``models.weights.load_weights``) instead of being fed time indices it never saw.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from models.weights import VARIANT_PREFIX


class RAPAdapter(nn.Module):
    """``forward(x, t) -> x̂₀``: images in [0, 1] → clean-image prediction in [0, 1].

    Args:
        net: a time-conditioned U-Net ``net(h, t) -> same shape`` (``DDPMUNet``, ``DiffDefenseUNet``).
        num_steps: T, the length of the adversarial process (the paper: 20); valid t are 1 … T.
        residual: predict x̂₀ = x_t + net(x_t, t) (in [−1, 1] space) instead of net(x_t, t) — Cold Diffusion's
            ``Unet(residual=…)`` switch, off by default there (the paper's f̃ predicts x₀ directly). With it the
            U-Net's last convolution starts at zero, so the untrained adapter is exactly the identity (the
            undefended victim) and a short run improves on it instead of first learning to copy its input.
    """

    def __init__(self, net: nn.Module, num_steps: int = 20, residual: bool = False) -> None:
        super().__init__()
        if int(num_steps) < 1:
            raise ValueError(f"RAPAdapter: num_steps must be >= 1, got {num_steps}")
        self.net = net
        self.num_steps = int(num_steps)
        self.residual = bool(residual)
        self.in_channels = int(getattr(net, "in_channels", 0)) or None
        if self.residual:
            last = [m for m in net.modules() if isinstance(m, nn.Conv2d)][-1]
            nn.init.zeros_(last.weight)
            if last.bias is not None:
                nn.init.zeros_(last.bias)
        self.register_buffer(f"{VARIANT_PREFIX}num_steps", torch.tensor(self.num_steps, dtype=torch.long))

    def extra_repr(self) -> str:
        return f"num_steps={self.num_steps}, residual={self.residual}"

    def times(self, t: int | Tensor, x: Tensor) -> Tensor:
        """``t`` as a LongTensor (N,) on ``x``'s device, or one clear error outside 1 … T."""
        t = torch.as_tensor(t, device=x.device).to(torch.long)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        if t.shape != (x.shape[0],):
            raise ValueError(f"RAPAdapter: t must be a scalar or of shape ({x.shape[0]},), got {tuple(t.shape)}")
        lo, hi = int(t.min()), int(t.max())
        if lo < 1 or hi > self.num_steps:
            raise ValueError(f"RAPAdapter: t must lie in 1..{self.num_steps} (T), got range [{lo}, {hi}]")
        return t

    def raw(self, x: Tensor, t: int | Tensor) -> Tensor:
        """x̂₀ in [−1, 1] space, unclamped."""
        h = 2.0 * x - 1.0
        out = self.net(h, self.times(t, x))
        return h + out if self.residual else out

    def forward(self, x: Tensor, t: int | Tensor) -> Tensor:
        return ((self.raw(x, t) + 1.0) / 2.0).clamp(0.0, 1.0)


class AdaptedClassifier(nn.Module):
    """``victim(adapter(x, t))`` at a fixed adapter time ``t``: the "robust classifier" of §3.3 / Fig. 3, the model
    Alg. 1 attacks while the adapter is trained (and, at inference, the one the reverse process re-degrades on)."""

    def __init__(self, adapter: RAPAdapter, victim: nn.Module, t: int) -> None:
        super().__init__()
        self.adapter = adapter
        self.victim = victim
        self.t = int(t)

    def extra_repr(self) -> str:
        return f"t={self.t}"

    def forward(self, x: Tensor) -> Tensor:
        return self.victim(self.adapter(x, self.t))
