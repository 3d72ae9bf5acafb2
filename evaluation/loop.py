"""The metric loop: attack each batch under a threat model, score the defended model, resume on rerun.

Soundness rules built in here (so no experiment can forget them):
- stochastic defenses are scored over ``n_draws`` purifications of every final example, reporting
  the mean accuracy and the worst case (correct on *all* draws); one forward pass overstates them;
- every adversarial example is checked to be finite, in [0, 1] and inside the ε-ball;
- each batch runs under its own seed derived from (seed, batch index), and its record is appended
  to a JSON-lines cache, so an interrupted evaluation resumed later gives the same numbers;
- the clean predictions of a batch do not depend on the attack or the threat model, so they can be kept
  in a second cache shared by every attack of one (dataset, victim, defense, seed) — for a slow purifier
  (DiffDefense: T*·L U-Net passes per restart) this halves the cost of every table row after the first.
  The attack and the scoring reseed on their own, so a cached clean pass changes no number.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable

import torch
from lightning import LightningDataModule
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn
from torch.utils.data import DataLoader

from attacks.base import Attack
from attacks.selection import pick_worst
from defenses.base import Defended, Identity
from evaluation.adv_cache import AdvCache, craft
from evaluation.results import append_jsonl, read_jsonl
from evaluation.threats import ThreatModel, WhiteBoxAdaptive

BatchSource = LightningDataModule | DataLoader | Iterable[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class BatchRecord:
    """Counts for one batch; sums of these give every reported metric."""

    index: int
    n: int
    clean_correct: float | None  # sum over images of the fraction of draws classified correctly (None: not scored)
    clean_correct_worst: int | None  # images correct on every draw
    robust_correct: float
    robust_correct_worst: int
    clean_correct_majority: int | None  # images whose majority vote is right (denominator of the success rate)
    attack_success: int | None  # of those, images whose adversarial majority vote is wrong
    violations: int  # adversarial examples outside [0,1], non-finite or outside the ε-ball
    max_perturbation: float
    seconds: float


def as_batches(data: BatchSource) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(data, LightningDataModule):
        data.setup("test")
        return data.test_dataloader()
    return data


def perturbation_norm(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-image norm of a perturbation (N, …) → (N,)."""
    flat = delta.flatten(1)
    if norm == "Linf":
        return flat.abs().amax(1)
    if norm == "L2":
        return flat.norm(p=2, dim=1)
    if norm == "L1":
        return flat.norm(p=1, dim=1)
    return flat.norm(p=2, dim=1)


