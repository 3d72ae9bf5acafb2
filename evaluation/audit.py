"""Gradient-masking audit (Athalye et al. 2018; Carlini et al. 2019; Tramèr et al. 2020 checklists).

Each check is PASS, FAIL or N/A (not applicable: its two sides would be the same model, or the
defense has nothing it could test) with the numbers behind it. The audit passes when no check fails;
a defense that fails one has an evaluation that cannot be trusted until the failure is explained.

(a) an unbounded attack (ε = 1 in L∞) drives accuracy to ≈ 0, and accuracy never rises with ε;
(b) the attack has converged: 2× steps and 2× EOT samples change robust accuracy by no more than
    the tolerance, for the audit's PGD and for the configured attack's own budget;
(c) the full-gradient attack is at least as strong as BPDA (identity), transfer and Square;
(d) input gradients are finite, non-zero and usable: a finite-difference check (float64) of the
    directional derivative where the gradient claims to be exact, and, for stochastic defenses, the per-draw
    cosine tells how many EOT samples the averaged gradient needs — fewer than configured fails;
(e) stochastic defenses: a frozen-randomness attack is no stronger than EOT;
(f) adversarial examples are valid (finite, in [0, 1], inside the ε-ball);
(g) a purifier declared deterministic gives the same output twice;
(h) every warning of pyautoattack's own checks fails, unless a written exception covers it;
(i) a purifier that can be weakened (``weakened()``: its strength at 0, t* = 0 for a diffusion purifier) then
    scores as the undefended victim under the same attack, and never above the full defense;
(j) with ``gradient=surrogate`` (forward the purifier, backward its ``smooth_surrogate()``): the surrogate classifies
    as the real purifier does under the same draws (clean and adversarial images), check (d) compares the gradient
    with the surrogate's own function, and (c) adds the exact-gradient attack to the comparisons.

Every tolerance is a binomial confidence interval for the number of images used, at ``confidence``
(default 95 %), never below one image (0.8 points at 128 images): comparisons of two attacks on the
same images use the paired (McNemar) interval of their difference; "≈ 0" is the one-sided bound of a
zero rate (the rule of three).
"""
from __future__ import annotations

import copy
import functools
import logging
import math
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Any

import torch
import torchattacks
from pyautoattack import checks as aa_checks
from torch import nn

from attacks.base import Attack
from attacks.square import Square
from attacks.wrappers import BPDA, EOT
from defenses.base import Defended, Identity, Purifier
from evaluation.loop import constraint_violations, predict_draws
from evaluation.threats import Oblivious, Query, ThreatModel, Transfer, WhiteBoxAdaptive, smooth_surrogate

PASS, FAIL, NA = "pass", "fail", "n/a"
log = logging.getLogger(__name__)
#: Builder arguments that set an attack's iteration or query budget (doubled by check (b)).
BUDGET_KEYS = ("steps", "n_iter", "max_iterations", "n_queries")
#: Builder arguments that set an attack's own EOT samples (doubled by check (b) for handles_eot attacks).
EOT_KEYS = ("eot_samples", "eot_iter")


@dataclass
class Check:
    name: str
    status: str
    detail: str
    values: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool | None:
        """True / False, or None when not applicable."""
        return None if self.status == NA else self.status == PASS


class _LoggedChecks(list):
    """The audit's checks, each logged the moment it is decided: an audit of a long chain runs for hours on a CPU,
    and a run stopped before its verdict still shows which checks it passed."""

    def append(self, check: Check) -> None:
        log.info("audit %s: %s — %s", check.name, check.status.upper(), check.detail)
        super().append(check)

    def extend(self, checks) -> None:
        for check in checks:
            self.append(check)


def _check(name: str, ok: bool, detail: str, values: dict[str, Any] | None = None) -> Check:
    return Check(name, PASS if ok else FAIL, detail, values or {})


