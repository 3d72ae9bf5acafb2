"""Threat models: which model the attack sees; the defended model is always the one scored.

- ``WhiteBoxAdaptive`` (default): attack the whole ``Defended`` model, with BPDA for
  non-differentiable purifiers and EOT for stochastic ones — the only protocol that bounds
  robustness from above honestly.
- ``Oblivious``: attack the bare victim, then purify (what several papers report; weaker).
- ``Transfer``: attack a surrogate classifier (DiffDefense's "black box").
- ``Query``: a score-based attack (Square) queries the defended model; gradients are never used.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

from torch import nn

from attacks.base import Attack
from attacks.wrappers import BPDA, EOT
from defenses.base import Defended


class ThreatModel(ABC):
    name: str = "threat"
    #: True when the attacked model never involves the defense, so adversarial examples can be shared
    #: between defenses (``evaluation.adv_cache``).
    defense_independent: bool = False

    @abstractmethod
    def attacked_model(self, defended: Defended, attack: Attack) -> nn.Module:
        """The model ``attack`` is run against."""

    def attacked_models(self, defended: Defended, attack: Attack) -> list[nn.Module]:
        """Every model the attack is run against; the loop keeps each image's worst candidate (default: one)."""
        return [self.attacked_model(defended, attack)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class WhiteBoxAdaptive(ThreatModel):
    """Attack ``Defended`` end to end.

    Args:
        eot_samples: draws averaged per gradient for stochastic purifiers (skipped when the attack
            averages over randomness itself, e.g. EOT-PGD). The average is over the attack's *loss*
            unless the attack declares ``eot: logits`` (``attacks.wrappers.EOT``).
        bpda: route gradients of non-differentiable purifiers through BPDA. Turning it off is only
            useful to *demonstrate* gradient masking (the audit's planted-defense test).
        both_paths: for purifiers that declare ``also_bpda`` (an exact gradient through a long chain,
            e.g. DiffDefense's unrolled search), attack along the exact gradient *and* identity BPDA and
            keep, per image, the candidate with the lower accuracy over draws (``evaluation.loop``).
        gradient: ``exact`` (the default: the purifier's own gradient wherever it has one), ``surrogate`` (forward
            the purifier, backward its ``smooth_surrogate()``: for purifiers whose exact gradient is shattered) or
            ``bpda`` (every purifier behind BPDA, its ``bpda_approximation`` or the identity, even a differentiable
            one). ``bpda`` is a *comparison* (JATP's Fig. 4a: BPDA+PGD vs PGD per pre-processor), never the sound
            default. With ``exact`` and ``both_paths``, a purifier that offers a smooth surrogate is attacked along
            it too, each image's worse candidate kept.
    """

    name = "white_box_adaptive"
    GRADIENTS = ("exact", "surrogate", "bpda")

    def __init__(self, eot_samples: int = 10, bpda: bool = True, both_paths: bool = True, gradient: str = "exact") -> None:
        if gradient not in self.GRADIENTS:
            raise ValueError(f"threat.model.gradient: unknown value {gradient!r}; valid: {', '.join(self.GRADIENTS)}")
        self.eot_samples = int(eot_samples)
        self.bpda = bpda
        self.both_paths = both_paths
        self.gradient = gradient

    def with_eot(self, eot_samples: int) -> "WhiteBoxAdaptive":
        """The same threat model with another number of EOT samples (the audit's 2× and 1-draw variants)."""
        return WhiteBoxAdaptive(eot_samples, self.bpda, self.both_paths, self.gradient)

    def attacked_model(self, defended: Defended, attack: Attack) -> nn.Module:
        if self.gradient == "bpda" or (self.bpda and not defended.differentiable):
            return self._with_eot(bpda_defended(defended), defended, attack)
        if self.gradient == "surrogate":
            return self._with_eot(surrogate_defended(defended), defended, attack)
        return self._with_eot(defended, defended, attack)

    def attacked_models(self, defended: Defended, attack: Attack) -> list[nn.Module]:
        """The exact-gradient model; with ``both_paths``, also the identity-BPDA one where the purifier asks for it
        (``also_bpda``) and the smooth-surrogate one where it offers a surrogate (``smooth_surrogate``)."""
        models = [self.attacked_model(defended, attack)]
        if self.gradient != "exact" or not self.both_paths or not defended.differentiable or attack.kind == "query":
            return models
        if getattr(defended.purifier, "also_bpda", False):
            models.append(self._with_eot(bpda_defended(defended), defended, attack))
        if smooth_surrogate(defended.purifier) is not None:
            models.append(self._with_eot(surrogate_defended(defended), defended, attack))
        return models

    def _with_eot(self, model: nn.Module, defended: Defended, attack: Attack) -> nn.Module:
        if defended.stochastic and self.eot_samples > 1 and not attack.handles_eot and attack.kind in ("gradient", "minimal"):
            model = EOT(model, self.eot_samples, reduction=attack.eot)
        return model.eval()  # fresh wrappers start in train mode; the attack must see eval mode


def bpda_defended(defended: Defended) -> Defended:
    """``defended`` with its purifier behind BPDA (the purifier's own ``bpda_approximation``, identity by default)."""
    approx = getattr(defended.purifier, "bpda_approximation", None)
    return Defended(BPDA(defended.purifier, approx), defended.victim, defended.input_shape)


def smooth_surrogate(purifier: nn.Module) -> nn.Module | None:
    """``purifier.smooth_surrogate()``, or None for purifiers without one (any ``nn.Module`` may be a purifier)."""
    offer = getattr(purifier, "smooth_surrogate", None)
    return offer() if callable(offer) else None


def surrogate_defended(defended: Defended) -> Defended:
    """``defended`` forwarding its purifier and backpropagating through the purifier's smooth surrogate."""
    surrogate = smooth_surrogate(defended.purifier)
    if surrogate is None:
        raise ValueError(
            f"threat.model.gradient=surrogate: the purifier {type(defended.purifier).__name__} offers no smooth surrogate "
            "(only a guided distribution transfer does here); use gradient=exact or gradient=bpda"
        )
    return Defended(BPDA(defended.purifier, surrogate), defended.victim, defended.input_shape)


class Oblivious(ThreatModel):
    """Craft on the undefended victim; the purifier is applied only when scoring."""

    name = "oblivious"
    defense_independent = True

    def attacked_model(self, defended: Defended, attack: Attack) -> nn.Module:
        return defended.victim


class Transfer(ThreatModel):
    """Craft on a surrogate (e.g. classifier B), score the defended victim."""

    name = "transfer"
    defense_independent = True

    def __init__(self, surrogate: nn.Module) -> None:
        self.surrogate = surrogate.eval()

    def attacked_model(self, defended: Defended, attack: Attack) -> nn.Module:
        return self.surrogate


class Query(ThreatModel):
    """A score-based attack queries ``Defended``; rejects attacks that would use gradients."""

    name = "query"

    def attacked_model(self, defended: Defended, attack: Attack) -> nn.Module:
        if attack.kind not in ("query", "noise"):
            raise ValueError(
                f"threat=query needs a query (score-based) attack, but attack={attack.name} is of kind "
                f"{attack.kind!r}; use attack=square"
            )
        return defended
