"""The one diffusion core (respacing, ᾱ matching, guided and checkpointed chains) and the three defenses on it:
DiffPure, DensePure and distribution transfer. Tiny generated tensors and tiny models only."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from defenses.base import Defended, Purifier
from defenses.densepure import DensePure
from defenses.diffpure import DiffPure
from defenses.distribution_transfer import ClassifierGuidance, DistributionTransfer, matched_t_star
from models.diffusion.chain import diffuse_and_denoise, respaced_steps
from models.diffusion.schedule import DiffusionSchedule, to_model_space
from models.diffusion.unet import DDPMUNet


class TinyEps(nn.Module):
    """A smooth, time-dependent ε-model (a conv and a tanh): enough for gradients to mean something."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls.append(int(t[0]))
        return torch.tanh(self.conv(x)) * (1.0 + t.to(x.dtype)[:, None, None, None] / 1000.0)


class TinyClassifier(nn.Module):
    def __init__(self, shape=(3, 8, 8), classes: int = 4) -> None:
        super().__init__()
        self.lin = nn.Linear(math.prod(shape), classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.flatten(1))


@pytest.fixture
def linear():
    return DiffusionSchedule(1000, 1e-4, 0.02)


# -- the core ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_forward_diffusion_matches_q_moments(kind):
    s = DiffusionSchedule(1000, 1e-4, 0.02, kind=kind)
    x0 = torch.full((20000, 1, 1, 1), 0.6)
    for t in (0, 99, 499):
        xt = s.q_sample(x0, t)
        ab = float(s._alphas_cumprod64[t])
        assert xt.mean().item() == pytest.approx(math.sqrt(ab) * 0.6, abs=0.02)
        assert xt.var().item() == pytest.approx(1 - ab, rel=0.06, abs=2e-4)


def test_alpha_bar_matching_between_cosine_4000_and_linear_1000(linear):
    cosine = DiffusionSchedule(4000, kind="cosine")
    ab = float(cosine._alphas_cumprod64[470])
    assert ab == pytest.approx(0.9622, abs=1e-3)  # the authors' "470 iterations"
    step = linear.match_step(ab)
    assert step == 57 and matched_t_star(linear, {"t": 470, "num_steps": 4000, "kind": "cosine"}) == 58
    neighbours = linear._alphas_cumprod64[step - 1: step + 2]
    assert float(neighbours[2]) <= ab <= float(neighbours[0])  # the nearest step brackets the reference
    # Mapping back lands on the reference step up to the coarser grid.
    assert abs(cosine.match_step(float(linear._alphas_cumprod64[step])) - 470) <= 4


def test_step_for_sigma_matches_carlini_search(linear):
    for sigma in (0.25, 0.5):
        t = linear.step_for_sigma(sigma)
        ratio = ((1 - linear._alphas_cumprod64) / linear._alphas_cumprod64).sqrt()
        first = int((ratio >= 2 * sigma).nonzero()[0])  # Carlini et al.'s search: first t with √((1−ᾱ)/ᾱ) ≥ 2σ
        assert abs(t - first) <= 1


def test_respace_keeps_alpha_bar_and_calls_the_model_with_trained_times(linear):
    taus = respaced_steps(100, 10)
    assert taus[0] == 0 and taus[-1] == 99 and len(taus) == 10 and taus == sorted(set(taus))
    sub = linear.respace(taus)
    assert torch.allclose(sub.alphas_cumprod, linear.alphas_cumprod[taus], rtol=1e-6)
    assert sub.timestep_map.tolist() == taus
    identity = linear.respace(range(1000))
    assert torch.allclose(identity.betas, linear.betas, rtol=1e-5) and torch.allclose(identity.posterior_variance, linear.posterior_variance, rtol=1e-4, atol=1e-12)
    eps = TinyEps()
    sub.sample_loop(eps, torch.randn(2, 3, 8, 8), t_start=sub.num_steps)
    assert eps.calls == list(reversed(taus))
    with pytest.raises(ValueError, match="increase strictly"):
        linear.respace([5, 3])