def paired_tol(a: torch.Tensor, b: torch.Tensor, confidence: float = 0.95) -> float:
    """Half-width (points) of the paired (McNemar) binomial CI of the difference of two accuracies on the same images.

    ``a``, ``b``: per-image accuracies in [0, 1] (fractions of draws). For 0/1 outcomes this is
    z·√(discordant images)/n; never below one image.
    """
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    n = a.numel()
    return max(100.0 * z * float((a - b).pow(2).sum().sqrt()) / n, 100.0 / n)


def zero_rate_bound(n: int, confidence: float = 0.95) -> float:
    """Largest accuracy (%) still consistent with a true rate of 0: the one-sided bound −ln(1−c)/n (rule of three)."""
    return max(100.0 * -math.log(1 - confidence) / n, 100.0 / n)


@dataclass
class Run:
    """One audit attack: per-image accuracy over the scoring draws, and the adversarial batch."""

    per_image: torch.Tensor
    x_adv: torch.Tensor

    @property
    def acc(self) -> float:
        return 100.0 * float(self.per_image.mean())


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
    builder = functools.partial(Square, norm=norm, eps=eps, n_queries=queries, seed=0)
    return Attack("square", builder, norm, eps, kind="query")


def scaled(attack: Attack, keys: tuple[str, ...], factor: int = 2) -> Attack | None:
    """``attack`` with every integer budget argument among ``keys`` multiplied by ``factor``; None if it has none."""
    builder = attack.builder
    keywords = dict(getattr(builder, "keywords", {}) or {})
    found = [k for k in keys if isinstance(keywords.get(k), int) and not isinstance(keywords.get(k), bool) and keywords[k] > 0]
    if not found:
        return None
    keywords.update({k: keywords[k] * factor for k in found})
    doubled = functools.partial(builder.func, *builder.args, **keywords)
    return Attack(f"{attack.name}_x{factor}", doubled, attack.norm, attack.eps, attack.kind, attack.handles_eot, attack.eot)


