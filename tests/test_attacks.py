"""Attacks: every conf/attack config instantiates and really attacks a trained victim; the uniform
``Attack`` callable's guarantees; the attacks torchattacks lacks (PGD-DLR, restarts, batched EOT-PGD,
standard AutoAttack, ℓ2 noise) and the torchattacks bugs we fix.

The configs run with shrunken budgets (few steps/queries, few images) so the file stays CPU-fast;
``@pytest.mark.slow`` tests run the real budgets.
"""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import torchattacks
from omegaconf import OmegaConf
from torch import nn

from attacks.autoattack_standard import StandardAutoAttack, step_counts
from attacks.base import Attack
from attacks.eot_pgd import BatchedEOTPGD
from attacks.noise import GaussianNoiseL2
from attacks.pgd_dlr import LossPGD, dlr_loss, per_example_loss
from attacks.registry import CONF_DIR, attack_config, available, load_attack
from attacks.torchattacks_fixes import CW, EADEN, TIFGSM, DeepFool, _true_and_best_other

EPS = {"Linf": 0.3, "L2": 1.5}

EXPECTED = {
    "fgsm", "bim", "pgd", "pgd_dlr", "pgd_l2", "pgd_restarts", "deepfool", "cw", "eot_pgd",
    "pgd_eot_strong", "square", "apgd_ce", "apgd_dlr", "autoattack", "autoattack_fast", "ead",
    "fab", "ti_fgsm", "ti_bim", "gaussian_noise", "none", "pgd_diffdefense", "pgd40_l2",
    "fgsm_unclipped", "deepfool_art", "deepfool_linf", "fwa", "pgd_jatp", "pgd_dlr_jatp", "ti_bim_jatp",
}  # fmt: skip
#: Attacks outside the ℓ∞ / ℓ2 balls: their budget and accuracy drop are tested in their own file (tests/test_fwa.py).
OTHER_NORMS = {"fwa"}

# Shrunken budgets for the CPU test (the configs' own defaults are the papers').
SHRINK = {
    "bim": {"alpha": 0.1, "steps": 5},
    "pgd": {"alpha": 0.1, "steps": 5},
    "pgd_diffdefense": {"alpha": 0.1, "steps": 5},
    "pgd_dlr": {"alpha": 0.1, "steps": 5},
    "pgd_l2": {"alpha": 0.5, "steps": 8},
    "pgd40_l2": {"alpha": 0.5, "steps": 8},
    "pgd_restarts": {"alpha": 0.1, "steps": 5, "restarts": 2},
    "deepfool": {"steps": 10},
    "deepfool_art": {"steps": 10},
    "deepfool_linf": {"steps": 10},
    "cw": {"c": 10.0, "lr": 0.1, "steps": 50},
    "eot_pgd": {"alpha": 0.1, "steps": 5, "eot_iter": 2},
    "pgd_eot_strong": {"alpha": 0.1, "steps": 5, "eot_samples": 3},
    "square": {"n_queries": 150},
    "apgd_ce": {"steps": 5},
    "apgd_dlr": {"steps": 5},
    "autoattack": {"n_iter": 5, "n_target_classes": 2, "n_queries": 100},
    "ead": {"binary_search_steps": 2, "max_iterations": 20, "initial_const": 1.0},
    "fab": {"steps": 10},
    "ti_bim": {"steps": 5},
    "ti_bim_jatp": {"steps": 5},
    "pgd_jatp": {"alpha": 0.1, "steps": 5},
    "pgd_dlr_jatp": {"alpha": 0.1, "steps": 5},
    "fwa": {"steps": 5, "dual_max_iter": 20},
}
N_IMAGES = {"autoattack": 16, "autoattack_fast": 16, "fab": 16, "square": 32, "ead": 24, "cw": 32, "deepfool": 32, "deepfool_linf": 32}


def _in_range(x_adv: torch.Tensor, attack: Attack) -> bool:
    """[0, 1], except for a paper-protocol preset declared outside the threat model (unclipped FGSM: [−ε, 1 + ε])."""
    if getattr(attack, "outside_threat_model", False):
        return bool(x_adv.min() >= -attack.eps - 1e-6 and x_adv.max() <= 1 + attack.eps + 1e-6 and (x_adv < 0).any())
    return bool(x_adv.min() >= 0 and x_adv.max() <= 1)


@pytest.fixture(scope="module")
def batch(fmnist_test_batch):
    x, y = fmnist_test_batch
    return x[:64], y[:64]


def _norms(delta: torch.Tensor) -> dict[str, torch.Tensor]:
    flat = delta.flatten(1)
    return {"Linf": flat.abs().amax(1), "L2": flat.norm(dim=1)}