def test_chain_from_t_star_zero_is_the_identity(linear):
    x = torch.rand(3, 3, 8, 8)
    eps = TinyEps()
    assert torch.equal(diffuse_and_denoise(linear, eps, x, 0), x) and eps.calls == []
    pure = DiffPure(eps, linear, t_star=0)
    assert torch.equal(pure(x), x) and not pure.stochastic


def test_chain_runs_t_star_trained_steps_or_the_respaced_ones(linear):
    eps = TinyEps()
    x = torch.rand(2, 3, 8, 8)
    out = diffuse_and_denoise(linear, eps, x, 12)
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
    assert eps.calls == list(range(11, -1, -1))
    eps.calls.clear()
    diffuse_and_denoise(linear, eps, x, 100, reverse_steps=5)
    assert eps.calls == list(reversed(respaced_steps(100, 5)))
    eps.calls.clear()
    diffuse_and_denoise(linear, eps, x, 40, sampler="one_shot")
    assert eps.calls == [39]


def test_one_shot_returns_the_predicted_x0(linear):
    eps = TinyEps()
    x = torch.rand(2, 3, 8, 8)
    g = torch.Generator().manual_seed(3)
    out = diffuse_and_denoise(linear, eps, x, 30, sampler="one_shot", generator=g)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    xt = linear.q_sample(to_model_space(x), 29, noise)
    expected = ((linear.predict_x0(xt, 29, eps(xt, torch.full((2,), 29))) + 1) / 2).clamp(0, 1)
    assert torch.allclose(out, expected, atol=1e-6)


def test_a_guidance_step_lowers_the_distance():
    torch.manual_seed(0)
    s = DiffusionSchedule(1000, 1e-4, 0.02)
    eps, clf = TinyEps(), TinyClassifier()
    x_ref = torch.rand(4, 3, 8, 8)
    guide = ClassifierGuidance(clf, x_ref, scale=200.0, phi=1.0, create_graph_ref=False)
    x_t = s.q_sample(to_model_space(torch.rand(4, 3, 8, 8)), 299)
    noise = torch.zeros_like(x_t)

    def distance(x):
        with torch.no_grad():
            return guide.distance(s.predict_x0(x, 298, s.eps(eps, x, 298)))

    plain = s.p_sample(eps, x_t, 299, noise=noise)
    guided = s.p_sample(eps, x_t, 299, noise=noise, guidance=guide)
    assert not torch.equal(plain, guided)
    assert (distance(guided) < distance(plain)).all()


@pytest.mark.parametrize("distance", ["norm", "squared"])
def test_the_logit_distance_is_the_norm_as_printed_or_its_square(distance):
    torch.manual_seed(0)
    clf, x_ref, x0 = TinyClassifier(), torch.rand(3, 3, 8, 8), torch.rand(3, 3, 8, 8)
    guide = ClassifierGuidance(clf, x_ref, scale=1.0, phi=0.0, create_graph_ref=False, distance=distance)
    gap = (clf(x0) - clf(x_ref)).flatten(1).norm(dim=1)
    with torch.no_grad():
        d = guide.distance(to_model_space(x0))
    assert torch.allclose(d, gap if distance == "norm" else gap**2, atol=1e-5)


def test_an_unknown_distance_lists_the_valid_ones():
    with pytest.raises(ValueError, match="norm.*squared"):
        DistributionTransfer(TinyEps(), DiffusionSchedule(1000, 1e-4, 0.02), classifier=TinyClassifier(), t_star=3, distance="l1")


def test_checkpointed_and_plain_gradients_agree_with_double_backprop():
    s = DiffusionSchedule(1000, 1e-4, 0.02)
    eps, clf = TinyEps().double(), TinyClassifier().double()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    grads = []
    for checkpoint in (False, True):
        dt = DistributionTransfer(eps, s, classifier=clf, t_star=6, scale=5.0, phi=1.0, checkpoint=checkpoint)
        xa = x.clone().requires_grad_(True)
        torch.manual_seed(1)
        loss = nn.functional.cross_entropy(Defended(dt, clf)(xa), torch.tensor([0, 1]))
        grads.append(torch.autograd.grad(loss, xa)[0])
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-9, atol=1e-12)
    # The guidance's own gradient is part of it: without guidance the gradient differs.
    torch.manual_seed(1)
    xa = x.clone().requires_grad_(True)
    unguided = DistributionTransfer(eps, s, classifier=clf, t_star=6, scale=0.0)
    loss = nn.functional.cross_entropy(Defended(unguided, clf)(xa), torch.tensor([0, 1]))
    assert not torch.allclose(torch.autograd.grad(loss, xa)[0], grads[0], rtol=1e-3)


