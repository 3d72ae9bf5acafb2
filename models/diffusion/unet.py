"""Noise-prediction U-Nets ``forward(x_t, t) -> ε̂`` (same shape as ``x_t``; ``t`` a LongTensor (N,)).

``DiffDefenseUNet`` is the small U-Net of DiffDefense (Silva et al. 2023, §3.1) for MNIST-sized images;
``DDPMUNet`` is Ho et al.'s CIFAR-10 U-Net (diffusers' ``UNet2DModel``, ≈ 35.7 M parameters in the
``google/ddpm-cifar10-32`` configuration), used by DiffPure, DensePure and distribution transfer. Both have
the same interface, so they swap through the ``denoiser`` config group.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer-style sinusoidal embedding of integer steps (Ho et al. 2020): (N,) → (N, dim),
    ``[sin(t ω_k), cos(t ω_k)]`` with ω_k = max_period^(−k/(dim/2)), k = 0 … dim/2 − 1."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=1)
    return emb


def check_denoiser_input(net: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """One clear error for an input the denoiser was not built for (channels, resolution); ``t`` as (N,)."""
    if x.shape[1] != net.in_channels:
        raise ValueError(f"{type(net).__name__} expects {net.in_channels} channels, got input {tuple(x.shape)}")
    if net.image_size is not None and x.shape[-1] != net.image_size:
        raise ValueError(f"{type(net).__name__} was built for {net.image_size}px images, got input {tuple(x.shape)}")
    return t.expand(x.shape[0]) if t.ndim == 0 else t


class TimeBlock(nn.Module):
    """DiffDefense's block: layer norm → 3×3 conv → (+ time) → SiLU.

    * Norm: ``GroupNorm(1, C)``, i.e. layer normalisation over (C, H, W) of each sample — the statistics
      of the authors' ``nn.LayerNorm([C, H, W])`` — with a per-channel affine instead of one per pixel,
      so the block works at any resolution and does not spend 2·C·H·W parameters per norm.
    * Time: the shared time embedding is projected by this block's own linear layer to C_out and added
      after the convolution, before the activation (as the DDPM ResNet block), so normalisation never
      removes it.
    """

    def __init__(self, in_channels: int, out_channels: int, time_dim: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(1, in_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, out_channels)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.norm(x))
        return self.act(h + self.time_proj(temb)[:, :, None, None])


class DiffDefenseUNet(nn.Module):
    """The noise-prediction U-Net of DiffDefense §3.1, ``forward(x, t) -> ε̂``.

    Layout (defaults, 1×28×28; channels c = base_channels · channel_mults = 16/32/64)::

        stem 3×3 conv  in → c0                                           28×28
        contracting: per level i, ``blocks_per_level`` blocks at c_i (skip saved),
                     then a stride-2 3×3 conv: c_i → c_{i+1} (doubling)  28→14→7
                     and a third one c_last → c_last                     7→4
        bottleneck:  the block repeated three times at c_last            4×4
        expansive:   per level i (reversed): transpose-conv ×2 up to the skip's size, channels → c_i
                     (halving), concatenate the skip, ``blocks_per_level`` blocks (2c_i → c_i, c_i → c_i)
        head:        3×3 conv c0 → in_channels (ε̂)

    Every block adds the time embedding: sinusoidal(t, time_dim) → Linear → SiLU → Linear (the paper's
    "two linear layers with a SiLU activation in between"), then a per-block SiLU → Linear to its width.

    Odd sizes: stride-2 3×3 convs with padding 1 give ⌈n/2⌉ (7 → 4); each transpose conv (3×3, stride 2,
    padding 1) is called with ``output_size`` = the skip's size, which picks output_padding 0 or 1 (4 → 7,
    7 → 14), so no padding/cropping of the input and any H, W work (28×28, 32×32, …). ``image_size`` is
    only checked against the input (it documents what the weights were trained for).

    Parameters at the defaults: 590,625 for in_channels=1, 591,203 for 3 (≈0.59 M; the authors' released U-Net has ≈0.6 M,
    most of them per-pixel LayerNorm affines). A stem conv (not in the paper) feeds the first block so that
    the first normalisation does not erase the absolute level of the noisy input.
    """

    def __init__(
        self,
        in_channels: int = 1,
        base_channels: int = 16,
        channel_mults: Sequence[int] = (1, 2, 4),
        time_dim: int = 128,
        image_size: int | None = 28,
        blocks_per_level: int = 2,
        bottleneck_blocks: int = 3,
    ) -> None:
        super().__init__()
        mults = tuple(int(m) for m in channel_mults)
        if not mults or blocks_per_level < 1:
            raise ValueError("need at least one level and one block per level")
        self.in_channels = in_channels
        self.image_size = image_size
        chans = [base_channels * m for m in mults]
        self.time_dim = time_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.temb_act = nn.SiLU()

        self.stem = nn.Conv2d(in_channels, chans[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        for i, c in enumerate(chans):
            self.down_blocks.append(nn.ModuleList([TimeBlock(c, c, time_dim) for _ in range(blocks_per_level)]))
            c_next = chans[i + 1] if i + 1 < len(chans) else c
            self.downsamples.append(nn.Conv2d(c, c_next, 3, stride=2, padding=1))
        self.mid_blocks = nn.ModuleList([TimeBlock(chans[-1], chans[-1], time_dim) for _ in range(bottleneck_blocks)])
        self.upsamples = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        c_cur = chans[-1]
        for c in reversed(chans):
            self.upsamples.append(nn.ConvTranspose2d(c_cur, c, 3, stride=2, padding=1))
            blocks = [TimeBlock(2 * c, c, time_dim)] + [TimeBlock(c, c, time_dim) for _ in range(blocks_per_level - 1)]
            self.up_blocks.append(nn.ModuleList(blocks))
            c_cur = c
        self.head = nn.Conv2d(chans[0], in_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = check_denoiser_input(self, x, t)
        temb = self.temb_act(self.time_mlp(sinusoidal_embedding(t, self.time_dim).to(x.dtype)))

        h = self.stem(x)
        skips = []
        for blocks, down in zip(self.down_blocks, self.downsamples):
            for block in blocks:
                h = block(h, temb)
            skips.append(h)
            h = down(h)
        for block in self.mid_blocks:
            h = block(h, temb)
        for up, blocks in zip(self.upsamples, self.up_blocks):
            skip = skips.pop()
            h = up(h, output_size=skip.shape[-2:])
            h = torch.cat([h, skip], dim=1)
            for block in blocks:
                h = block(h, temb)
        return self.head(h)


def double_backward_attention():
    """Attention on PyTorch's math kernel for the enclosed forward passes: the fused SDPA kernels (flash / memory-
    efficient, CPU and CUDA) have no double backward, so any graph that is differentiated twice (a gradient taken with
    ``create_graph`` inside an attack's graph: guided diffusion, RAP's smooth surrogate) must record attention this
    way, or the outer backward stops with "derivative for aten::_scaled_dot_product_…_backward is not implemented"."""
    return sdpa_kernel(SDPBackend.MATH)


class DDPMUNet(nn.Module):
    """Ho et al.'s (2020) ε-prediction U-Net, built by ``diffusers.UNet2DModel`` — ``forward(x_t, t) -> ε̂``.

    Why a wrapper: diffusers returns a ``UNet2DOutput`` and accepts float/int timesteps; every sampler of
    ``models.diffusion.schedule`` calls ``eps_model(x_t, t)`` with a LongTensor ``t`` and wants a tensor back.
    The keyword arguments go to ``UNet2DModel`` unchanged, so a ``config.json`` of a diffusers model
    directory (``models.diffusion.pretrained``) builds the same network. The defaults are the
    ``google/ddpm-cifar10-32`` configuration (block widths 128/256/256/256, two ResNet blocks per level,
    self-attention at 16×16, dropout 0.1, GroupNorm 32).

    ``image_size`` (checked against inputs) documents the resolution the weights were trained for.

    ``double_backward``: set by a guided defense whose adaptive attack differentiates through ε_θ twice (the
    guidance's gradient inside the attack's graph). PyTorch's fused attention kernels (flash / memory-efficient
    SDPA) have no double backward, so attention then runs on the math kernel whenever gradients flow; plain
    purification (no gradients) keeps the fast kernels.
    """

    double_backward: bool = False

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int | None = 32,
        block_out_channels: Sequence[int] = (128, 256, 256, 256),
        layers_per_block: int = 2,
        down_block_types: Sequence[str] = ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types: Sequence[str] = ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        dropout: float = 0.1,
        norm_num_groups: int = 32,
        **unet_kwargs,
    ) -> None:
        super().__init__()
        from diffusers import UNet2DModel  # imported here: only the CIFAR-scale defenses need diffusers

        self.in_channels = int(in_channels)
        self.image_size = image_size
        self.net = UNet2DModel(
            sample_size=image_size,
            in_channels=in_channels,
            out_channels=unet_kwargs.pop("out_channels", in_channels),
            block_out_channels=tuple(int(c) for c in block_out_channels),
            layers_per_block=int(layers_per_block),
            down_block_types=tuple(down_block_types),
            up_block_types=tuple(up_block_types),
            dropout=float(dropout),
            norm_num_groups=int(norm_num_groups),
            **unet_kwargs,
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = check_denoiser_input(self, x, t)
        if self.double_backward and torch.is_grad_enabled():
            with double_backward_attention():
                return self.net(x, t).sample
        return self.net(x, t).sample
