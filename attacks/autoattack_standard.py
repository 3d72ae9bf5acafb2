"""The original *standard* AutoAttack (Croce & Hein, ICML 2020) from ``pyautoattack``, as a builder.

Standard version, L∞/L2: APGD-CE (100 steps, 1 restart) → APGD-T (9 target classes × 100 steps)
→ FAB-T (9 target classes × 100 steps) → Square (5000 queries); each attack runs only on the
images still classified correctly. torchattacks' ``AutoAttack(version='standard')`` keeps the same
four attacks but with torchattacks' default of **10** steps for APGD, APGD-T and FAB-T (the setting
the DiffDefense authors evaluated with): ``step_counts`` reads the configured counts off either
object so tests and result files can state which one ran.

Against a **stochastic** model (``version='auto'``, the config's default, picks it; so does ``'rand'``) the
standard version is unsound twice over: its one-pass "is it still correct?" filter is a coin flip, and
every image it judges not fooled is handed back clean. There we run AutoAttack's ``rand`` version —
APGD-CE and APGD-DLR, 100 steps, 1 restart, each gradient averaged over 20 draws (``eot_iter``) — on
*every* image, keep each one's highest-loss iterate (never x), and pick per image between the two
candidates by accuracy over ``select_draws`` draws (``attacks.selection.pick_worst``).

Note: pyautoattack and torchattacks both call ``torch.random.manual_seed(seed)`` inside their
attacks, i.e. they reset the *global* generator.
"""
from __future__ import annotations

from typing import Any

import pyautoattack
import torch
from torch import nn

from attacks.apgd import model_device
from attacks.selection import pick_worst
from attacks.wrappers import is_stochastic

VERSIONS = ("auto", "standard", "plus", "rand")


