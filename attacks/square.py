"""Square Attack (Andriushchenko et al., ECCV 2020) from torchattacks, sound against stochastic defenses.

torchattacks' ``Square.perturb`` keeps, per image, the first iterate that one query judged adversarial and
hands back the *clean* image for every image it never saw fooled. Against a stochastic defense both
judgements are one noisy forward pass: the clean fallback scores a coin flip as robustness. There
every image gets its search's best-margin iterate instead (an adversarial candidate, never x), and with
restarts each image keeps the candidate of lowest accuracy over ``select_draws`` draws
(``attacks.selection.pick_worst``). Deterministic models run torchattacks' own ``perturb`` unchanged.
"""
from __future__ import annotations

import torch
import torchattacks

from attacks.selection import pick_worst
from attacks.wrappers import is_stochastic


class Square(torchattacks.Square):
    """torchattacks' Square (same arguments) plus ``select_draws`` for stochastic models.

    Examples::
        >>> x_adv = Square(defended, norm="Linf", eps=0.3, n_queries=5000)(x, y)
    """

    def __init__(self, model, *args, select_draws: int = 10, **kwargs) -> None:
        super().__init__(model, *args, **kwargs)
        self.select_draws = int(select_draws)

    def perturb(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if not is_stochastic(self.model) or y is None or self.targeted:
            return super().perturb(x, y)
        self.init_hyperparam(x)
        y = y.detach().clone().long().to(self.device)
        torch.random.manual_seed(self.seed)
        torch.cuda.random.manual_seed(self.seed)
        candidates = [self.attack_single_run(x, y)[1] for _ in range(self.n_restarts)]
        return pick_worst(self.model, candidates, y, self.select_draws)
