"""APE-GAN (Shen et al. 2017; the JATP paper's APE-G baseline, issue 14): x ↦ G(x), the generator trained by
``python train.py model=ape_gan`` (``models.jatp.ape_gan``) on (adversarial, clean) pairs against a target.

One feed-forward pass with running BatchNorm statistics: deterministic and differentiable, so the adaptive attack
gets the exact gradient of victim∘G. G's output, (tanh(h) + 1)/2 (or σ(h)), lies in (0, 1) by construction.

G is trained once against one target (the paper: the TRADES ResNet-18) on one source of adversaries — ``oblivious``
(PGD on the target) or ``full`` (PGD on target∘G) — and put in front of the evaluated victim: its weights file names
both, ``ape_gan-<victim>-<victim_training>-<adversaries>.pt``, so the two variants of Figs. 1–2 coexist.

``weakened()`` is the identity: APE-GAN without its generator is the undefended victim (audit check (i)).

``BaselinePreprocessor`` is the shared part of this purifier and ``defenses.hgd.HGD``: a frozen network, its weights
file and the one-line "train it first" message.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from defenses.base import FrozenPreprocessor
from models.jatp.adversaries import check_adversaries
from models.jatp.ape_gan import APEGANGenerator


def baseline_train_hint(model: str, path: str | Path, victim: str, victim_training: str, adversaries: str) -> str:
    """The ``train.py`` command that writes ``path`` (``<checkpoint_dir>/<dataset>/<model>-<victim>-<training>-<adv>.pt``)."""
    dataset = Path(path).parent.name
    command = (f"python train.py model={model} dataset={dataset} victim={victim} victim_training={victim_training} "
               f"model.adversaries={adversaries}")
    return f"train it first with `{command}` (it needs the target's weights {victim}-{victim_training}.pt)"


class BaselinePreprocessor(FrozenPreprocessor):
    """A baseline pre-processor trained against a target on one source of adversaries (``defenses.base.
    FrozenPreprocessor`` + the file name and message of its training). Subclasses set ``model_name`` (the
    ``conf/model`` option that trains it) and ``network`` (the expected class).

    Args:
        net: the network.
        weights: its weights file; ``None`` keeps ``net`` as given.
        victim_name / victim_training: the target it was trained against (for the "train it first" message only).
        adversaries: ``"oblivious"`` or ``"full"``, the source of its training adversaries (file name and message).
    """

    model_name: str = ""

    def __init__(self, net: nn.Module, weights: str | None = None, victim_name: str = "resnet18",
                 victim_training: str = "trades", adversaries: str = "oblivious") -> None:
        self_name = type(self).__name__
        adversaries = check_adversaries(adversaries, self_name)
        hint = "" if weights is None else baseline_train_hint(self.model_name, weights, victim_name, victim_training, adversaries)
        super().__init__(net, weights, hint)
        self.adversaries = adversaries


class APEGAN(BaselinePreprocessor):
    """``x ↦ G(x)`` with APE-GAN's trained generator (``models.jatp.ape_gan.APEGANGenerator``)."""

    model_name = "ape_gan"
    network = APEGANGenerator