def test_exact_chain_gradient_matches_finite_differences():
    s = DiffusionSchedule(1000, 1e-4, 0.02)
    eps, clf = TinyEps().double(), TinyClassifier().double()
    dt = DistributionTransfer(eps, s, classifier=clf, t_star=4, scale=5.0, phi=0.5, checkpoint=True)
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64) * 0.8 + 0.1
    direction = torch.randn_like(x)

    def f(z):
        torch.manual_seed(7)  # the same forward and reverse noise on every call
        return Defended(dt, clf)(z)[0, 1]

    xa = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(xa), xa)
    h = 1e-5
    fd = (f(x + h * direction) - f(x - h * direction)) / (2 * h)
    assert float((g * direction).sum()) == pytest.approx(float(fd), rel=1e-4, abs=1e-8)


# -- the defenses -----------------------------------------------------------------------------------------------
class ScriptedPurifier(Purifier):
    """Returns the next image of a script on every call (to control DensePure's votes)."""

    stochastic = True

    def __init__(self, outputs: list[torch.Tensor], votes: int) -> None:
        super().__init__()
        self.outputs, self.i, self.votes = outputs, 0, votes

    def forward(self, x):
        out = self.outputs[self.i % len(self.outputs)]
        self.i += 1
        return x * 0 + out


def test_densepure_majority_vote_and_its_gradient():
    victim = TinyClassifier((3, 2, 2), classes=3)
    with torch.no_grad():
        victim.lin.weight.zero_()
        victim.lin.bias.zero_()
        for c in range(3):
            victim.lin.weight[c, 4 * c] = 10.0  # class c ← channel c's first pixel
    e = [torch.zeros(1, 3, 2, 2) for _ in range(3)]
    for c in range(3):
        e[c][0, c] = 1.0
    # Five passes: class 1 twice, class 2 twice, class 0 once → vote shares 0.4 / 0.4 / 0.2; then a clear majority.
    votes = Defended(ScriptedPurifier([e[1], e[1], e[0], e[2], e[2]], votes=5), victim)(torch.zeros(1, 3, 2, 2)).detach()
    assert votes.exp()[0, 1] == pytest.approx(0.4, abs=2e-3) and votes.exp()[0, 0] == pytest.approx(0.2, abs=2e-3)
    majority = Defended(ScriptedPurifier([e[2], e[2], e[0], e[2], e[1]], votes=5), victim)(torch.zeros(1, 3, 2, 2))
    assert majority.argmax(1).item() == 2
    # Gradient = that of the log mean softmax over the passes (never the hard vote's zero).
    x = torch.rand(2, 3, 2, 2, requires_grad=True)
    torch.manual_seed(0)
    noise = [torch.randn(2, 3, 2, 2) * 0.1 for _ in range(4)]

    class Noisy(Purifier):
        stochastic, votes = True, 4

        def __init__(self):
            super().__init__()
            self.i = 0

        def forward(self, z):
            self.i += 1
            return z + noise[(self.i - 1) % 4]

    out = Defended(Noisy(), victim)(x)
    (g,) = torch.autograd.grad(out[:, 0].sum(), x)
    x2 = x.detach().clone().requires_grad_(True)
    soft = torch.stack([victim(x2 + n).softmax(1) for n in noise]).mean(0).log()
    (g2,) = torch.autograd.grad(soft[:, 0].sum(), x2)
    assert torch.allclose(g, g2, atol=1e-6) and g.abs().sum() > 0


