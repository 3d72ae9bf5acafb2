"""The metric loop and threat models: real accuracy drops, N-draw scoring, resume, determinism, shape errors."""
from __future__ import annotations

import functools

import pytest
import torch
import torchattacks
from torch import nn

from attacks.base import Attack
from defenses.base import Defended, Identity, Purifier
from defenses.bit_depth import BitDepthReduction
from defenses.gaussian_noise import GaussianNoise
from evaluation.loop import constraint_violations, evaluate
from evaluation.results import read_jsonl
from evaluation.threats import Oblivious, Query, Transfer, WhiteBoxAdaptive


def pgd(eps=0.2, steps=10):
    return Attack("pgd", functools.partial(torchattacks.PGD, eps=eps, alpha=2.5 * eps / steps, steps=steps), "Linf", eps)


@pytest.fixture(scope="module")
def batches(fmnist_test_batch):
    x, y = fmnist_test_batch
    return [(x[i : i + 40], y[i : i + 40]) for i in range(0, 120, 40)]


def test_pgd_lowers_undefended_accuracy(trained_victim, batches):
    out = evaluate(trained_victim, batches, pgd(), progress=False)
    assert out["n_images"] == 120 and out["clean_acc"] > 65
    assert out["robust_acc"] < out["clean_acc"] - 40
    assert out["violations"] == 0 and out["max_perturbation"] <= 0.2 + 1e-6
    assert out["clean_acc"] == out["clean_acc_worst"]  # deterministic: one draw


def test_noisy_purifier_is_scored_over_draws(trained_victim, batches):
    defended = Defended(GaussianNoise(sigma=0.35), trained_victim)
    out = evaluate(defended, batches, attack=None, n_draws=8, progress=False)
    # Worst case over 8 draws is strictly harsher than the mean: a single pass would hide the spread.
    assert out["clean_acc_worst"] < out["clean_acc"] - 2
    one = evaluate(defended, batches, attack=None, n_draws=1, progress=False)
    assert one["clean_acc_worst"] == one["clean_acc"]


def test_white_box_wraps_eot_and_bpda(trained_victim):
    noisy = Defended(GaussianNoise(0.1), trained_victim)
    assert type(WhiteBoxAdaptive(eot_samples=5).attacked_model(noisy, pgd())).__name__ == "EOT"
    quant = Defended(BitDepthReduction(1), trained_victim)
    assert type(WhiteBoxAdaptive().attacked_model(quant, pgd()).purifier).__name__ == "BPDA"
    assert WhiteBoxAdaptive(bpda=False).attacked_model(quant, pgd()) is quant
    assert Oblivious().attacked_model(quant, pgd()) is trained_victim


@pytest.mark.parametrize(
    "name, expected",
    [
        ("pgd", ("EOT", "loss")),  # loss-averaging EOT for every plain gradient attack
        ("apgd_ce", ("EOT", "loss")),
        ("deepfool", ("EOT", "logits")),  # linearising attacks average logits
        ("fab", ("EOT", "logits")),
        ("eot_pgd", None),  # averages over draws itself: never wrapped twice
        ("pgd_eot_strong", None),
        ("autoattack", None),  # the rand version brings its own EOT 20
        ("square", None),  # a query attack: no gradients, no EOT
    ],
)
def test_threat_model_wrapping_rules(trained_victim, name, expected):
    from attacks.registry import load_attack
    from attacks.wrappers import EOT

    atk = load_attack(name)
    noisy = Defended(GaussianNoise(0.1), trained_victim)
    threat = WhiteBoxAdaptive(eot_samples=5) if atk.kind != "query" else Query()
    model = threat.attacked_model(noisy, atk)
    if expected is None:
        assert not isinstance(model, EOT) and model is noisy
    else:
        assert isinstance(model, EOT) and (type(model).__name__, model.reduction) == expected and model.samples == 5
    # a deterministic defense is never wrapped in EOT, whatever the attack
    assert not isinstance(WhiteBoxAdaptive(5).attacked_model(Defended(Identity(), trained_victim), atk), EOT)


def test_bpda_makes_the_adaptive_attack_stronger_than_naive(trained_victim, batches):
    quant = Defended(BitDepthReduction(1), trained_victim)
    naive = evaluate(quant, batches, pgd(0.2), WhiteBoxAdaptive(bpda=False), progress=False)
    adaptive = evaluate(quant, batches, pgd(0.2), WhiteBoxAdaptive(), progress=False)
    assert adaptive["robust_acc"] < naive["robust_acc"] - 15


def test_transfer_and_query_threats(trained_victim, trained_surrogate, batches):
    transfer = evaluate(trained_victim, batches, pgd(0.2), Transfer(trained_surrogate), progress=False)
    white = evaluate(trained_victim, batches, pgd(0.2), progress=False)
    assert white["robust_acc"] < transfer["robust_acc"] < transfer["clean_acc"]
    with pytest.raises(ValueError, match="attack=square"):
        evaluate(trained_victim, batches, pgd(), Query(), progress=False)


