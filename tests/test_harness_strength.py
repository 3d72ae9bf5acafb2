"""Tests of the harness that fail when the behaviour breaks: safe loading and exact N-draw scoring.

Each group also runs a deliberately wrong implementation (by monkeypatch) and shows that the same checks
catch it, so a later edit cannot quietly turn them into tests that always pass.
"""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from torch import nn

from attacks.base import Attack
from defenses.base import Defended, Purifier
from evaluation import loop
from evaluation.adv_cache import AdvCache
from evaluation.loop import evaluate
from evaluation.threats import Oblivious
from models.weights import CheckpointError, load_weights


# -- weights_only: a weights file or a cached batch never runs code ------------------------------------
def _side_effect(marker: str) -> torch.Tensor:
    """What a malicious pickle would run on load: here, harmlessly, create ``marker``; returns a plausible tensor."""
    Path(marker).touch()
    return torch.zeros(1, 4)


class Payload:
    """Unpickles to ``_side_effect(marker)``: a (1, 4) tensor (nn.Linear(4, 1)'s weight), and the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return _side_effect, (self.marker,)


class TrojanModule(nn.Linear):
    """A whole pickled module (``torch.save(module)``) whose unpickling has a side effect."""

    marker: str = ""

    def __setstate__(self, state):
        super().__setstate__(state)
        Path(state["marker"]).touch()


def _trojan_module(marker: Path) -> nn.Module:
    module = TrojanModule(4, 1)
    module.marker = str(marker)  # an instance attribute: pickled in __dict__, read back by __setstate__
    return module


UNSAFE = ["reduce_state", "reduce_tensor", "module"]


@pytest.fixture
def payload_files(tmp_path):
    """(path, marker) per unsafe file: a __reduce__ payload as the weight of an nn.Linear(4, 1) state dict (an
    unsafe load_weights accepts it silently), the payload alone (a tensor: an unsafe AdvCache.get returns it),
    and a pickled nn.Module with a side-effecting __setstate__."""
    objects = {
        "reduce_state": lambda m: {"weight": Payload(m), "bias": torch.zeros(1)},
        "reduce_tensor": Payload,
        "module": _trojan_module,
    }
    files = {}
    for kind, make in objects.items():
        files[kind] = (tmp_path / f"{kind}.pt", tmp_path / f"{kind}.ran")
        torch.save(make(files[kind][1]), files[kind][0])
    assert not any(marker.exists() for _, marker in files.values())  # saving runs nothing
    return files


@pytest.mark.parametrize("kind", UNSAFE)
def test_load_weights_refuses_pickled_code_without_running_it(payload_files, kind):
    path, marker = payload_files[kind]
    with pytest.raises(CheckpointError, match=r"checkpoint .* is corrupt or not a weights file") as err:
        load_weights(nn.Linear(4, 1), path, missing_hint="train it")
    assert str(path) in str(err.value)
    assert not marker.exists(), "unpickling ran code: weights must be loaded with weights_only=True"


@pytest.mark.parametrize("kind", UNSAFE)
def test_adv_cache_ignores_pickled_code_without_running_it(payload_files, tmp_path, kind):
    source, marker = payload_files[kind]
    cache = AdvCache(tmp_path / "adv")
    cache.folder.mkdir()
    cache.path(0).write_bytes(source.read_bytes())
    x = torch.zeros(1, 4)  # the shape the reduce payload unpickles to: only the safe load refuses it
    assert cache.get(0, x) is None
    assert not marker.exists(), "unpickling ran code: cached batches must be loaded with weights_only=True"
    cache.put(0, torch.ones_like(x))  # the cache itself still works on a genuine tensor
    assert torch.equal(cache.get(0, x), torch.ones_like(x))


def test_the_side_effect_check_catches_an_unsafe_load(payload_files, tmp_path, monkeypatch):
    """With torch.load forced to weights_only=False, the reduce payload loads silently and the marker appears."""
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: real_load(*a, **{**kw, "weights_only": False}))
    path, marker = payload_files["reduce_tensor"]
    cache = AdvCache(tmp_path / "adv")
    cache.folder.mkdir()
    cache.path(0).write_bytes(path.read_bytes())
    x_adv = cache.get(0, torch.zeros(1, 4))
    assert x_adv is not None and marker.exists()  # an unsafe AdvCache.get returns the payload's tensor
    path, marker = payload_files["reduce_state"]
    load_weights(nn.Linear(4, 1), path, missing_hint="train it")  # an unsafe load_weights accepts it silently
    assert marker.exists()
    module_path, module_marker = payload_files["module"]
    with pytest.raises(CheckpointError):
        load_weights(nn.Linear(4, 1), module_path, missing_hint="train it")
    assert module_marker.exists()


# -- N-draw scoring: exact numbers on a scripted stochastic purifier -----------------------------------
# Six images in two batches of three, four draws. Image i is a constant image of value i/100 (clean) or
# 0.5 + i/100 (after the attack below); the purifier makes the victim predict y_i on draw k of image i iff
# CLEAN[k][i] (resp. ADV[k][i]) is 1, another class otherwise.
LABELS = [3, 1, 4, 1, 5, 9]
CLEAN = [  # draws × images: correct counts per image 4, 3, 2, 1, 0, 4
    [1, 1, 1, 1, 0, 1],
    [1, 1, 1, 0, 0, 1],
    [1, 1, 0, 0, 0, 1],
    [1, 0, 0, 0, 0, 1],
]
ADV = [  # correct counts per image 4, 1, 3, 2, 1, 0
    [1, 0, 1, 1, 0, 0],
    [1, 0, 1, 1, 1, 0],
    [1, 1, 1, 0, 0, 0],
    [1, 0, 0, 0, 0, 0],
]
DRAWS = 4
# By hand, from the tables above:
#   clean mean  = (4+3+2+1+0+4)/24 = 14/24 = 58.33 %;  clean worst  = images 0 and 5 correct on all 4 = 2/6
#   robust mean = (4+1+3+2+1+0)/24 = 11/24 = 45.83 %;  robust worst = image 0 only                  = 1/6
#   clean majority (> 2 of 4 draws): images 0, 1, 5 (image 2's 2 of 4 is no majority) = 3 images;
#   of those, adversarial majority wrong: image 1 (1 of 4) and image 5 (0 of 4) → success rate 2/3.
EXPECTED = {
    "clean_acc": 100 * 14 / 24, "clean_acc_worst": 100 * 2 / 6,
    "robust_acc": 100 * 11 / 24, "robust_acc_worst": 100 * 1 / 6, "attack_success_rate": 100 * 2 / 3,
}
EXPECTED_NO_ATTACK = {
    "clean_acc": 100 * 14 / 24, "clean_acc_worst": 100 * 2 / 6,
    "robust_acc": 100 * 14 / 24, "robust_acc_worst": 100 * 2 / 6, "attack_success_rate": 0.0,
}
KEYS = tuple(EXPECTED)


class Scripted(Purifier):
    """Row k·n + i of a call (``predict_draws``' layout: draw k of image i) → an image encoding the class the
    victim should predict: y_i if the table says draw k is correct, (y_i + 1) mod 10 otherwise."""

    stochastic = True

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        value = x.flatten(1)[:, 0]
        adversarial = value >= 0.5
        images = torch.round((value - 0.5 * adversarial) * 100).long().tolist()
        seen: dict[int, int] = {}
        out = torch.empty_like(x)
        for row, i in enumerate(images):
            k = seen[i] = seen.get(i, -1) + 1  # the k-th copy of image i in this call is its draw k (row k·n + i)
            table = ADV if adversarial[row] else CLEAN
            out[row] = (LABELS[i] if table[k][i] else (LABELS[i] + 1) % 10) / 10
        return out


class ReadClass(nn.Module):
    """Victim: predicts class c when the (constant) image has value c/10."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x.flatten(1).mean(1, keepdim=True)
        return -(v - torch.arange(10, dtype=x.dtype) / 10).abs()


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    x = (torch.arange(6, dtype=torch.float32) / 100).view(6, 1, 1, 1).expand(6, 1, 2, 2).contiguous()
    y = torch.tensor(LABELS)
    return [(x[:3], y[:3]), (x[3:], y[3:])]


def shift_attack(calls: list | None = None) -> Attack:
    """A trivial attack (no model access): every pixel + 0.5, so the purifier reads its ADV table."""

    def build(model):
        def run(x, y):
            if calls is not None:
                calls.append(x.shape[0])
            return x + 0.5

        return run

    return Attack("shift", build, norm="none", eps=None, kind="noise")


def _scores(out: dict) -> dict:
    return {k: out[k] for k in KEYS}


def test_n_draw_scoring_is_exact_on_a_scripted_purifier():
    purifier = Scripted()
    run = functools.partial(evaluate, Defended(purifier, ReadClass()), _data(), threat=Oblivious(), n_draws=DRAWS, progress=False)
    calls: list = []
    out = run(shift_attack(calls))
    assert _scores(out) == pytest.approx(EXPECTED, abs=1e-9)
    assert out["n_images"] == 6 and out["n_draws"] == DRAWS and out["violations"] == 0 and calls == [3, 3]
    assert purifier.calls == 2 * 2  # per batch: one batched clean pass, one batched adversarial pass

    purifier.calls = 0
    none = run(None)
    assert _scores(none) == pytest.approx(EXPECTED_NO_ATTACK, abs=1e-9)
    assert purifier.calls == 2  # clean draws only


def _single_draw(model, x, draws):  # scores one forward pass and copies it: the mistake N-draw scoring exists to avoid
    one = model(x).argmax(-1)
    return one.expand(draws, x.shape[0])


def _image_major(model, x, draws):  # rows read as image-major (i·draws + k) instead of draw-major (k·n + i)
    logits = model(x.repeat(draws, *([1] * (x.dim() - 1))))
    return logits.argmax(-1).view(x.shape[0], draws).T


@pytest.mark.parametrize("wrong", [_single_draw, _image_major])
def test_the_exact_n_draw_checks_catch_a_wrong_scoring(monkeypatch, wrong):
    monkeypatch.setattr(loop, "predict_draws", wrong)
    out = evaluate(Defended(Scripted(), ReadClass()), _data(), shift_attack(), Oblivious(), n_draws=DRAWS, progress=False)
    assert _scores(out) != pytest.approx(EXPECTED, abs=1e-9)


def test_the_exact_n_draw_checks_catch_a_non_strict_majority(monkeypatch):
    """Image 2 is right on exactly 2 of 4 clean draws: counting that as a majority changes the success rate."""
    real = loop.evaluate_batch

    def lenient(*args, **kwargs):
        record, x_adv, clean = real(*args, **kwargs)
        record.clean_correct_majority = int((clean.float().mean(0) >= 0.5).sum())
        return record, x_adv, clean

    monkeypatch.setattr(loop, "evaluate_batch", lenient)
    out = evaluate(Defended(Scripted(), ReadClass()), _data(), shift_attack(), Oblivious(), n_draws=DRAWS, progress=False)
    assert out["attack_success_rate"] != pytest.approx(EXPECTED["attack_success_rate"])


# -- resume after a torn cache line ---------------------------------------------------------------------
def test_a_batch_finished_after_a_torn_line_is_not_redone(tmp_path):
    calls: list = []
    run = functools.partial(evaluate, Defended(Scripted(), ReadClass()), _data(), threat=Oblivious(), n_draws=DRAWS,
                            progress=False, cache_file=tmp_path / "runs.jsonl")
    run(shift_attack(calls), max_batches=1)
    with open(tmp_path / "runs.jsonl", "a") as f:
        f.write('{"index": 1, "torn')
    run(shift_attack(calls))
    assert calls == [3, 3]  # batch 0, then the missing batch 1
    run(shift_attack(calls))
    assert calls == [3, 3], "a third run found batch 1's record unreadable and attacked it again"
