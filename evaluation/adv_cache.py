"""Adversarial batches kept on disk for threat models that never see the defense.

Under ``threat=oblivious`` (crafted on the bare victim) and ``threat=transfer`` (crafted on a surrogate)
the adversarial examples do not depend on the purifier, so one table's ``defense=none`` and
``defense=diffdefense`` columns — and every T* of a sweep — can share them instead of re-running
the attack (EAD, EOT-PGD and AutoAttack dominate a CPU run otherwise). The caller keys the folder by
everything that determines the examples (data, victim or surrogate, attack, threat, seed, weights) and
never by the defense. Files are written atomically and read with ``weights_only=True``; a file of the
wrong shape or an unreadable one is ignored and the batch is attacked again.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn


class AdvCache:
    """One ``<index>.pt`` per batch under ``folder``."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def path(self, index: int) -> Path:
        return self.folder / f"{int(index)}.pt"

    def get(self, index: int, x: torch.Tensor) -> torch.Tensor | None:
        """The cached adversarial batch for ``x`` (same shape, on ``x``'s device), or ``None``."""
        path = self.path(index)
        if not path.is_file():
            return None
        try:
            x_adv = torch.load(path, map_location=x.device, weights_only=True)
        except Exception:  # torn or foreign file: attack again
            return None
        if not isinstance(x_adv, torch.Tensor) or x_adv.shape != x.shape:
            return None
        return x_adv.to(x.dtype)

    def put(self, index: int, x_adv: torch.Tensor) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        os.close(fd)
        try:
            torch.save(x_adv.detach().cpu(), tmp)
            os.replace(tmp, self.path(index))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def craft(
    attack: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    attacked: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    index: int,
    cache: AdvCache | None,
) -> torch.Tensor:
    """``attack(attacked, x, y)``, from ``cache`` when it holds this batch (and into it when not)."""
    if cache is not None:
        cached = cache.get(index, x)
        if cached is not None:
            return cached
    x_adv = attack(attacked, x, y)
    if cache is not None:
        cache.put(index, x_adv)
    return x_adv
