"""JATP (issue 14, "Joint Adversarial Training based Pre-processing"): the pre-processing network (NRP's generator),
full adversarial examples in a feature space of the target (Eq. 5), the loss terms (Eqs. 6–9) and their training
(Eq. 10, Alg. 1). The purifier is ``defenses.jatp``."""
from models.jatp.attack import FeatureAttack, features_and_logits, resolve_layer
from models.jatp.losses import boosted_cross_entropy, feature_similarity, pixel_loss
from models.jatp.networks import NRPGenerator

__all__ = ["FeatureAttack", "NRPGenerator", "boosted_cross_entropy", "feature_similarity", "features_and_logits",
           "pixel_loss", "resolve_layer"]
