"""evaluation.stability: the share of labels that change under noise far below one grey level (a chaotic chain)."""
import torch
from torch import nn

from evaluation.stability import label_stability


class Chaotic(nn.Module):
    """A planted classifier whose label is a hash of the input's low-order digits: deterministic, but chaotic."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        code = torch.sin(1e8 * x.flatten(1)).sum(1)
        return torch.stack([code, -code], dim=1)


class Smooth(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.flatten(1).mean(1) - 0.5
        return torch.stack([m, -m], dim=1)


def test_a_chaotic_classifier_changes_labels_under_tiny_noise_and_a_smooth_one_does_not():
    x = torch.rand(64, 1, 8, 8)
    chaotic, smooth = label_stability(Chaotic(), x), label_stability(Smooth(), x)
    assert chaotic["repeat"] == 0.0 and chaotic["sigma=1e-06"] > 0.2 and chaotic["sigma=0.0001"] > 0.2
    assert smooth["repeat"] == 0.0 and smooth["sigma=1e-06"] == 0.0 and smooth["sigma=0.0001"] == 0.0
