"""RAP (issue 13): the adapter, its training (Alg. 3) and the purifier (1-step and Alg. 2).

What could fail and is checked: training adversaries crafted on the bare victim instead of victim∘adapter (a spy
adapter and a comparison with the victim-only adversaries), a training loop that does not learn, a 1-step output of
the wrong shape/range or with hidden randomness, a reverse chain in the wrong order, configs that do not compose,
weights not found by dataset/name (and the one-line message saying how to train them), and the evaluation and the
audit running end to end on a tiny trained adapter.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn

from defenses.base import Defended, Identity
from defenses.rap import RAP
from models.rap.adapter import AdaptedClassifier, RAPAdapter
from models.rap.forward_process import AdversarialProcess
from models.rap.module import RAPModule
from models.weights import CheckpointError, save_weights

T = 4


class TinyTimeNet(nn.Module):
    """A time-conditioned two-layer conv net: the U-Net's interface at a fraction of its cost (tests only)."""

    in_channels = 1
    image_size = None

    def __init__(self, num_steps: int = T, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.emb = nn.Embedding(num_steps + 1, width)
        self.conv2 = nn.Conv2d(width, 1, 3, padding=1)

    def forward(self, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.silu(self.conv1(h) + self.emb(t)[:, :, None, None]))


def tiny_adapter(residual: bool = False, seed: int = 0, num_steps: int = T) -> RAPAdapter:
    torch.manual_seed(seed)
    return RAPAdapter(TinyTimeNet(num_steps), num_steps=num_steps, residual=residual)


def tiny_victim(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 5, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 12 * 12, 10))


@pytest.fixture(scope="module")
def fitted(fmnist_test_batch, fit_on_batch):
    """(victim, x, y): a tiny victim fitted to 128 Fashion-MNIST test images (it needs accuracy to lose)."""
    x, y = fmnist_test_batch
    x, y = x[:128], y[:128]
    return fit_on_batch(tiny_victim(), x, y), x, y


def _module(adapter: RAPAdapter, victim: nn.Module, eps: float = 0.1, **kwargs) -> RAPModule:
    process = AdversarialProcess("Linf", eps, adapter.num_steps)
    return RAPModule(adapter, copy.deepcopy(victim), process, optimizer=lambda p: torch.optim.Adam(p, 3e-3), **kwargs)


# -- the adapter -------------------------------------------------------------------------------------------
def test_residual_adapter_starts_as_the_identity_and_checks_t():
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(tiny_adapter(residual=True)(x, T), x)
    assert not torch.allclose(tiny_adapter(residual=False)(x, T), x)
    ad = tiny_adapter()
    assert ad(x, torch.tensor([1, 2, 3, 4])).shape == x.shape
    for bad in (0, T + 1):
        with pytest.raises(ValueError, match=f"t must lie in 1..{T}"):
            ad(x, bad)
    assert int(ad.state_dict()["_variant_num_steps"]) == T


# -- the 1-step purifier -----------------------------------------------------------------------------------
def test_one_step_output_has_the_input_shape_range_and_is_deterministic(fitted):
    victim, x, _ = fitted
    rap = RAP(tiny_adapter())
    assert (rap.stochastic, rap.differentiable, rap.mode) == (False, True, "one_step")
    torch.manual_seed(1)
    a = rap(x[:16])
    torch.manual_seed(2)
    b = rap(x[:16])
    assert a.shape == x[:16].shape and float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.equal(a, b)
    torch.testing.assert_close(a, rap.adapter(x[:16], T))  # x̂₀ = f̃(x, T)
    xg = x[:16].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(Defended(rap, victim)(xg), fitted[2][:16]), xg)
    assert torch.isfinite(grad).all() and float(grad.abs().sum()) > 0  # exact gradient through adapter + victim
    assert not RAP(tiny_adapter(), gradient="bpda").differentiable
    assert isinstance(rap.weakened(), Identity)
    rap.train()
    assert rap.training and not rap.adapter.training


