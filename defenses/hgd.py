"""HGD (Liao et al. 2018; the JATP paper's HGD baseline, issue 14): x ↦ clamp(x + D(x), 0, 1), the DUNET denoiser
trained by ``python train.py model=hgd`` (``models.jatp.hgd``) with the logits-guided loss against a target.

One feed-forward pass with running BatchNorm statistics: deterministic and differentiable, so the adaptive attack
gets the exact gradient of victim∘(x + D(x)) (the clamp passes it inside [0, 1]).

Trained once against one target (the paper: the TRADES ResNet-18) on ``oblivious`` or ``full`` adversaries; the
weights file names both, ``hgd-<victim>-<victim_training>-<adversaries>.pt``.

``weakened()`` is the identity: HGD without its denoiser is the undefended victim (audit check (i)).
"""
from __future__ import annotations

from defenses.ape_gan import BaselinePreprocessor
from models.jatp.hgd import HGDDenoiser


class HGD(BaselinePreprocessor):
    """``x ↦ clamp(x + D(x), 0, 1)`` with HGD's trained denoiser (``models.jatp.hgd.HGDDenoiser``)."""

    model_name = "hgd"
    network = HGDDenoiser
