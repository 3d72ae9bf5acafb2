"""JATP ("Joint Adversarial Training based Pre-processing", issue 14): NRP's generator P (3 RRDB blocks, ``models.jatp.
networks``) trained by ``models.jatp.module`` on full adversarial examples of target∘P, put in front of the victim.

    x ↦ P(x) = clamp(NRP(x), 0, 1)          (``output: sigmoid``: σ(NRP(x)))

One feed-forward pass: deterministic and differentiable, so the adaptive attack gets the exact gradient of victim∘P.
P is trained once against one target (the paper: the TRADES ResNet-18) and put unchanged in front of others (Table 2):
its weights file names the target it was trained against (``jatp-<victim>-<victim_training>.pt``), not the victim it
is evaluated with.

``weakened()`` is the identity: JATP without its pre-processor is the undefended victim (audit check (i)).
"""
from __future__ import annotations

from pathlib import Path


from defenses.base import FrozenPreprocessor
from models.jatp.networks import NRPGenerator


#: Training switches of the named variants (JATP′ and the ablation of Fig. 4b); any other name is trained as given.
VARIANT_SWITCHES = {"jatp": "", "jatp_prime": " model.update_target=true", "jatp_no_pix": " model.beta=0",
                    "jatp_no_bce": " model.bce_weight=0", "jatp_no_fsm": " model.alpha=0"}


def jatp_train_hint(path: str | Path, victim: str, victim_training: str, variant: str = "jatp") -> str:
    """The ``train.py`` command that writes ``path`` (``<checkpoint_dir>/<dataset>/<variant>-<victim>-<victim_training>.pt``)."""
    dataset = Path(path).parent.name
    switches = VARIANT_SWITCHES.get(variant, "") + ("" if variant == "jatp" else f" model.variant={variant}")
    command = f"python train.py model=jatp dataset={dataset} victim={victim} victim_training={victim_training}{switches}"
    return f"train it first with `{command}` (it needs the target's weights {victim}-{victim_training}.pt)"


class JATP(FrozenPreprocessor):
    """``x ↦ P(x)`` with the trained pre-processor (frozen: ``defenses.base.FrozenPreprocessor``).

    Args:
        net: the ``NRPGenerator``.
        weights: its weights file (``python train.py model=jatp``); ``None`` keeps ``net`` as given.
        victim_name / victim_training: the target P was trained against (for the "train it first" message only).
        variant: which trained P (``jatp``, ``jatp_prime``, an ablation): its weights file's prefix (message only).
    """

    network = NRPGenerator

    def __init__(self, net: NRPGenerator, weights: str | None = None, victim_name: str = "resnet18",
                 victim_training: str = "trades", variant: str = "jatp") -> None:
        hint = "" if weights is None else jatp_train_hint(weights, victim_name, victim_training, variant)
        super().__init__(net, weights, hint)