def _same_as_identity_bpda(purifier: nn.Module) -> bool:
    """BPDA with the identity is what the adaptive attack already uses for this purifier."""
    approx = getattr(type(purifier), "bpda_approximation", None)
    return approx is None or approx is Purifier.bpda_approximation


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
    confidence: float = 0.95,
    seed: int = 0,
    fd_step: float = 1e-2,
    fd_tol: float = 0.1,
) -> dict[str, Any]:
    """Run checks (a)–(i) on ``(x, y)``; accuracies in %.

    Args:
        threat: the adaptive threat model under audit (default ``WhiteBoxAdaptive(eot_samples)``);
            pass ``WhiteBoxAdaptive(bpda=False)`` to audit what a naive evaluation would do.
        attack: the configured attack: check (b) doubles its own budget, check (f) validates its outputs.
        surrogate: a separately trained classifier for the transfer comparison (default: the bare
            victim, i.e. the oblivious attack).
        confidence: level of the binomial confidence intervals that set every tolerance.
        fd_step / fd_tol: L2 length of the finite-difference step and the largest median relative
            error between the directional derivative and gradient·direction.
    """
    threat = threat or WhiteBoxAdaptive(eot_samples=eot_samples)
    defended = defended.eval()
    n = len(x)
    num_classes = int(defended(x[:2]).shape[-1])
    tol = lambda a, b: paired_tol(a.per_image, b.per_image, confidence)  # noqa: E731
    purifier = defended.purifier
    no_defense = isinstance(purifier, Identity)

    def run(atk: Attack, th: ThreatModel = threat, model: Defended = defended) -> Run:
        """Attack, then score every image over ``n_draws`` purifications: per-image accuracy in [0, 1]."""
        if isinstance(th, WhiteBoxAdaptive) and th.gradient == "surrogate" and smooth_surrogate(model.purifier) is None:
            th = WhiteBoxAdaptive(th.eot_samples, th.bpda, both_paths=False)  # weakened / bare models: nothing to smooth
        attacked = th.attacked_model(model, atk)
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(seed + 2)
            x_adv = atk(attacked, x, y)
            torch.manual_seed(seed + 1)
            correct = predict_draws(model, x_adv, n_draws if model.stochastic else 1) == y
        return Run(correct.float().mean(0), x_adv)

    checks: list[Check] = _LoggedChecks()

    # (a) an unbounded attack reaches ≈ 0; accuracy never rises with ε.
    big = 1.0 if norm == "Linf" else float(x[0].numel()) ** 0.5
    sweep = {e: run(pgd(e, steps, norm)) for e in sorted({min(k * eps, big) for k in (1, 2, 4)} | {big})}
    bound = zero_rate_bound(n, confidence)
    checks.append(_check(
        "a_unbounded_attack_reaches_zero", sweep[big].acc <= bound,
        f"robust acc at eps={big:g} is {sweep[big].acc:.1f}% (must be ≤ {bound:.1f}%, the {confidence:.0%} bound of a zero rate on {n} images)",
        {"eps_sweep": {f"{k:g}": v.acc for k, v in sweep.items()}, "bound": bound, "chance": 100.0 / num_classes},
    ))
    runs = list(sweep.items())
    rises = [(f"{e1:g}", f"{e2:g}") for (e1, a), (e2, b) in zip(runs, runs[1:]) if b.acc > a.acc + tol(a, b)]
    checks.append(_check("a_monotone_in_eps", not rises, "robust acc never rises with ε beyond the tolerance", {"rises": rises}))

    # (b) convergence: doubling the budget changes nothing beyond the tolerance — either way.
    base = sweep[min(eps, big)]
    more = {"2x_steps": run(pgd(eps, 2 * steps, norm))}
    if defended.stochastic:
        more["2x_eot"] = run(pgd(eps, steps, norm), threat.with_eot(2 * threat.eot_samples))
    checks.append(_convergence_check("b_pgd_converged", "PGD", base, more, tol, two_sided=True))
    configured = None
    if attack is not None and attack.kind in ("gradient", "query") and attack.bounded:
        configured = run(attack)
        checks.append(_budget_check(attack, configured, threat, defended, run, tol))

    # (i) a weakened defense is weaker: at strength → 0 (t* → 0) it falls to the undefended accuracy.
    checks.append(_weakened_check(defended, purifier, no_defense, base, run, pgd(eps, steps, norm), tol))

    # (c) the full-gradient attack is the strongest; a comparison whose two sides are one model is N/A.
    alternatives: dict[str, tuple[Attack, ThreatModel] | str] = {
        "bpda_identity": "no defense" if no_defense else
        "the adaptive attack already uses identity BPDA for this purifier (differentiable=False)"
        if (not defended.differentiable and threat.bpda and _same_as_identity_bpda(purifier)) else
        (pgd(eps, steps, norm), _BPDAEverywhere(threat)),
        "transfer": (pgd(eps, steps, norm), Transfer(surrogate)) if surrogate is not None else
        ("no defense: the oblivious attack is the full-gradient attack" if no_defense else (pgd(eps, steps, norm), Oblivious())),
        "square": (square(eps, square_queries, norm), Query()),
    }
    via_surrogate = threat.gradient == "surrogate"
    if via_surrogate:
        alternatives["exact_gradient"] = (pgd(eps, steps, norm), WhiteBoxAdaptive(threat.eot_samples, threat.bpda, both_paths=False))
    attack_label = "surrogate-gradient PGD" if via_surrogate else "full-gradient PGD"
    for label, spec in alternatives.items():
        if isinstance(spec, str):
            checks.append(Check(f"c_full_gradient_beats_{label}", NA, f"not applicable: {spec}"))
            continue
        other = run(*spec)
        t = tol(base, other)
        checks.append(_check(
            f"c_full_gradient_beats_{label}", other.acc >= base.acc - t,
            f"{attack_label} {base.acc:.1f}% vs {label} {other.acc:.1f}%"
            + ("" if other.acc >= base.acc - t else " → the weaker-information attack wins: gradient masking"),
            {"full_gradient": base.acc, label: other.acc, "tol": t},
        ))

    # (d) gradients: finite, non-zero, exact where claimed, informative per draw.
    collector = _WarningCollector()
    checks.extend(_gradient_checks(defended, threat, x, y, seed, fd_step, fd_tol, collector))

    # (j) the smooth surrogate classifies as the purifier does, so its gradient is about the defense under attack.
    if via_surrogate:
        checks.append(_surrogate_fidelity_check(defended, x, base.x_adv, y, seed, confidence))

    # (e) frozen randomness is no stronger than EOT.
    if defended.stochastic:
        frozen = run(pgd(eps, steps, norm), _Frozen(threat, seed))
        t = tol(base, frozen)
        checks.append(_check(
            "e_frozen_randomness_not_stronger", frozen.acc >= base.acc - t,
            f"frozen-seed attack {frozen.acc:.1f}% vs EOT attack {base.acc:.1f}%", {"frozen": frozen.acc, "eot": base.acc, "tol": t},
        ))
    else:
        checks.append(Check("e_frozen_randomness_not_stronger", NA, "not applicable: deterministic defense"))

    # (f) adversarial examples are valid.
    atk = attack or pgd(eps, steps, norm)
    x_adv = configured.x_adv if configured is not None else atk(threat.attacked_model(defended, atk), x, y)
    n_bad = int(constraint_violations(x, x_adv, atk).sum())
    checks.append(_check("f_adversarial_examples_valid", n_bad == 0, f"{n_bad} of {n} examples outside [0,1], non-finite or outside ε", {"violations": n_bad}))

    # (g) declared determinism holds.
    checks.append(_determinism_check(defended, x, seed))

    # (h) pyautoattack's own checks: each warning fails unless a written exception covers it.
    aa_checks.check_randomized(defended, x, y, n=3, logger=collector)
    aa_checks.check_range_output(defended, x, logger=collector)
    checks.append(_autoattack_check(collector.messages, defended.stochastic))

    return {
        "passed": not any(c.status == FAIL for c in checks),
        "checks": [{**asdict(c), "passed": c.passed} for c in checks],
        "autoattack_warnings": collector.messages,
        "settings": {
            "eps": eps, "norm": norm, "steps": steps, "eot_samples": threat.eot_samples, "n_draws": n_draws, "n_images": n,
            "confidence": confidence, "one_image": 100.0 / n, "fd_step": fd_step, "fd_tol": fd_tol,
        },
    }