def test_every_attack_has_a_config():
    assert set(available()) == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_documents_and_interpolates(name):
    path = CONF_DIR / f"{name}.yaml"
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and len(first) > 40, f"{path.name}: first line must document paper, norm, defaults"
    raw = OmegaConf.load(path)
    assert raw.name == name and raw._target_ == "attacks.base.Attack"
    assert raw.builder._partial_ is True
    if raw.norm == "none":
        assert raw.eps is None
    else:
        expected = {"Linf": "${dataset.eps.linf}", "L2": "${dataset.eps.l2}",
                    "wasserstein": "${oc.select:dataset.eps.wasserstein,0.005}"}[raw.norm]
        assert OmegaConf.to_container(raw)["eps"] == expected
        assert OmegaConf.to_container(raw)["builder"]["eps"] == "${..eps}"


@pytest.mark.parametrize("name", sorted(EXPECTED - OTHER_NORMS))
def test_attack_config_attacks_the_victim(name, trained_victim, batch, acc):
    attack = load_attack(name, eps_linf=EPS["Linf"], eps_l2=EPS["L2"], builder_overrides=SHRINK.get(name))
    assert isinstance(attack, Attack) and attack.name == name
    n = N_IMAGES.get(name, 64)
    x, y = batch[0][:n], batch[1][:n]
    torch.manual_seed(0)
    x_adv = attack(trained_victim, x, y)

    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert torch.isfinite(x_adv).all() and _in_range(x_adv, attack)
    if attack.bounded:
        assert attack.eps == EPS[attack.norm]
        assert _norms(x_adv - x)[attack.norm].max() <= attack.eps + 1e-5
    clean, adv = acc(trained_victim, x, y), acc(trained_victim, x_adv, y)
    assert clean > 0.6
    if name == "none":
        assert torch.equal(x_adv, x)  # the "no attack" row
    elif attack.kind == "noise":
        assert (x_adv != x).any()  # ε = 1.5 of ℓ2 noise barely moves accuracy: see test_gaussian_noise_*
    else:
        assert adv <= clean - 0.3, f"{name}: accuracy {clean:.2f} -> {adv:.2f}"


def test_autoattack_reports_the_standard_budget(trained_victim):
    runner = load_attack("autoattack").builder(trained_victim)
    assert isinstance(runner, StandardAutoAttack)
    assert step_counts(runner) == {
        "apgd-ce": {"steps": 100, "restarts": 1, "eot": 1},
        "apgd-t": {"steps": 100, "targets": 9, "restarts": 1},
        "fab-t": {"steps": 100, "targets": 9, "restarts": 1},
        "square": {"queries": 5000, "restarts": 1},
    }
    assert runner.aa.norm == "Linf" and runner.aa.epsilon == 0.3


def test_autoattack_fast_reports_torchattacks_10_step_budget(trained_victim):
    runner = load_attack("autoattack_fast").builder(trained_victim)
    assert isinstance(runner, torchattacks.AutoAttack)
    counts = step_counts(runner)  # read off the torchattacks sub-attacks, not hard-coded
    assert list(counts) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert counts["apgd-ce"]["steps"] == counts["apgd-t"]["steps"] == counts["fab-t"]["steps"] == 10
    assert counts["apgd-t"]["targets"] == counts["fab-t"]["targets"] == 9
    assert counts["square"]["queries"] == 5000


def test_autoattack_shrinking_keeps_apgd_schedule_consistent(trained_victim):
    runner = StandardAutoAttack(trained_victim, eps=0.3, n_iter=10)
    for apgd in (runner.aa.apgd, runner.aa.apgd_targeted):
        assert (apgd.n_iter, apgd.n_iter_2, apgd.n_iter_min, apgd.size_decr) == (10, 2, 1, 1)
    with pytest.raises(TypeError, match="StandardAutoAttack"):
        step_counts(object())


# --- the uniform Attack callable -----------------------------------------------------------------


def _fast_pgd() -> Attack:
    return Attack("pgd", functools.partial(torchattacks.PGD, eps=0.3, alpha=0.1, steps=5), "Linf", 0.3)


def test_attack_restores_train_mode(trained_victim, batch):
    x, y = batch[0][:8], batch[1][:8]
    trained_victim.train()
    try:
        _fast_pgd()(trained_victim, x, y)
        assert trained_victim.training

        def broken(model):
            def run(x, y):
                assert not model.training  # attacks always see the model in eval mode
                raise RuntimeError("boom")

            return run

        with pytest.raises(RuntimeError, match="boom"):
            Attack("broken", broken, "Linf", 0.3)(trained_victim, x, y)
        assert trained_victim.training
    finally:
        trained_victim.eval()
    _fast_pgd()(trained_victim, x, y)
    assert not trained_victim.training