class CountingNoise(GaussianNoise):
    """Gaussian noise that counts the images it purifies."""

    def __init__(self, sigma: float) -> None:
        super().__init__(sigma=sigma)
        self.images = 0

    def forward(self, x):
        self.images += x.shape[0]
        return super().forward(x)


def recording_pgd(attacked: list, eps=0.2, steps=4):
    """PGD that records the clean batch of every call it makes (to tell which batches were attacked)."""
    def build(model):
        inner = torchattacks.PGD(model, eps=eps, alpha=2.5 * eps / steps, steps=steps)

        def run(x, y):
            attacked.append(x.clone())
            return inner(x, y)

        return run

    return Attack("pgd", build, "Linf", eps)


def test_interrupted_evaluation_resumes_to_identical_numbers(trained_victim, batches, tmp_path, monkeypatch):
    """A resumed run attacks and purifies only the batches its cache lacks, and gives the full run's numbers.

    Identical numbers alone prove nothing (per-batch seeding makes a full rerun identical too): the counts do.
    """
    import evaluation.loop as loop

    purifier = CountingNoise(0.2)  # stochastic: per-batch seeding must hold
    defended = Defended(purifier, trained_victim)
    small = [(x[:16], y[:16]) for x, y in batches]
    attacked: list = []
    run = functools.partial(evaluate, defended, small, recording_pgd(attacked), WhiteBoxAdaptive(eot_samples=2),
                            n_draws=4, seed=3, progress=False)
    # Which batch each attack call was on (an EOT attack may see its batch replicated: match the first rows).
    which = lambda: [next(i for i, (x, _) in enumerate(small) if torch.equal(x, a[: len(x)])) for a in attacked]  # noqa: E731

    full = run(cache_file=tmp_path / "a.jsonl")
    per_batch = purifier.images / 3  # clean draws + EOT attack passes + adversarial draws of one batch
    assert which() == [0, 1, 2] and per_batch == int(per_batch) > 0
    attacked.clear(), setattr(purifier, "images", 0)
    run(cache_file=tmp_path / "b.jsonl", max_batches=2)
    assert which() == [0, 1] and purifier.images == 2 * per_batch
    assert [r["index"] for r in read_jsonl(tmp_path / "b.jsonl")] == [0, 1]
    with open(tmp_path / "b.jsonl", "a") as f:
        f.write('{"index": 2, "torn')  # a crash mid-write leaves a torn line: it is redone, not misread
    torn = (tmp_path / "b.jsonl").read_text()

    attacked.clear(), setattr(purifier, "images", 0)
    resumed = run(cache_file=tmp_path / "b.jsonl")
    assert which() == [2], "the resumed run must attack only the missing batch"
    assert purifier.images == per_batch, "the resumed run must purify only the missing batch"
    keys = ("clean_acc", "clean_acc_worst", "robust_acc", "robust_acc_worst", "attack_success_rate", "n_images", "violations")
    assert {k: resumed[k] for k in keys} == {k: full[k] for k in keys}

    # The counts catch what the numbers cannot: a loop that ignored its cache reruns everything, same numbers.
    (tmp_path / "c.jsonl").write_text(torn)
    monkeypatch.setattr(loop, "read_jsonl", lambda path: [])
    attacked.clear(), setattr(purifier, "images", 0)
    ignored = run(cache_file=tmp_path / "c.jsonl")
    assert {k: ignored[k] for k in keys} == {k: full[k] for k in keys}
    assert which() == [0, 1, 2] and purifier.images == 3 * per_batch  # ≠ the assertions above: caught


def test_clean_cache_is_shared_across_attacks_and_changes_no_number(trained_victim, batches, tmp_path):
    purifier = CountingNoise(0.2)
    defended = Defended(purifier, trained_victim)
    small = [(x[:16], y[:16]) for x, y in batches[:2]]
    run = functools.partial(evaluate, defended, small, threat=Oblivious(), n_draws=3, seed=5, progress=False)
    keys = ("clean_acc", "clean_acc_worst", "robust_acc", "robust_acc_worst", "attack_success_rate")
    plain = run(pgd(steps=3))
    first = run(pgd(steps=3), clean_cache_file=tmp_path / "clean.jsonl")
    assert {k: first[k] for k in keys} == {k: plain[k] for k in keys}
    # A second attack on the same (data, defense, seed) reuses the clean draws: only x_adv is purified.
    purifier.images = 0
    cached = run(pgd(0.1, steps=3), clean_cache_file=tmp_path / "clean.jsonl")
    assert purifier.images == 3 * 32
    fresh = run(pgd(0.1, steps=3))
    assert {k: cached[k] for k in keys} == {k: fresh[k] for k in keys}
    # Another draw count is another clean pass, never a misread of the cached one.
    purifier.images = 0
    run(pgd(0.1, steps=3), n_draws=2, clean_cache_file=tmp_path / "clean.jsonl")
    assert purifier.images == 2 * 2 * 32


