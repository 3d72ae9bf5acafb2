"""Reconstruction error as an attack detector (DiffDefense §4.4, Fig. 4): ``evaluate.py detection=true``.

Clean test images are the negatives and their adversarial versions the positives; each image's score
is ``purifier.reconstruct(x).mse_mean`` — the final reconstruction MSE averaged over the R restarts (the
authors' detection score), computed with the *same* purifier settings (L, R, T*) for both, so both get
the same iteration count. A higher score means "more likely attacked"; the ROC curve and its AUC follow
(``sklearn.metrics``). The adversarial examples are crafted under the configured threat model (the
paper's protocol is ``threat=oblivious``: crafted on the bare victim).

Also reported: ``auc_successful``, the AUC with only the *successful* adversarial examples as positives
(those the undefended victim misclassifies) — an unsuccessful attack that barely moved the image is hard
to detect and arguably need not be.

Each batch runs under its own seed (``evaluation.loop.batch_seed``); the clean and the adversarial batch
are reconstructed from the same seed (same initial latents and step noise), so their scores differ only
by the input. Finished batches are appended to a JSON-lines cache, so an interrupted run resumes.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from attacks.base import Attack
from defenses.base import Defended
from evaluation.adv_cache import AdvCache, craft
from evaluation.loop import ATTACK_SEED_OFFSET, as_batches, batch_seed, constraint_violations
from evaluation.results import append_jsonl, read_jsonl, write_json_atomic
from evaluation.threats import ThreatModel


def roc_auc(scores_clean: Any, scores_adv: Any) -> dict[str, Any]:
    """ROC of "score > threshold ⇒ attacked": clean = negatives (0), adversarial = positives (1).

    Returns ``{"auc", "fpr", "tpr"}`` (lists); ``auc`` is ``None`` when either class is empty.
    Ties count one half (identical score distributions give 0.5).
    """
    neg = np.asarray(scores_clean, dtype=np.float64).ravel()
    pos = np.asarray(scores_adv, dtype=np.float64).ravel()
    if neg.size == 0 or pos.size == 0:
        return {"auc": None, "fpr": [], "tpr": []}
    if not (np.isfinite(neg).all() and np.isfinite(pos).all()):
        raise ValueError("detection scores contain NaN or Inf")
    labels = np.concatenate([np.zeros(neg.size), np.ones(pos.size)])
    scores = np.concatenate([neg, pos])
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return {"auc": float(roc_auc_score(labels, scores)), "fpr": fpr.tolist(), "tpr": tpr.tolist()}


def reconstruction_scores(purifier: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-image detection score ``purifier.reconstruct(x).mse_mean`` as a float CPU tensor (N,)."""
    reconstruct = getattr(purifier, "reconstruct", None)
    if not callable(reconstruct):
        raise ValueError(no_reconstruct_message(purifier))
    mse = reconstruct(x).mse_mean
    return mse.detach().float().cpu().view(-1)


def no_reconstruct_message(purifier: Any) -> str:
    return (
        f"detection needs a reconstruction defense whose purifier has reconstruct(x) -> .mse_mean; "
        f"{type(purifier).__name__} has none: use defense=diffdefense (or defense_gan)"
    )