def test_attack_works_under_inference_mode(trained_victim, batch, acc):
    x, y = batch[0][:32], batch[1][:32]
    with torch.inference_mode():  # what Lightning's trainer.test does around test_step
        x_inf, y_inf = x.clone(), y.clone()
        x_adv = _fast_pgd()(trained_victim, x_inf, y_inf)
    assert not x_adv.is_inference()
    assert acc(trained_victim, x_adv, y) <= acc(trained_victim, x, y) - 0.3


def test_attack_rejects_images_outside_unit_range(trained_victim, batch):
    x, y = batch[0][:4], batch[1][:4]
    for bad in ((x - 0.2860) / 0.3530, x * 255):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            _fast_pgd()(trained_victim, bad, y)
    with pytest.raises(ValueError, match="NaN"):
        _fast_pgd()(trained_victim, torch.full_like(x, float("nan")), y)
    with pytest.raises(ValueError, match="shape"):
        _fast_pgd()(trained_victim, x[0], y)


def test_attack_rejects_unknown_norm_kind_and_config():
    with pytest.raises(ValueError, match="unknown norm"):
        Attack("x", lambda m: None, norm="Linfinity", eps=0.3)
    with pytest.raises(ValueError, match="unknown kind"):
        Attack("x", lambda m: None, norm="Linf", eps=0.3, kind="whitebox")
    with pytest.raises(ValueError, match="unknown attack"):
        attack_config("no_such_attack")
    with pytest.raises(KeyError, match="stepz"):
        attack_config("pgd", builder_overrides={"stepz": 3})


# --- PGD-DLR and restarts ------------------------------------------------------------------------


