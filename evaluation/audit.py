"""Gradient-masking audit (Athalye et al. 2018; Carlini et al. 2019; Tramèr et al. 2020 checklists).

Each check returns pass/fail with the numbers behind it. A defense that fails any check has an
evaluation that cannot be trusted until the failure is explained (docs/decisions.md).

(a) robust accuracy → ≈ chance as ε grows large;        (b) more PGD steps / EOT samples never help the model;
(c) full-gradient attack beats BPDA, transfer and Square; (d) input gradients finite, non-zero, consistent;
(e) stochastic defenses: a frozen-randomness attack is no stronger than EOT;  (f) adversarial examples valid.
pyautoattack's own checks (randomness, zero gradients) are run and their warnings reported too.
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torchattacks
from pyautoattack import checks as aa_checks
from torch import nn

from attacks.base import Attack
from attacks.wrappers import BPDA, EOT
from defenses.base import Defended
from evaluation.loop import constraint_violations, evaluate
from evaluation.threats import Oblivious, Query, Transfer, WhiteBoxAdaptive


@dataclass
class Check:
    name: str
    passed: bool
    detail: str
    values: dict[str, Any] = field(default_factory=dict)


class _WarningCollector:
    """Stands in for a logger so pyautoattack's checks report to us instead of ``warnings``."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def warning(self, msg: str) -> None:
        self.messages.append(str(msg))


class FrozenRandomness(nn.Module):
    """Replays the same random draw on every forward pass: the attack sees one fixed purifier."""

    def __init__(self, model: nn.Module, seed: int = 0) -> None:
        super().__init__()
        self.model, self.seed = model, seed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            return self.model(x)


def pgd(eps: float, steps: int, norm: str = "Linf") -> Attack:
    """PGD with Madry's step rule (2.5·ε/steps), so larger ε or more steps are real strengthening."""
    alpha = 2.5 * eps / steps
    cls = torchattacks.PGD if norm == "Linf" else torchattacks.PGDL2
    return Attack(f"pgd{steps}_eps{eps:g}", functools.partial(cls, eps=eps, alpha=alpha, steps=steps), norm, eps)


def square(eps: float, queries: int, norm: str = "Linf") -> Attack:
    builder = functools.partial(torchattacks.Square, norm=norm, eps=eps, n_queries=queries, seed=0)
    return Attack("square", builder, norm, eps, kind="query")