def _convergence_check(name: str, label: str, base: "Run", more: dict[str, "Run"], tol, two_sided: bool) -> Check:
    """Fail when a doubled budget lowers robust accuracy beyond the paired tolerance (or, two-sided, raises it)."""
    values: dict[str, Any] = {"robust": base.acc}
    bad: dict[str, float] = {}
    for key, other in more.items():
        t, delta = tol(base, other), other.acc - base.acc
        values[f"robust_{key}"], values[f"tol_{key}"] = other.acc, t
        if delta < -t or (two_sided and delta > t):
            bad[key] = round(delta, 2)
    return _check(
        name, not bad,
        f"{label}: doubling its budget moves robust acc within the tolerance"
        if not bad else f"{label} has not converged: doubling moved robust acc by {bad} points",
        values,
    )


def _budget_check(attack: Attack, own: "Run", threat: WhiteBoxAdaptive, defended: Defended, run, tol) -> Check:
    """(b) on the configured attack: 2× its iterations and, on stochastic defenses, 2× its EOT samples."""
    more: dict[str, Run] = {}
    more_steps = scaled(attack, BUDGET_KEYS)
    if more_steps is not None:
        more["2x_budget"] = run(more_steps)
    if defended.stochastic:
        if attack.handles_eot:
            more_eot = scaled(attack, EOT_KEYS)
            if more_eot is not None:
                more["2x_eot"] = run(more_eot)
        elif attack.kind == "gradient":
            more["2x_eot"] = run(attack, threat.with_eot(2 * threat.eot_samples))
    if not more:
        return Check("b_configured_attack_converged", NA, f"not applicable: {attack.name} has no budget argument to double")
    return _convergence_check("b_configured_attack_converged", attack.name, own, more, tol, two_sided=False)