def test_dlr_loss_matches_definition_and_is_affine_invariant():
    z = torch.tensor([[3.0, 1.0, 0.5, -2.0], [0.0, 2.0, 5.0, 1.0]])
    y = torch.tensor([0, 2])
    # row 0: y on top → -(3 - 1)/(3 - 0.5); row 1: y on top too → -(5 - 2)/(5 - 1)
    assert torch.allclose(dlr_loss(z, y), torch.tensor([-2 / 2.5, -3 / 4]))
    y2 = torch.tensor([1, 0])  # not on top: -(z_y - max_other)/(z_π1 - z_π3)
    assert torch.allclose(dlr_loss(z, y2), torch.tensor([-(1 - 3) / 2.5, -(0 - 5) / 4]))
    assert torch.allclose(dlr_loss(7 * z - 3, y), dlr_loss(z, y), atol=1e-6)
    with pytest.raises(ValueError, match="3 classes"):
        dlr_loss(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown loss"):
        per_example_loss(z, y, "hinge")
    with pytest.raises(ValueError, match="unknown loss"):
        LossPGD(nn.Linear(2, 3), loss="hinge")


def test_restarts_keep_the_worst_case_per_image(trained_victim, batch):
    x, y = batch[0][:48], batch[1][:48]
    kwargs = dict(eps=0.1, alpha=0.02, steps=3, loss="ce")  # weak, so single runs leave survivors
    torch.manual_seed(3)
    single = LossPGD(trained_victim, restarts=1, **kwargs)(x, y)
    torch.manual_seed(3)  # the first restart draws the same start as the single run
    multi = LossPGD(trained_victim, restarts=4, **kwargs)(x, y)
    with torch.no_grad():
        fooled_single = trained_victim(single).argmax(1) != y
        fooled_multi = trained_victim(multi).argmax(1) != y
        loss_single = per_example_loss(trained_victim(single), y, "ce")
        loss_multi = per_example_loss(trained_victim(multi), y, "ce")
    assert (fooled_multi | ~fooled_single).all()  # fooled once → fooled in the result
    assert fooled_multi.sum() >= fooled_single.sum()
    survivors = ~fooled_multi
    assert (loss_multi[survivors] >= loss_single[survivors] - 1e-5).all()
    assert (multi - x).abs().max() <= 0.1 + 1e-6


# --- batched EOT-PGD ----------------------------------------------------------------------------


class CountingNoisyNet(nn.Module):
    """A tiny classifier that sees its input plus fresh Gaussian noise; counts forward calls."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 5))
        self.calls: list[int] = []

    def forward(self, x):
        self.calls.append(len(x))
        return self.net(x + 0.2 * torch.randn_like(x))


def test_batched_eot_pgd_one_forward_per_step_and_stays_in_ball():
    model = CountingNoisyNet()
    x, y = torch.rand(6, 1, 4, 4), torch.randint(0, 5, (6,))
    x_adv = BatchedEOTPGD(model, eps=0.1, alpha=0.03, steps=4, eot_samples=7)(x, y)
    assert model.calls == [42] * 4  # images × samples, one pass per step
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1
    model.calls.clear()
    BatchedEOTPGD(model, eps=0.1, alpha=0.03, steps=2, eot_samples=7, max_batch=18)(x, y)
    assert model.calls == [18, 18, 6] * 2  # chunks of 3 draws × 6 images, then the last draw
    with pytest.raises(ValueError, match="eot_samples"):
        BatchedEOTPGD(model, eot_samples=0)


# --- ℓ2 Gaussian noise ---------------------------------------------------------------------------


def test_gaussian_noise_has_exact_l2_norm_before_clipping():
    x = torch.full((16, 3, 8, 8), 0.5)
    noisy = GaussianNoiseL2(None, eps=1.5, seed=0)(x)  # 1.5 spread over 192 pixels never clips
    assert torch.allclose((noisy - x).flatten(1).norm(dim=1), torch.full((16,), 1.5), atol=1e-5)
    assert torch.equal(noisy, GaussianNoiseL2(None, eps=1.5, seed=0)(x))  # seeded → reproducible
    assert not torch.equal(noisy, GaussianNoiseL2(None, eps=1.5, seed=1)(x))
    with pytest.raises(ValueError, match="eps"):
        GaussianNoiseL2(None, eps=-1.0)


def test_gaussian_noise_lowers_accuracy_at_large_eps(trained_victim, batch, acc):
    x, y = batch
    attack = load_attack("gaussian_noise", eps_l2=25.0, builder_overrides={"seed": 0})
    assert attack.kind == "noise" and attack.norm == "L2" and attack.eps == 25.0
    x_adv = attack(trained_victim, x, y)
    assert _norms(x_adv - x)["L2"].max() <= 25.0 + 1e-5
    assert acc(trained_victim, x_adv, y) <= acc(trained_victim, x, y) - 0.2


# --- torchattacks fixes --------------------------------------------------------------------------


def test_margin_uses_true_logits_even_when_negative():
    logits = torch.tensor([[-1.0, -3.0, -2.0], [-5.0, 2.0, -0.5]])
    real, other = _true_and_best_other(logits, torch.tensor([0, 2]))
    assert real.tolist() == [-1.0, -0.5] and other.tolist() == [-2.0, 2.0]
    cw = CW(nn.Linear(2, 3))
    assert cw.f(logits, torch.tensor([0, 2])).tolist() == [1.0, 0.0]  # clamp(real - other, min=-κ=0)
    ead = EADEN(nn.Linear(2, 3), max_iterations=5)  # < 10 iterations: upstream divides by zero
    assert not ead.abort_early
    # tanh space: pixels at exactly 0/1 map to finite values (upstream: ±inf, gradient 0 forever)
    w = cw.inverse_tanh_space(torch.tensor([0.0, 0.5, 1.0]))
    assert torch.isfinite(w).all() and torch.allclose(cw.tanh_space(w), torch.tensor([0.0, 0.5, 1.0]), atol=1e-5)


@pytest.mark.parametrize("channels", [1, 3])
def test_tifgsm_any_channels_and_zero_gradient(channels):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(channels * 64, 4))
    x, y = torch.rand(5, channels, 8, 8), torch.randint(0, 4, (5,))
    x_adv = TIFGSM(model, eps=0.1, steps=3, len_kernel=5)(x, y)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and torch.isfinite(x_adv).all()
    dead = nn.Sequential(nn.Flatten(), nn.Linear(channels * 64, 4))
    nn.init.zeros_(dead[1].weight)  # zero input gradient: upstream turns it into NaN
    assert torch.equal(TIFGSM(dead, eps=0.1, steps=2, len_kernel=5)(x, y), x)
    assert TIFGSM(model, eps=0.3, steps=10).alpha == pytest.approx(0.03)  # alpha=None → eps/steps


def test_deepfool_is_batched_and_minimal(trained_victim, batch, acc):
    x, y = batch[0][:32], batch[1][:32]
    trained_victim.zero_grad(set_to_none=True)
    x_adv = DeepFool(trained_victim, steps=20)(x, y)
    assert acc(trained_victim, x_adv, y) == 0.0
    assert all(p.grad is None for p in trained_victim.parameters())  # upstream leaves .grad behind
    with torch.no_grad():
        correct = trained_victim(x).argmax(1) == y
    delta = _norms(x_adv - x)["L2"]
    assert (delta[~correct] == 0).all()  # already misclassified: untouched
    pgd = torchattacks.PGDL2(trained_victim, eps=5.0, alpha=0.5, steps=10)(x, y)
    assert delta[correct].median() < _norms(pgd - x)["L2"][correct].median()


def test_linf_deepfool_is_minimal_in_linf(trained_victim, batch, acc):
    """The ℓ∞ variant fools the model with a smaller ℓ∞ perturbation than the ℓ2 one (and the ℓ2 one with a smaller ℓ2)."""
    x, y = batch[0][:32], batch[1][:32]
    linf, l2 = DeepFool(trained_victim, steps=20, norm="Linf")(x, y), DeepFool(trained_victim, steps=20)(x, y)
    assert acc(trained_victim, linf, y) == 0.0
    with torch.no_grad():
        correct = trained_victim(x).argmax(1) == y
    d_inf, d_2 = _norms(linf - x), _norms(l2 - x)
    assert d_inf["Linf"][correct].median() < d_2["Linf"][correct].median()
    assert d_2["L2"][correct].median() < d_inf["L2"][correct].median()
    with pytest.raises(ValueError, match="valid: L2, Linf"):
        DeepFool(trained_victim, norm="L1")


@pytest.mark.slow
def test_full_standard_autoattack_runs(trained_victim, batch, acc):
    """The real budget end to end; at ε = 0.1 some images survive APGD-CE, so all four attacks run."""
    x, y = batch[0][:16], batch[1][:16]
    x_adv = load_attack("autoattack", eps_linf=0.1)(trained_victim, x, y)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-5
    torch.manual_seed(0)
    x_pgd = torchattacks.PGD(trained_victim, eps=0.1, alpha=0.01, steps=40)(x, y)
    assert acc(trained_victim, x_adv, y) <= acc(trained_victim, x_pgd, y) < acc(trained_victim, x, y)


def test_conf_dir_is_the_repository_one():
    assert CONF_DIR == Path(__file__).resolve().parents[1] / "conf" / "attack"


@pytest.mark.parametrize("eps", [0.3, 8 / 255])
def test_default_pgd_is_standard_strength_and_weak_presets_warn(eps):
    """attack=pgd reaches 2.5·ε (Madry); the DiffDefense authors' 20 × 0.01 at ε = 0.3 is a named preset that warns."""
    import warnings

    from attacks.base import WeakAttackWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pgd = load_attack("pgd", eps_linf=eps)
    atk = pgd.builder(torch.nn.Linear(1, 1))
    assert atk.steps * atk.alpha == pytest.approx(2.5 * eps) and atk.steps == 40
    assert load_attack("pgd", eps_linf=eps, builder_overrides={"steps": 10}).builder(torch.nn.Linear(1, 1)).alpha == pytest.approx(eps / 4)
    assert not [w for w in caught if issubclass(w.category, WeakAttackWarning)]
    if eps == 0.3:
        with pytest.warns(WeakAttackWarning, match=r"20 × 0.01 = 0.2 < eps = 0.3"):
            load_attack("pgd_diffdefense", eps_linf=eps)
        with warnings.catch_warnings(record=True) as again:
            warnings.simplefilter("always")
            load_attack("pgd_diffdefense", eps_linf=eps)
        assert not again  # once per setting


@pytest.mark.parametrize("name", sorted(EXPECTED - {"none", "gaussian_noise", "square"}))
def test_every_gradient_attack_runs_through_eot_on_a_stochastic_defense(name, trained_victim, batch):
    """The threat model's EOT (loss or logits, per attack) composes with every attack: none evaluates a subset
    of a tied-replica batch (which would raise TiedReplicaError), and the ε-ball holds."""
    from defenses.base import Defended
    from defenses.gaussian_noise import GaussianNoise
    from evaluation.threats import WhiteBoxAdaptive

    attack = load_attack(name, eps_linf=EPS["Linf"], eps_l2=EPS["L2"], builder_overrides=SHRINK.get(name))
    x, y = batch[0][:8], batch[1][:8]
    noisy = Defended(GaussianNoise(0.1), trained_victim)
    torch.manual_seed(0)
    x_adv = attack(WhiteBoxAdaptive(eot_samples=2).attacked_model(noisy, attack), x, y)
    assert x_adv.shape == x.shape and torch.isfinite(x_adv).all() and _in_range(x_adv, attack)
    if attack.bounded and name not in OTHER_NORMS:
        assert _norms(x_adv - x)[attack.norm].max() <= attack.eps + 1e-5