def test_no_attack_scores_the_clean_draws_once(trained_victim, batches):
    from attacks.noise import NoAttack

    purifier = CountingNoise(0.3)
    small = [(x[:16], y[:16]) for x, y in batches[:2]]
    out = evaluate(Defended(purifier, trained_victim), small, Attack("none", NoAttack, "none", None, kind="noise"), n_draws=3, progress=False)
    assert purifier.images == 3 * 32  # clean draws only: the unchanged input is not purified again
    assert out["robust_acc"] == out["clean_acc"] and out["attack_success_rate"] == 0


def test_score_clean_off_purifies_adversarial_images_only(trained_victim, batches, tmp_path):
    from attacks.noise import NoAttack

    purifier = CountingNoise(0.2)
    small = [(x[:16], y[:16]) for x, y in batches[:2]]
    run = functools.partial(evaluate, Defended(purifier, trained_victim), small, threat=Oblivious(), n_draws=2, seed=5, progress=False)
    full = run(pgd(steps=3))
    purifier.images = 0
    robust_only = run(pgd(steps=3), score_clean=False, cache_file=tmp_path / "runs.jsonl")
    assert purifier.images == 2 * 32  # the adversarial draws only: half the purifier's work
    assert robust_only["robust_acc"] == full["robust_acc"] and robust_only["robust_acc_worst"] == full["robust_acc_worst"]
    assert robust_only["clean_acc"] is None and robust_only["attack_success_rate"] is None
    # Resumed from its cache, it still says "not scored", never 0 %.
    resumed = run(pgd(steps=3), score_clean=False, cache_file=tmp_path / "runs.jsonl")
    assert resumed["clean_acc"] is None and resumed["robust_acc"] == full["robust_acc"]
    # With no attack, the unchanged images are still purified once (robust accuracy = clean accuracy).
    none = run(Attack("none", NoAttack, "none", None, kind="noise"), score_clean=False)
    assert none["robust_acc"] == pytest.approx(full["clean_acc"])


def counting_pgd(calls: list, eps=0.2, steps=3):
    def build(model):
        calls.append(1)
        return torchattacks.PGD(model, eps=eps, alpha=2.5 * eps / steps, steps=steps)

    return Attack("pgd", build, "Linf", eps)


def test_adv_cache_shares_defense_independent_examples(trained_victim, batches, tmp_path):
    small = [(x[:16], y[:16]) for x, y in batches[:2]]
    keys = ("clean_acc", "robust_acc", "robust_acc_worst", "attack_success_rate")
    calls: list = []
    run = functools.partial(evaluate, threat=Oblivious(), n_draws=2, seed=4, progress=False)
    run(trained_victim, small, counting_pgd(calls), adv_cache_dir=tmp_path / "adv")
    assert len(calls) == 2 and len(list((tmp_path / "adv").glob("*.pt"))) == 2
    noisy = Defended(GaussianNoise(0.2), trained_victim)
    shared = run(noisy, small, counting_pgd(calls), adv_cache_dir=tmp_path / "adv")
    assert len(calls) == 2  # the oblivious examples were not crafted again for another defense
    fresh = run(noisy, small, counting_pgd(calls))
    assert {k: shared[k] for k in keys} == {k: fresh[k] for k in keys}
    # A torn file is attacked again; an adaptive threat never reads the cache (its examples see the defense).
    (tmp_path / "adv" / "0.pt").write_bytes(b"torn")
    calls.clear()
    run(noisy, small, counting_pgd(calls), adv_cache_dir=tmp_path / "adv")
    assert len(calls) == 1
    calls.clear()
    evaluate(noisy, small, counting_pgd(calls), WhiteBoxAdaptive(eot_samples=2), n_draws=2, progress=False, adv_cache_dir=tmp_path / "adv")
    assert len(calls) == 2


def test_same_seed_same_metrics(trained_victim, batches):
    defended = Defended(GaussianNoise(0.2), trained_victim)
    small = [(x[:16], y[:16]) for x, y in batches[:2]]
    run = functools.partial(evaluate, defended, small, pgd(steps=4), WhiteBoxAdaptive(eot_samples=2), n_draws=3, seed=7, progress=False)
    a, b = run(), run()

    def untimed(result: dict) -> dict:
        """Everything but wall time, per run and per batch record."""
        out = {k: v for k, v in result.items() if "second" not in k and k != "images_per_s"}
        out["batch_records"] = [{k: v for k, v in vars(r).items() if k != "seconds"} if not isinstance(r, dict)
                                else {k: v for k, v in r.items() if k != "seconds"} for r in result.get("batch_records", [])]
        return out

    assert untimed(a) == untimed(b)
    assert untimed(a)["batch_records"]  # the per-batch counts are compared too