def test_densepure_t_star_from_sigma_and_votes(linear):
    dp = DensePure(TinyEps(), linear, sigma=0.25, votes=3)
    assert dp.t_star == linear.step_for_sigma(0.25) + 1 == 145 and dp.votes == 3 and dp.stochastic
    weak = dp.weakened()
    assert weak.t_star == 0 and weak.votes == 1 and dp.t_star == 145  # the original is untouched
    with pytest.raises(ValueError, match="votes"):
        DensePure(TinyEps(), linear, votes=0)


def test_distribution_transfer_variants_and_errors(linear):
    eps, clf = TinyEps(), TinyClassifier()
    paper = DistributionTransfer(eps, linear, classifier=clf, scale=1.0)
    assert paper.t_star == 58 and paper.sampler == "ddpm" and paper.guidance(torch.rand(1, 3, 8, 8)) is not None
    authors = DistributionTransfer(eps, linear, variant="authors_code", sampler="one_shot", clip_x0=True)
    assert authors.guidance(torch.rand(1, 3, 8, 8)) is None and authors.sampler == "one_shot"
    eps.calls.clear()
    authors(torch.rand(2, 3, 8, 8))
    assert eps.calls == [57]
    with pytest.raises(ValueError, match="variant"):
        DistributionTransfer(eps, linear, classifier=clf, variant="nope")
    with pytest.raises(ValueError, match="protected model"):
        DistributionTransfer(eps, linear, classifier=None, scale=1.0)
    with pytest.raises(ValueError, match="one-shot"):
        DistributionTransfer(eps, linear, classifier=clf, sampler="one_shot", scale=1.0)
    with pytest.raises(ValueError, match="sampler"):
        DiffPure(eps, linear, sampler="sde")
    with pytest.raises(ValueError, match="t_star"):
        DiffPure(eps, linear, t_star=1001)


def test_diffpure_is_stochastic_and_purifies_towards_the_data():
    """On a denoiser that knows the data is constant (ε̂ = the exact noise for x_0 ≡ c), purification from t*
    returns c whatever the input perturbation — the chain does what DiffPure relies on."""
    s = DiffusionSchedule(1000, 1e-4, 0.02)
    c = 0.3  # model-space value of the single training image

    class Oracle(nn.Module):
        def forward(self, x, t):
            ab = s.alphas_cumprod[t][:, None, None, None]
            return (x - ab.sqrt() * c) / (1 - ab).sqrt()

    pure = DiffPure(Oracle(), s, t_star=200)
    x = torch.full((2, 3, 8, 8), (c + 1) / 2) + 0.05 * torch.randn(2, 3, 8, 8)
    out = pure(x.clamp(0, 1))
    assert torch.allclose(out, torch.full_like(out, (c + 1) / 2), atol=1e-3)
    assert pure.stochastic and pure.differentiable and not pure.also_bpda


def test_ddpm_unet_wrapper_matches_diffusers():
    from diffusers import UNet2DModel

    net = DDPMUNet(in_channels=3, image_size=8, block_out_channels=(8, 16), layers_per_block=1,
                   down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                   norm_num_groups=4, dropout=0.0)
    assert isinstance(net.net, UNet2DModel)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 900])
    assert torch.equal(net(x, t), net.net(x, t).sample)
    with pytest.raises(ValueError, match="channels"):
        net(torch.randn(1, 1, 8, 8), t[:1])


