"""``make bench``: speed figures of the evaluation stack, each as a ratio to a reference measured in the same run.

A benchmark that prints, never a timed test. Why ratios: a shared 2-core CPU runs two or three times slower when
another job is busy, so an images/s figure alone says little; the same workload measured side by side against a
straightforward reference (fp32, eager, one image at a time the way the papers' loops run, torchattacks' sequential
EOTPGD, the un-checkpointed chain) keeps its ratio when the machine is noisy. Every timing is the best of
``repeats`` interleaved runs (figure, reference, figure, reference …) after an untimed warm-up.

Output: the device line, one JSON object per figure (``name, value, unit, reference, reference_label, ratio,
ratio_meaning, target, device, n, settings``) and a Markdown summary. Weights are random (speed does not depend on
them); models are built from the real configs (``conf/defense/*.yaml`` composed with Hydra, ``build_defended``) with
small denoisers so that a CPU can run them. ``--quick``: tiny sizes, PGD-5, no per-defense memory rows — a smoke test
(< 1 min); default: ≤ ~10 min on 2 cores (measured: 10.5 min on one thread of the loaded machine); unchanged on a
CUDA machine (8× the batches, the 35.7 M-parameter DDPM U-Net, bf16 peak, a 100-step chain at batch 64, compile).
``--only a,b`` runs some figure groups or defense cases; ``--compile`` measures ``eval.compile`` on a CPU too.

Figures (issue 15 item 1):
- per defense family: defended inference images/s, batched vs one image at a time; adaptive PGD-k images/s and its
  cost ratio to (PGD-k on the bare victim + k purifier forward/backward passes), target ≤ 1.5, with the number of
  purifier and denoiser calls (no recomputation: k purifier calls; a checkpointed chain recomputes each step once in
  the backward pass, by design); peak memory of one adaptive gradient step vs the bare victim's;
- DiffDefense s/image at (L, R) = (5, 5), T* = 15 (Table 3's setting), batched vs batch 1;
- each denoiser's achieved FLOP/s (``torch.utils.flop_counter``) as a fraction of the device's measured peak
  (CPU: a large fp32 matmul; CUDA: a large bf16 matmul, the denoiser under bf16 autocast);
- batched EOT-PGD (``attacks.eot_pgd.BatchedEOTPGD``) vs torchattacks' sequential ``EOTPGD``;
- exact gradients through a reverse chain of K steps: peak memory with and without activation checkpointing and
  its growth with K (sub-linear with checkpointing);
- the ``eval.amp`` / ``eval.channels_last`` / ``eval.compile`` flags (``evaluation.speedups``) vs fp32 eager.

Peak memory: CUDA ``max_memory_allocated`` above the allocation at the start; CPU the resident-set high-water mark
(``VmHWM``, reset through ``/proc/self/clear_refs`` after ``malloc_trim``) above the resident set at the start, or,
where the kernel refuses the reset, a 1 ms sampler of ``VmRSS`` (the figure's settings say which).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import functools
import gc
import json
import math
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
MIB = 2**20


# --------------------------------------------------------------------------------------------------------------------
# Figures and their output
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class Figure:
    """One measured figure with its reference (the same workload done the straightforward way, in the same run)."""

    name: str
    value: float | None
    unit: str
    reference: float | None
    reference_label: str
    ratio: float | None
    ratio_meaning: str
    device: str
    n: int
    settings: dict[str, Any] = field(default_factory=dict)
    target: str | None = None

    def to_json(self) -> str:
        return json.dumps({k: _plain(v) for k, v in asdict(self).items()}, sort_keys=False)


def _plain(value: Any) -> Any:
    """JSON-safe: NaN/inf → None, floats rounded to 6 significant digits, containers recursively."""
    if isinstance(value, float):
        return None if not math.isfinite(value) else float(f"{value:.6g}")
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


class Report:
    """Collects figures, printing each as one JSON line the moment it is measured (a long run shows progress)."""

    def __init__(self, device_label: str, stream=sys.stdout) -> None:
        self.device_label = device_label
        self.figures: list[Figure] = []
        self.stream = stream

    def add(self, name: str, value: float | None, unit: str, reference: float | None, reference_label: str,
            ratio_value: float | None, ratio_meaning: str, n: int, settings: dict[str, Any] | None = None,
            target: str | None = None) -> Figure:
        figure = Figure(name, value, unit, reference, reference_label, ratio_value, ratio_meaning, self.device_label, n,
                        settings or {}, target)
        self.figures.append(figure)
        print(figure.to_json(), file=self.stream, flush=True)
        return figure

    def markdown(self) -> str:
        """The summary table: one row per figure, ratios in the last columns (how to read them: README "Benchmark")."""
        lines = ["| figure | value | reference | ratio | n | target |", "|---|---|---|---|---|---|"]
        for f in self.figures:
            lines.append(f"| {f.name} | {_fmt(f.value, f.unit)} | {_fmt(f.reference, f.unit)} ({f.reference_label}) | "
                         f"{_fmt_ratio(f.ratio)} {f.ratio_meaning} | {f.n} | {f.target or ''} |")
        return "\n".join(lines)


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "–"
    if unit == "bytes":
        return f"{value / MIB:.1f} MiB"
    if unit == "FLOP/s":
        return f"{value / 1e9:.2f} GFLOP/s"
    return f"{value:.4g} {unit}"


def _fmt_ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.3g}×"


# --------------------------------------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call of ``fn`` (device work included)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def side_by_side(fn: Callable[[], Any], reference: Callable[[], Any], device: torch.device, repeats: int = 1,
                 warmup: bool | Callable[[], Any] = True, budget_s: float = 60.0) -> tuple[float, float]:
    """Best-of-``repeats`` seconds of ``fn`` and of ``reference``, runs interleaved so that a burst of load on a
    shared machine hits both; the minimum is the least noisy estimate of a run's cost. ``warmup``: ``True`` runs
    both once untimed, a callable runs that instead (a cheaper warm-up of the same kernels), ``False`` nothing.
    No further pair starts once ``budget_s`` seconds are spent (a heavy figure is measured once)."""
    if callable(warmup):
        warmup()
    elif warmup:
        fn()
        reference()
    times, ref_times = [], []
    start = time.perf_counter()
    for _ in range(max(1, repeats)):
        times.append(wall(fn, device))
        ref_times.append(wall(reference, device))
        if time.perf_counter() - start > budget_s:
            break
    return min(times), min(ref_times)


def best_time(fn: Callable[[], Any], device: torch.device, repeats: int = 1, warmup: bool = True) -> float:
    if warmup:
        fn()
    return min(wall(fn, device) for _ in range(max(1, repeats)))


def _proc_status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _trim_heap() -> None:
    """Return freed heap memory to the OS (glibc ``malloc_trim``), so that memory freed by an earlier figure and
    reused by the next one is counted again as it is touched."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    """Reset the kernel's resident-set high-water mark (``VmHWM``) to the current resident set (Linux ≥ 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory above the start of the ``with`` block: ``.bytes`` and ``.method`` after it.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors only). CPU: the resident set's high-water mark, which counts
    everything the process touches (allocator slack included) — the figure a CPU job's memory limit sees.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.bytes: int | None = None
        self.method = ""
        self._sampler: _RssSampler | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.method = "cuda max_memory_allocated"
            return self
        _trim_heap()
        self._base = (_proc_status_kib("VmRSS") or 0) * 1024
        if _reset_hwm():
            self.method = "cpu VmHWM (reset via clear_refs)"
        else:
            self._sampler = _RssSampler().start()
            self.method = "cpu VmRSS sampled every 1 ms"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._sampler is not None:
            self.bytes = max(0, self._sampler.stop() - self._base)
        else:
            self.bytes = max(0, (_proc_status_kib("VmHWM") or 0) * 1024 - self._base)


