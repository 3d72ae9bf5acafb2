"""Defense-GAN's MNIST WGAN generator and critic (Samangouei et al. 2018, released code
``models/dataset_models.py``: ``mnist_generator`` / ``mnist_discriminator``), in PyTorch.

Generator: z ∈ R^128 → Linear → 4·4·(4·width) → ReLU → 5×5 transposed conv (stride 2) to 2·width
→ ReLU → crop 8×8 to 7×7 → 5×5 transposed conv to width → ReLU → 5×5 transposed conv to C → sigmoid:
28×28 in [0, 1].
Critic: three 5×5 stride-2 convs (width, 2·width, 4·width) with LeakyReLU(0.2), no normalisation (a WGAN-GP
critic must not use batch norm: the penalty is per sample), then Linear → one score per image.

Differences from the release (TensorFlow, NHWC): PyTorch's default initialisation instead of tflib's He
initialisation; feature maps are reshaped channels-first. Other square sizes divisible by 4 (e.g. 32) are
accepted: the FC map is ⌈size/8⌉² and the first upsampled map is cropped to size/4 (a no-op at 32).
"""
from __future__ import annotations

import math

import torch
from torch import nn


def _check_sizes(image_size: int, latent_dim: int, width: int, in_channels: int) -> None:
    if image_size < 8 or image_size % 4:
        raise ValueError(f"image_size must be a multiple of 4 and at least 8, got {image_size}")
    for name, value in (("latent_dim", latent_dim), ("width", width), ("in_channels", in_channels)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


class DefenseGANGenerator(nn.Module):
    """``G(z)``: latents ``(N, latent_dim)`` → images ``(N, in_channels, image_size, image_size)`` in [0, 1]."""

    def __init__(self, in_channels: int = 1, image_size: int = 28, latent_dim: int = 128, width: int = 64) -> None:
        super().__init__()
        _check_sizes(image_size, latent_dim, width, in_channels)
        self.in_channels, self.image_size, self.latent_dim, self.width = in_channels, image_size, latent_dim, width
        self.start_size = math.ceil(image_size / 8)  # 4 for 28 and 32
        self.crop_size = image_size // 4  # 7 for 28 (the release's output[:, :7, :7, :]), 8 for 32
        self.fc = nn.Linear(latent_dim, self.start_size**2 * 4 * width)

        def up(c_in: int, c_out: int) -> nn.ConvTranspose2d:
            # TF 'SAME' transposed conv with stride 2: exactly doubles the size.
            return nn.ConvTranspose2d(c_in, c_out, 5, stride=2, padding=2, output_padding=1)

        self.up1 = up(4 * width, 2 * width)
        self.up2 = up(2 * width, width)
        self.up3 = up(width, in_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"expected latents of shape (N, {self.latent_dim}), got {tuple(z.shape)}")
        h = torch.relu(self.fc(z)).view(-1, 4 * self.width, self.start_size, self.start_size)
        h = torch.relu(self.up1(h))[:, :, : self.crop_size, : self.crop_size]
        h = torch.relu(self.up2(h))
        return torch.sigmoid(self.up3(h))


class DefenseGANCritic(nn.Module):
    """WGAN critic ``D(x)``: images ``(N, C, H, W)`` in [0, 1] → unbounded scores ``(N,)``."""

    def __init__(self, in_channels: int = 1, image_size: int = 28, width: int = 64) -> None:
        super().__init__()
        _check_sizes(image_size, 1, width, in_channels)
        self.in_channels, self.image_size, self.width = in_channels, image_size, width
        size = image_size
        layers: list[nn.Module] = []
        for c_in, c_out in ((in_channels, width), (width, 2 * width), (2 * width, 4 * width)):
            # TF 'SAME' conv with stride 2: ⌈size/2⌉ (28 → 14 → 7 → 4).
            layers += [nn.Conv2d(c_in, c_out, 5, stride=2, padding=2), nn.LeakyReLU(0.2)]
            size = math.ceil(size / 2)
        self.features = nn.Sequential(*layers)
        self.out = nn.Linear(size * size * 4 * width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected images of shape (N, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        return self.out(self.features(x).flatten(1)).squeeze(1)
