"""From a resolved Hydra config to result files: build the pieces, run the loop or the audit, write."""
from __future__ import annotations

import copy
import functools
import hashlib
import importlib.metadata
import json
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from attacks.base import Attack
from datamodules.base import Shard, parse_shard
from defenses.base import Defended
from evaluation.audit import format_report, run_audit
from evaluation.loop import evaluate
from evaluation.multirun import in_multirun
from evaluation.cost import CostClock
from evaluation.results import device_name, git_commit, write_csv_atomic, write_json_atomic
from evaluation.speedups import SPEED_FLAGS, SpeedUps, ignored_note

#: Config keys that do not change the numbers, left out of the resume-cache key.
_NOT_IN_CACHE_KEY = ("paths", "hydra", "logger", "task_name", "audit", "audit_settings", "paper", "paper_quoted", "table", "device", "detection",
                     "certify", "certify_settings")

#: The project root whose packages the source hash covers (the checkout this module was imported from).
SOURCE_ROOT = Path(__file__).resolve().parent.parent
#: Packages whose code determines the numbers: a change to any .py file under them invalidates every cache.
SOURCE_PACKAGES = ("datamodules", "models", "defenses", "attacks", "evaluation")
#: Left out of the source hash: they only read, format or print results (or guard the command line), so
#: editing a table layout must not throw away hours of cached attacks.
PRESENTATION_MODULES = ("evaluation/tables.py", "evaluation/report.py", "evaluation/plots.py", "evaluation/bench.py", "evaluation/cli.py",
                        "evaluation/multirun.py", "evaluation/wandb_sweep.py", "evaluation/cost.py")
#: Installed distributions whose releases change attacks or numerics (torchattacks/AutoAttack defects, kernels).
VERSIONED_PACKAGES = ("torch", "torchattacks", "pyautoattack")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_defended(cfg: DictConfig) -> Defended:
    victim = instantiate(cfg.victim)
    purifier = instantiate(cfg.defense.purifier)
    return Defended(purifier, victim, input_shape=tuple(cfg.dataset.image_shape))


def source_hash(root: str | Path = SOURCE_ROOT) -> str:
    """Hash of the number-determining source files under ``root`` (see ``SOURCE_PACKAGES``), so a bug fix in
    an attack or a defense invalidates the cached batches that the old code produced."""
    return _source_hash(Path(root).resolve())