class _RssSampler:
    """Fallback peak of the resident set: a thread reading ``VmRSS`` every millisecond."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "_RssSampler":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, (_proc_status_kib("VmRSS") or 0) * 1024)
            time.sleep(0.001)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, (_proc_status_kib("VmRSS") or 0) * 1024)


def peak_memory(fn: Callable[[], Any], device: torch.device) -> tuple[int | None, str]:
    """(bytes above the start, method) of one call of ``fn``; ``(None, "out of memory …")`` when a GPU runs out (the
    un-checkpointed long chain may: that is what the figure shows)."""
    try:
        with PeakMemory(device) as peak:
            fn()
    except torch.cuda.OutOfMemoryError as err:
        gc.collect()
        torch.cuda.empty_cache()
        return None, f"out of memory: {str(err).splitlines()[0][:120]}"
    return peak.bytes, peak.method


# --------------------------------------------------------------------------------------------------------------------
# Models from the real configs
# --------------------------------------------------------------------------------------------------------------------
def compose_config(overrides: list[str]):
    """``conf/evaluate.yaml`` with ``overrides`` (nothing is read from disk but the configs)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="evaluate", overrides=list(overrides))


def without_weights(cfg) -> Any:
    """``cfg`` with every weights file of the victim and the defense unset: random weights, nothing to train."""
    from omegaconf import OmegaConf

    for key in ("victim.weights", "defense.purifier.weights"):
        if OmegaConf.select(cfg, key, default="__absent__") != "__absent__":
            OmegaConf.update(cfg, key, None, merge=False)
    return cfg


def build_from_config(overrides: list[str], device: torch.device, seed: int = 0):
    """(Defended, cfg) built by ``evaluation.runner.build_defended`` from the composed config, random weights."""
    from evaluation.runner import build_defended

    cfg = without_weights(compose_config(overrides))
    torch.manual_seed(seed)
    return build_defended(cfg).to(device).eval(), cfg