# -- Alg. 3 ---------------------------------------------------------------------------------------------------
class SpyAdapter(RAPAdapter):
    """Records every call made while an input gradient is being taken (i.e. inside the training attack)."""

    def forward(self, x: torch.Tensor, t):
        if torch.is_grad_enabled() and x.requires_grad:
            self.calls.append(int(torch.as_tensor(t).flatten()[0]))
        return super().forward(x, t)


def test_training_adversaries_are_crafted_against_victim_and_adapter(fitted):
    victim, x, y = fitted
    torch.manual_seed(0)
    spy = SpyAdapter(TinyTimeNet(), num_steps=T)
    spy.calls = []
    module = _module(spy, victim, eps=0.2)
    t = torch.tensor([1, 2, 3, 4] * 4)
    torch.manual_seed(5)
    ours = module.adversaries(x[:16], y[:16], t)
    # The attack differentiated through the adapter at every one of its max(t) steps, at the adapter time T.
    assert spy.calls == [T] * T
    # Exactly Alg. 1 on victim∘f̃(·, T) with the current weights …
    torch.manual_seed(5)
    expected = module.process.sample(AdaptedClassifier(spy, victim, T), x[:16], y[:16], t)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    # … and not the adversaries of the bare victim.
    torch.manual_seed(5)
    bare = module.process.sample(victim, x[:16], y[:16], t)
    assert (ours - bare).abs().amax() > 0.1
    spy.train()
    module.adversaries(x[:4], y[:4], t[:4])
    assert spy.training and not module.victim.training


def test_a_few_training_steps_lower_the_rap_loss(fitted):
    victim, x, y = fitted
    module = _module(tiny_adapter(residual=True), victim, eps=0.1)
    opt = module.configure_optimizers()
    assert all(p.requires_grad for p in opt.param_groups[0]["params"]) and not any(p.requires_grad for p in module.victim.parameters())
    xb, yb = x[:16], y[:16]
    t = torch.arange(16) % T + 1

    def loss_at_seed() -> float:
        torch.manual_seed(0)
        with torch.no_grad():
            return float(module.rap_loss(xb, yb, t)[0])

    before = loss_at_seed()
    module.train()
    for step in range(15):
        opt.zero_grad()
        loss, logs = module.step((xb, yb), "train")
        loss.backward()
        opt.step()
    assert set(logs) == {"rec", "ce", "adv_acc"}
    after = loss_at_seed()
    assert after < 0.8 * before, (before, after)
    assert all(p.grad is None for p in module.victim.parameters())
    exported = module.export()
    assert isinstance(exported, RAPAdapter) and not exported.training
    _, val_logs = module.step((xb, yb), "val")
    assert {"acc", "adv_acc"} <= set(val_logs)


def test_reconstruction_is_l1_or_squared_l2(fitted):
    victim, x, y = fitted
    ad = tiny_adapter()
    t = torch.full((8,), 2)
    losses = {}
    for rec in ("l1", "l2"):
        module = _module(ad, victim, reconstruction=rec, ce_weight=0.0)
        torch.manual_seed(0)
        losses[rec] = float(module.rap_loss(x[:8], y[:8], t)[1]["rec"])
    torch.manual_seed(0)
    x_t = _module(ad, victim).adversaries(x[:8], y[:8], t)
    diff = ad.raw(x_t, t) - (2 * x[:8] - 1)
    assert losses["l1"] == pytest.approx(float(diff.abs().mean()), rel=1e-5)
    assert losses["l2"] == pytest.approx(float((diff ** 2).mean()), rel=1e-5)
    with pytest.raises(ValueError, match="unknown reconstruction 'l3'; valid: l1, l2"):
        _module(ad, victim, reconstruction="l3")
    with pytest.raises(ValueError, match="attack_t must lie in 1..4"):
        _module(ad, victim, attack_t=5)


