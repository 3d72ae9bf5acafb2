"""HGD (Liao et al. 2018, "Defense against Adversarial Attacks Using High-Level Representation Guided Denoiser"; the
JATP paper's HGD baseline), after the authors' PyTorch release (``lfz/Guided-Denoise``, ``Exps/sample/inception.py``:
``Denoise``, ``Conv``, ``DenoiseLoss``; ``GD_train/main.py``, ``train.py``): the DUNET denoiser with a residual
output, trained with the logits-guided loss (LGD) against a frozen target.

DUNET (the release's ``Denoise``): a feedforward path of stages, each ``num_fwd[i]`` blocks of 3×3 conv (no bias) →
BN → ReLU (``Conv``), the first block of every stage but the first with stride 2; a feedback path that, from the
deepest stage up, upsamples bilinearly to the size of the feedforward stage above, concatenates that stage's
output (the lateral connection) and runs ``num_back[i]`` blocks; a final 1×1 conv (no bias) back to C channels;
and the residual output

    x̂ = x + D(x)          (the release: ``out += x``)

kept in [0, 1] here by a clamp, P(x) = clamp(x + D(x), 0, 1): the architecture stays HGD's, the target always gets
an image; the clamp's derivative is 1 inside [0, 1] and 0 outside, as every clamped purifier here. A zero final
convolution gives the identity.

32×32 instead of 299×299: the release has five feedforward stages (64, 128, 256, 256, 256 channels; 2, 3, 3, 3, 3
blocks; 299 → 150 → 75 → 38 → 19) and four feedback stages (64, 128, 256, 256; 2, 3, 3, 3). Four downsamplings
would take 32×32 to 2×2, where a 3×3 convolution sees mostly padding; we drop the deepest stage of each path:
feedforward 64, 128, 256, 256 (2, 3, 3, 3 blocks; 32 → 16 → 8 → 4), feedback 64, 128, 256 (2, 3, 3). Widths and
block counts are config lists (``conf/preprocessor/hgd.yaml``). Sizes are taken from the input at run time (the
release fixes them at construction), so 28×28 works too (28 → 14 → 7 → 4, ⌈·/2⌉ as the release).
Bilinear upsampling with ``align_corners=True``: PyTorch's behaviour when the release was written (before 0.4).
The release works in the Inception input space [−1, 1]; we denoise the [0, 1] image itself (the residual is in
pixel units; the first BatchNorm absorbs the input's affine map).

LGD ("logits guided denoiser", the release's ``loss_idcs`` pointing at the logits): L = mean |T(x̂(x̃)) − T(x)|
over batch and classes (``DenoiseLoss`` with n = 1), T the frozen target, its clean logits constants.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.jatp.adversaries import AdversarySource, adversary_cache, cached_adversaries, check_adversaries, usable_cache
from models.lit_base import LitBase, OptimizerFactory, SchedulerFactory


class ConvBlock(nn.Module):
    """The release's ``Conv``: 3×3 conv (no bias, padding 1, ``stride``) → BatchNorm → ReLU."""

    def __init__(self, n_in: int, n_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(n_in, n_out, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(n_out)
        # Not in-place (the release's is): attacks differentiate through the denoiser.
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.conv(x)))


def _positive_ints(values: Sequence[int], name: str) -> list[int]:
    out = [int(v) for v in values]
    if not out or min(out) < 1:
        raise ValueError(f"HGDDenoiser: {name} must be a non-empty list of integers >= 1, got {list(values)}")
    return out


