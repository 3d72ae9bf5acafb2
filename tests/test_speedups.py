"""The eval.amp / eval.channels_last / eval.compile speed-ups: the same numbers as fp32 on a fixed subset, the traps
refused in one line, the caches keyed by them, and what the loop already batches (no purifier recomputed by an attack).

Tolerances: on the 200 fixed Fashion-MNIST test images one image is 0.5 points. bf16 keeps 8 mantissa bits, so a few
images whose top-two logits are within ~1 % can flip: clean accuracy within 1 point (2 images), PGD robust accuracy
within 3 points (6 images: the attack amplifies a flipped gradient sign along 10 steps). channels_last only reorders
the same fp32 arithmetic: within 0.5 points (1 image) and logits equal to 1e-4.
"""
from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import pytest
import torch
import torchattacks
from torch import nn

from attacks.base import Attack
from defenses.base import Defended, Purifier
from defenses.gaussian_noise import GaussianNoise
from evaluation.loop import evaluate
from evaluation.speedups import SpeedUps, use_autocast
from evaluation.threats import WhiteBoxAdaptive


class Smoothing(Purifier):
    """A fixed 3×3 box blur (deterministic, differentiable, a convolution autocast runs in bf16)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
        nn.init.constant_(self.conv.weight, 1 / 9)
        self.calls, self.rows = 0, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.rows.append(x.shape[0])
        return (0.5 * x + 0.5 * self.conv(x)).clamp(0, 1)


def pgd(eps: float = 0.1, steps: int = 10) -> Attack:
    return Attack("pgd", functools.partial(torchattacks.PGD, eps=eps, alpha=2.5 * eps / steps, steps=steps), "Linf", eps)


def scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor, flags: SpeedUps) -> dict:
    defended = flags.apply(Defended(Smoothing(), copy.deepcopy(model)))
    return evaluate(defended, [(x, y)], pgd(), seed=0, progress=False)


@pytest.fixture(scope="module")
def fp32_scores(trained_victim, fmnist_test_batch):
    x, y = fmnist_test_batch
    return scores(trained_victim, x, y, SpeedUps())


def test_bf16_autocast_agrees_with_fp32_on_a_fixed_subset(trained_victim, fmnist_test_batch, fp32_scores):
    x, y = fmnist_test_batch
    bf16 = scores(trained_victim, x, y, SpeedUps(amp="bf16"))
    assert fp32_scores["clean_acc"] > 60 and fp32_scores["robust_acc"] < fp32_scores["clean_acc"] - 20  # a real attack
    assert abs(bf16["clean_acc"] - fp32_scores["clean_acc"]) <= 1.0
    assert abs(bf16["robust_acc"] - fp32_scores["robust_acc"]) <= 3.0
    assert bf16["violations"] == 0


def test_channels_last_agrees_with_fp32(trained_victim, fmnist_test_batch, fp32_scores):
    x, y = fmnist_test_batch
    fast = scores(trained_victim, x, y, SpeedUps(channels_last=True))
    assert abs(fast["clean_acc"] - fp32_scores["clean_acc"]) <= 0.5
    assert abs(fast["robust_acc"] - fp32_scores["robust_acc"]) <= 0.5
    nhwc = SpeedUps(channels_last=True).apply(Defended(Smoothing(), copy.deepcopy(trained_victim)))
    with torch.no_grad():
        assert torch.allclose(nhwc(x[:32]), Defended(Smoothing(), trained_victim)(x[:32]), atol=1e-4)


def test_autocast_region_ends_with_the_forward_and_hands_back_fp32():
    net = use_autocast(nn.Linear(4, 3), torch.bfloat16)
    out = net(torch.randn(2, 4))
    assert out.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
    broken = use_autocast(nn.Linear(4, 3), torch.bfloat16)
    with pytest.raises(RuntimeError):
        broken(torch.randn(2, 5))  # a shape error inside the forward
    assert not torch.is_autocast_enabled("cpu")  # the region was left all the same


def test_autocast_reaches_every_gradient_path(trained_victim):
    """The BPDA and EOT wrappers are built around the very victim and purifier that carry the hooks."""
    purifier = GaussianNoise(0.1)
    seen = []
    trained_victim = copy.deepcopy(trained_victim)
    trained_victim.register_forward_hook(lambda m, a, out: seen.append(torch.is_autocast_enabled("cpu")))
    defended = SpeedUps(amp="bf16").apply(Defended(purifier, trained_victim))
    attacked = WhiteBoxAdaptive(eot_samples=2, gradient="bpda").attacked_model(defended, pgd(steps=1))
    attacked(torch.rand(3, 1, 28, 28))
    assert seen == [True]


@pytest.mark.parametrize("attack", ["fab", "autoattack", "autoattack_fast", "apgd_ce"])
def test_amp_refused_for_attacks_without_a_reduced_precision_path(compose, attack):
    from hydra.utils import instantiate

    cfg = compose("evaluate", [f"attack={attack}", "eval.amp=bf16"])
    with pytest.raises(ValueError, match="eval.amp=null"):
        SpeedUps.from_config(cfg.eval, instantiate(cfg.attack))
    assert SpeedUps.from_config({"amp": None}, instantiate(cfg.attack)) == SpeedUps()  # fp32: nothing to refuse


def test_bad_amp_value_fails_in_one_line():
    with pytest.raises(ValueError, match="eval.amp: unknown value 'int8'; valid: null, bf16, fp16"):
        SpeedUps.from_config({"amp": "int8"})


def test_speed_flags_key_the_caches_only_when_on(compose):
    from omegaconf import OmegaConf

    from evaluation.runner import cache_key

    default = compose("evaluate", [])
    assert default.eval.amp is None and default.eval.channels_last is False and default.eval.compile is False
    absent = compose("evaluate", [])
    OmegaConf.set_struct(absent, False)
    for key in ("amp", "channels_last", "compile"):
        del absent.eval[key]
    assert cache_key(default) == cache_key(absent)  # the keys of every earlier run stay as they were
    keys = {cache_key(compose("evaluate", [flag])) for flag in ("eval.amp=bf16", "eval.channels_last=true", "eval.compile=true")}
    assert len(keys) == 3 and cache_key(default) not in keys
    assert SpeedUps().cache_suffix == "" and SpeedUps(amp="bf16", channels_last=True).cache_suffix == "-amp=bf16-channels_last"


def test_runner_records_the_flags(compose):
    from hydra.utils import instantiate

    from evaluation.runner import run_evaluation
    from models.weights import save_weights

    cfg = compose("evaluate", ["attack=fgsm", "eval.amp=bf16", "eval.channels_last=true", "dataset.eval_subset=16", "eval.grid=false"])
    torch.manual_seed(0)
    save_weights(instantiate(cfg.victim, weights=None), cfg.victim.weights)
    result = run_evaluation(cfg)
    on_disk = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    assert on_disk["speedups"] == result["speedups"] == {"amp": "bf16", "channels_last": True, "compile": False}
    assert on_disk["n_images"] == 16 and on_disk["violations"] == 0


def test_pgd_purifies_once_per_step_and_batches_the_eot_draws(trained_victim):
    """No recomputation: PGD-k through Defended calls the purifier k times; loss-EOT sends all k·N draws in one call,
    and the loop scores all draws of a batch in one call."""
    x = torch.rand(5, 1, 28, 28)
    y = torch.randint(0, 10, (5,))
    smoothing = Smoothing()
    defended = Defended(smoothing, trained_victim)
    pgd(steps=7)(WhiteBoxAdaptive().attacked_model(defended, pgd(steps=7)), x, y)
    assert smoothing.calls == 7 and set(smoothing.rows) == {5}

    class NoisySmoothing(Smoothing):
        stochastic = True

    noisy = NoisySmoothing()
    evaluate(Defended(noisy, trained_victim), [(x, y)], pgd(steps=3), WhiteBoxAdaptive(eot_samples=4), n_draws=6, progress=False)
    # clean draws (6·5 rows, one call) · 3 attack steps on 4 tied replicas (4·5 rows each) · robust draws (6·5 rows)
    assert noisy.rows == [30, 20, 20, 20, 30]


@pytest.mark.slow
def test_compiled_victim_agrees_with_eager(trained_victim, fmnist_test_batch):
    x, _ = fmnist_test_batch
    eager = Defended(Smoothing(), trained_victim)
    compiled = SpeedUps(compile=True).apply(Defended(Smoothing(), copy.deepcopy(trained_victim)))
    with torch.no_grad():
        assert torch.allclose(compiled(x[:64]), eager(x[:64]), atol=1e-4)