@functools.cache
def _source_hash(root: Path) -> str:
    # Once per process and root: the files do not change under a running evaluation, and a sweep keys many runs.
    digest = hashlib.sha256()
    files = sorted(
        (path.relative_to(root).as_posix(), path)
        for package in SOURCE_PACKAGES
        for path in (root / package).rglob("*.py")
        if path.relative_to(root).as_posix() not in PRESENTATION_MODULES
    )
    for relative, path in files:
        # Path and content digest, NUL-separated: renaming a file or moving code between files changes the hash.
        digest.update(relative.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def package_version(distribution: str) -> str | None:
    """Installed version of ``distribution`` (``None`` when absent: an optional backend is then part of the key too)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def library_versions() -> dict[str, str | None]:
    return {name: package_version(name) for name in VERSIONED_PACKAGES}


def device_key(device: torch.device | str) -> str:
    """``cpu`` or ``cuda (<GPU name>)``: kernels differ between device kinds and GPU models, so cached batches
    from one are not the numbers of another; CPU thread counts are left out (the same run on a busier host)."""
    device = torch.device(device)
    return f"cuda ({device_name(device)})" if device.type == "cuda" else device.type


def provenance(device: torch.device | str, source_root: str | Path = SOURCE_ROOT) -> dict[str, Any]:
    """What besides the config and weights determines the numbers: code, library versions, device.
    The resume-cache key hashes exactly this, and results.json records it."""
    return {"source_hash": source_hash(source_root), "versions": library_versions(), "device": device_key(device)}


def cache_key(
    cfg: DictConfig,
    ignore: tuple[str, ...] = (),
    device: torch.device | str | None = None,
    source_root: str | Path = SOURCE_ROOT,
) -> str:
    """Hash of everything that determines the numbers: the resolved config, every weights file the config loads
    (victim, surrogate, denoiser, GAN …), the project's source, the library versions and the device, so
    retraining a model, fixing an attack or moving to a GPU invalidates the cached batches.
    ``ignore``: further top-level keys left out (``("attack", "threat")`` keys the clean-prediction cache);
    ``device``: where the run computes (default: ``cfg.device`` resolved, as ``run_evaluation`` does)."""
    device = resolve_device(cfg.device) if device is None else device
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain = {k: v for k, v in plain.items() if k not in _NOT_IN_CACHE_KEY + tuple(ignore)}
    if isinstance(plain.get("dataset"), dict):
        # Tuned values (dataset.tuned.*) count only where a defense reads them, already resolved into its own keys:
        # re-tuning DiffDefense's T* must not invalidate the undefended model's cached batches.
        plain["dataset"] = {k: v for k, v in plain["dataset"].items() if k != "tuned"}
    if "eval" in plain:
        # score_clean only when off, so the keys of every run that scores clean images stay as they were; the speed-up
        # flags (they change the arithmetic) only when on, for the same reason.
        plain["eval"] = {k: v for k, v in plain["eval"].items()
                         if k == "n_draws" or (k == "score_clean" and v is False) or (k in SPEED_FLAGS and v not in (None, False))}
    keyed = {"config": plain, "provenance": provenance(device, source_root)}
    digest = hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode())
    for path in sorted(set(_weights_files(plain))):
        digest.update(hashlib.sha256(Path(path).read_bytes()).digest())
    return digest.hexdigest()[:16]


def _weights_files(node: Any) -> list[str]:
    """Every weights file a config loads: ``weights`` keys, and the weights inside a pretrained model's
    ``directory`` (a local diffusers folder), so replacing either invalidates the cached batches."""
    if isinstance(node, dict):
        found = [v for k, v in node.items() if k == "weights" and isinstance(v, str) and Path(v).is_file()]
        for k, v in node.items():
            if k == "directory" and isinstance(v, str) and Path(v).is_dir():
                found += sorted(str(p) for p in Path(v).rglob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".json"))
        return found + [f for v in node.values() for f in _weights_files(v)]
    if isinstance(node, list):
        return [f for v in node for f in _weights_files(v)]
    return []


def run_label(cfg: DictConfig) -> dict[str, Any]:
    return {
        "dataset": cfg.dataset.name,
        "victim": cfg.victim.name,
        "victim_training": cfg.victim_training,
        "defense": cfg.defense.name,
        "attack": cfg.attack.name,
        "threat": cfg.threat.name,
        "norm": cfg.attack.norm,
        "eps": cfg.attack.eps,
    }


def run_metadata(cfg: DictConfig, device: torch.device) -> dict[str, Any]:
    """What every result file carries besides its metrics: labels, paper number, provenance, config."""
    return {
        **run_label(cfg),
        "table": OmegaConf.to_container(cfg.table, resolve=True),
        "paper": _paper_number(cfg),
        "device": device_name(device),
        "git_commit": git_commit(Path(__file__).parent),
        "provenance": provenance(device),
        "seed": cfg.seed,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def shard_setting(cfg: DictConfig) -> tuple[int, int] | None:
    """``dataset.shard`` as ``(i, n)`` (``None``: unsharded); one-line ``ValueError`` for a bad string or a mode that
    cannot be sharded. The audit, detection and certification each run on the whole set; ``eval.max_batches`` would
    shard a truncated run whose shards no longer add up to it (pick the images with ``dataset.eval_subset``)."""
    shard = parse_shard(cfg.dataset.get("shard"))
    if shard is None:
        return None
    for mode in ("audit", "detection", "certify"):
        if cfg.get(mode):
            raise ValueError(f"dataset.shard shards the attack evaluation only; {mode}=true runs on the whole evaluation set")
    if cfg.eval.get("max_batches") is not None:
        raise ValueError("dataset.shard with eval.max_batches: choose the images with dataset.eval_subset and shard those "
                         "(shards of a truncated run do not add up to it)")
    return shard


def unsharded_key(cfg: DictConfig, device: torch.device) -> str:
    """``cache_key`` of ``cfg`` with ``dataset.shard`` unset: the same for every shard of one evaluation (and for the
    unsharded run) on the same code, library versions, device kind and weights, so ``make tables`` merges exactly
    the shards that belong together and refuses shards computed by different code or weights."""
    whole = copy.deepcopy(cfg)
    OmegaConf.update(whole, "dataset.shard", None, merge=False)
    return cache_key(whole, device=device)


def finished_result(cfg: DictConfig, out_dir: Path, device: torch.device) -> dict[str, Any] | None:
    """The run folder's results.json when it is this very run's — in a multirun with ``eval.skip_done`` — else None.

    "This very run" = the same resolved config, every key (so adding ``eval.time_purifier=true`` redoes the job), and
    the same ``run_key`` (code, library versions, device kind, weights files: ``cache_key``). A rerun of a sweep with
    its ``hydra.sweep.dir`` thus skips the finished jobs and runs the failed or missing ones; skipping is said in one
    line. Single runs get a fresh folder each time and are never skipped; the audit, detection and certification
    write other files and rerun from their own caches.
    """
    if not cfg.eval.get("skip_done", True) or not in_multirun() or any(cfg.get(m) for m in ("audit", "detection", "certify")):
        return None
    path = out_dir / "results.json"
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    current = json.loads(json.dumps(OmegaConf.to_container(cfg, resolve=True), default=str))
    if not isinstance(stored, dict) or stored.get("config") != current or stored.get("run_key") != cache_key(cfg, device=device):
        return None
    print(f"skipped: {path} already holds this job's results (identical config, code and weights; eval.skip_done=false redoes it)",
          flush=True)
    return stored


def run_evaluation(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate one table cell and write results.json / results.csv / grid.png into the run folder.

    ``dataset.shard=i/n``: only the i-th of n shards of whole evaluation batches, each under the unsharded run's batch
    index and seed (``datamodules.base.Shard``); results.json records the shard and the per-batch counts, from which
    ``evaluation.tables`` merges the n shards into the unsharded numbers.

    Every result file records ``cost`` (``evaluation.cost.cost_record``): device, wall time of this job from here
    to the file, CPU-minutes or GPU-hours; ``make tables`` sums it per table."""
    clock = CostClock()
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    out_dir = Path(cfg.paths.output_dir)
    shard_index = shard_setting(cfg)
    done = finished_result(cfg, out_dir, device)
    if done is not None:
        return done
    datamodule = instantiate(cfg.dataset.datamodule)
    defended = build_defended(cfg).to(device)
    attack = instantiate(cfg.attack)
    threat = instantiate(cfg.threat.model)
    # eval.amp / channels_last / compile (evaluation/speedups.py): the attack evaluation only; the other modes run fp32.
    speedups = SpeedUps.from_config(cfg.eval, attack)
    for mode in ("audit", "certify", "detection"):
        if cfg.get(mode) and ignored_note(speedups, mode):
            print(f"NOTE: {ignored_note(speedups, mode)}", flush=True)
    if cfg.audit:
        return run_audit_from_config(cfg, defended, datamodule, attack, threat, device, out_dir, clock=clock)
    # --- certify=true: randomized-smoothing certification (evaluation/certify.py) instead of an attack ---------
    if cfg.get("certify"):
        return record_cost(run_certification_from_config(cfg, defended, datamodule, device, out_dir), clock, device,
                           out_dir / "certify.json")
    # --- end certify -----------------------------------------------------------------------------------------
    # Adversarial batches of defense-independent threats (oblivious, transfer), shared across defenses.
    adv_cache_dir = Path(cfg.eval.cache_dir) / "adv" / f"{cfg.dataset.name}-{cache_key(cfg, ignore=('defense', 'eval'), device=device)}{speedups.cache_suffix}" if cfg.eval.resume else None
    if cfg.get("detection"):
        from evaluation.detection import run_detection

        extra = run_metadata(cfg, device)
        key = f"{cfg.dataset.name}-{cache_key(cfg, device=device)}-detection.jsonl"
        clean_key = f"{cfg.dataset.name}-{cache_key(cfg, ignore=('attack', 'threat'), device=device)}-detection-clean.jsonl"
        return record_cost(run_detection(
            defended, datamodule, attack, threat, seed=cfg.seed, device=device, max_batches=cfg.eval.max_batches,
            cache_file=Path(cfg.eval.cache_dir) / key if cfg.eval.resume else None, progress=cfg.eval.progress,
            out_dir=out_dir, extra=extra, adv_cache_dir=adv_cache_dir,
            clean_cache_file=Path(cfg.eval.cache_dir) / clean_key if cfg.eval.resume else None,
        ), clock, device, out_dir / "detection.json")

    cache_file = Path(cfg.eval.cache_dir) / f"{cfg.dataset.name}-{cache_key(cfg, device=device)}.jsonl" if cfg.eval.resume else None
    clean_key = cache_key(cfg, ignore=("attack", "threat"), device=device)
    clean_cache_file = Path(cfg.eval.cache_dir) / f"{cfg.dataset.name}-{clean_key}-clean.jsonl" if cfg.eval.resume else None
    data, shard = datamodule, None
    if shard_index is not None:
        data, shard = datamodule.test_shard_dataloader(*shard_index)
        print(f"shard {shard.index}/{shard.count}: batches {shard.first_batch}–{shard.stop_batch - 1} of {shard.n_batches} "
              f"(images {shard.first_image}–{shard.stop_image - 1} of {shard.n_images})", flush=True)
    metrics = evaluate(
        speedups.apply(defended),
        data,
        attack,
        threat,
        n_draws=cfg.eval.n_draws,
        seed=cfg.seed,
        device=device,
        cache_file=cache_file,
        max_batches=cfg.eval.max_batches,
        progress=cfg.eval.progress,
        grid_path=out_dir / "grid.png" if cfg.eval.grid else None,
        clean_cache_file=clean_cache_file,
        adv_cache_dir=adv_cache_dir,
        score_clean=cfg.eval.get("score_clean", True),
        first_batch=0 if shard is None else shard.first_batch,
    )
    # Before any result file: a number measured outside the threat model is not a robust accuracy. The batch
    # records keep their violation counts, so a resumed rerun reads them back and stops here again.
    check_threat_model(attack, metrics)
    result = {
        **run_metadata(cfg, device),
        **metrics,
        "purifier": purifier_settings(defended.purifier),
        "cache_file": str(cache_file) if cache_file else None,
        "run_key": cache_key(cfg, device=device),
        "shard": None if shard is None else shard_record(shard, unsharded_key(cfg, device)),
        "speedups": speedups.as_dict(),
    }
    if cfg.eval.get("image_quality"):
        result.update(purified_image_quality(defended.purifier, datamodule, device, cfg.seed))
    if cfg.eval.get("response_curve"):
        result.update(purifier_response(defended, datamodule, attack, threat, device, cfg.seed, out_dir / "response.png", run_label(cfg)))
    if cfg.eval.get("time_purifier"):
        result.update(time_purifier(defended.purifier, datamodule, device, cfg.eval.time_purifier_bs1_images, cfg.seed))
        result["paper_purify_s_per_image"] = _paper_number(cfg, "s_per_image")
    result["cost"] = clock.cost(device)  # last, so the wall time covers every extra measurement above
    write_json_atomic(out_dir / "results.json", result)
    write_csv_atomic(out_dir / "results.csv", [csv_row(result)])
    log_summary(cfg, result)
    return result


def record_cost(result: dict[str, Any], clock: CostClock, device: torch.device, path: Path) -> dict[str, Any]:
    """``result["cost"]`` = the job's cost up to now, and ``path`` (the result file the mode already wrote: certify.json,
    detection.json) rewritten with it, atomically."""
    result["cost"] = clock.cost(device)
    if path.exists():
        write_json_atomic(path, result)
    return result


def shard_record(shard: Shard, cell: str) -> dict[str, Any]:
    """results.json's ``shard``: which part of which whole (``cell``: ``unsharded_key``) this run scored."""
    return {**shard.as_dict(), "cell": cell}


def csv_row(result: dict[str, Any]) -> dict[str, Any]:
    """The flat CSV row of a result: nested blocks left to results.json, a shard as ``i/n``."""
    row = {k: v for k, v in result.items() if k not in ("config", "table", "paper", "provenance", "purifier", "batch_records", "shard", "speedups", "cost")}
    cost = result.get("cost") or {}
    row.update({f"cost_{k}": cost.get(k) for k in ("device_kind", "wall_s", "cpu_minutes", "gpu_hours")} if cost else {})
    if result.get("shard"):
        row["shard"] = f"{result['shard']['index']}/{result['shard']['count']}"
    return row


#: Purifier attributes resolved at construction (t* matched from another schedule, votes …) that results record.
PURIFIER_SETTINGS = ("t_star", "sampler", "reverse_steps", "votes", "variant", "scale", "phi", "gradient", "sigma")


def purifier_settings(purifier: torch.nn.Module) -> dict[str, Any]:
    """The purifier's resolved settings (config values may be null and resolved at construction, e.g. the t* that
    matches the authors' 470/4000 cosine), plus its class and flags, for results.json and the plots."""
    found = {k: getattr(purifier, k) for k in PURIFIER_SETTINGS if isinstance(getattr(purifier, k, None), (int, float, str))}
    return {"class": type(purifier).__name__, "stochastic": bool(getattr(purifier, "stochastic", False)),
            "differentiable": bool(getattr(purifier, "differentiable", True)), **found}


def check_threat_model(attack: Attack, metrics: dict[str, Any]) -> None:
    """Raise one line when some adversarial example left the threat model (ε-ball, [0, 1], finite): a robust
    accuracy measured on such examples is not comparable to any paper's, so it must never reach a table.

    The one exception is an attack that *declares* it leaves the [0, 1] box (``attack.outside_threat_model``: a
    paper-protocol preset such as ``fgsm_unclipped``, the DiffDefense authors' unclipped FGSM). Its violations are
    recorded instead of refused, loudly: ``metrics`` (hence results.json and results.csv) gains
    ``outside_threat_model: True`` and a one-line ``threat_model_note``, and a warning is printed. An ε-ball
    violation of such an attack still raises: the declaration covers the box only.

    A ``wasserstein`` attack (FWA) is checked by necessary conditions only (``evaluation.loop.constraint_violations``):
    when none fails, ``metrics`` gains ``threat_model_check: "necessary"`` and a ``threat_model_note`` saying so, so a
    table never reads it as a certified ball membership; membership rests on the attack's own feasible plan."""
    violations = int(metrics.get("violations") or 0)
    # as evaluation.loop.perturbation_size (the wasserstein size is the transport-cost lower bound)
    norm = attack.norm if attack.norm in ("Linf", "L2", "L1", "wasserstein") else "L2"
    if norm == "wasserstein" and violations <= 0 and not getattr(attack, "outside_threat_model", False):
        metrics["threat_model_check"] = "necessary"
        metrics["threat_model_note"] = (
            f"Wasserstein ball (ε = {attack.eps:g} of the image mass) checked by necessary conditions only: no channel "
            f"gained mass and the transport-cost lower bound ½‖δ‖₁/Σx ≤ ε (max {metrics.get('max_perturbation', float('nan')):.4g}); "
            "membership itself rests on the attack's feasible transport plan (attacks/fwa.py, tests/test_fwa.py)"
        )
        print(f"NOTE: {metrics['threat_model_note']}", flush=True)
        return
    max_perturbation = float(metrics.get("max_perturbation", float("nan")))
    if getattr(attack, "outside_threat_model", False):
        # Same tolerance as evaluation.loop.constraint_violations.
        if attack.bounded and not max_perturbation <= attack.eps * (1 + 1e-4) + 1e-5:
            raise RuntimeError(
                f"attack {attack.name!r} (declared outside the threat model for the [0, 1] box only) broke its ε-ball: max {norm} "
                f"perturbation {max_perturbation:.4g} vs ε = {attack.eps:g}; no results.json written"
            )
        note = (
            f"OUTSIDE THE THREAT MODEL: attack {attack.name!r} declares outside_threat_model; {violations} of "
            f"{metrics.get('n_images')} adversarial examples leave [0, 1] — not a robust accuracy under any threat model"
        )
        metrics["outside_threat_model"] = True
        metrics["threat_model_note"] = note
        import warnings

        warnings.warn(note, UserWarning, stacklevel=2)
        print(f"WARNING: {note}", flush=True)
        return
    if violations <= 0:
        return
    bound = f"ε = {attack.eps:g}" if attack.bounded else "no ε-ball (unbounded attack: outside [0, 1] or non-finite)"
    raise RuntimeError(
        f"attack {attack.name!r} broke the threat model on {violations} of {metrics.get('n_images')} adversarial examples "
        f"(max {norm} perturbation {metrics.get('max_perturbation', float('nan')):.4g} vs {bound}); no results.json written"
    )


def _paper_number(cfg: DictConfig, column: str | None = None) -> float | None:
    paper = cfg.get("paper")
    if not paper:
        return None
    row = paper.get(str(cfg.table.row))
    return None if row is None else row.get(str(cfg.table.column) if column is None else column)


@torch.no_grad()
def time_purifier(purifier: torch.nn.Module, datamodule, device: torch.device, bs1_images: int, seed: int = 0) -> dict:
    """Seconds per image of the purifier alone on the first eval batch: batched, and one image at a time.

    Clean images (the time does not depend on the content); one untimed warm-up call on one image first.
    """
    datamodule.setup("test")
    x, _ = next(iter(datamodule.test_dataloader()))
    x = x.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(seed)
    purifier.eval()(x[:1])  # warm-up (lazy device moves, kernel selection), not timed
    sync()
    start = time.perf_counter()
    purifier(x)
    sync()
    batched = (time.perf_counter() - start) / x.shape[0]
    n = min(int(bs1_images), x.shape[0])
    start = time.perf_counter()
    for i in range(n):
        purifier(x[i : i + 1])
    sync()
    return {
        "purify_s_per_image_batched": batched,
        "purify_s_per_image_bs1": (time.perf_counter() - start) / n if n else None,
        "purify_batch_size": int(x.shape[0]),
        "purify_bs1_images": n,
    }


@torch.no_grad()
def purified_image_quality(purifier: torch.nn.Module, datamodule, device: torch.device, seed: int = 0) -> dict:
    """SSIM and PSNR (torchmetrics, data range 1) between the clean images of the first eval batch and their
    purification: how much a purifier changes what it is meant to keep (distribution transfer §4.3)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    datamodule.setup("test")
    x, _ = next(iter(datamodule.test_dataloader()))
    x = x.to(device)
    torch.manual_seed(seed)
    x_hat = purifier.eval()(x).clamp(0, 1)
    ssim = structural_similarity_index_measure(x_hat, x, data_range=1.0, reduction="none")
    psnr = peak_signal_noise_ratio(x_hat, x, data_range=1.0, reduction="none", dim=(1, 2, 3))
    return {"purified_ssim": float(ssim.mean()), "purified_psnr": float(psnr.clamp(max=100.0).mean()), "quality_images": int(x.shape[0])}


def purifier_response(defended: Defended, datamodule, attack: Attack, threat, device: torch.device, seed: int, png: Path,
                      label: dict[str, Any]) -> dict:
    """``eval.response_curve``: the purifier's intensity response on the first eval batch, with the configured attack's
    adversarial examples (crafted as the threat model says) for the whitened-pixel fraction (evaluation/response.py)."""
    from evaluation.response import response_diagnostic

    datamodule.setup("test")
    x, y = next(iter(datamodule.test_dataloader()))
    x, y = x.to(device), y.to(device)
    x_adv = None
    if attack.name != "none":
        torch.manual_seed(seed)
        x_adv = attack(threat.attacked_model(defended, attack).to(device), x, y).detach()
    title = f"{label.get('defense')} ({label.get('dataset')}; {attack.name})"
    return response_diagnostic(defended.purifier, x, x_adv, seed=seed, out_png=png, label=title)


# --- certify=true (evaluation/certify.py) ---------------------------------------------------------------------
def run_certification_from_config(cfg: DictConfig, defended: Defended, datamodule, device: torch.device, out_dir: Path) -> dict[str, Any]:
    """``certify.json`` + ``certify.png`` for ``cfg.certify_settings``; resumes per image from the eval cache.

    The cache file is keyed by the config (attack, threat and eval left out: certification uses none of them) and,
    separately, by the settings that change the samples — σ, n0, n, α, batch size — but not n_images or the radius
    grid, so certifying more images or reading other radii reuses every finished image.
    """
    from evaluation.certify import run_certification

    s = cfg.certify_settings
    cache_file = None
    if cfg.eval.resume:
        sampled = {k: OmegaConf.to_container(s, resolve=True)[k] for k in ("sigma", "n0", "n", "alpha", "batch_size")}
        settings = hashlib.sha256(json.dumps(sampled, sort_keys=True).encode()).hexdigest()[:8]
        key = cache_key(cfg, ignore=("attack", "threat", "eval"), device=device)
        cache_file = Path(cfg.eval.cache_dir) / f"{cfg.dataset.name}-{key}-certify-{settings}.jsonl"
    return run_certification(
        defended, datamodule, sigma=s.sigma, n0=s.n0, n=s.n, alpha=s.alpha, batch_size=s.batch_size,
        n_images=s.n_images, radius_grid=list(s.radius_grid), seed=cfg.seed, device=device, out_dir=out_dir,
        extra={**run_metadata(cfg, device), "cache_file": str(cache_file) if cache_file else None},
        num_classes=cfg.dataset.num_classes, cache_file=cache_file, progress=cfg.eval.progress,
    )
# --- end certify -----------------------------------------------------------------------------------------------


def run_audit_from_config(cfg, defended, datamodule, attack, threat, device, out_dir: Path, clock: CostClock | None = None) -> dict[str, Any]:
    """The audit on ``audit_settings.n_images`` images → audit.json (with ``cost``: ``clock`` from the start of the job,
    or from here when None)."""
    from evaluation.threats import WhiteBoxAdaptive

    clock = clock or CostClock()

    datamodule.setup("test")
    s = cfg.audit_settings
    xs, ys = [], []
    for x, y in datamodule.test_dataloader():
        xs.append(x), ys.append(y)
        if sum(len(b) for b in xs) >= s.n_images:
            break
    x, y = torch.cat(xs)[: s.n_images].to(device), torch.cat(ys)[: s.n_images].to(device)
    norm = attack.norm if attack.norm in ("Linf", "L2") else "Linf"
    # The audit's own PGD probes need an ε of their norm: an L1 or Wasserstein radius is not an L∞ one.
    eps = attack.eps if attack.bounded and attack.norm == norm else float(cfg.dataset.eps.linf)
    surrogate = getattr(threat, "surrogate", None)
    report = run_audit(
        defended, x, y, eps=eps, norm=norm, steps=s.steps, eot_samples=s.eot_samples, n_draws=cfg.eval.n_draws,
        surrogate=surrogate, threat=WhiteBoxAdaptive(s.eot_samples, bpda=s.bpda, gradient=s.gradient),
        attack=attack if attack.bounded else None, square_queries=s.square_queries, confidence=s.confidence, seed=cfg.seed,
    )
    report.update(run_label(cfg))
    report["cost"] = clock.cost(device)
    write_json_atomic(out_dir / "audit.json", report)
    print(format_report(report))
    return report


def log_summary(cfg: DictConfig, result: dict[str, Any]) -> None:
    """Write the run's metrics as a W&B summary when the wandb logger is configured (offline by default)."""
    wandb_cfg = cfg.logger.get("wandb") if cfg.get("logger") else None
    if not wandb_cfg:
        return
    import wandb

    run = wandb.init(
        project=wandb_cfg.project,
        name=f"{result['defense']}-{result['attack']}-{result['threat']}",
        dir=str(wandb_cfg.save_dir),
        mode=wandb_cfg.get("mode", "offline"),
        config=result["config"],
        reinit="finish_previous",
    )
    run.summary.update({k: v for k, v in result.items() if isinstance(v, (int, float, str)) or v is None})
    run.finish()
