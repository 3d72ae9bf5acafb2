"""Small MNIST-family victims (28x28 grey by default).

The layer lists follow the code the papers' authors released, because the papers only name the
models. The flatten size is computed by a dummy forward in ``__init__`` so the same classes also run
on other input sizes/channels (e.g. the 32x32x3 Fashion-MNIST stand-in) without hand-edited constants.
"""
from __future__ import annotations

import torch
from torch import nn

from models.weights import VARIANT_PREFIX


def _flat_features(features: nn.Module, in_channels: int, input_size: int) -> int:
    """Number of features ``features`` outputs for one image (dummy forward, no grad)."""
    with torch.no_grad():
        return int(features(torch.zeros(1, in_channels, input_size, input_size)).flatten(1).shape[1])


class ClassifierA(nn.Sequential):
    """DiffDefense's classifier A (§3.1), exactly as in the authors' ``classifiers/classifier.py``.

    Conv(64, 5x5, s1) → ReLU → Conv(64, 5x5, s2) → ReLU → Dropout(.25) → FC 128 → ReLU → Dropout(.5) → FC.
    Both convs are unpadded (28→24→10, 6400 features), unlike Defense-GAN's model A whose first conv is
    "SAME"-padded (9216 features); we follow DiffDefense because its numbers are the ones we reproduce.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int = 28) -> None:
        features = nn.Sequential(
            nn.Conv2d(in_channels, 64, 5, stride=1), nn.ReLU(),
            nn.Conv2d(64, 64, 5, stride=2), nn.ReLU(),
            nn.Dropout(0.25),
            nn.Flatten(),
        )
        super().__init__(*features, *_hidden_head(_flat_features(features, in_channels, input_size), num_classes))


def _hidden_head(flat: int, num_classes: int) -> list[nn.Module]:
    """FC 128 → ReLU → Dropout(.5) → FC: the head shared by classifier A and the pytorch/examples CNN."""
    return [nn.Linear(flat, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, num_classes)]


def _classifier_b(in_channels: int, num_classes: int, input_size: int, paddings: tuple[int, int, int]) -> list[nn.Module]:
    """Dropout(.2) → Conv(64, 8x8, s2) → ReLU → Conv(128, 6x6, s2) → ReLU → Conv(128, 5x5, s1) → ReLU → Dropout(.5)
    → FC, with the three convs' ``paddings``."""
    p1, p2, p3 = paddings
    features = nn.Sequential(
        nn.Dropout(0.2),
        nn.Conv2d(in_channels, 64, 8, stride=2, padding=p1), nn.ReLU(),
        nn.Conv2d(64, 128, 6, stride=2, padding=p2), nn.ReLU(),
        nn.Conv2d(128, 128, 5, stride=1, padding=p3), nn.ReLU(),
        nn.Dropout(0.5),
        nn.Flatten(),
    )
    return [*features, nn.Linear(_flat_features(features, in_channels, input_size), num_classes)]


class ClassifierB(nn.Sequential):
    """DiffDefense's classifier B (§3.1, the transfer-attack surrogate), exactly as in the authors'
    ``classifiers/classifier.py`` (``classifier_b``).

    Dropout(.2) → Conv(64, 8x8, s2, unpadded) → ReLU → Conv(128, 6x6, s2, unpadded) → ReLU →
    Conv(128, 5x5, s1, padding 1) → ReLU → Dropout(.5) → FC: 28→11→3→1, 128 features. Its parameter shapes are
    those of Defense-GAN's model B (``ClassifierBDefenseGAN``, padding on the first conv instead of the last), so
    the buffer ``_variant_conv_padding`` = (0, 0, 1) is saved with the weights and a file of the other variant (or
    one written before B followed the DiffDefense release) fails to load with one line instead of loading silently.
    """

    #: Paddings of conv1, conv2, conv3.
    paddings = (0, 0, 1)

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int = 28) -> None:
        super().__init__(*_classifier_b(in_channels, num_classes, input_size, self.paddings))
        self.register_buffer(f"{VARIANT_PREFIX}conv_padding", torch.tensor(self.paddings))


class ClassifierBDefenseGAN(nn.Sequential):
    """Defense-GAN's model B (Samangouei et al. 2018), as in its authors' ``network_builder.model_b``.

    Dropout(.2) → Conv(64, 8x8, s2, "SAME") → ReLU → Conv(128, 6x6, s2, "VALID") → ReLU →
    Conv(128, 5x5, s1, "VALID") → ReLU → Dropout(.5) → FC. TensorFlow's "SAME" for an 8x8 stride-2 conv
    on 28x28 pads 3 on each side (28→14); the other two convs are unpadded (14→5→1, 128 features).
    Saves no variant buffer: its files are the ones every ``classifier_b`` run wrote before B followed DiffDefense.
    """

    paddings = (3, 0, 0)

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int = 28) -> None:
        super().__init__(*_classifier_b(in_channels, num_classes, input_size, self.paddings))


class PyTorchExamplesCNN(nn.Sequential):
    """The MNIST CNN of pytorch/examples (``mnist/main.py``), used as the victim by the RAP paper.

    Conv(32, 3x3) → ReLU → Conv(64, 3x3) → ReLU → MaxPool 2 → Dropout(.25) → FC 9216→128 → ReLU →
    Dropout(.5) → FC. Returns logits: the original ends in ``log_softmax`` for ``nll_loss``; logits keep
    every victim interchangeable with ``cross_entropy`` and margin-based attacks (argmax is unchanged).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int = 28) -> None:
        features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, stride=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Dropout(0.25),
            nn.Flatten(),
        )
        super().__init__(*features, *_hidden_head(_flat_features(features, in_channels, input_size), num_classes))