def test_wrong_image_shape_fails_clearly(trained_victim):
    defended = Defended(Identity(), trained_victim, input_shape=(1, 28, 28))
    with pytest.raises(ValueError, match=r"expected images of shape \(1, 28, 28\).*got \(3, 32, 32\)"):
        defended(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        defended(torch.rand(28, 28))


def test_constraint_violations_detected():
    x = torch.full((3, 1, 4, 4), 0.5)
    adv = x.clone()
    adv[1, 0, 0, 0] = 0.9  # outside eps
    adv[2, 0, 0, 0] = float("nan")
    mask = constraint_violations(x, adv, pgd(eps=0.1))
    assert mask.tolist() == [False, True, True]


def test_attacking_a_fresh_wrapper_leaves_the_victim_in_eval_mode(trained_victim, batches):
    """Regression: a new EOT wrapper is in train mode; restoring only its flag switched dropout on."""
    defended = Defended(GaussianNoise(0.1), trained_victim).eval()
    x, y = batches[0]
    pgd()(WhiteBoxAdaptive(eot_samples=2).attacked_model(defended, pgd()), x[:4], y[:4])
    assert not any(m.training for m in defended.modules())


class ShatteredButHonest(Purifier):
    """Almost the identity in value; its exact gradient (±30, flipping every 0.001) is useless to an attack.

    It declares ``also_bpda``: the adaptive attack must then try identity BPDA too and keep the worse candidate.
    """

    also_bpda = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + 0.01 * torch.sin(3000 * x)).clamp(0, 1)


def test_purifiers_declaring_also_bpda_are_attacked_along_both_paths(trained_victim, batches):
    defended = Defended(ShatteredButHonest(), trained_victim)
    threat = WhiteBoxAdaptive(eot_samples=2)
    models = threat.attacked_models(defended, pgd(0.2))
    assert len(models) == 2 and type(models[1].purifier).__name__ == "BPDA"
    assert len(WhiteBoxAdaptive(both_paths=False).attacked_models(defended, pgd(0.2))) == 1
    assert len(threat.attacked_models(Defended(GaussianNoise(0.1), trained_victim), pgd(0.2))) == 1  # no extra cost
    small = batches[:2]
    exact_only = evaluate(defended, small, pgd(0.2), WhiteBoxAdaptive(both_paths=False), progress=False)["robust_acc"]
    both = evaluate(defended, small, pgd(0.2), threat, progress=False)["robust_acc"]
    bpda_only = evaluate(Defended(ShatteredButHonestBPDA(), trained_victim), small, pgd(0.2), threat, progress=False)["robust_acc"]
    assert both <= bpda_only + 1e-9 and both <= exact_only + 1e-9  # per image the worse candidate is kept
    assert both < exact_only - 10  # the shattered exact gradient alone overstates robustness


class ShatteredButHonestBPDA(ShatteredButHonest):
    """The same function attacked through identity BPDA only."""

    differentiable = False
    also_bpda = False


class ShatteredWithSurrogate(ShatteredButHonest):
    """A rough purifier that offers a smooth surrogate (the identity it wiggles around), like a guided chain."""

    also_bpda = False

    def smooth_surrogate(self) -> nn.Module:
        return Identity()


def test_purifiers_offering_a_smooth_surrogate_are_attacked_along_it_too(trained_victim, batches):
    defended = Defended(ShatteredWithSurrogate(), trained_victim)
    models = WhiteBoxAdaptive(eot_samples=2).attacked_models(defended, pgd(0.2))
    assert len(models) == 2 and isinstance(models[1].purifier.approximation, Identity)
    only = WhiteBoxAdaptive(gradient="surrogate").attacked_models(defended, pgd(0.2))
    assert len(only) == 1 and type(only[0].purifier).__name__ == "BPDA"
    with pytest.raises(ValueError, match="offers no smooth surrogate"):
        WhiteBoxAdaptive(gradient="surrogate").attacked_model(Defended(GaussianNoise(0.1), trained_victim), pgd(0.2))
    small = batches[:2]
    exact_only = evaluate(defended, small, pgd(0.2), WhiteBoxAdaptive(both_paths=False), progress=False)["robust_acc"]
    both = evaluate(defended, small, pgd(0.2), WhiteBoxAdaptive(), progress=False)["robust_acc"]
    assert both < exact_only - 10  # the surrogate path finds what the shattered exact gradient cannot
