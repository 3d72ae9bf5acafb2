"""``softplus_relus(β)``: inside this context every ReLU computes softplus(βx)/β instead.

Why: the input gradient of a ReLU network contains its ReLU masks, which are piecewise constant in the input. A
defense that *uses* such a gradient in its forward pass (distribution transfer's guidance, ∇ₓD with a ReLU classifier
inside D) is therefore a discontinuous function of its input, and its exact gradient describes it only inside one
activation region — shattered gradients produced by the method (docs/results/disttrans-fashion-mnist-rgb32-cpu.md).
Replacing the ReLUs by softplus gives a smooth function that stays close to the real one: the differentiable
surrogate of BPDA (Athalye et al. 2018, §4.1, "replace the non-differentiable layer with a differentiable
approximation").

A ``TorchFunctionMode`` rather than swapping ``nn.ReLU`` modules: it also catches ``F.relu`` / ``torch.relu`` /
``Tensor.relu`` calls inside a network's ``forward`` (many victims call them directly), and it is scoped to the
context, so the same network outside it is untouched. Graphs built inside the context keep the softplus on their
backward (and double-backward) passes, wherever those run.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

#: Every spelling of ReLU a ``forward`` may call (``nn.ReLU`` calls ``F.relu``; ``inplace=True`` calls ``torch.relu_``).
RELUS = frozenset({F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_})


class softplus_relus(TorchFunctionMode):  # noqa: N801 — used as a context manager, named like one
    """Context: each ReLU call computes ``softplus(x, beta)`` (→ ReLU as β → ∞; max error ln 2 / β at x = 0).

    In-place ReLUs return a new tensor: a ``forward`` that ignores the return value of ``x.relu_()`` is not
    supported (none of the victims here does).
    """

    def __init__(self, beta: float = 10.0) -> None:
        super().__init__()
        if not beta > 0:
            raise ValueError(f"softplus β must be > 0, got {beta}")
        self.beta = float(beta)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in RELUS:
            return F.softplus(args[0], beta=self.beta)
        return func(*args, **kwargs)