# -- Alg. 2 -------------------------------------------------------------------------------------------------
def test_reverse_process_runs_t_to_1_and_is_deterministic_and_differentiable(fitted):
    victim, x, y = fitted
    ad = tiny_adapter()
    proc = AdversarialProcess("Linf", 1e-6, T, random_start="uniform")
    rap = RAP(ad, mode="reverse", classifier=copy.deepcopy(victim), process=proc)
    assert (rap.stochastic, rap.differentiable, rap.process.random_start) == (False, True, "none")
    xb = x[:8]
    out = rap(xb)
    assert out.shape == xb.shape and torch.equal(out, rap(xb))
    # With ε → 0 the re-degradation is (almost) the identity: Alg. 2 is then x ← f̃(x, t) for t = T … 1.
    manual = xb
    with torch.no_grad():
        for t in range(T, 0, -1):
            manual = ad(manual, t)
    torch.testing.assert_close(out, manual, atol=1e-5, rtol=0)
    # T = 1: Alg. 2 is the 1-step defense.
    one = tiny_adapter(num_steps=1)
    torch.testing.assert_close(RAP(one, mode="reverse", classifier=victim, process=proc)(xb), RAP(one)(xb))
    # Gradients: exact through every adapter call (and the inner steps' projection / clamp), or BPDA through the inner steps.
    grads = {}
    for inner in ("exact", "bpda"):
        r = RAP(ad, mode="reverse", classifier=copy.deepcopy(victim), process=AdversarialProcess("Linf", 0.1, T), inner_gradient=inner)
        xg = xb.clone().requires_grad_(True)
        (grads[inner],) = torch.autograd.grad(F.cross_entropy(Defended(r, victim)(xg), y[:8]), xg)
        assert torch.isfinite(grads[inner]).all() and float(grads[inner].abs().sum()) > 0
    # (They differ only where an inner [0, 1] clamp is active: there the exact derivative is 0, BPDA's 1.)
    noisy = RAP(ad, mode="reverse", classifier=victim, process=proc, random_start="uniform")
    assert noisy.stochastic
    with pytest.raises(ValueError, match="mode=reverse needs the victim"):
        RAP(ad, mode="reverse")
    with pytest.raises(ValueError, match="unknown mode 'two_step'; valid: one_step, reverse"):
        RAP(ad, mode="two_step")


def test_reverse_mode_offers_a_smooth_surrogate_whose_gradient_matches_its_function(fitted):
    """The reverse chain's inner sign steps make its exact gradient describe a jumping function; the surrogate (tanh
    steps, soft label, double backprop) classifies like the chain and its gradient matches its own finite differences
    (the audit's check (d) along gradient=surrogate). One-step mode, smooth already, offers none."""
    from evaluation.audit import _finite_difference

    victim, x, y = fitted
    steps = 4
    proc = AdversarialProcess("Linf", 0.1, steps, step_size=0.03)
    rap = RAP(tiny_adapter(residual=True, num_steps=steps), mode="reverse", classifier=copy.deepcopy(victim), process=proc)
    assert RAP(tiny_adapter()).smooth_surrogate() is None
    smooth = rap.smooth_surrogate()
    assert smooth is not None and smooth.smooth and not rap.smooth and smooth.smooth_surrogate() is None
    assert smooth.adapter is rap.adapter, "the surrogate shares the adapter"
    # Interior images (pixels in [0.2, 0.8]): at the [0, 1] boundary the chain's clamps (x̂₀'s and Alg. 1's) are kinks
    # of the real function and of the surrogate alike, which a finite difference of step 0.01 straddles.
    xb, yb = 0.2 + 0.6 * x[:16], y[:16]
    real, soft = Defended(rap, victim), Defended(smooth, victim)
    with torch.no_grad():
        agree = (real(xb).argmax(1) == soft(xb).argmax(1)).float().mean()
    assert agree >= 0.8, f"the surrogate classifies only {agree:.0%} of the images like the chain"
    rel_smooth, _ = _finite_difference(copy.deepcopy(soft).double().eval(), xb.double(), yb, 0.01, 0)
    rel_exact, _ = _finite_difference(copy.deepcopy(real).double().eval(), xb.double(), yb, 0.01, 0)
    assert rel_smooth <= 0.1, rel_smooth
    assert rel_smooth < rel_exact, (rel_smooth, rel_exact)
    with pytest.raises(ValueError, match="surrogate_tau, surrogate_sharpness and surrogate_beta must be > 0"):
        RAP(tiny_adapter(), surrogate_tau=0)