def _weakened_check(defended: Defended, purifier: nn.Module, no_defense: bool, base: "Run", run, atk: Attack, tol) -> Check:
    """(i) ``purifier.weakened()`` (its strength at 0: t* = 0 for a diffusion purifier) must score as the undefended
    victim under the same attack, and never above the full defense. A defense whose "robustness" survives its own
    removal gets it from elsewhere — a broken attack path, a masked gradient — not from the purification."""
    name = "i_weakened_defense_is_weaker"
    weaken = getattr(purifier, "weakened", None)
    if no_defense:
        return Check(name, NA, "not applicable: no defense")
    if weaken is None:
        return Check(name, NA, "not applicable: the purifier declares no weakened() variant (strength → 0)")
    weak = run(atk, model=Defended(weaken(), defended.victim, defended.input_shape))
    bare = run(atk, model=Defended(Identity(), defended.victim, defended.input_shape))
    t_bare, t_full = tol(weak, bare), tol(weak, base)
    falls = abs(weak.acc - bare.acc) <= t_bare
    weaker = weak.acc <= base.acc + t_full
    detail = f"weakened {weak.acc:.1f}% vs undefended {bare.acc:.1f}% (±{t_bare:.1f}) and full defense {base.acc:.1f}%"
    if not falls:
        detail += " → the weakened defense does not fall to the undefended accuracy"
    elif not weaker:
        detail += " → the weakened defense is more robust than the full one"
    return _check(name, falls and weaker, detail, {"weakened": weak.acc, "undefended": bare.acc, "full": base.acc, "tol": t_bare})


