"""Defense-GAN: the release's WGAN generator/critic, WGAN-GP training on LitBase, the purifier's latent
search, weights errors, and the configs (train model=gan, evaluate defense=defense_gan)."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Subset

from defenses.base import Defended
from defenses.defense_gan import DefenseGAN
from defenses.latent_search import LatentSearchResult
from models.gan import DefenseGANCritic, DefenseGANGenerator, WGANModule, gradient_penalty
from models.weights import save_weights

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def adam(params):
    return torch.optim.Adam(params, lr=1e-4, betas=(0.5, 0.9))


def quiet_trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path, **kwargs)


# -- networks ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_generator_and_critic_shapes_and_ranges(channels, size):
    torch.manual_seed(0)
    g, d = DefenseGANGenerator(channels, size, latent_dim=16, width=8), DefenseGANCritic(channels, size, width=8)
    x = g(5 * torch.randn(6, 16))
    assert x.shape == (6, channels, size, size) and x.min() >= 0 and x.max() <= 1
    scores = d(x)
    assert scores.shape == (6,) and torch.isfinite(scores).all()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in d.modules())
    with pytest.raises(ValueError, match=r"latents of shape \(N, 16\)"):
        g(torch.randn(6, 8))
    with pytest.raises(ValueError, match="images of shape"):
        d(torch.rand(2, channels, size + 4, size + 4))
    with pytest.raises(ValueError, match="multiple of 4"):
        DefenseGANGenerator(1, 30)


def test_default_sizes_are_the_releases_mnist_networks():
    g, d = DefenseGANGenerator(), DefenseGANCritic()
    # FC 128 → 4·4·256, deconvs 256→128→(crop 7×7)→64→1 (5×5); convs 1→64→128→256 (5×5), FC 4·4·256 → 1.
    g_params = (128 * 4096 + 4096) + (256 * 128 * 25 + 128) + (128 * 64 * 25 + 64) + (64 * 25 + 1)
    d_params = (25 * 64 + 64) + (64 * 128 * 25 + 128) + (128 * 256 * 25 + 256) + (4096 + 1)
    assert sum(p.numel() for p in g.parameters()) == g_params
    assert sum(p.numel() for p in d.parameters()) == d_params
    h = torch.relu(g.up1(torch.relu(g.fc(torch.randn(2, 128))).view(2, 256, 4, 4)))
    assert h.shape[-2:] == (8, 8) and g.crop_size == 7
    assert d.features(torch.rand(2, 1, 28, 28)).shape == (2, 256, 4, 4)


# -- gradient penalty -----------------------------------------------------------------------------------
def test_gradient_penalty_of_a_linear_critic_is_closed_form():
    torch.manual_seed(0)
    critic = nn.Sequential(nn.Flatten(), nn.Linear(12, 1))  # ∇_x D = w everywhere → GP = (‖w‖ − 1)²
    real, fake = torch.rand(5, 3, 2, 2), torch.rand(5, 3, 2, 2)
    w = critic[1].weight
    gp = gradient_penalty(critic, real, fake)
    assert torch.allclose(gp, (w.norm() - 1) ** 2)
    # create_graph: the penalty trains the critic, d GP / d w = 2 (‖w‖ − 1) w / ‖w‖.
    (grad_w,) = torch.autograd.grad(gp, w)
    assert torch.allclose(grad_w, 2 * (w.norm() - 1) * w / w.norm(), atol=1e-6)


def test_gradient_penalty_interpolates_per_sample():
    class HalfSquaredNorm(nn.Module):  # D(x) = ½‖x‖² → ∇_x D(x̂) = x̂
        def forward(self, x):
            return 0.5 * x.flatten(1).pow(2).sum(1)

    real, fake = torch.rand(4, 1, 3, 3), torch.rand(4, 1, 3, 3)
    alpha = torch.tensor([0.0, 0.25, 0.5, 1.0])
    x_hat = real + alpha.view(-1, 1, 1, 1) * (fake - real)
    expected = ((x_hat.flatten(1).norm(dim=1) - 1) ** 2).mean()
    assert torch.allclose(gradient_penalty(HalfSquaredNorm(), real, fake, alpha), expected)


# -- the LightningModule -----------------------------------------------------------------------------
def test_wgan_gp_training_updates_both_networks_on_the_n_critic_schedule(fmnist_dm, tmp_path):
    torch.manual_seed(0)
    gen, critic = DefenseGANGenerator(width=8), DefenseGANCritic(width=8)
    module = WGANModule(gen, critic, adam, adam, n_critic=5, gp_lambda=10.0,
                        sample_every_n_epochs=1, n_samples=4)
    before_g = {k: v.clone() for k, v in gen.state_dict().items()}
    before_d = {k: v.clone() for k, v in critic.state_dict().items()}
    train = DataLoader(Subset(fmnist_dm.train_set, range(160)), batch_size=16, shuffle=True)
    val = DataLoader(Subset(fmnist_dm.val_set, range(32)), batch_size=32)
    trainer = quiet_trainer(tmp_path, max_steps=12)
    trainer.fit(module, train_dataloaders=train, val_dataloaders=val)

    # Manual optimisation: global_step counts both optimisers → 10 critic + 2 generator updates.
    gen_opt, critic_opt = (o.optimizer for o in module.optimizers())
    step_count = lambda opt: int(next(iter(opt.state.values()))["step"])  # noqa: E731
    assert module.critic_updates == 10 and step_count(critic_opt) == 10 and step_count(gen_opt) == 2
    assert trainer.global_step == 12
    assert {id(p) for g in gen_opt.param_groups for p in g["params"]} == {id(p) for p in gen.parameters()}
    assert {id(p) for g in critic_opt.param_groups for p in g["params"]} == {id(p) for p in critic.parameters()}
    assert all(not torch.equal(v, before_g[k]) for k, v in gen.state_dict().items())
    # The critic's output bias cancels in D(real) − D(fake) and does not move the penalty: zero gradient.
    assert [k for k, v in critic.state_dict().items() if torch.equal(v, before_d[k])] == ["out.bias"]
    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/wasserstein", "train/gradient_penalty", "train/generator_loss", "val/wasserstein"):
        assert key in metrics and torch.isfinite(metrics[key]), key
    assert torch.allclose(metrics["val/loss"], -metrics["val/wasserstein"])
    assert sorted(p.name for p in (tmp_path / "samples").glob("*.png")) == ["epoch_0000.png"]

    # export(): an eval-mode copy of the generator whose weights file loads into a fresh generator.
    exported = module.export()
    assert exported is not gen and not exported.training and isinstance(exported, DefenseGANGenerator)
    fresh = DefenseGANGenerator(width=8)
    purifier = DefenseGAN(fresh, weights=str(save_weights(exported, tmp_path / "g.pt")), iterations=1, restarts=1)
    z = torch.randn(3, 128)
    assert torch.equal(purifier.generator(z), gen.eval()(z))


def test_n_critic_cycle_and_its_checkpoint_state(tmp_path):
    torch.manual_seed(0)
    module = WGANModule(DefenseGANGenerator(latent_dim=8, width=4), DefenseGANCritic(width=4), adam, adam,
                        n_critic=2, sample_every_n_epochs=0)
    data = DataLoader(torch.rand(32, 1, 28, 28), batch_size=4)
    quiet_trainer(tmp_path, max_steps=6).fit(module, train_dataloaders=data)
    assert module.critic_updates == 4  # 4 critic + 2 generator updates = 6 steps
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    other = WGANModule(DefenseGANGenerator(latent_dim=8, width=4), DefenseGANCritic(width=4), adam, adam)
    other.on_load_checkpoint(checkpoint)
    assert other.critic_updates == 4 and other.latent_dim == 8
    with pytest.raises(ValueError, match="n_critic"):
        WGANModule(DefenseGANGenerator(), DefenseGANCritic(), adam, adam, n_critic=0)


# -- the purifier ------------------------------------------------------------------------------------
def tiny_generator(seed: int = 0) -> DefenseGANGenerator:
    torch.manual_seed(seed)
    return DefenseGANGenerator(latent_dim=16, width=8)


def test_defense_gan_flags_and_defaults():
    purifier = DefenseGAN(tiny_generator())
    assert DefenseGAN.stochastic is True and DefenseGAN.differentiable is False
    # Table 3's best row / the release's MNIST config; release init std √(1/latent_dim).
    assert (purifier.iterations, purifier.restarts, purifier.lr, purifier.optimizer) == (200, 10, 10.0, "sgd")
    assert purifier.latent_dim == 16 and purifier.init_std == pytest.approx(0.25)
    assert not purifier.generator.training and not any(p.requires_grad for p in purifier.generator.parameters())
    purifier.train()
    assert not purifier.generator.training
    with pytest.raises(ValueError, match="iterations and restarts"):
        DefenseGAN(tiny_generator(), restarts=0)


def test_latent_search_lowers_the_mse_with_more_iterations():
    gen = tiny_generator()
    with torch.no_grad():
        for p in gen.parameters():  # an untrained G is nearly constant (every image ≈ 0.5): make it vary with z
            p.mul_(3.0)
        target = gen(torch.randn(4, 16, generator=torch.Generator().manual_seed(1)))  # in G's range
    mse = {}
    for iterations in (1, 20):  # the config's update rule (plain GD, lr 10, decay 0.1), same initial latents
        purifier = DefenseGAN(gen, iterations=iterations, restarts=3)
        result = purifier.reconstruct(target, generator=torch.Generator().manual_seed(0))
        assert isinstance(result, LatentSearchResult)
        assert result.reconstruction.shape == target.shape and result.mse_best.shape == (4,)
        assert (result.mse_best <= result.mse_mean + 1e-7).all()
        assert torch.allclose(result.mse_best, (result.reconstruction - target).pow(2).flatten(1).mean(1))
        mse[iterations] = result.mse_best
    print("MSE after L=1:", mse[1].tolist(), "after L=20:", mse[20].tolist())
    assert (mse[20] < mse[1]).all() and mse[20].mean() < 0.5 * mse[1].mean()


def test_forward_under_no_grad_is_a_detached_reconstruction_and_bpda_passes_identity_gradients():
    torch.manual_seed(0)
    purifier = DefenseGAN(tiny_generator(), iterations=3, restarts=2)
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():  # BPDA and scoring call the purifier without gradients
        out = purifier(x)
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1 and not out.requires_grad
    assert all(p.grad is None for p in purifier.generator.parameters())
    # Seeded replays give the same purification (the audit's frozen-randomness check relies on it).
    torch.manual_seed(3)
    a = purifier(x)
    torch.manual_seed(3)
    assert torch.equal(a, purifier(x))

    from attacks.wrappers import BPDA

    x_req = x.clone().requires_grad_(True)
    BPDA(purifier, purifier.bpda_approximation)(x_req).sum().backward()
    assert torch.equal(x_req.grad, torch.ones_like(x))
    assert Defended(purifier, nn.Sequential(nn.Flatten(), nn.Linear(784, 10))).stochastic


def test_missing_weights_name_the_path_and_the_train_command(tmp_path):
    path = tmp_path / "mnist" / "gan-defensegan_wgan.pt"
    with pytest.raises(FileNotFoundError) as err:
        DefenseGAN(tiny_generator(), weights=str(path))
    assert str(path) in str(err.value) and "`python train.py model=gan dataset=mnist`" in str(err.value)
    with pytest.raises(FileNotFoundError, match="model=gan dataset=kmnist gan=other_gan`"):
        DefenseGAN(tiny_generator(), weights=str(tmp_path / "kmnist" / "gan-other_gan.pt"))


# -- configs -------------------------------------------------------------------------------------------
def _train_gan_overrides() -> list[str]:
    """``gan=…`` once conf/train.yaml lists the group in its defaults, ``+gan=…`` until then."""
    defaults = OmegaConf.load(CONF_DIR / "train.yaml").defaults
    listed = any(not isinstance(d, str) and "gan" in d for d in defaults)
    return ["model=gan", ("gan=" if listed else "+gan=") + "defensegan_wgan"]


def test_train_config_composes_and_instantiates_the_wgan_module(compose, tmp_path):
    cfg = compose("train", _train_gan_overrides())
    assert cfg.model.export_path == str(tmp_path / "checkpoints" / "fashion_mnist" / "gan-defensegan_wgan.pt")
    module = instantiate(cfg.model)
    assert isinstance(module, WGANModule) and not module.automatic_optimization
    assert isinstance(module.generator, DefenseGANGenerator) and isinstance(module.critic, DefenseGANCritic)
    assert (module.n_critic, module.gp_lambda, module.latent_dim) == (5, 10.0, 128)
    gen_opt, critic_opt = module.configure_optimizers()
    for opt in (gen_opt, critic_opt):
        assert isinstance(opt, torch.optim.Adam)
        assert opt.defaults["lr"] == 1e-4 and tuple(opt.defaults["betas"]) == (0.5, 0.9)
    x = torch.rand(3, 1, 28, 28)
    loss, logs = module.step((x, torch.zeros(3, dtype=torch.long)), "val")
    assert torch.allclose(loss, -logs["wasserstein"])
    assert module.export()(torch.randn(2, 128)).shape == (2, 1, 28, 28)


def test_evaluate_config_composes_and_instantiates_the_purifier(compose, tmp_path):
    cfg = compose("evaluate", ["defense=defense_gan"])
    assert cfg.defense.name == "defense_gan"
    purifier_cfg = cfg.defense.purifier
    assert purifier_cfg.weights == str(tmp_path / "checkpoints" / "fashion_mnist" / "gan-defensegan_wgan.pt")
    assert (purifier_cfg.iterations, purifier_cfg.restarts) == (200, 10)
    with pytest.raises(Exception, match="python train.py model=gan dataset=fashion_mnist`"):
        instantiate(purifier_cfg)  # no weights trained in tmp_path
    purifier = instantiate(purifier_cfg, weights=None, iterations=2, restarts=2)
    assert isinstance(purifier, DefenseGAN) and isinstance(purifier.generator, DefenseGANGenerator)
    assert purifier.latent_dim == 128
    with torch.no_grad():
        assert purifier(torch.rand(2, 1, 28, 28)).shape == (2, 1, 28, 28)

    # The same generator config as training, so train.py's export loads into the purifier.
    train_cfg = compose("train", _train_gan_overrides())
    exported = instantiate(train_cfg.model).export()
    save_weights(exported, purifier_cfg.weights)
    loaded = instantiate(purifier_cfg)
    z = torch.randn(2, 128)
    assert torch.equal(loaded.generator(z), exported(z))