# -- end to end through the runner --------------------------------------------------------------------------------
@pytest.mark.parametrize("defense", ["diffpure", "densepure", "disttrans", "disttrans_authors"])
def test_runner_attacks_each_diffusion_defense_adaptively(compose, defense):
    """Hydra config → purifier → white-box adaptive PGD through the exact chain (loss-EOT) → N-draw scores → results.json,
    with tiny untrained weights written by the test (the numbers mean nothing; the path must run and stay in ε)."""
    import json
    from pathlib import Path

    from hydra.utils import instantiate

    from evaluation.runner import run_evaluation
    from models.weights import save_weights

    tiny = ["dataset=fashion_mnist_rgb32", "victim=resnet18", "denoiser=ddpm_small", f"defense={defense}",
            "attack=pgd", "attack.builder.steps=2", "threat=white_box_adaptive", "threat.model.eot_samples=2",
            "dataset.eval_subset=4", "dataset.datamodule.eval_batch_size=4", "eval.n_draws=2", "eval.grid=false",
            "defense.purifier.reverse_steps=2", "eval.image_quality=true"]
    if defense == "densepure":
        tiny += ["defense.purifier.votes=2"]
    cfg = compose("evaluate", tiny)
    torch.manual_seed(0)
    save_weights(instantiate(cfg.victim, weights=None), cfg.victim.weights)
    save_weights(instantiate(cfg.denoiser.net), cfg.denoiser.weights)
    result = run_evaluation(cfg)
    on_disk = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    assert on_disk["n_images"] == 4 and on_disk["n_draws"] == 2 and on_disk["violations"] == 0
    assert -1.0 <= on_disk["purified_ssim"] < 1.0 and on_disk["purified_psnr"] > 0  # an untrained denoiser changes the image
    assert result["purifier"]["stochastic"] and result["purifier"]["t_star"] == {
        "diffpure": 100, "densepure": 145, "disttrans": 58, "disttrans_authors": 58}[defense]


class ReluClassifier(nn.Module):
    """A classifier with ReLUs in every spelling a victim's forward may use (module, functional, method)."""

    def __init__(self, shape=(3, 8, 8), classes: int = 4) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(math.prod(shape), 16), nn.Linear(16, classes)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.a(x.flatten(1)))
        return self.b(nn.functional.relu(h) + torch.relu(h).relu())


def test_softplus_relus_replaces_every_relu_spelling_inside_the_context_only():
    from models.smooth_relu import softplus_relus

    torch.manual_seed(0)
    clf, x = ReluClassifier(), torch.randn(5, 3, 8, 8)
    plain = clf(x)
    with softplus_relus(4.0):
        smooth = clf(x)
    h = nn.functional.softplus(clf.a(x.flatten(1)), beta=4.0)
    sp = lambda t: nn.functional.softplus(t, beta=4.0)  # noqa: E731
    assert torch.allclose(smooth, clf.b(sp(h) + sp(sp(h))), atol=1e-6)
    assert torch.equal(clf(x), plain)  # outside the context: ReLU again
    with pytest.raises(ValueError, match="> 0"):
        softplus_relus(0.0)


def test_the_guided_chain_offers_a_smooth_surrogate_that_tracks_it():
    """Guided: a surrogate with softplus in the guidance classifier only, the same draws under the same seed, close
    to the real chain, its gradient matching its own finite differences. Unguided (s = 0, or the one-shot variant):
    none, the chain is smooth already."""
    s = DiffusionSchedule(1000, 1e-4, 0.02)
    eps, clf = TinyEps().double(), ReluClassifier().double()
    dt = DistributionTransfer(eps, s, classifier=clf, t_star=4, scale=5.0, phi=0.5, surrogate_beta=20.0)
    assert DistributionTransfer(eps, s, classifier=clf, t_star=4, scale=0.0).smooth_surrogate() is None
    assert DistributionTransfer(eps, s, classifier=clf, t_star=4, variant="authors_code").smooth_surrogate() is None
    sur = dt.smooth_surrogate()
    assert sur.guidance_softplus_beta == 20.0 and dt.guidance_softplus_beta is None and sur.smooth_surrogate() is None
    assert sur.denoiser is dt.denoiser and sur.classifier is dt.classifier
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64) * 0.8 + 0.1

    def run(purifier, z):
        torch.manual_seed(7)
        return purifier(z)

    real, smooth = run(dt, x), run(sur, x)
    assert 0 < (real - smooth).abs().max() < 0.05
    with pytest.raises(ValueError, match="surrogate_beta"):
        DistributionTransfer(eps, s, classifier=clf, t_star=4, scale=5.0, surrogate_beta=0.0)
    direction = torch.randn_like(x)
    xa = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(run(sur, xa).sum(), xa)
    h = 1e-5
    fd = (run(sur, x + h * direction).sum() - run(sur, x - h * direction).sum()) / (2 * h)
    assert float((g * direction).sum()) == pytest.approx(float(fd), rel=1e-4, abs=1e-8)