def _margin(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image logit margin (best other class − true class): never saturates as fp32 softmax CE does."""
    logits = model(x)
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(nn.functional.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return other - true


def _input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Gradient of the summed logit margin with respect to the input."""
    with torch.inference_mode(False), torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(_margin(model, xg, y).sum(), xg)
    return grad


def _gradient_checks(
    defended: Defended, threat: WhiteBoxAdaptive, x: torch.Tensor, y: torch.Tensor, seed: int,
    fd_step: float, fd_tol: float, collector: _WarningCollector,
) -> list[Check]:
    single = threat.with_eot(1)  # one draw per gradient: what EOT averages
    probe = pgd(1.0, 1)
    attacked = single.attacked_model(defended, probe)
    out: list[Check] = []
    grads = [_input_grad(attacked, x, y) for _ in range(4 if defended.stochastic else 1)]
    aa_checks.check_zero_gradients(grads[0], logger=collector)
    finite = all(bool(torch.isfinite(g).all()) for g in grads)
    nonzero = min(float((g.flatten(1).abs().sum(1) > 0).float().mean()) for g in grads)
    out.append(_check(
        "d_gradients_finite_nonzero", finite and nonzero >= 0.99,
        f"finite: {finite}; images with a non-zero gradient: {nonzero:.1%}", {"finite": finite, "nonzero_fraction": nonzero},
    ))

    # Exactness: where the gradient claims to be exact (no BPDA on the backward), it must match finite differences.
    if threat.gradient == "bpda" or (not defended.differentiable and threat.bpda):
        out.append(Check("d_gradient_matches_finite_differences", NA, "not applicable: BPDA's backward is an approximation by design"))
    else:
        # float64: a defense whose output barely moves with x (directional derivatives ~1e-5) would otherwise
        # fail on fp32 rounding alone; a rough function (shattered gradients) stays rough in float64.
        # Along a smooth surrogate the gradient is the surrogate's: it is checked against the surrogate's function.
        via_surrogate = threat.gradient == "surrogate"
        described = Defended(smooth_surrogate(defended.purifier), defended.victim, defended.input_shape) if via_surrogate else attacked
        exact = copy.deepcopy(described).double()
        # A majority vote (DensePure) is piecewise constant, and its declared gradient is that of the soft vote
        # (straight-through): finite differences check that gradient against the soft vote, through the very same
        # purifier passes, so a faked purifier gradient still fails here.
        voting = [m for m in exact.modules() if isinstance(m, Defended) and int(getattr(m.purifier, "votes", 1)) > 1]
        for m in voting:
            m.soft_vote = True
        frozen = FrozenRandomness(exact, seed).eval() if defended.stochastic else exact.eval()
        rel, values = _finite_difference(frozen, x.double(), y, fd_step, seed)
        values["against"] = ("soft vote (log mean softmax of the passes)" if voting else
                             "the smooth surrogate" if via_surrogate else "the defended classifier")
        hint = ""
        if rel > fd_tol and not via_surrogate and smooth_surrogate(defended.purifier) is not None:
            hint = "; the purifier offers a smooth surrogate: audit threat.model.gradient=surrogate"
        out.append(_check(
            "d_gradient_matches_finite_differences", rel <= fd_tol,
            f"median relative error of the directional derivative {rel:.3g} (≤ {fd_tol:g})"
            + (", against the soft vote whose gradient the straight-through vote returns" if voting else "")
            + (", against the smooth surrogate whose gradient the attack follows" if via_surrogate else "")
            + ("" if rel <= fd_tol else ": the gradient does not describe the function (shattered or faked gradients)" + hint),
            values,
        ))

    # Informativeness of one draw: per-draw cosine c → EOT samples k needed for the average to be within 60° of E[∇].
    if defended.stochastic:
        flat = [g.flatten(1) for g in grads]
        cos = [float(nn.functional.cosine_similarity(a, b, dim=1).nan_to_num(0.0).mean()) for i, a in enumerate(flat) for b in flat[i + 1 :]]
        c = sum(cos) / len(cos)
        needed = math.inf if c <= 0 else math.ceil((1 - c) / (3 * c))
        ok = needed <= threat.eot_samples
        out.append(_check(
            "d_eot_samples_suffice", ok,
            f"per-draw gradient cosine {c:.3f} → {needed} EOT samples needed, {threat.eot_samples} configured"
            + ("" if ok else ": the averaged gradient is mostly noise (raise threat.model.eot_samples)"),
            {"per_draw_cosine": c, "eot_needed": needed, "eot_samples": threat.eot_samples},
        ))
    else:
        out.append(Check("d_eot_samples_suffice", NA, "not applicable: deterministic defense"))
    return out


def _finite_difference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, h: float, seed: int) -> tuple[float, dict[str, Any]]:
    """Median over images of |(m(x+hd) − m(x−hd))/2h − ∇m·d| / max(|both|) for a random unit direction d per image."""
    gen = torch.Generator(device="cpu").manual_seed(seed + 17)
    d = torch.randn(x.shape, generator=gen).to(x.device, x.dtype)
    d = d / d.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))
    analytic = (_input_grad(model, x, y) * d).flatten(1).sum(1)
    with torch.no_grad():
        fd = (_margin(model, x + h * d, y) - _margin(model, x - h * d, y)) / (2 * h)
    scale = torch.maximum(fd.abs(), analytic.abs()).clamp_min(1e-6)
    rel = ((fd - analytic).abs() / scale).median().item()
    return rel, {"median_relative_error": rel, "fd_step": h, "median_abs_directional_derivative": fd.abs().median().item()}


def _surrogate_fidelity_check(
    defended: Defended, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, seed: int, confidence: float,
) -> Check:
    """(j) The surrogate's labels equal the purifier's, draw for draw, on the clean and the attack's images: its
    disagreement rate must be consistent with 0 (the rule-of-three bound on 2n images). A surrogate that computes
    some other function hands the attack a gradient of that function — a planted masking path."""
    surrogate = Defended(smooth_surrogate(defended.purifier), defended.victim, defended.input_shape).eval()
    images = torch.cat([x, x_adv])
    with torch.no_grad(), torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(seed + 303)
        real = defended(images).argmax(1)
        torch.manual_seed(seed + 303)
        smooth = surrogate(images).argmax(1)
    n = len(images)
    rate = 100.0 * float((real != smooth).float().mean())
    bound = zero_rate_bound(n, confidence)
    return _check(
        "j_surrogate_matches_defense", rate <= bound,
        f"the smooth surrogate's label differs from the purifier's on {rate:.1f}% of {n} clean and adversarial images "
        f"(must be ≤ {bound:.1f}%)" + ("" if rate <= bound else ": its gradient belongs to another function"),
        {"disagreement": rate, "bound": bound, "n": n, "labels_true": float((real == torch.cat([y, y])).float().mean())},
    )


