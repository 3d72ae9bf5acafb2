"""RAP (reverse adversarial process, issue 13): the adversarial forward process (Alg. 1), the adapter f̃_θ(x_t, t)
and its training (Alg. 3). The purifier (1-step and Alg. 2) is ``defenses.rap``."""
from models.rap.adapter import AdaptedClassifier, RAPAdapter
from models.rap.forward_process import AdversarialProcess, select

__all__ = ["AdaptedClassifier", "AdversarialProcess", "RAPAdapter", "select"]