# -- configs, weights, messages --------------------------------------------------------------------------------
def test_configs_compose_and_instantiate(compose):
    from models.diffusion.unet import DDPMUNet

    cfg = compose("train", ["model=rap", "denoiser=rap_tiny", "logger=csv"])
    module = instantiate(cfg.model, victim={"weights": None})
    assert isinstance(module, RAPModule) and isinstance(module.adapter.net, DDPMUNet)
    assert module.export_path.endswith("fashion_mnist/rap-rap_tiny-Linf-classifier_a-standard.pt")
    assert (module.num_steps, module.attack_t, module.reconstruction, module.ce_weight) == (20, 20, "l1", 1.0)
    assert (module.process.norm, module.process.eps, module.process.random_start) == ("Linf", 0.3, "uniform")
    assert module.process.step_size == pytest.approx(0.0375)
    l2 = compose("train", ["model=rap", "victim=mnist_cnn", "denoiser.norm=L2", "dataset=mnist"])
    assert l2.model.export_path.endswith("mnist/rap-rap_small-L2-mnist_cnn-standard.pt")
    assert l2.model.process.eps == 1.5 and l2.model.victim.weights.endswith("mnist/mnist_cnn-standard.pt")
    big = compose("train", ["model=rap", "denoiser=rap_cifar10", "dataset=cifar10", "victim=wrn_28_10"])
    assert list(big.denoiser.net.net.block_out_channels) == [128, 256, 256, 256] and big.denoiser.net.net.layers_per_block == 2
    assert big.model.process.eps == pytest.approx(8 / 255) and not big.denoiser.net.residual

    ev = compose("evaluate", ["defense=rap"])
    assert ev.denoiser.name == "rap_small" and ev.defense.purifier.weights.endswith("fashion_mnist/rap-rap_small-Linf-classifier_a-standard.pt")
    rap = instantiate(ev.defense.purifier, weights=None)
    assert isinstance(rap, RAP) and rap.mode == "one_step" and rap.num_steps == 20
    rev = compose("evaluate", ["defense=rap_reverse", "denoiser=rap_tiny"])
    rap = instantiate(rev.defense.purifier, weights=None, classifier={"weights": None})
    assert (rap.mode, rap.stochastic, rap.process.random_start, rap.inner_gradient, rev.defense.name) == ("reverse", False, "none", "exact", "rap_reverse")
    assert rap.smooth_surrogate() is not None and (rap.surrogate_tau, rap.surrogate_sharpness, rap.surrogate_beta) == (0.1, 5.0, 10.0)
    # Table 6: the adapter trained against the standard victim, put in front of the adversarially trained one.
    t6 = compose("evaluate", ["defense=rap", "victim_training=pgd_at", "denoiser.victim_training=standard"])
    assert t6.victim.weights.endswith("classifier_a-pgd_at.pt") and t6.defense.purifier.weights.endswith("classifier_a-standard.pt")
    assert compose("evaluate", ["defense=diffpure"]).denoiser.name == "ddpm_cifar10"  # other defenses unchanged


def test_missing_checkpoint_is_one_line_saying_how_to_train_it(compose, missing_weights_message):
    message = missing_weights_message(compose("evaluate", ["defense=rap", "victim=mnist_cnn"]))
    assert "python train.py model=rap dataset=fashion_mnist victim=mnist_cnn denoiser=rap_small" in message
    assert "rap-rap_small-Linf-mnist_cnn-standard.pt" in message


def test_weights_round_trip_and_a_file_for_another_T_fails_in_one_line(tmp_path):
    ad = tiny_adapter()
    path = save_weights(ad, tmp_path / "fashion_mnist" / "rap-x.pt")
    loaded = RAP(tiny_adapter(seed=1), weights=str(path))
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(loaded(x), ad(x, T))
    with pytest.raises(CheckpointError, match="_variant_num_steps") as err:
        RAP(tiny_adapter(num_steps=T + 1), weights=str(path))
    assert "\n" not in str(err.value)