def _determinism_check(defended: Defended, x: torch.Tensor, seed: int) -> Check:
    """Purify the same batch twice under different seeds; a purifier declared deterministic must agree with itself."""
    with torch.no_grad(), torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(seed + 101)
        first = defended.purifier(x)
        torch.manual_seed(seed + 202)
        second = defended.purifier(x)
    differ = float((first - second).abs().max())
    if defended.stochastic:
        return Check(
            "g_declared_randomness_holds", PASS,
            "declared stochastic (EOT and N-draw scoring apply)" + ("" if differ > 0 else "; it gave identical outputs twice: harmless, only slower"),
            {"max_difference": differ},
        )
    return _check(
        "g_declared_randomness_holds", differ <= 1e-6,
        "declared deterministic and gives the same output twice" if differ <= 1e-6
        else f"declared deterministic (stochastic=False) but two purifications differ by up to {differ:.3g}: "
        "EOT and N-draw scoring are switched off for a randomised defense",
        {"max_difference": differ},
    )


#: pyautoattack warnings that a declaration explains, keyed by a phrase of the message.
AUTOATTACK_EXCEPTIONS = {
    "randomized defense": "the defense declares stochastic=True: EOT attacks and N-draw scoring are in force",
}


def _autoattack_check(messages: list[str], stochastic: bool) -> Check:
    unexplained, explained = [], []
    for msg in messages:
        reason = next((r for phrase, r in AUTOATTACK_EXCEPTIONS.items() if phrase in msg), None)
        if reason is not None and stochastic:
            explained.append(f"{msg} — {reason}")
        else:
            unexplained.append(msg)
    return _check(
        "h_autoattack_checks", not unexplained,
        "no unexplained pyautoattack warning" if not unexplained else f"{len(unexplained)} pyautoattack warning(s): {unexplained}",
        {"explained": explained, "unexplained": unexplained},
    )


class _BPDAEverywhere(WhiteBoxAdaptive):
    """Identity backward through the whole purifier, whatever it declares."""

    def __init__(self, base: WhiteBoxAdaptive) -> None:
        super().__init__(base.eot_samples, bpda=True)

    def attacked_model(self, defended: Defended, attack: Attack) -> nn.Module:
        model: nn.Module = Defended(BPDA(defended.purifier), defended.victim, defended.input_shape)
        if defended.stochastic and self.eot_samples > 1:
            model = EOT(model, self.eot_samples, reduction=attack.eot)
        return model.eval()


class _Frozen(WhiteBoxAdaptive):
    def __init__(self, base: WhiteBoxAdaptive, seed: int) -> None:
        super().__init__(1, base.bpda, base.both_paths, base.gradient)
        self.seed = seed

    def attacked_model(self, defended: Defended, attack: Attack) -> nn.Module:
        return FrozenRandomness(super().attacked_model(defended, attack), self.seed).eval()


def format_report(report: dict[str, Any]) -> str:
    lines = [f"Gradient-masking audit: {'PASS' if report['passed'] else 'FAIL'}"]
    for c in report["checks"]:
        status = c.get("status") or ("pass" if c["passed"] else "fail")
        lines.append(f"  [{status.upper()}] {c['name']}: {c['detail']}")
        if c["values"]:
            lines.append(f"         {c['values']}")
    for w in report["autoattack_warnings"]:
        lines.append(f"  autoattack check: {w}")
    return "\n".join(lines)