def batch(cfg, n: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random images of the config's dataset shape and random labels (speed does not depend on content)."""
    gen = torch.Generator().manual_seed(seed)
    shape = tuple(cfg.dataset.image_shape)
    x = torch.rand(n, *shape, generator=gen)
    y = torch.randint(0, int(cfg.dataset.num_classes), (n,), generator=gen)
    return x.to(device), y.to(device)


def denoiser_of(purifier: nn.Module) -> nn.Module | None:
    """The purifier's big network (U-Net, adapter, pre-processor), whose calls the PGD figure counts."""
    for name in ("denoiser", "adapter", "net"):
        module = getattr(purifier, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


@dataclass
class Case:
    """One defense family: its config overrides and batch sizes (inference, attack)."""

    name: str
    overrides: list[str]
    n_infer: int
    n_attack: int
    note: str = ""


def cases(quick: bool, cuda: bool) -> list[Case]:
    """The defense families of the bench, at sizes a CPU runs in minutes (``quick``: seconds)."""
    big = 8 if cuda else 1
    k = 2 if quick else 5  # reverse steps of the respaced diffusion chains
    k_guided = 1 if quick else 3  # the guided chain differentiates twice per step
    votes = 2
    mnist = ["dataset=fashion_mnist", "victim=classifier_a"]
    rgb32 = ["dataset=fashion_mnist_rgb32", "victim=classifier_a", "denoiser=ddpm_small" if not cuda else "denoiser=ddpm_cifar10"]
    n = lambda q, d: (q if quick else d) * big  # noqa: E731
    return [
        Case("none", mnist + ["defense=none"], n(16, 128), n(16, 64), "undefended (Identity purifier)"),
        Case("diffdefense", mnist + ["defense=diffdefense"], n(4, 16), n(2, 4), "T* = dataset.tuned (1 on Fashion-MNIST), L = 5, R = 5, exact gradient path"),
        Case("diffpure", rgb32 + ["defense=diffpure", f"defense.purifier.reverse_steps={k}"], n(4, 8), n(2, 2),
             f"t* = 100 respaced to {k} steps, checkpointed"),
        Case("densepure", rgb32 + ["defense=densepure", f"defense.purifier.reverse_steps={k}", f"defense.purifier.votes={votes}"],
             n(2, 4), n(1, 1), f"t* = 145 respaced to {k} steps, {votes} votes"),
        Case("disttrans", rgb32 + ["defense=disttrans", "defense.purifier.scale=1.0", f"defense.purifier.reverse_steps={k_guided}"],
             n(2, 4), n(1, 1), f"guided (s = 1, double backprop), t* = 58 respaced to {k_guided} steps"),
        Case("rap", mnist + ["defense=rap", "denoiser=rap_tiny"], n(16, 64), n(8, 16), "one-step adapter rap_tiny"),
        Case("jatp", mnist + ["defense=jatp"], n(4, 16), n(2, 4), "NRP generator, 3 RRDB"),
    ]


# --------------------------------------------------------------------------------------------------------------------
# Per-defense figures
# --------------------------------------------------------------------------------------------------------------------
def bench_inference(report: Report, case: Case, defended: nn.Module, x: torch.Tensor, device: torch.device, repeats: int) -> None:
    """Defended inference images/s: the whole batch in one call vs one image at a time (the papers' loops)."""

    @torch.no_grad()
    def batched() -> None:
        defended(x)

    @torch.no_grad()
    def one_by_one() -> None:
        for xi in x.split(1):
            defended(xi)

    t, t_ref = side_by_side(batched, one_by_one, device, repeats, warmup=torch.no_grad()(lambda: (defended(x), defended(x[:1]))))
    n = x.shape[0]
    report.add(f"{case.name}: defended inference", n / t, "images/s", n / t_ref, "one image at a time", t_ref / t,
               "speed-up", n, {"case": case.note, "batch": n})


class CallCounter:
    """Counts forward calls of a module (hook), to show what an attack recomputes."""

    def __init__(self, module: nn.Module | None) -> None:
        self.calls = 0
        self._handle = None if module is None else module.register_forward_hook(self._count)

    def _count(self, *_: Any) -> None:
        self.calls += 1

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()


def pgd_attack(cfg, steps: int):
    """The configured ``attack=pgd`` (LossPGD on CE, α = 2.5·ε/steps) with ``steps`` steps."""
    from attacks.base import Attack
    from attacks.pgd_dlr import LossPGD

    eps = float(cfg.dataset.eps.linf)
    return Attack(f"pgd-{steps}", functools.partial(LossPGD, eps=eps, alpha=None, steps=steps, random_start=True), "Linf", eps)


def purifier_passes(purifier: nn.Module, x: torch.Tensor, passes: int) -> None:
    """``passes`` forward/backward passes of the purifier alone (the backward of the output's sum): the cost the
    adaptive attack adds to an attack on the bare victim, if it recomputes nothing."""
    for _ in range(passes):
        xin = x.detach().clone().requires_grad_(True)
        out = purifier(xin)
        (grad,) = torch.autograd.grad(out.float().sum(), xin)


def bench_adaptive_pgd(report: Report, case: Case, defended: nn.Module, cfg, x: torch.Tensor, y: torch.Tensor,
                       device: torch.device, steps: int, repeats: int) -> None:
    """Adaptive PGD-k through the defense (the threat model's gradient path: exact, or BPDA where the purifier is not
    differentiable; one draw per step — EOT has its own figure) and its cost ratio to PGD-k on the bare victim plus k
    purifier forward/backward passes (× votes for DensePure), measured interleaved. Issue target: ≤ 1.5×. A PGD-2 probe
    (also the warm-up) counts the purifier and denoiser calls per step: what the attack recomputes."""
    from evaluation.threats import WhiteBoxAdaptive

    attack = pgd_attack(cfg, steps)
    attacked = WhiteBoxAdaptive(eot_samples=1, both_paths=False).attacked_model(defended, attack)
    votes = int(getattr(defended.purifier, "votes", 1))  # DensePure: every attack step purifies `votes` times
    calls = calls_per_step(defended, attacked, cfg, x, y)
    parts: dict[str, float] = {}

    def reference() -> None:
        parts["victim"] = wall(lambda: attack(defended.victim, x, y), device)
        parts["purifier"] = wall(lambda: purifier_passes(attacked.purifier, x, steps * votes), device)

    t_attack, t_ref = side_by_side(lambda: attack(attacked, x, y), reference, device, repeats,
                                   warmup=lambda: purifier_passes(attacked.purifier, x, 1))
    n = x.shape[0]
    settings = {"case": case.note, "steps": steps, "gradient": "exact" if defended.differentiable else "bpda", "votes": votes,
                "t_attack_s": t_attack, "t_victim_pgd_s": parts["victim"], "t_purifier_passes_s": parts["purifier"], **calls,
                "checkpoint": getattr(defended.purifier, "checkpoint", None),
                "also_bpda": bool(getattr(defended.purifier, "also_bpda", False))}
    report.add(f"{case.name}: adaptive PGD-{steps}", n / t_attack, "images/s", n / t_ref,
               f"PGD-{steps} on victim + {steps * votes} purifier fwd/bwd", t_attack / t_ref,
               "cost ratio (lower is better)", n, settings, target="≤ 1.5×")


def calls_per_step(defended: nn.Module, attacked: nn.Module, cfg, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Purifier and denoiser forward calls per PGD step (a PGD-2 run; its first call also warms the kernels up)."""
    purifier_calls, denoiser_calls = CallCounter(defended.purifier), CallCounter(denoiser_of(defended.purifier))
    try:
        pgd_attack(cfg, 2)(attacked, x, y)
    finally:
        purifier_calls.remove()
        denoiser_calls.remove()
    return {"purifier_calls_per_step": purifier_calls.calls / 2, "denoiser_calls_per_step": denoiser_calls.calls / 2}


def bench_gradient_memory(report: Report, case: Case, defended: nn.Module, cfg, x: torch.Tensor, y: torch.Tensor,
                          device: torch.device) -> None:
    """Peak memory of one adaptive gradient step (forward + backward through the attacked model) vs the bare victim's."""
    from evaluation.threats import WhiteBoxAdaptive

    attacked = WhiteBoxAdaptive(eot_samples=1, both_paths=False).attacked_model(defended, pgd_attack(cfg, 1))

    def step(model: nn.Module) -> Callable[[], None]:
        def run() -> None:
            xin = x.detach().clone().requires_grad_(True)
            loss = nn.functional.cross_entropy(model(xin), y)
            torch.autograd.grad(loss, xin)
        return run

    used, method = peak_memory(step(attacked), device)
    used_ref, _ = peak_memory(step(defended.victim), device)
    report.add(f"{case.name}: peak memory of one adaptive gradient step", used, "bytes", used_ref, "bare victim",
               ratio(used, used_ref), "memory ratio", x.shape[0], {"case": case.note, "method": method})


# --------------------------------------------------------------------------------------------------------------------
# Global figures
# --------------------------------------------------------------------------------------------------------------------
def bench_diffdefense_l5r5(report: Report, device: torch.device, quick: bool) -> None:
    """DiffDefense Table 3's figure: s/image of the purifier alone at (L, R) = (5, 5), T* = 15, batched vs batch 1
    (the paper: 0.28 s on a Titan Xp, one image at a time; issue target ≤ 0.028 s on one GPU)."""
    defended, cfg = build_from_config(["dataset=mnist", "victim=classifier_a", "defense=table3/diffdefense_l5r5"], device)
    purifier = defended.purifier
    n = (2 if quick else 16) * (8 if device.type == "cuda" else 1)
    n_bs1 = 1 if quick else 4
    x, _ = batch(cfg, n, device)

    @torch.no_grad()
    def batched() -> None:
        purifier(x)

    @torch.no_grad()
    def bs1() -> None:
        for xi in x[:n_bs1].split(1):
            purifier(xi)

    t, t_ref = side_by_side(batched, bs1, device, repeats=1, warmup=torch.no_grad()(lambda: purifier(x[:1])))
    per, per_ref = t / n, t_ref / n_bs1
    report.add("diffdefense (L, R) = (5, 5): purification", per, "s/image", per_ref, "batch 1", per_ref / per, "speed-up", n,
               {"t_star": purifier.t_star, "iterations": purifier.iterations, "restarts": purifier.restarts, "bs1_images": n_bs1},
               target="≤ 0.028 s/image on one GPU (paper 0.28 s, Titan Xp)")


def matmul_peak(device: torch.device, quick: bool) -> tuple[float, str]:
    """The device's measured peak FLOP/s and how: a large fp32 matmul on CPU, a large bf16 matmul on CUDA."""
    if device.type == "cuda":
        size, dtype, label = 8192, torch.bfloat16, "bf16 matmul 8192³"
    else:
        size, dtype, label = (1024 if quick else 2048), torch.float32, f"fp32 matmul {1024 if quick else 2048}³"
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    reps = 10 if device.type == "cuda" else 2
    t = best_time(lambda: a @ b, device, repeats=reps)
    return 2 * size**3 / t, label


def denoiser_flops(net: nn.Module, x: torch.Tensor, t: torch.Tensor) -> int:
    """FLOPs of one forward of ``net(x, t)`` counted by ``torch.utils.flop_counter`` (matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x, t)
    return int(counter.get_total_flops())


def bench_denoiser_flops(report: Report, device: torch.device, quick: bool) -> None:
    """Achieved FLOP/s of each denoiser (no-grad forward, batched) as a fraction of the device's measured peak."""
    peak, how = matmul_peak(device, quick)
    cuda = device.type == "cuda"
    specs = [("diffdefense_unet 1×28×28", ["dataset=mnist", "defense=diffdefense"], "defense.denoiser.net", 256 if cuda else 32),
             ("ddpm_small 3×32×32", ["dataset=fashion_mnist_rgb32", "denoiser=ddpm_small"], "denoiser.net", 256 if cuda else 16)]
    if not quick:
        specs.append(("ddpm_cifar10 (35.7 M) 3×32×32", ["dataset=fashion_mnist_rgb32", "denoiser=ddpm_cifar10"], "denoiser.net",
                      256 if cuda else 4))
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    for label, overrides, key, n in specs:
        cfg = compose_config(overrides)
        torch.manual_seed(0)
        net = instantiate(OmegaConf.select(cfg, key)).to(device).eval()
        x = torch.randn(n, *cfg.dataset.image_shape, device=device)
        t = torch.full((n,), 10, dtype=torch.long, device=device)
        flops = denoiser_flops(net, x, t)

        @torch.no_grad()
        def forward() -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext():
                net(x, t)

        seconds = best_time(forward, device, repeats=2 if quick else 3)
        report.add(f"denoiser FLOP/s: {label}", flops / seconds, "FLOP/s", peak, f"device peak ({how})", flops / seconds / peak,
                   "fraction of peak", n, {"flops_per_image": flops / n, "dtype": "bf16 autocast" if cuda else "fp32",
                                           "params": sum(p.numel() for p in net.parameters())},
                   target="≥ 0.40 of the bf16 roofline on an H100-class GPU" if cuda else None)
        del net


def bench_eot(report: Report, device: torch.device, quick: bool) -> None:
    """Batched EOT-PGD (all draws of all images in one pass) vs torchattacks' sequential EOTPGD (one pass per draw)."""
    import torchattacks

    from attacks.eot_pgd import BatchedEOTPGD
    from defenses.base import Defended
    from defenses.gaussian_noise import GaussianNoise
    from models.victims import build_victim
    from models.victims.mnist import ClassifierA

    torch.manual_seed(0)
    victim = build_victim(ClassifierA(), [0.5], [0.5]).to(device)
    noisy = Defended(GaussianNoise(0.1), victim).eval()
    n, samples, steps = (16, 10, 2) if quick else (64, 10, 5)
    n *= 8 if device.type == "cuda" else 1
    x, y = torch.rand(n, 1, 28, 28, device=device), torch.randint(0, 10, (n,), device=device)
    batched = BatchedEOTPGD(noisy, eps=0.3, alpha=0.01, steps=steps, eot_samples=samples)
    sequential = torchattacks.EOTPGD(noisy, eps=0.3, alpha=0.01, steps=steps, eot_iter=samples)
    t, t_ref = side_by_side(lambda: batched(x, y), lambda: sequential(x, y), device, repeats=2)
    report.add("EOT-PGD (classifier A + Gaussian noise)", n / t, "images/s", n / t_ref, "torchattacks.EOTPGD (sequential draws)",
               t_ref / t, "speed-up", n, {"eot_samples": samples, "steps": steps})


def bench_checkpoint_memory(report: Report, device: torch.device, quick: bool) -> None:
    """Exact gradient through a DiffPure chain of K reverse steps: peak memory with and without activation
    checkpointing (``models.diffusion.schedule.sample_loop(checkpoint=True)``). Without, memory grows linearly with K
    (every step's U-Net activations are kept); with, it holds one step's activations plus one latent per step."""
    cuda = device.type == "cuda"
    steps_grid = (2, 4, 8) if quick else (5, 10, 20)
    n = (1 if quick else 4) * (16 if cuda else 1)
    denoiser = "denoiser=ddpm_cifar10" if cuda else "denoiser=ddpm_small"
    defended, cfg = build_from_config(["dataset=fashion_mnist_rgb32", "victim=classifier_a", "defense=diffpure", denoiser], device)
    purifier = defended.purifier
    x, _ = batch(cfg, n, device)
    memory: dict[tuple[int, bool], int | None] = {}
    purifier.t_star = steps_grid[0]
    purifier_passes(purifier, x, 1)  # warm-up: the kernels and allocator caches of this shape
    for k in steps_grid:
        purifier.t_star = k
        seconds = {}
        for checkpoint in (True, False):
            purifier.checkpoint = checkpoint
            run = lambda: purifier_passes(purifier, x, 1)  # noqa: E731
            memory[(k, checkpoint)], method = peak_memory(run, device)
            seconds[checkpoint] = None if memory[(k, checkpoint)] is None else best_time(run, device, repeats=1, warmup=False)
        report.add(f"exact gradient through {k} reverse steps: peak memory, checkpointed", memory[(k, True)], "bytes",
                   memory[(k, False)], "no checkpointing", ratio(memory[(k, True)], memory[(k, False)]), "memory ratio", n,
                   {"steps": k, "denoiser": denoiser.split("=")[1], "method": method,
                    "time_ratio_checkpointed": ratio(seconds[True], seconds[False])})
    lo, hi = steps_grid[0], steps_grid[-1]
    growth = ratio(memory[(hi, True)], memory[(lo, True)])
    growth_ref = ratio(memory[(hi, False)], memory[(lo, False)])
    report.add(f"memory growth {lo} → {hi} reverse steps, checkpointed", growth, "×", growth_ref, "no checkpointing",
               ratio(growth, growth_ref), "growth ratio", n, {"steps_ratio": hi / lo, "sublinear": growth is not None and growth < hi / lo},
               target=f"sub-linear: < {hi / lo:g}×")
    if cuda:
        _long_chain_memory(report, purifier, cfg, device, steps=100, n=64)


def _long_chain_memory(report: Report, purifier: nn.Module, cfg, device: torch.device, steps: int, n: int) -> None:
    """Issue target: exact gradients through a 100-step chain at batch 64 within one 80 GB GPU (checkpointed only:
    the un-checkpointed chain would not fit, which is the point)."""
    purifier.t_star, purifier.checkpoint = steps, True
    x, _ = batch(cfg, n, device)
    used, method = peak_memory(lambda: purifier_passes(purifier, x, 1), device)
    seconds = None if used is None else best_time(lambda: purifier_passes(purifier, x, 1), device, repeats=1, warmup=False)
    report.add(f"exact gradient through {steps} reverse steps, checkpointed, batch {n}", used, "bytes", 80 * 2**30,
               "80 GiB budget", ratio(used, 80 * 2**30), "fraction of budget", n, {"method": method, "seconds": seconds},
               target="fits one 80 GB GPU")


# --------------------------------------------------------------------------------------------------------------------
# The eval.* speed-up flags
# --------------------------------------------------------------------------------------------------------------------
def flag_variants(device: torch.device) -> list[tuple[str, Any]]:
    """(label, SpeedUps) of each flag benchmarked against fp32 eager (fp16 only where a GPU has fast fp16)."""
    from evaluation.speedups import SpeedUps

    variants = [("eval.amp=bf16", SpeedUps(amp="bf16")), ("eval.channels_last=true", SpeedUps(channels_last=True))]
    if device.type == "cuda":
        variants.insert(1, ("eval.amp=fp16", SpeedUps(amp="fp16")))
    return variants


def bench_flags(report: Report, device: torch.device, quick: bool, steps: int, compile_victim: bool) -> None:
    """Each flag vs the same fp32 eager model in the same run, on: DiffPure defended inference (denoiser-bound),
    adaptive PGD through RAP (victim and adapter, forward and backward) and, by default, ResNet-18 inference (a
    convolution-bound CIFAR-sized victim). ``eval.compile`` compiles the victim only: its workload is ResNet-18
    inference, its compilation timed apart; on a CPU it is measured only with ``--compile`` (minutes per shape)."""
    from evaluation.speedups import SpeedUps

    cuda = device.type == "cuda"
    k = 2 if quick else 10
    big = 8 if cuda else 1
    diffpure, cfg_d = build_from_config(["dataset=fashion_mnist_rgb32", "victim=classifier_a",
                                         "denoiser=ddpm_cifar10" if cuda else "denoiser=ddpm_small", "defense=diffpure",
                                         f"defense.purifier.reverse_steps={k}"], device)
    rap, cfg_r = build_from_config(["dataset=fashion_mnist", "victim=classifier_a", "defense=rap", "denoiser=rap_tiny"], device)
    xd, _ = batch(cfg_d, (4 if quick else 16) * big, device)
    xr, yr = batch(cfg_r, 8 * big, device)
    workloads = [(f"diffpure ({k} reverse steps) defended inference", diffpure, xd)]
    if not quick:
        resnet, cfg_v = build_from_config(["dataset=fashion_mnist_rgb32", "victim=resnet18", "defense=none"], device)
        workloads.append(("resnet18 3×32×32 inference", resnet, batch(cfg_v, 64 * big, device)[0]))
    for label, flags in flag_variants(device):
        for what, model, x in workloads:
            _bench_flag_inference(report, label, flags, model, x, device, what)
        _bench_flag_pgd(report, label, flags, rap, cfg_r, xr, yr, device, min(steps, 10), "rap (rap_tiny) + classifier A")
    if not quick:
        _bench_compile(report, "eval.compile=true", SpeedUps(compile=True), resnet, workloads[-1][2], device,
                       run=compile_victim or cuda)


def _with_flags(defended: nn.Module, flags: Any) -> nn.Module:
    return flags.apply(copy.deepcopy(defended))


def _bench_flag_inference(report: Report, label: str, flags: Any, defended: nn.Module, x: torch.Tensor,
                          device: torch.device, what: str) -> None:
    fast = _with_flags(defended, flags)
    with torch.no_grad():
        agree = _argmax_agreement(fast, defended, x)
    t, t_ref = side_by_side(torch.no_grad()(lambda: fast(x)), torch.no_grad()(lambda: defended(x)), device, repeats=2)
    n = x.shape[0]
    report.add(f"{label}: {what}", n / t, "images/s", n / t_ref, "fp32 eager", t_ref / t, "speed-up", n,
               {"argmax_agreement_same_noise": agree})


def _bench_flag_pgd(report: Report, label: str, flags: Any, defended: nn.Module, cfg, x: torch.Tensor, y: torch.Tensor,
                    device: torch.device, steps: int, what: str) -> None:
    fast = _with_flags(defended, flags)
    attack, warm = pgd_attack(cfg, steps), pgd_attack(cfg, 1)
    adv: dict[str, torch.Tensor] = {}
    t, t_ref = side_by_side(lambda: attack(fast, x, y), lambda: adv.update(ref=attack(defended, x, y)), device, repeats=1,
                            warmup=lambda: (warm(fast, x, y), warm(defended, x, y)))
    n = x.shape[0]
    with torch.no_grad():
        agree = float((fast(adv["ref"]).argmax(1) == defended(adv["ref"]).argmax(1)).float().mean())
    report.add(f"{label}: PGD-{steps} on {what}", n / t, "images/s", n / t_ref, "fp32 eager", t_ref / t, "speed-up", n,
               {"argmax_agreement_on_adversarial": agree})


def _bench_compile(report: Report, label: str, flags: Any, victim_defended: nn.Module, x: torch.Tensor,
                   device: torch.device, run: bool) -> None:
    """torch.compile of the victim: compilation (the first call) timed apart, then steady-state inference vs eager.
    Not run (a figure without value, with the reason) where it was not asked for; a failure (no compiler, an
    unsupported op) is reported the same way, with the error, and the bench goes on."""
    name, n = f"{label}: resnet18 3×32×32 inference", x.shape[0]
    if not run:
        report.add(name, None, "images/s", None, "fp32 eager", None, "speed-up", n,
                   {"skipped": "CPU: torch.compile (inductor, C++) takes ~1 min per model and input shape here, "
                               "fwd and bwd each (measured); `python -m evaluation.bench --only flags --compile` measures it"})
        return
    try:
        fast = _with_flags(victim_defended, flags)
        compile_s = wall(torch.no_grad()(lambda: fast(x)), device)
        t, t_ref = side_by_side(torch.no_grad()(lambda: fast(x)), torch.no_grad()(lambda: victim_defended(x)), device, repeats=2)
    except Exception as err:  # noqa: BLE001 — any compiler failure is reported, not raised: the bench goes on
        report.add(name, None, "images/s", None, "fp32 eager", None, "speed-up", n,
                   {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"})
        return
    report.add(name, n / t, "images/s", n / t_ref, "fp32 eager", t_ref / t, "speed-up", n, {"compile_s": compile_s})


def _argmax_agreement(fast: nn.Module, reference: nn.Module, x: torch.Tensor) -> float:
    """Share of images whose predicted class agrees, both models run under the same random stream."""
    state = torch.random.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if x.is_cuda else None
    a = fast(x).argmax(1)
    torch.random.set_rng_state(state)
    if cuda_state is not None:
        torch.cuda.set_rng_state_all(cuda_state)
    b = reference(x).argmax(1)
    return float((a == b).float().mean())


# --------------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------------
GROUPS = ("cases", "diffdefense_l5r5", "flops", "eot", "checkpoint", "flags")


def run_case(report: Report, case: Case, device: torch.device, steps: int, repeats: int, memory: bool) -> None:
    defended, cfg = build_from_config(case.overrides, device)
    x, y = batch(cfg, case.n_infer, device)
    bench_inference(report, case, defended, x, device, repeats)
    xa, ya = x[: case.n_attack], y[: case.n_attack]
    if xa.shape[0] < case.n_attack:
        xa, ya = batch(cfg, case.n_attack, device)
    bench_adaptive_pgd(report, case, defended, cfg, xa, ya, device, steps, repeats)
    if memory:
        bench_gradient_memory(report, case, defended, cfg, xa, ya, device)


def selected(only: str | None) -> tuple[set[str], set[str] | None]:
    """(figure groups, defense cases or None = all) from ``--only a,b`` (group or case names); unknown names exit
    with one line listing the valid ones."""
    if not only:
        return set(GROUPS), None
    names = {s.strip() for s in only.split(",") if s.strip()}
    known_cases = {c.name for c in cases(quick=True, cuda=False)}
    unknown = names - set(GROUPS) - known_cases
    if unknown:
        raise SystemExit(f"--only: unknown {', '.join(sorted(unknown))}; valid: {', '.join(GROUPS + tuple(sorted(known_cases)))}")
    case_names = names & known_cases
    groups = (names & set(GROUPS)) | ({"cases"} if case_names else set())
    return groups, None if "cases" in names else (case_names or None)


def machine_load() -> str:
    """Other runnable processes now and the 1-minute load average against the core count, with a warning when another
    job is busy. Why: two processes that each run as many OpenMP threads as there are cores make every small kernel
    wait for a core (session 14 saw `--quick` take 15 min instead of 20 s beside a 2-thread evaluation), so absolute
    figures from a loaded machine mean little; the side-by-side ratios hold better, but a reader should know. The
    runnable count (``/proc/loadavg``, this process excluded) is the warning's test: the 1-minute average still counts
    a job that has just ended."""
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    try:
        others = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0]) - 1
    except (OSError, IndexError, ValueError):
        others = round(load)
    busy = " — the machine is busy: absolute figures are slowed, read the ratios" if others > 0 else ""
    return f"{others} other runnable processes, load average {load:.1f} on {cores} cores{busy}"


def run(argv: list[str] | None = None, stream=sys.stdout) -> Report:
    """Run the bench; return the report (the JSON lines are printed as they come, the summary at the end)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and PGD-5: a smoke test (< 1 min on 2 quiet cores)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", default=None, help=f"comma-separated figure groups ({', '.join(GROUPS)}) or defense cases")
    parser.add_argument("--compile", action="store_true", help="measure eval.compile on a CPU too (minutes of compilation)")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-defense peak-memory figures (--quick skips them)")
    args = parser.parse_args(argv)
    from evaluation.results import device_name

    device = torch.device(args.device)
    label = device_name(device)
    print(f"device: {label}; torch {torch.__version__}; mode: {'quick' if args.quick else 'default'}; {machine_load()}",
          file=stream, flush=True)
    report = Report(label, stream)
    groups, names = selected(args.only)
    steps = 5 if args.quick else 40
    start = time.perf_counter()
    if "cases" in groups:
        for case in cases(args.quick, device.type == "cuda"):
            if names is None or case.name in names:
                run_case(report, case, device, steps, repeats=1 if args.quick else 2, memory=not (args.no_memory or args.quick))
    if "diffdefense_l5r5" in groups:
        bench_diffdefense_l5r5(report, device, args.quick)
    if "flops" in groups:
        bench_denoiser_flops(report, device, args.quick)
    if "eot" in groups:
        bench_eot(report, device, args.quick)
    if "checkpoint" in groups:
        bench_checkpoint_memory(report, device, args.quick)
    if "flags" in groups:
        bench_flags(report, device, args.quick, steps, compile_victim=args.compile)
    print(f"\n## make bench — {label} ({time.perf_counter() - start:.0f} s)\n", file=stream)
    print(report.markdown(), file=stream, flush=True)
    return report


def main(argv: list[str] | None = None) -> None:
    run(argv)


if __name__ == "__main__":
    main()