def wasserstein_lower_bound(x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
    """Per-image lower bound on the normalised transport cost (cost / Σx, the unit of FWA's ε) of *any* plan
    taking ``x`` to ``x_adv``: ½‖x_adv − x‖₁ / Σx.

    Every pixel's surplus or deficit must be carried by mass that leaves or enters it, so a plan moves at least
    ½‖δ‖₁ of mass, each unit at least one pixel (cost ≥ 1). A final clamp to [0, 1] only shrinks |δ| (x ≤ 1), so
    the bound still holds for a clamped transported image. It is only a lower bound: an image can pass it and
    still be outside the ball (mass moved far), which is why the check is reported as necessary-only."""
    return 0.5 * (x_adv - x).flatten(1).abs().sum(1) / x.flatten(1).sum(1).clamp_min(1e-12)


def perturbation_size(x: torch.Tensor, x_adv: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-image size of the perturbation in the attack's own norm (``wasserstein``: :func:`wasserstein_lower_bound`)."""
    if norm == "wasserstein":
        return wasserstein_lower_bound(x, x_adv)
    return perturbation_norm(x_adv - x, norm)


def constraint_violations(x: torch.Tensor, x_adv: torch.Tensor, attack: Attack | None, tol: float = 1e-5) -> torch.Tensor:
    """Boolean mask of adversarial examples that break the threat model.

    ``wasserstein`` balls cannot be checked exactly from pixels without solving a transport problem per image;
    the check is the two *necessary* conditions — no channel gains mass (transport moves mass, a clamp only removes
    it) and :func:`wasserstein_lower_bound` ≤ ε — so a flagged image is certainly outside the ball, an unflagged
    one is not certified inside (``evaluation.runner.check_threat_model`` writes that into results.json)."""
    bad = ~torch.isfinite(x_adv).flatten(1).all(1)
    bad |= (x_adv.flatten(1).amin(1) < -tol) | (x_adv.flatten(1).amax(1) > 1 + tol)
    if attack is not None and attack.bounded:
        bad |= perturbation_size(x, x_adv, attack.norm) > attack.eps * (1 + 1e-4) + tol
        if attack.norm == "wasserstein":
            mass, mass_adv = x.flatten(2).sum(2), x_adv.flatten(2).sum(2)
            bad |= ((mass_adv - mass) > 1e-4 * mass.clamp_min(1.0)).any(1)
    return bad


@torch.no_grad()
def predict_draws(model: nn.Module, x: torch.Tensor, draws: int) -> torch.Tensor:
    """Predicted labels of ``draws`` independent forward passes, shape (draws, N), one batched call."""
    logits = model(x.repeat(draws, *([1] * (x.dim() - 1))))
    return logits.argmax(-1).view(draws, x.shape[0])


#: The attack of batch i runs under batch_seed(seed, i) + this, in the metric loop and in detection alike,
#: so both craft the same examples and may share them (``evaluation.adv_cache``).
ATTACK_SEED_OFFSET = 2
#: Seed offset of the draws that choose between several gradient paths' candidates (``craft_worst``).
SELECT_SEED_OFFSET = 3


def batch_seed(seed: int, index: int) -> int:
    return (int(seed) * 1_000_003 + int(index) * 7919) % (2**63 - 1)


def craft_worst(
    attack: Attack,
    attacked: nn.Module | list[nn.Module],
    defended: Defended,
    x: torch.Tensor,
    y: torch.Tensor,
    index: int,
    draws: int,
    seed: int = 0,
    adv_cache: AdvCache | None = None,
) -> torch.Tensor:
    """The attack against each attacked model (one, or several gradient paths), each image's worst candidate kept.

    Every path starts from the same seed, so its random starts do not depend on whether the clean pass ran
    or came from a cache; several candidates are compared over ``draws`` purifications of ``defended``
    under a seed of their own (not the scoring draws, which would bias the choice towards them).
    """
    models = attacked if isinstance(attacked, (list, tuple)) else [attacked]
    candidates = []
    for model in models:
        torch.manual_seed(batch_seed(seed, index) + ATTACK_SEED_OFFSET)
        candidates.append(craft(attack, model, x, y, index, adv_cache if len(models) == 1 else None))
    if len(candidates) == 1:
        return candidates[0]
    torch.manual_seed(batch_seed(seed, index) + SELECT_SEED_OFFSET)
    return pick_worst(defended, candidates, y, draws)


def evaluate_batch(
    defended: Defended,
    attacked: nn.Module | list[nn.Module] | None,
    attack: Attack | None,
    x: torch.Tensor,
    y: torch.Tensor,
    index: int,
    n_draws: int,
    seed: int = 0,
    clean: torch.Tensor | None = None,
    adv_cache: AdvCache | None = None,
    score_clean: bool = True,
) -> tuple[BatchRecord, torch.Tensor, torch.Tensor | None]:
    """Attack and score one batch. ``clean``: this batch's cached clean correctness (draws, N), if any;
    ``adv_cache``: where this batch's adversarial examples may already be (defense-independent threats);
    ``score_clean=False``: do not purify the clean batch (robust accuracy only; clean metrics are None).

    Returns the record, the adversarial batch and the clean correctness (for the clean cache; None if not scored).
    """
    start = time.perf_counter()
    draws = n_draws if defended.stochastic else 1

    def clean_pass() -> torch.Tensor:
        torch.manual_seed(batch_seed(seed, index))
        return predict_draws(defended, x, draws) == y

    if clean is None and score_clean:
        clean = clean_pass()
    x_adv = x if attack is None else craft_worst(attack, attacked, defended, x, y, index, draws, seed, adv_cache)
    bad = constraint_violations(x, x_adv, attack)
    # Reseed: APGD/FAB/Square reset the global generator to a fixed seed on every call, which would
    # otherwise give every batch the same purification draws when scoring.
    if torch.equal(x_adv, x):
        # Nothing changed (attack "none"): robust = clean, never a second purification of the same input.
        clean = clean_pass() if clean is None else clean  # not scored yet: the same draws as a clean pass
        robust = clean
    else:
        torch.manual_seed(batch_seed(seed, index) + 1)
        robust = predict_draws(defended, x_adv, draws) == y
    robust_majority = robust.float().mean(0) > 0.5
    clean_majority = None if clean is None else clean.float().mean(0) > 0.5
    record = BatchRecord(
        index=index,
        n=int(x.shape[0]),
        clean_correct=None if clean is None else clean.float().mean(0).sum().item(),
        clean_correct_worst=None if clean is None else int(clean.all(0).sum()),
        robust_correct=robust.float().mean(0).sum().item(),
        robust_correct_worst=int(robust.all(0).sum()),
        clean_correct_majority=None if clean_majority is None else int(clean_majority.sum()),
        attack_success=None if clean_majority is None else int((clean_majority & ~robust_majority).sum()),
        violations=int(bad.sum()),
        max_perturbation=float(perturbation_size(x, x_adv, attack.norm if attack else "Linf").max()),
        seconds=time.perf_counter() - start,
    )
    return record, x_adv, clean


def summarise(records: list[BatchRecord]) -> dict[str, Any]:
    """Percentages over all records; the clean metrics are None if any batch was scored without them."""
    n = sum(r.n for r in records)
    seconds = sum(r.seconds for r in records)
    pct = lambda v: 100.0 * v / n if n else float("nan")  # noqa: E731
    clean_scored = all(r.clean_correct is not None for r in records)
    majority = sum(r.clean_correct_majority for r in records) if clean_scored else 0
    return {
        "n_images": n,
        "clean_acc": pct(sum(r.clean_correct for r in records)) if clean_scored else None,
        "clean_acc_worst": pct(sum(r.clean_correct_worst for r in records)) if clean_scored else None,
        "robust_acc": pct(sum(r.robust_correct for r in records)),
        "robust_acc_worst": pct(sum(r.robust_correct_worst for r in records)),
        "attack_success_rate": (100.0 * sum(r.attack_success for r in records) / majority if majority else float("nan"))
        if clean_scored
        else None,
        "violations": sum(r.violations for r in records),
        "max_perturbation": max((r.max_perturbation for r in records), default=0.0),
        "seconds": seconds,
        "images_per_s": n / seconds if seconds > 0 else float("nan"),
        "n_batches": len(records),
    }


def evaluate(
    defended: nn.Module,
    data: BatchSource,
    attack: Attack | None = None,
    threat: ThreatModel | None = None,
    n_draws: int = 10,
    seed: int = 0,
    device: str | torch.device = "cpu",
    cache_file: str | Path | None = None,
    max_batches: int | None = None,
    progress: bool = True,
    grid_path: str | Path | None = None,
    clean_cache_file: str | Path | None = None,
    adv_cache_dir: str | Path | None = None,
    score_clean: bool = True,
    first_batch: int = 0,
) -> dict[str, Any]:
    """Clean and robust accuracy of ``defended`` under ``attack`` — callable from a notebook.

    Args:
        defended: a ``Defended`` model, or any classifier (wrapped as ``Defended(Identity(), model)``).
        data: a LightningDataModule (its test split), a DataLoader, or an iterable of (x, y).
        attack: ``attacks.base.Attack``; ``None`` measures clean accuracy only.
        threat: which model the attack sees (default ``WhiteBoxAdaptive()``).
        n_draws: purifications per final example for stochastic defenses.
        cache_file: JSON-lines file of finished batches; batches found there are skipped, so a
            rerun after an interruption resumes (and gives identical numbers).
        max_batches: stop after this many batches (quick looks; the cache keeps them).
        grid_path: save a PNG of clean / adversarial / purified images of the first batch.
        clean_cache_file: JSON-lines file of per-batch clean correctness (draws × N), shared by runs
            that differ only in attack / threat model (the caller keys it so); ``None`` = no sharing.
        adv_cache_dir: folder of adversarial batches shared by runs that differ only in the defense
            (the caller keys it so); used only when ``threat.defense_independent``.
        score_clean: ``False`` skips purifying the clean images (clean metrics None, unless cached) — for
            tables that report robust accuracy only, where a slow purifier's clean pass would double the cost.
        first_batch: index of ``data``'s first batch in the whole evaluation set: a shard of it
            (``datamodules.base.Shard``) keeps its batches' indices, hence their seeds, cache records and numbers.

    Returns:
        A dict of metrics (percentages) — see ``summarise`` — plus ``batch_records``, the per-batch counts they sum
        (``BatchRecord`` as dicts, by batch index), from which shards of one evaluation merge exactly.
    """
    if not isinstance(defended, Defended):
        defended = Defended(Identity(), defended)
    device = torch.device(device)
    defended = defended.to(device).eval()
    threat = threat or WhiteBoxAdaptive()
    attacked = None
    if attack is not None:
        paths = getattr(threat, "attacked_models", None)  # a duck-typed threat may offer only attacked_model
        attacked = [m.to(device) for m in (paths(defended, attack) if paths else [threat.attacked_model(defended, attack)])]
    done = {r["index"]: BatchRecord(**{f.name: r[f.name] for f in fields(BatchRecord)}) for r in read_jsonl(cache_file)} if cache_file else {}
    adv_cache = AdvCache(adv_cache_dir) if adv_cache_dir and attack is not None and threat.defense_independent else None
    draws = n_draws if defended.stochastic else 1
    clean_done = {r["index"]: r["correct"] for r in read_jsonl(clean_cache_file) if r.get("draws") == draws} if clean_cache_file else {}

    batches = as_batches(data)
    total = len(batches) if hasattr(batches, "__len__") else None
    if max_batches is not None and total is not None:
        total = min(total, max_batches)
    records: list[BatchRecord] = []
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    label = attack.name if attack is not None else "clean"
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task(label, total=total)
        for index, (x, y) in enumerate(batches, start=first_batch):
            if max_batches is not None and index - first_batch >= max_batches:
                break
            if index in done:
                records.append(done[index])
            else:
                x, y = x.to(device), y.to(device)
                cached = clean_done.get(index)
                if cached is not None and len(cached[0]) != x.shape[0]:
                    cached = None  # a different batch layout: recompute
                clean_in = None if cached is None else torch.tensor(cached, dtype=torch.bool, device=device)
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    record, x_adv, clean = evaluate_batch(
                        defended, attacked, attack, x, y, index, n_draws, seed, clean_in, adv_cache, score_clean
                    )
                    if grid_path is not None and index == first_batch:
                        save_grid(defended, x, x_adv, grid_path)
                if clean_cache_file and cached is None and clean is not None:
                    append_jsonl(clean_cache_file, {"index": index, "draws": draws, "correct": clean.cpu().tolist()})
                records.append(record)
                if cache_file:
                    append_jsonl(cache_file, asdict(record))
            running = summarise(records)
            clean_text = "–" if running["clean_acc"] is None else f"{running['clean_acc']:.1f}%"
            bar.update(task, advance=1, description=f"{label}: clean {clean_text} robust {running['robust_acc']:.1f}%")
    return {**summarise(records), "n_draws": n_draws if defended.stochastic else 1, "batch_records": [asdict(r) for r in records]}


@torch.no_grad()
def save_grid(defended: Defended, x: torch.Tensor, x_adv: torch.Tensor, path: str | Path, n: int = 8) -> Path:
    """Rows: clean, adversarial, purified adversarial (one draw)."""
    from torchvision.utils import save_image

    n = min(n, x.shape[0])
    purified = defended.purifier(x_adv[:n]).clamp(0, 1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(torch.cat([x[:n], x_adv[:n], purified]).float().cpu(), path, nrow=n, padding=2)
    return path
