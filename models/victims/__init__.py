"""Victim classifiers: every victim maps images in [0, 1] to logits (normalisation is inside)."""
from models.victims.build import build_victim
from models.victims.normalize import Normalized

__all__ = ["Normalized", "build_victim"]