def _save_tiny_run(cfg) -> None:
    """Victim and rap_tiny adapter weights where the composed config looks for them (random init: plumbing only)."""
    victim = instantiate(cfg.victim, weights=None)
    save_weights(victim, cfg.victim.weights)
    save_weights(instantiate(cfg.denoiser.net), cfg.denoiser.weights)


def test_evaluate_finds_the_weights_by_dataset_and_name_and_runs_adaptively(compose):
    from evaluation.runner import run_evaluation

    cfg = compose("evaluate", ["defense=rap", "denoiser=rap_tiny", "denoiser.num_steps=5", "attack=fgsm",
                               "threat=white_box_adaptive", "dataset.eval_subset=8", "eval.max_batches=1", "eval.grid=false",
                               "eval.resume=false"])
    _save_tiny_run(cfg)
    result = run_evaluation(cfg)
    assert result["defense"] == "rap" and result["n_images"] == 8 and result["threat"] == "white_box_adaptive"
    assert result["purifier"]["class"] == "RAP" and result["purifier"]["differentiable"] and not result["purifier"]["stochastic"]


def test_audit_runs_on_rap_one_step(fitted):
    from evaluation.audit import format_report, run_audit

    victim, x, y = fitted
    report = run_audit(Defended(RAP(tiny_adapter(seed=3)), victim), x[:16], y[:16], eps=0.1, steps=4,
                       eot_samples=1, n_draws=1, square_queries=10)
    print(format_report(report))
    status = {c["name"]: c["status"] for c in report["checks"]}
    assert status["g_declared_randomness_holds"] == "pass" and status["e_frozen_randomness_not_stronger"] == "n/a"
    assert status["d_gradient_matches_finite_differences"] == "pass"
    assert status["c_full_gradient_beats_bpda_identity"] != "n/a" and status["i_weakened_defense_is_weaker"] != "n/a"


# -- experiments -----------------------------------------------------------------------------------------------
RAP_EXPERIMENTS = ["rap_mnist", "rap_table1", "rap_table2", "rap_transfer", "rap_bpda_eot", "rap_with_at"]


@pytest.mark.parametrize("experiment", RAP_EXPERIMENTS)
def test_every_sweep_job_composes_and_resolves(compose, experiment):
    from omegaconf import OmegaConf

    from evaluation.runner import _paper_number
    from test_experiments import CONF, sweep_jobs

    text = (CONF / "experiment" / f"{experiment}.yaml").read_text()
    assert text.startswith("# @package _global_\n") and f"python evaluate.py -m experiment={experiment}" in text
    assert "python train.py" in text
    jobs = sweep_jobs(experiment)
    assert len(jobs) >= 2
    for job in jobs:
        cfg = compose("evaluate", [f"experiment={experiment}", *job])
        OmegaConf.to_container(cfg, resolve=True)
        _paper_number(cfg)
        if cfg.defense.name.startswith("rap"):
            assert cfg.denoiser.name == ("rap_small" if experiment == "rap_mnist" else "rap_cifar10")