class StandardAutoAttack:
    """``model -> callable(x, y)`` running ``pyautoattack.AutoAttack(...).run_standard_evaluation``.

    Args:
        model: classifier returning logits of images in [0, 1].
        norm: ``Linf``, ``L2`` or ``L1``.
        eps: radius of the ε-ball.
        version: ``auto`` (``rand`` for a stochastic model, else ``standard``), ``standard``, ``plus`` or ``rand``.
        seed: seed of every sub-attack (``None`` = time-based, as in the original).
        n_iter, n_target_classes, n_queries: override the version's APGD/FAB iterations, the number
            of target classes of APGD-T/FAB-T and Square's query budget (``None`` = keep; tests
            only — the standard version is only "standard" with the defaults).
        batch_size: images per batch inside AutoAttack (``None`` = the whole input at once).
        eot_iter: gradient draws per APGD step of the rand version (``None`` = its 20).
        select_draws: draws that score the rand version's two candidates per image.

    Examples::
        >>> run = StandardAutoAttack(model, norm="Linf", eps=0.3)
        >>> x_adv = run(x, y)
        >>> step_counts(run)["apgd-t"]
        {'steps': 100, 'targets': 9, 'restarts': 1}
    """

    def __init__(
        self,
        model: nn.Module,
        norm: str = "Linf",
        eps: float = 0.3,
        version: str = "auto",
        seed: int | None = 0,
        n_iter: int | None = None,
        n_target_classes: int | None = None,
        n_queries: int | None = None,
        batch_size: int | None = None,
        eot_iter: int | None = None,
        select_draws: int = 10,
    ) -> None:
        if version not in VERSIONS:
            raise ValueError(f"unknown AutoAttack version {version!r}; valid: {', '.join(VERSIONS)}")
        if version == "auto":
            version = "rand" if is_stochastic(model) else "standard"
        self.model = model
        self.version = version
        self.batch_size = batch_size
        self.select_draws = int(select_draws)
        self.aa = pyautoattack.AutoAttack(model, norm=norm, eps=float(eps), version=version, seed=seed, device=model_device(model))
        self.aa.verbose = False
        if n_iter is not None:
            for apgd in (self.aa.apgd, self.aa.apgd_targeted):
                _set_apgd_iterations(apgd, int(n_iter))
            self.aa.fab.n_iter = int(n_iter)
        if n_target_classes is not None:
            self.aa.apgd_targeted.n_target_classes = int(n_target_classes)
            self.aa.fab.n_target_classes = int(n_target_classes)
        if n_queries is not None:
            self.aa.square.n_queries = int(n_queries)
        if eot_iter is not None:
            self.aa.apgd.eot_iter = int(eot_iter)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.version == "rand":
            return self._rand(x, y)
        x_adv, _ = self.aa.run_standard_evaluation(x, y, batch_size=self.batch_size or len(x))
        return x_adv

    def _rand(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """APGD-CE and APGD-DLR with EOT on every image (highest-loss iterates), the worse one per image kept."""
        candidates = []
        for loss in ("ce", "dlr"):
            self.aa.apgd.loss = loss
            candidates.append(self.aa.apgd.perturb(x, y, best_loss=True))
        return pick_worst(self.model, candidates, y, self.select_draws)

    def step_counts(self) -> dict[str, dict[str, int]]:
        return step_counts(self)


def _set_apgd_iterations(apgd: Any, n_iter: int) -> None:
    """APGD derives its checkpoint schedule from ``n_iter`` in ``__init__``: keep them consistent."""
    apgd.n_iter = n_iter
    apgd.n_iter_orig = n_iter
    apgd.n_iter_2 = max(int(0.22 * n_iter), 1)
    apgd.n_iter_min = max(int(0.06 * n_iter), 1)
    apgd.size_decr = max(int(0.03 * n_iter), 1)


def step_counts(runner: Any) -> dict[str, dict[str, int]]:
    """The configured budget of every sub-attack, keyed by AutoAttack's names.

    ``runner`` is a ``StandardAutoAttack`` (or a ``pyautoattack.AutoAttack``) or a
    ``torchattacks.AutoAttack``. Values: ``steps`` (iterations per target/restart), ``targets``
    (target classes of APGD-T/FAB-T), ``restarts``, ``queries`` (Square).
    """
    aa = getattr(runner, "aa", runner)
    if isinstance(aa, pyautoattack.AutoAttack):
        counts: dict[str, dict[str, int]] = {}
        for name in aa.attacks_to_run:
            if name in ("apgd-ce", "apgd-dlr"):
                counts[name] = {"steps": aa.apgd.n_iter, "restarts": aa.apgd.n_restarts, "eot": aa.apgd.eot_iter}
            elif name == "apgd-t":
                t = aa.apgd_targeted
                counts[name] = {"steps": t.n_iter, "targets": t.n_target_classes, "restarts": t.n_restarts}
            elif name == "fab-t":  # run_standard_evaluation forces fab.n_restarts = 1 for FAB-T
                counts[name] = {"steps": aa.fab.n_iter, "targets": aa.fab.n_target_classes, "restarts": 1}
            elif name == "fab":
                counts[name] = {"steps": aa.fab.n_iter, "restarts": aa.fab.n_restarts}
            elif name == "square":
                counts[name] = {"queries": aa.square.n_queries, "restarts": aa.square.n_restarts}
        return counts

    import torchattacks

    if isinstance(aa, torchattacks.AutoAttack):
        counts = {}
        for sub in aa._autoattack.attacks:
            if isinstance(sub, torchattacks.APGDT):
                counts["apgd-t"] = {"steps": sub.steps, "targets": sub.n_target_classes, "restarts": sub.n_restarts}
            elif isinstance(sub, torchattacks.APGD):
                counts[f"apgd-{sub.loss}"] = {"steps": sub.steps, "restarts": sub.n_restarts}
            elif isinstance(sub, torchattacks.FAB):
                if sub.multi_targeted:
                    counts["fab-t"] = {"steps": sub.steps, "targets": sub.n_target_classes, "restarts": sub.n_restarts}
                else:
                    counts["fab"] = {"steps": sub.steps, "restarts": sub.n_restarts}
            elif isinstance(sub, torchattacks.Square):
                counts["square"] = {"queries": sub.n_queries, "restarts": sub.n_restarts}
        return counts
    raise TypeError(f"step_counts: expected a StandardAutoAttack or torchattacks.AutoAttack, got {type(runner).__name__}")