def run_detection(
    defended: Defended,
    datamodule: Any,
    attack: Attack,
    threat: ThreatModel,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    max_batches: int | None = None,
    cache_file: str | Path | None = None,
    progress: bool = False,
    out_dir: str | Path | None = None,
    extra: dict[str, Any] | None = None,
    adv_cache_dir: str | Path | None = None,
    clean_cache_file: str | Path | None = None,
) -> dict[str, Any]:
    """Score clean and attacked test images by reconstruction error; ROC/AUC of that detector.

    Args:
        defended: ``Defended(purifier, victim)``; the purifier must have ``reconstruct(x)``.
        datamodule: a LightningDataModule (its test/eval split), a DataLoader, or an iterable of (x, y).
        attack / threat: the attack and the model it is crafted on (``threat.attacked_model``).
        cache_file: JSON-lines file of finished batches (resume); ``None`` = no cache.
        out_dir: where ``detection.json`` and ``roc.png`` are written (``None`` = nothing written).
        extra: fields merged into the result (run labels, config …).
        adv_cache_dir: adversarial batches shared with other runs (``evaluation.adv_cache``); used only
            when ``threat.defense_independent``.
        clean_cache_file: JSON-lines file of per-batch clean scores, shared by runs that differ only in
            attack / threat (the caller keys it so): the clean half of the detector is computed once.

    Returns:
        ``{"auc", "auc_successful", "n_clean", "n_adv", "n_successful", "fpr", "tpr", "scores_clean",
        "scores_adv", "fooled", "mean_score_clean", "mean_score_adv", "violations", "seconds",
        "t_star", "iterations", "restarts", …extra}``.
    """
    purifier = defended.purifier
    if not callable(getattr(purifier, "reconstruct", None)):
        raise ValueError(no_reconstruct_message(purifier))  # before any attack is crafted
    device = torch.device(device)
    defended = defended.to(device).eval()
    attacked = threat.attacked_model(defended, attack)
    if isinstance(attacked, torch.nn.Module):
        attacked = attacked.to(device)
    done = {int(r["index"]): r for r in read_jsonl(cache_file)} if cache_file else {}
    adv_cache = AdvCache(adv_cache_dir) if adv_cache_dir and threat.defense_independent else None
    clean_done = {int(r["index"]): r["scores"] for r in read_jsonl(clean_cache_file)} if clean_cache_file else {}

    records: list[dict[str, Any]] = []
    for index, (x, y) in enumerate(as_batches(datamodule)):
        if max_batches is not None and index >= max_batches:
            break
        if index in done:
            records.append(done[index])
            continue
        start = time.perf_counter()
        x, y = x.to(device), y.to(device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(batch_seed(seed, index) + ATTACK_SEED_OFFSET)  # as evaluation.loop: shared examples
            x_adv = craft(attack, attacked, x, y, index, adv_cache)
            with torch.no_grad():
                fooled = defended.victim(x_adv).argmax(-1) != y
                cached = clean_done.get(index)
                if cached is not None and len(cached) == x.shape[0]:
                    s_clean = torch.tensor(cached)
                else:
                    torch.manual_seed(batch_seed(seed, index) + 1)
                    s_clean = reconstruction_scores(purifier, x)
                    if clean_cache_file:
                        append_jsonl(clean_cache_file, {"index": index, "scores": s_clean.tolist()})
                torch.manual_seed(batch_seed(seed, index) + 1)  # same latents and noise as the clean batch
                s_adv = reconstruction_scores(purifier, x_adv)
        record = {
            "index": index,
            "clean": s_clean.tolist(),
            "adv": s_adv.tolist(),
            "fooled": fooled.cpu().tolist(),
            "violations": int(constraint_violations(x, x_adv, attack).sum()),
            "seconds": time.perf_counter() - start,
        }
        records.append(record)
        if cache_file:
            append_jsonl(cache_file, record)
        if progress:
            running = roc_auc([s for r in records for s in r["clean"]], [s for r in records for s in r["adv"]])
            print(f"{attack.name}: batch {index + 1}, {sum(len(r['clean']) for r in records)} images, AUC {running['auc']:.4f}")

    clean = [s for r in records for s in r["clean"]]
    adv = [s for r in records for s in r["adv"]]
    fooled_all = [bool(f) for r in records for f in r["fooled"]]
    successful = [s for s, f in zip(adv, fooled_all) if f]
    roc = roc_auc(clean, adv)
    result: dict[str, Any] = {
        **(extra or {}),
        "auc": roc["auc"],
        "auc_successful": roc_auc(clean, successful)["auc"],
        "n_clean": len(clean),
        "n_adv": len(adv),
        "n_successful": len(successful),
        "mean_score_clean": float(np.mean(clean)) if clean else None,
        "mean_score_adv": float(np.mean(adv)) if adv else None,
        "violations": sum(int(r["violations"]) for r in records),
        "seconds": sum(float(r["seconds"]) for r in records),
        "t_star": getattr(purifier, "t_star", None),
        "iterations": getattr(purifier, "iterations", None),
        "restarts": getattr(purifier, "restarts", None),
        "fpr": roc["fpr"],
        "tpr": roc["tpr"],
        "scores_clean": clean,
        "scores_adv": adv,
        "fooled": fooled_all,
    }
    if out_dir is not None:
        write_outputs(result, Path(out_dir))
    auc = "–" if result["auc"] is None else f"{result['auc']:.4f}"
    print(f"detection AUC {auc} ({attack.name}, T*={result['t_star']}, {len(clean)} clean vs {len(adv)} attacked)")
    return result


def write_outputs(result: dict[str, Any], out_dir: Path) -> None:
    """``detection.json`` and ``roc.png`` in ``out_dir``, both written atomically."""
    from evaluation.plots import plot_roc, plt, save_figure_atomic

    write_json_atomic(out_dir / "detection.json", result)
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    auc = "–" if result["auc"] is None else f"{result['auc']:.3f}"
    plot_roc(ax, result["fpr"], result["tpr"], f"{result.get('attack', 'attack')} T*={result.get('t_star')} (AUC {auc})")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"{result.get('dataset', '')} reconstruction-error detector")
    save_figure_atomic(fig, out_dir / "roc.png")