def run_audit(
    defended: Defended,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    norm: str = "Linf",
    steps: int = 20,
    eot_samples: int = 10,
    n_draws: int = 10,
    surrogate: nn.Module | None = None,
    threat: WhiteBoxAdaptive | None = None,
    attack: Attack | None = None,
    square_queries: int = 500,
    tol: float = 5.0,
    chance_margin: float = 10.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Run checks (a)–(f) on ``(x, y)``; accuracies in %, ``tol`` in percentage points.

    Args:
        threat: the adaptive threat model under audit (default ``WhiteBoxAdaptive(eot_samples)``);
            pass ``WhiteBoxAdaptive(bpda=False)`` to audit what a naive evaluation would do.
        attack: the configured attack whose outputs check (f) validates (default: PGD at ``eps``).
        surrogate: a separately trained classifier for the transfer comparison (default: the bare
            victim, i.e. the oblivious attack).
    """
    threat = threat or WhiteBoxAdaptive(eot_samples=eot_samples)
    defended = defended.eval()
    num_classes = int(defended(x[:2]).shape[-1])
    chance = 100.0 / num_classes

    def robust(atk: Attack, th=threat) -> float:
        return evaluate(defended, [(x, y)], atk, th, n_draws=n_draws, seed=seed, progress=False)["robust_acc"]

    checks: list[Check] = []

    # (a) large ε drives accuracy to chance.
    big = 1.0 if norm == "Linf" else float(x[0].numel()) ** 0.5
    sweep = {e: robust(pgd(e, steps, norm)) for e in sorted({min(k * eps, big) for k in (1, 2, 4)} | {big})}
    checks.append(Check(
        "a_large_eps_to_chance", sweep[big] <= chance + chance_margin,
        f"robust acc at eps={big:g} is {sweep[big]:.1f}% (chance {chance:.1f}%)",
        {"eps_sweep": {f"{k:g}": v for k, v in sweep.items()}},
    ))
    monotone = all(b <= a + tol for a, b in zip(list(sweep.values()), list(sweep.values())[1:]))
    checks.append(Check("a_monotone_in_eps", monotone, "robust acc never rises with ε", {}))

    # (b) more steps / more EOT samples never raise robust accuracy.
    base = sweep[min(eps, big)]
    doubled = robust(pgd(eps, 2 * steps, norm))
    values = {"steps": steps, "robust": base, "robust_2x_steps": doubled}
    ok = doubled <= base + tol
    if defended.stochastic:
        more_eot = robust(pgd(eps, steps, norm), WhiteBoxAdaptive(eot_samples=2 * threat.eot_samples, bpda=threat.bpda))
        values["robust_2x_eot"] = more_eot
        ok = ok and more_eot <= base + tol
    checks.append(Check("b_more_iterations_never_help", ok, "doubling PGD steps / EOT samples does not raise robust acc", values))

    # (c) the full-gradient attack is the strongest.
    alternatives = {
        "bpda_identity": robust(pgd(eps, steps, norm), _BPDAEverywhere(threat)),
        "transfer": robust(pgd(eps, steps, norm), Transfer(surrogate) if surrogate is not None else Oblivious()),
        "square": robust(square(eps, square_queries, norm), Query()),
    }
    beaten = {k: v for k, v in alternatives.items() if v < base - tol}
    checks.append(Check(
        "c_full_gradient_strongest", not beaten,
        "full-gradient PGD is at least as strong as BPDA, transfer and Square"
        if not beaten else f"weaker-information attacks beat full-gradient PGD ({base:.1f}%): {beaten} → gradient masking",
        {"full_gradient": base, **alternatives},
    ))

    # (d) gradients: finite, non-zero, consistent across random draws.
    attacked = threat.attacked_model(defended, pgd(eps, steps, norm))
    g1 = _input_grad(attacked, x, y)
    finite = bool(torch.isfinite(g1).all())
    nonzero = float((g1.flatten(1).abs().sum(1) > 0).float().mean())
    collector = _WarningCollector()
    aa_checks.check_zero_gradients(g1, logger=collector)
    values = {"finite": finite, "nonzero_fraction": nonzero}
    ok = finite and nonzero >= 0.99
    if defended.stochastic:
        g2 = _input_grad(attacked, x, y)
        cos = float(nn.functional.cosine_similarity(g1.flatten(1), g2.flatten(1), dim=1).nan_to_num(0.0).mean())
        values["cosine_between_draws"] = cos
        ok = ok and cos >= 0.5
    checks.append(Check("d_gradients_finite_nonzero_consistent", ok, "input gradients are usable", values))

    # (e) frozen randomness is no stronger than EOT.
    aa_checks.check_randomized(defended, x, y, n=3, logger=collector)
    if defended.stochastic:
        frozen = robust(pgd(eps, steps, norm), _Frozen(threat, seed))
        checks.append(Check(
            "e_frozen_randomness_not_stronger", frozen >= base - tol,
            f"frozen-seed attack {frozen:.1f}% vs EOT attack {base:.1f}%", {"frozen": frozen, "eot": base},
        ))
    else:
        checks.append(Check("e_frozen_randomness_not_stronger", True, "deterministic defense: not applicable", {}))

    # (f) adversarial examples are valid.
    atk = attack or pgd(eps, steps, norm)
    x_adv = atk(threat.attacked_model(defended, atk), x, y)
    bad = int(constraint_violations(x, x_adv, atk).sum())
    checks.append(Check("f_adversarial_examples_valid", bad == 0, f"{bad} of {len(x)} examples outside [0,1], non-finite or outside ε", {"violations": bad}))

    return {
        "passed": all(c.passed for c in checks),
        "checks": [asdict(c) for c in checks],
        "autoattack_warnings": collector.messages,
        "settings": {"eps": eps, "norm": norm, "steps": steps, "eot_samples": threat.eot_samples, "n_draws": n_draws, "n_images": len(x), "tol": tol},
    }


def _input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Gradient of the logit margin (best other class − true class).

    Not cross-entropy: for confidently classified images fp32 softmax saturates and the CE gradient
    is exactly zero, which would flag an honest model; the margin's gradient never vanishes that way.
    """
    with torch.inference_mode(False), torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        logits = model(xg)
        true = logits.gather(1, y[:, None]).squeeze(1)
        other = logits.masked_fill(nn.functional.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
        loss = (other - true).sum()
        (grad,) = torch.autograd.grad(loss, xg)
    return grad


class _BPDAEverywhere(WhiteBoxAdaptive):
    """Identity backward through the whole purifier, whatever it declares."""

    def __init__(self, base: WhiteBoxAdaptive) -> None:
        super().__init__(base.eot_samples, bpda=True)

    def attacked_model(self, defended: Defended, attack: Attack) -> nn.Module:
        model: nn.Module = Defended(BPDA(defended.purifier), defended.victim, defended.input_shape)
        if defended.stochastic and self.eot_samples > 1:
            model = EOT(model, self.eot_samples)
        return model.eval()


class _Frozen(WhiteBoxAdaptive):
    def __init__(self, base: WhiteBoxAdaptive, seed: int) -> None:
        super().__init__(1, base.bpda)
        self.seed = seed

    def attacked_model(self, defended: Defended, attack: Attack) -> nn.Module:
        return FrozenRandomness(super().attacked_model(defended, attack), self.seed).eval()


def format_report(report: dict[str, Any]) -> str:
    lines = [f"Gradient-masking audit: {'PASS' if report['passed'] else 'FAIL'}"]
    for c in report["checks"]:
        lines.append(f"  [{'PASS' if c['passed'] else 'FAIL'}] {c['name']}: {c['detail']}")
        if c["values"]:
            lines.append(f"         {c['values']}")
    for w in report["autoattack_warnings"]:
        lines.append(f"  autoattack check: {w}")
    return "\n".join(lines)
