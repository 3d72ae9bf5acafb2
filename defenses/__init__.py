"""Purifiers: ``nn.Module`` mapping x in [0,1] to x_hat in [0,1]. See ``defenses.base``."""
from defenses.base import Defended, Identity, Purifier

__all__ = ["Defended", "Identity", "Purifier"]
