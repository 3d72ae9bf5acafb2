"""JATP's pre-processing network P: NRP's generator (Naseer et al. 2020) with 3 basic blocks, NRP(3, 3, 64, 3).

The paper: "For NRP, we use the basic block in the original paper and only reduce the number of basic blocks to 3",
and JATP's P is that network. NRP's release (``networks.py``; the same first author's CAFD copy,
``CIFAR-10/networks/networks_NRP.py``, which we read) is

    fea = conv_first(x)                         # 3×3 conv in_nc → nf
    out = trunk_conv(RRDB_trunk(fea))           # nb residual-in-residual dense blocks, then a 3×3 conv nf → 3

with ESRGAN's RRDB: three 5-conv dense blocks (growth gc = 32, LeakyReLU 0.2, output ·0.2 + input), the three
chained, their output ·0.2 + the RRDB input. The module and parameter names here are NRP's (``conv_first``,
``RRDB_trunk.<i>.RDB<j>.conv<k>``, ``trunk_conv``), so a state dict of the released architecture loads unchanged.

NRP's release has no global skip, no tanh and no clamp: its output is unbounded. Ours (``output``):

* ``"clamp"`` (default): P(x) = clamp(raw(x), 0, 1). ``raw`` is NRP's output itself, so the architecture is exactly
  NRP's; the clamp only makes the output an image the target accepts (its derivative is 1 inside [0, 1], 0 outside,
  as every clamped purifier here). The pixel loss is taken on ``raw`` (see ``models.jatp.module``), so pixels the
  network pushes outside [0, 1] are still pulled back.
* ``"sigmoid"``: P(x) = σ(raw(x)) — smooth everywhere but cannot output exact 0 / 1 (Fashion-MNIST's background) and
  changes NRP's function; the alternative, for the record.

Where P starts (``skip``, ``init_scale``). NRP's release (and CAFD's copy) initialise with PyTorch's defaults and have
no global skip, so an untrained P maps every image to ≈ 0 (raw output ≈ 0 ± 0.08 at nf 16): a trained target sees
black images and JATP's BCE starts at 18–25. Where the raw output is below 0 the clamp passes no gradient, so BCE
alone never moves P (measured: 15 steps stuck at 24.6); the pixel term drags pixels into [0, 1], and there BCE's
gradient (norm ≈ 200 on P) switches on at full force: the paper's SGD then overshoots (see ``models.jatp.module``
for the measured divergence and the gradient clipping that stops it). Two switches:

* ``skip`` (default ``True``): raw(x) = x + NRP(x), the global residual with which the JATP authors' earlier code
  (CAFD, ``train_or_test_denoiser.py``: ``x_smooth = x_adv + denoiser(x_adv)``, NRP(3, 3, 64, 5) among its
  denoisers) uses NRP's generator. P then starts near the identity, the target sees the images themselves and the
  first gradients are those of a trained model on clean data (BCE ≈ 1.2 at step 0 instead of 18.5). No
  parameters are added (see the variant mark below). ``False`` is NRP's release (the NRP baseline,
  ``models.jatp.nrp_ssp``, keeps it).
* ``init_scale`` (default ``None``: PyTorch's init, as NRP's release): a number s re-initialises every convolution
  of the dense blocks with Kaiming-normal (fan-in) weights × s and zero biases — BasicSR's ``initialize_weights(…,
  0.1)`` in ESRGAN's ``ResidualDenseBlock_5C``, the code NRP's networks.py was copied from (NRP dropped the call).
  With ``skip`` it makes P start closer to the identity still. Neither switch alone stops the divergence (measured:
  skip alone NaN after 9 steps, init 0.1 alone after 4); the gradient clipping of ``models.jatp.module`` does.

``skip`` has no parameters, so the same weights would load into either form and compute another function: with
``skip`` the network carries a ``_variant_skip`` buffer (``models.weights.VARIANT_PREFIX``), and a file of the other
form fails to load in one line. Without ``skip`` the state dict is NRP's release's, key for key. With ``output:
sigmoid`` the skip is added before σ, so σ(x + NRP(x)) starts near σ(x), not near x.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from models.weights import VARIANT_PREFIX

OUTPUTS = ("clamp", "sigmoid")


def scaled_kaiming_(convs: list[nn.Conv2d], scale: float) -> None:
    """BasicSR's ``initialize_weights(convs, scale)``: Kaiming-normal (a = 0, fan-in) weights × ``scale``, zero biases."""
    for conv in convs:
        nn.init.kaiming_normal_(conv.weight, a=0, mode="fan_in")
        with torch.no_grad():
            conv.weight.mul_(scale)
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)


