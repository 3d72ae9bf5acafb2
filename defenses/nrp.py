"""NRP (Naseer et al. 2020; the JATP paper's NRP baseline, issue 14): NRP's generator (3 RRDB blocks, the release's form
without a global skip) trained on self-supervised perturbations by ``models.jatp.nrp_ssp``, put in front of the victim.

    x ↦ clamp(NRP(x), 0, 1)

The purifier is JATP's (``defenses.jatp.JATP``: the same network class, deterministic, differentiable, frozen, and
``weakened()`` = the identity); only the weights file differs — ``nrp-<feature_net>.pt``, trained without labels or
target, so one file serves every victim — and with it the "train it first" line. NRP's "dynamic inference" (Gaussian
noise before purification, the release's ``purify.py --dynamic``) is not used: the JATP paper evaluates NRP as a
deterministic pre-processor like the other baselines.
"""
from __future__ import annotations

from defenses.base import FrozenPreprocessor
from defenses.jatp import JATP
from models.jatp.networks import NRPGenerator
from models.jatp.nrp_ssp import nrp_train_hint, nrp_weights_name


class NRP(JATP):
    """``x ↦ P(x)`` with NRP's trained generator (see the module docstring).

    Args:
        net: the ``NRPGenerator`` (``skip=False``, as trained by ``model=nrp``).
        weights: its weights file (``python train.py model=nrp``); ``None`` keeps ``net`` as given.
        feature_net: the feature network it was trained with (``vgg16`` | ``vgg16_random``), for the message only.
    """

    def __init__(self, net: NRPGenerator, weights: str | None = None, feature_net: str = "vgg16") -> None:
        nrp_weights_name(feature_net)  # one ValueError listing the valid names
        FrozenPreprocessor.__init__(self, net, weights, "" if weights is None else nrp_train_hint(weights, feature_net))
        self.feature_net = feature_net