class HGDDenoiser(nn.Module):
    """x ↦ clamp(x + D(x), 0, 1) with D the DUNET (see the module docstring); images in [0, 1], shape kept.

    Args:
        in_channels: C (3; 1 for the grey MNIST family).
        fwd_out / num_fwd: channels and blocks of each feedforward stage (ours: 64, 128, 256, 256 / 2, 3, 3, 3).
        back_out / num_back: channels and blocks of each feedback stage, one fewer (ours: 64, 128, 256 / 2, 3, 3).
    """

    def __init__(
        self,
        in_channels: int = 3,
        fwd_out: Sequence[int] = (64, 128, 256, 256),
        num_fwd: Sequence[int] = (2, 3, 3, 3),
        back_out: Sequence[int] = (64, 128, 256),
        num_back: Sequence[int] = (2, 3, 3),
    ) -> None:
        super().__init__()
        fwd_out, num_fwd = _positive_ints(fwd_out, "fwd_out"), _positive_ints(num_fwd, "num_fwd")
        back_out, num_back = _positive_ints(back_out, "back_out"), _positive_ints(num_back, "num_back")
        if len(fwd_out) != len(num_fwd) or len(fwd_out) < 2:
            raise ValueError(f"HGDDenoiser: fwd_out and num_fwd need the same length >= 2, got {fwd_out} and {num_fwd}")
        if not len(back_out) == len(num_back) == len(fwd_out) - 1:
            raise ValueError(f"HGDDenoiser: back_out and num_back need one stage fewer than fwd_out ({len(fwd_out) - 1}), "
                             f"got {back_out} and {num_back}")
        if int(in_channels) < 1:
            raise ValueError(f"HGDDenoiser: in_channels must be >= 1, got {in_channels}")
        self.in_channels = int(in_channels)
        self.fwd_out, self.num_fwd, self.back_out, self.num_back = fwd_out, num_fwd, back_out, num_back

        fwd, n_in = [], self.in_channels
        for i, (width, blocks) in enumerate(zip(fwd_out, num_fwd)):
            group = [ConvBlock(n_in, width, stride=1 if i == 0 else 2)]
            group += [ConvBlock(width, width) for _ in range(blocks - 1)]
            fwd.append(nn.Sequential(*group))
            n_in = width
        self.fwd = nn.ModuleList(fwd)

        back: list[nn.Module] = [nn.Identity()] * len(back_out)
        n_in = fwd_out[-2] + fwd_out[-1]
        for i in range(len(back_out) - 1, -1, -1):
            group = [ConvBlock(n_in, back_out[i])] + [ConvBlock(back_out[i], back_out[i]) for _ in range(num_back[i] - 1)]
            back[i] = nn.Sequential(*group)
            if i:
                n_in = back_out[i] + fwd_out[i - 1]
        self.back = nn.ModuleList(back)
        self.final = nn.Conv2d(back_out[0], self.in_channels, kernel_size=1, bias=False)

    def extra_repr(self) -> str:
        return f"fwd_out={self.fwd_out}, num_fwd={self.num_fwd}, back_out={self.back_out}, num_back={self.num_back}"

    def residual(self, x: Tensor) -> Tensor:
        """D(x): the DUNET's output, the estimated negative of the adversarial noise."""
        out, lateral = x, []
        for i, stage in enumerate(self.fwd):
            out = stage(out)
            if i != len(self.fwd) - 1:
                lateral.append(out)
        for i in range(len(self.back) - 1, -1, -1):
            out = F.interpolate(out, size=lateral[i].shape[-2:], mode="bilinear", align_corners=True)
            out = self.back[i](torch.cat((out, lateral[i]), 1))
        return self.final(out)

    def raw(self, x: Tensor) -> Tensor:
        """x + D(x), the release's output (unbounded)."""
        return x + self.residual(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.raw(x).clamp(0.0, 1.0)


def logits_guided_loss(denoised_logits: Tensor, clean_logits: Tensor) -> Tensor:
    """LGD: mean |T(x̂) − T(x)| over batch and classes (the release's ``DenoiseLoss`` with n = 1, no hard mining)."""
    return (denoised_logits - clean_logits).abs().mean()


def release_lr_schedule(optimizer: torch.optim.Optimizer, epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The release's ``get_lr``: lr for epochs ≤ 0.6·E, lr/10 up to 0.9·E, lr/100 after (epochs counted from 1).

    Stepped once per epoch (``LitBase``); ``epochs`` = E, the run's ``trainer.max_epochs``.
    """
    if int(epochs) < 1:
        raise ValueError(f"release_lr_schedule: epochs must be >= 1 (trainer.max_epochs), got {epochs}")
    total = int(epochs)

    def factor(done: int) -> float:
        epoch = done + 1
        return 1.0 if epoch <= 0.6 * total else 0.1 if epoch <= 0.9 * total else 0.01

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class HGDModule(LitBase):
    """Trains the HGD denoiser with LGD against a frozen target, on adversaries from ``models.jatp.adversaries``.

    One batch (x, y):  x̃ = source(P, T, x, y)  (oblivious: PGD on T; full: PGD on T∘P with P's current weights),
    L = mean |T(P(x̃)) − T(x)|, P(x̃) = clamp(x̃ + D(x̃), 0, 1) as the purifier computes it; only D is optimised
    (the release: the target in eval mode, the denoiser in train mode). Logs ``acc`` (T on P(x̃)) and, outside
    training, ``clean_acc`` (T on P(x)).

    Args:
        denoiser: the ``HGDDenoiser``.
        victim: the trained target T (inputs in [0, 1]); frozen (eval mode, no parameter gradients).
        optimizer / scheduler: partial factories (the release: Adam, lr 0.01, no weight decay; ``release_lr_schedule``).
        adversaries: ``"oblivious"`` or ``"full"``.
        attack: keyword arguments of ``AdversarySource`` (eps, steps, alpha, random_start).
        reuse_adversaries: attack each training image once and reuse its example (``oblivious`` only, ``full`` is always fresh; HGD's fixed
            training set of adversarial images, ``models.jatp.adversaries.AdversaryCache``).
        export_path: where ``train.py`` writes the denoiser.
    """

    def __init__(
        self,
        denoiser: HGDDenoiser,
        victim: nn.Module,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        adversaries: str = "oblivious",
        attack: dict[str, Any] | None = None,
        reuse_adversaries: bool = False,
        export_path: str | None = None,
    ) -> None:
        super().__init__(optimizer, scheduler, export_path)
        check_adversaries(adversaries, "HGDModule")
        self.denoiser = denoiser
        self.victim = victim.eval().requires_grad_(False)
        self.source = AdversarySource(adversaries, **dict(attack or {}))
        self.adversaries = adversaries
        self.adversary_cache = adversary_cache(reuse_adversaries, adversaries, self.source.eps)

    def train(self, mode: bool = True) -> "HGDModule":
        """The frozen target stays in eval mode whatever Lightning sets."""
        super().train(mode)
        self.victim.eval()
        return self

    def on_fit_start(self) -> None:
        self.adversary_cache = usable_cache(self.adversary_cache, self.trainer)

    def forward(self, x: Tensor) -> Tensor:
        return self.denoiser(x)

    def export(self) -> nn.Module:
        """A copy of the denoiser in eval mode: what ``defenses.hgd.HGD`` loads."""
        return copy.deepcopy(self.denoiser).eval()

    def make_adversaries(self, x: Tensor, y: Tensor) -> Tensor:
        """x̃ from the configured source, with the denoiser's current weights (used only by ``full``); in training,
        from the cache when ``reuse_adversaries`` is on."""
        return cached_adversaries(self.adversary_cache, self.training, x,
                                  lambda i: self.source(self.denoiser, self.victim, x[i], y[i]))

    def lgd_loss(self, x: Tensor, x_adv: Tensor) -> tuple[Tensor, Tensor]:
        """(LGD loss, the target's logits on P(x̃))."""
        with torch.no_grad():
            clean_logits = self.victim(x)
        logits = self.victim(self.denoiser(x_adv))
        return logits_guided_loss(logits, clean_logits), logits

    def step(self, batch: Any, stage: str) -> tuple[Tensor, dict[str, Tensor]]:
        x, y = batch
        loss, logits = self.lgd_loss(x, self.make_adversaries(x, y))
        logs = {"acc": (logits.detach().argmax(1) == y).float().mean()}
        if stage == "train" and self.adversary_cache is not None:
            logs["adv_reused"] = torch.tensor(self.adversary_cache.last_reused)
        if stage != "train":
            with torch.no_grad():
                logs["clean_acc"] = (self.victim(self.denoiser(x)).argmax(1) == y).float().mean()
        return loss, logs