class ResidualDenseBlock_5C(nn.Module):  # noqa: N801 (NRP's / ESRGAN's name, kept for state-dict compatibility)
    """Five 3×3 convs with dense connections (growth ``gc``), LeakyReLU 0.2 after the first four; out = x + 0.2·conv5."""

    def __init__(self, nf: int = 64, gc: int = 32, bias: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(nf, gc, 3, 1, 1, bias=bias)
        self.conv2 = nn.Conv2d(nf + gc, gc, 3, 1, 1, bias=bias)
        self.conv3 = nn.Conv2d(nf + 2 * gc, gc, 3, 1, 1, bias=bias)
        self.conv4 = nn.Conv2d(nf + 3 * gc, gc, 3, 1, 1, bias=bias)
        self.conv5 = nn.Conv2d(nf + 4 * gc, nf, 3, 1, 1, bias=bias)
        # Not in-place (NRP's is): the attack differentiates through this block, and an in-place activation on a
        # tensor autograd keeps is a classic source of "modified by an inplace operation" errors.
        self.lrelu = nn.LeakyReLU(negative_slope=0.2)

    def forward(self, x: Tensor) -> Tensor:
        x1 = self.lrelu(self.conv1(x))
        x2 = self.lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = self.lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = self.lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * 0.2 + x


class RRDB(nn.Module):
    """Residual in residual dense block: three ``ResidualDenseBlock_5C`` chained, out = x + 0.2·chain(x)."""

    def __init__(self, nf: int, gc: int = 32) -> None:
        super().__init__()
        self.RDB1 = ResidualDenseBlock_5C(nf, gc)
        self.RDB2 = ResidualDenseBlock_5C(nf, gc)
        self.RDB3 = ResidualDenseBlock_5C(nf, gc)

    def forward(self, x: Tensor) -> Tensor:
        return self.RDB3(self.RDB2(self.RDB1(x))) * 0.2 + x


class NRPGenerator(nn.Module):
    """NRP(in_nc, out_nc, nf, nb, gc): images in [0, 1] → images in [0, 1] of the same shape (see the module docstring).

    Args:
        in_nc / out_nc: image channels (3; 1 for the grey MNIST family). They must be equal (a purifier keeps the shape).
        nf: trunk width (NRP: 64).
        nb: number of RRDB blocks (JATP: 3; NRP's release: 23).
        gc: growth channels of each dense block (NRP: 32).
        output: ``"clamp"`` (default) or ``"sigmoid"``: how the unbounded NRP output is made an image.
        skip: raw(x) = x + NRP(x) (default, CAFD's use of the generator) or NRP(x) (NRP's release).
        init_scale: ``None`` (PyTorch's init, NRP's release) or BasicSR's scale of the dense blocks' Kaiming init (0.1).
    """

    def __init__(self, in_nc: int = 3, out_nc: int = 3, nf: int = 64, nb: int = 3, gc: int = 32, output: str = "clamp",
                 skip: bool = True, init_scale: float | None = None) -> None:
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"NRPGenerator: unknown output {output!r}; valid: {', '.join(OUTPUTS)}")
        if int(in_nc) != int(out_nc):
            raise ValueError(f"NRPGenerator: in_nc ({in_nc}) must equal out_nc ({out_nc}): a pre-processor keeps the image shape")
        if int(nb) < 1 or int(nf) < 1 or int(gc) < 1:
            raise ValueError(f"NRPGenerator: nf, nb and gc must be >= 1, got nf={nf}, nb={nb}, gc={gc}")
        if init_scale is not None and not float(init_scale) > 0:
            raise ValueError(f"NRPGenerator: init_scale must be > 0 or null (PyTorch's init), got {init_scale}")
        self.in_channels = int(in_nc)
        self.nf, self.nb, self.gc, self.output = int(nf), int(nb), int(gc), output
        self.skip = bool(skip)
        self.init_scale = None if init_scale is None else float(init_scale)
        self.conv_first = nn.Conv2d(in_nc, nf, 3, 1, 1, bias=True)
        self.RRDB_trunk = nn.Sequential(*[RRDB(nf, gc) for _ in range(nb)])
        self.trunk_conv = nn.Conv2d(nf, out_nc, 3, 1, 1, bias=True)
        if self.skip:  # marks the form in the weights file (see the module docstring)
            self.register_buffer(f"{VARIANT_PREFIX}skip", torch.tensor(1))
        if self.init_scale is not None:
            scaled_kaiming_([m for m in self.RRDB_trunk.modules() if isinstance(m, nn.Conv2d)], self.init_scale)

    def extra_repr(self) -> str:
        return (f"nf={self.nf}, nb={self.nb}, gc={self.gc}, output={self.output}, skip={self.skip}, "
                f"init_scale={self.init_scale}")

    def raw(self, x: Tensor) -> Tensor:
        """The pre-activation image (unbounded for ``clamp``; already in (0, 1) for ``sigmoid``): NRP(x), plus x with
        ``skip``. What the pixel loss sees."""
        out = self.trunk_conv(self.RRDB_trunk(self.conv_first(x)))
        if self.skip:
            out = out + x
        return torch.sigmoid(out) if self.output == "sigmoid" else out

    def forward(self, x: Tensor) -> Tensor:
        out = self.raw(x)
        return out if self.output == "sigmoid" else out.clamp(0.0, 1.0)