def test_rap_mnist_paper_cells_and_cpu_stand_in(compose):
    from evaluation.runner import _paper_number
    from test_experiments import sweep_jobs

    rap_column = {"none": 99.0, "gaussian_noise": 98.9, "deepfool": 97.3, "fgsm": 94.8}
    for attack, value in rap_column.items():
        cfg = compose("evaluate", ["experiment=rap_mnist", "defense=rap", f"attack={attack}"])
        assert _paper_number(cfg) == value and cfg.table.column == "rap standard"
    bim = compose("evaluate", ["experiment=rap_mnist", "attack=bim", "attack.builder.steps=20", "attack.builder.alpha=0.0375"])
    assert _paper_number(bim) == 94.1 and bim.attack.eps == 0.3
    bim_l2 = compose("evaluate", ["experiment=rap_mnist", "attack=pgd_l2", "attack.builder.random_start=false", "table.row=${dataset.name} bim_l2"])
    assert _paper_number(bim_l2) == 93.5 and bim_l2.attack.eps == 1.5 and bim_l2.attack.builder.steps == 20
    madry = compose("evaluate", ["experiment=rap_mnist", "defense=none", "victim_training=pgd_at", "attack=deepfool"])
    assert _paper_number(madry) == 91.0 and madry.victim.weights.endswith("mnist/mnist_cnn-pgd_at.pt")
    rap_at = compose("evaluate", ["experiment=rap_mnist", "defense=rap", "victim_training=pgd_at"])
    assert rap_at.defense.purifier.weights.endswith("mnist/rap-rap_small-Linf-mnist_cnn-standard.pt")
    # CPU stand-in: the same experiment on Fashion-MNIST, 1000 images, no paper numbers attached.
    for job in sweep_jobs("rap_mnist", ["dataset=fashion_mnist", "dataset.eval_subset=1000"]):
        cfg = compose("evaluate", ["experiment=rap_mnist", *job])
        assert cfg.dataset.name == "fashion_mnist" and cfg.dataset.eval_subset == 1000 and _paper_number(cfg) is None


def test_cifar_tables_point_at_the_right_adapters_and_numbers(compose):
    from evaluation.runner import _paper_number

    t1 = compose("evaluate", ["experiment=rap_table1"])
    assert (_paper_number(t1), t1.dataset.eval_subset, t1.victim.name) == (73.24, 512, "robustbench")
    assert t1.defense.purifier.weights.endswith("cifar10/rap-rap_cifar10-Linf-robustbench-standard.pt")
    t2 = compose("evaluate", ["experiment=rap_table2"])
    assert (_paper_number(t2), t2.attack.norm, t2.attack.eps) == (85.54, "L2", 0.5)
    assert t2.defense.purifier.weights.endswith("rap-rap_cifar10-L2-robustbench-standard.pt")
    cross = compose("evaluate", ["experiment=rap_transfer", "denoiser.norm=L2", "eval_norm=Linf"])
    assert (_paper_number(cross), cross.attack.norm, cross.table.row) == (70.2, "Linf", "cifar10 rap L2")
    b = compose("evaluate", ["experiment=rap_bpda_eot"])
    assert _paper_number(b) == 81.63 and b.defense.purifier.gradient == "bpda"
    assert (b.attack.builder.steps, b.attack.builder.eot_iter) == (50, 15) and b.attack.builder.alpha == pytest.approx(2 / 255)
    both = compose("evaluate", ["experiment=rap_with_at", "victim=wrn_28_10", "victim_training=pgd_at", "denoiser.victim_name=robustbench",
                                "denoiser.victim_training=standard", "table.row=cifar10 RAP+AT"])
    assert _paper_number(both) == 73.5 and both.defense.purifier.weights.endswith("rap-rap_cifar10-Linf-robustbench-standard.pt")
    assert both.victim.weights.endswith("cifar10/wrn_28_10-pgd_at.pt")


def test_smooth_surrogate_differentiates_twice_through_the_configured_adapter(compose, fitted):
    """The audit along gradient=surrogate backpropagates through the surrogate's inner gradients, so every op of the
    real adapter needs a double backward: `rap_tiny`'s U-Net has self-attention, whose fused CPU kernel has none
    (session 14: the audit stopped with "derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is
    not implemented"). The surrogate's gradient through the configured adapter must come back finite and non-zero."""
    victim, x, y = fitted
    cfg = compose("train", ["model=rap", "denoiser=rap_tiny", "denoiser.num_steps=2", "logger=csv"])
    adapter = instantiate(cfg.model, victim={"weights": None}).adapter.eval()
    assert any("Attention" in type(m).__name__ for m in adapter.modules()), "the test needs an adapter with attention"
    proc = AdversarialProcess("Linf", 0.1, 2, step_size=0.05)
    smooth = RAP(adapter, mode="reverse", classifier=copy.deepcopy(victim), process=proc).smooth_surrogate()
    xb = x[:4].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(Defended(smooth, victim)(xb), y[:4]), [xb])
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
