"""The shared diffusion stack (models.diffusion): U-Net, DDPM schedule/samplers, DenoiserModule, configs."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Subset

from models.diffusion import DiffDefenseUNet, DiffusionSchedule, to_image_space, to_model_space
from models.diffusion.module import DenoiserModule

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


class CountingEps(torch.nn.Module):
    """A stand-in ε-model that records the steps it was called at; depends on x and t."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.3))
        self.calls: list[list[int]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls.append(t.tolist())
        return self.w * x + 0.01 * t.to(x.dtype).reshape(-1, 1, 1, 1)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convnets run several times faster on one intra-op thread than on two contended ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_unet(in_channels: int = 1, image_size: int = 28) -> DiffDefenseUNet:
    return DiffDefenseUNet(in_channels, base_channels=8, time_dim=32, image_size=image_size, blocks_per_level=1)


# -- U-Net -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_unet_output_shape(shape):
    torch.manual_seed(0)
    net = DiffDefenseUNet(in_channels=shape[0], image_size=shape[1])
    x = torch.randn(3, *shape)
    eps = net(x, torch.tensor([0, 50, 99]))
    assert eps.shape == x.shape and torch.isfinite(eps).all()


def test_unet_default_parameter_count():
    n = sum(p.numel() for p in DiffDefenseUNet().parameters())
    assert n == 590_625, n  # stated in docs; ≈ the authors' 0.6 M-parameter U-Net


def test_unet_time_embedding_changes_output():
    torch.manual_seed(0)
    net = DiffDefenseUNet()
    x = torch.randn(1, 1, 28, 28).expand(4, -1, -1, -1)
    eps = net(x, torch.tensor([0, 1, 50, 99]))
    for i in range(1, 4):
        assert (eps[i] - eps[0]).abs().max() > 1e-4, f"t={i} gives the same output as t=0"


def test_unet_rejects_wrong_input():
    net = DiffDefenseUNet()
    with pytest.raises(ValueError, match="channels"):
        net(torch.randn(1, 3, 28, 28), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="28px"):
        net(torch.randn(1, 1, 32, 32), torch.zeros(1, dtype=torch.long))


# -- schedule ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_buffers(kind):
    s = DiffusionSchedule(100, 1e-5, 0.02, kind=kind)
    assert s.betas.shape == (100,)
    ac = s.alphas_cumprod
    assert (ac[1:] < ac[:-1]).all() and 0 < ac[-1] < ac[0] <= 1
    assert torch.allclose(ac, torch.cumprod(1 - s.betas.double(), 0).float())
    assert s.alphas_cumprod_prev[0] == 1 and torch.equal(s.alphas_cumprod_prev[1:], ac[:-1])
    if kind == "linear":
        assert torch.allclose(s.betas[[0, -1]], torch.tensor([1e-5, 0.02]))
    # β̃_t = (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · β_t, zero at t = 0; the log is clipped to β̃_1 there.
    b = s.betas.double()
    ac64 = torch.cumprod(1 - b, 0)
    ac64_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac64[:-1]])
    expected = (1 - ac64_prev) / (1 - ac64) * b
    assert torch.allclose(s.posterior_variance.double(), expected, rtol=1e-5)
    assert s.posterior_variance[0] == 0
    assert torch.isfinite(s.posterior_log_variance_clipped).all()
    assert torch.allclose(s.posterior_log_variance_clipped[0], s.posterior_variance[1].log())
    # No buffer leaks into a saved state dict: the schedule is a function of its arguments.
    assert s.state_dict() == {}


def test_q_sample_closed_form_and_predict_x0_inverts_it():
    s = DiffusionSchedule()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1, torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([0, 10, 57, 99])
    ac = torch.cumprod(1 - torch.linspace(1e-5, 0.02, 100, dtype=torch.float64), 0)[t].reshape(-1, 1, 1, 1)
    expected = ac.sqrt() * x0.double() + (1 - ac).sqrt() * noise.double()
    x_t = s.q_sample(x0, t, noise)
    assert torch.allclose(x_t.double(), expected, atol=1e-6)
    assert torch.allclose(s.predict_x0(x_t, t, noise), x0, atol=1e-4)
    assert s.q_sample(x0, t).shape == x0.shape  # fresh noise when none is given


def test_posterior_mean_is_eq11_mean():
    """μ̃_t(x_t, x̂_0(ε)) equals Ho et al.'s Eq. 11 mean 1/√α_t (x_t − β_t/√(1−ᾱ_t) ε), and p_sample uses it."""
    s = DiffusionSchedule()
    model = CountingEps()
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([1, 5, 50, 99])
    eps = model(x_t, t)
    a, ac, b = (v[t].reshape(-1, 1, 1, 1) for v in (s.alphas, s.alphas_cumprod, s.betas))
    eq11 = (x_t - b / (1 - ac).sqrt() * eps) / a.sqrt()
    out = s.p_mean_variance(model, x_t, t, clip_x0=False)
    assert torch.allclose(out["mean"], eq11, atol=1e-5)
    assert torch.allclose(out["variance"], b)  # σ_t² = β_t (DDPM Alg. 2, DiffDefense Eq. 2)
    z = torch.randn(4, 1, 8, 8, generator=g)
    assert torch.allclose(s.p_sample(model, x_t, t, noise=z), eq11 + b.sqrt() * z, atol=1e-5)
    posterior = DiffusionSchedule(variance="posterior")
    assert torch.isfinite(posterior.p_mean_variance(model, x_t, torch.zeros(4, dtype=torch.long))["log_variance"]).all()
    assert torch.allclose(posterior.p_sample(model, x_t, t, noise=z), eq11 + posterior.posterior_variance[t].reshape(-1, 1, 1, 1).sqrt() * z, atol=1e-5)


def test_clip_x0_clamps_the_prediction():
    s = DiffusionSchedule()
    big = lambda x, t: -10 * torch.ones_like(x)  # noqa: E731  (x̂_0 far outside [−1, 1])
    x_t = torch.zeros(2, 1, 4, 4)
    t = torch.tensor([50, 50])
    assert s.p_mean_variance(big, x_t, t, clip_x0=True)["pred_x0"].max() <= 1.0
    assert not torch.allclose(s.p_sample(big, x_t, t, noise=torch.zeros_like(x_t), clip_x0=True),
                              s.p_sample(big, x_t, t, noise=torch.zeros_like(x_t)))


def test_p_sample_adds_noise_only_for_t_above_zero():
    s = DiffusionSchedule()
    model = CountingEps()
    x_t = torch.randn(2, 1, 8, 8)
    t = torch.tensor([0, 3])
    a = s.p_sample(model, x_t, t, noise=torch.randn_like(x_t))
    b = s.p_sample(model, x_t, t, noise=torch.randn_like(x_t))
    assert torch.equal(a[0], b[0])  # t = 0: the mean, no noise
    assert not torch.allclose(a[1], b[1])


def test_sample_loop_truncated_start_runs_exactly_t_star_steps():
    s = DiffusionSchedule()
    model = CountingEps()
    x_T = torch.randn(3, 1, 8, 8)
    out = s.sample_loop(model, x_T, t_start=5)
    assert model.calls == [[i] * 3 for i in (4, 3, 2, 1, 0)]
    assert out.shape == x_T.shape
    model.calls.clear()
    assert torch.equal(s.sample_loop(model, x_T, t_start=0), x_T) and model.calls == []
    s.sample_loop(model, x_T)  # default: all T steps
    assert len(model.calls) == 100
    with pytest.raises(ValueError, match="t_start"):
        s.sample_loop(model, x_T, t_start=101)


def test_sample_loop_noise_fn_makes_it_deterministic():
    s = DiffusionSchedule()
    model = CountingEps()
    x_T = torch.randn(2, 1, 8, 8)

    def fixed(x, i):
        return torch.randn(x.shape, generator=torch.Generator().manual_seed(i))

    assert torch.equal(s.sample_loop(model, x_T, 10, noise_fn=fixed), s.sample_loop(model, x_T, 10, noise_fn=fixed))
    assert not torch.equal(s.sample_loop(model, x_T, 10), s.sample_loop(model, x_T, 10))


def test_gradients_flow_from_sample_loop_to_x_T():
    """DiffDefense optimises z_T through the reverse process: ∂ loss(x_0) / ∂ x_T must be non-zero."""
    torch.manual_seed(0)
    s = DiffusionSchedule()
    net = tiny_unet()
    x_T = torch.randn(2, 1, 28, 28, requires_grad=True)
    x0 = to_image_space(s.sample_loop(net, x_T, t_start=3))
    target = torch.rand(2, 1, 28, 28)
    (x0 - target).pow(2).mean().backward()
    assert x_T.grad is not None and torch.isfinite(x_T.grad).all() and x_T.grad.abs().sum() > 0
    assert all(p.grad is not None for p in net.parameters())


def test_ddim_step():
    s = DiffusionSchedule(variance="posterior")
    model = CountingEps()
    g = torch.Generator().manual_seed(2)
    x_t = torch.randn(3, 1, 8, 8, generator=g)
    z = torch.randn(3, 1, 8, 8, generator=g)
    t = torch.tensor([1, 20, 99])
    # η = 1 with consecutive steps is the DDPM step with σ_t² = β̃_t.
    assert torch.allclose(s.ddim_step(model, x_t, t, t - 1, eta=1.0, noise=z), s.p_sample(model, x_t, t, noise=z), atol=1e-5)
    # η = 0 is deterministic; a jump to t_prev = −1 returns x̂_0.
    assert torch.equal(s.ddim_step(model, x_t, t, t - 10, eta=0.0), s.ddim_step(model, x_t, t, t - 10, eta=0.0))
    x0_hat = s.predict_x0(x_t, t, model(x_t, t))
    assert torch.allclose(s.ddim_step(model, x_t, t, -1), x0_hat, atol=1e-5)


def test_dtype_and_int_t_follow_the_input():
    s = DiffusionSchedule()
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    assert s.q_sample(x, 7).dtype == torch.float64
    assert s.p_sample(CountingEps().double(), x, 7).dtype == torch.float64
    with pytest.raises(ValueError, match="shape"):
        s.q_sample(x, torch.tensor([1, 2, 3]))


def test_model_space_round_trip():
    x = torch.rand(2, 1, 4, 4)
    m = to_model_space(x)
    assert m.min() >= -1 and m.max() <= 1 and torch.allclose(to_image_space(m), x)
    assert to_image_space(torch.tensor([-3.0, 3.0]), clamp=True).tolist() == [0.0, 1.0]


# -- the LightningModule -----------------------------------------------------------------------------
def test_denoiser_module_training_lowers_loss_and_keeps_ema(fmnist_dm, tmp_path):
    torch.manual_seed(0)
    module = DenoiserModule(
        tiny_unet(), DiffusionSchedule(),
        optimizer=lambda params: torch.optim.Adam(params, lr=2e-3),
        ema_decay=0.9, sample_every_n_epochs=2, n_samples=4,
    )
    train = DataLoader(Subset(fmnist_dm.train_set, range(480)), batch_size=32, shuffle=True)
    val = DataLoader(Subset(fmnist_dm.val_set, range(64)), batch_size=64)
    held_out = torch.stack([fmnist_dm.val_set[i][0] for i in range(64, 192)])
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 100, (len(held_out),), generator=g)
    noise = torch.randn(held_out.shape, generator=g)

    def loss_of(net):
        with torch.no_grad():
            return module.denoising_loss(held_out, t, noise, denoiser=net).item()

    before = loss_of(module.denoiser)
    trainer = L.Trainer(max_steps=60, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=train, val_dataloaders=val)
    after, after_ema = loss_of(module.denoiser), loss_of(module.ema.module)
    print(f"held-out denoising loss: {before:.3f} → {after:.3f} (EMA {after_ema:.3f})")
    assert after < 0.6 * before, (before, after)
    assert after_ema < 0.8 * before, (before, after_ema)
    assert "val/loss" in trainer.callback_metrics

    # EMA: a different set of weights than the trained ones, and what export_denoiser returns.
    raw, ema = module.denoiser.state_dict(), module.ema.module.state_dict()
    assert any(not torch.allclose(raw[k], ema[k]) for k in raw)
    exported = module.export_denoiser()
    assert not exported.training
    assert all(torch.equal(v, ema[k]) for k, v in exported.state_dict().items())
    fresh = tiny_unet()
    fresh.load_state_dict(torch.load(_save(exported, tmp_path / "d.pt"), weights_only=True))
    x = torch.rand(2, 1, 28, 28)
    assert fresh(x, torch.tensor([3, 4])).shape == x.shape

    # 60 steps of 15 batches = 4 epochs → sample grids after epochs 2 and 4 (0-based 1 and 3).
    grids = sorted(p.name for p in (tmp_path / "samples").glob("*.png"))
    assert grids == ["epoch_0001.png", "epoch_0003.png"]
    images = module.sample(3, generator=torch.Generator().manual_seed(0))
    assert images.shape == (3, 1, 28, 28) and images.min() >= 0 and images.max() <= 1


def _save(module: torch.nn.Module, path: Path) -> Path:
    torch.save(module.state_dict(), path)
    return path


def test_denoiser_module_without_ema_exports_the_trained_net():
    net = tiny_unet()
    module = DenoiserModule(net, DiffusionSchedule(), optimizer=lambda p: torch.optim.Adam(p), ema_decay=None)
    assert module.ema is None and module.eval_denoiser is net
    exported = module.export_denoiser()
    assert exported is not net and all(torch.equal(v, net.state_dict()[k]) for k, v in exported.state_dict().items())
    with pytest.raises(ValueError, match="image_shape"):
        module.sample(2)


def test_ema_update_is_an_exponential_average():
    module = DenoiserModule(tiny_unet(), DiffusionSchedule(), optimizer=lambda p: torch.optim.Adam(p), ema_decay=0.9)
    module.on_train_batch_end(None, None, 0)  # first update copies the weights
    w0 = module.denoiser.head.weight.detach().clone()
    with torch.no_grad():
        module.denoiser.head.weight.add_(1.0)
    module.on_train_batch_end(None, None, 1)
    d = 2 / 11  # warm-up: min(0.9, (1 + n) / (10 + n)) with n = 1 earlier update
    assert torch.allclose(module.ema.module.head.weight, d * w0 + (1 - d) * (w0 + 1.0), atol=1e-6)


def test_ema_decay_warms_up_to_its_ceiling():
    from models.diffusion.module import warmup_ema

    a, c = torch.zeros(3), torch.ones(3)
    assert torch.allclose(warmup_ema(a, c, torch.tensor(0), decay=0.999), torch.full((3,), 0.9))  # d = 0.1
    assert torch.allclose(warmup_ema(a, c, torch.tensor(10**6), decay=0.999), torch.full((3,), 0.001), atol=1e-6)


def test_ema_parameters_are_not_trained():
    module = DenoiserModule(tiny_unet(), DiffusionSchedule(), optimizer=lambda p: torch.optim.Adam(p))
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in module.denoiser.parameters()}


# -- configs -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("image_shape", [[1, 28, 28], [3, 32, 32]])
def test_configs_instantiate(image_shape, tmp_path):
    cfg = OmegaConf.create({
        "dataset": {"name": "toy", "image_shape": image_shape},
        "paths": {"checkpoint_dir": str(tmp_path)},
        "denoiser": OmegaConf.load(CONF_DIR / "denoiser" / "diffdefense_unet.yaml"),
        "model": OmegaConf.load(CONF_DIR / "model" / "denoiser.yaml"),
    })
    assert cfg.denoiser.weights == f"{tmp_path}/toy/denoiser-diffdefense_unet.pt"
    schedule = instantiate(cfg.denoiser.schedule)
    assert schedule.num_steps == 100 and torch.allclose(schedule.betas[[0, -1]], torch.tensor([1e-5, 0.02]))
    module = instantiate(cfg.model)
    assert isinstance(module, DenoiserModule) and isinstance(module.denoiser, DiffDefenseUNet)
    assert module.ema_decay == 0.999 and module.image_shape == tuple(image_shape)
    opt = module.configure_optimizers()
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["lr"] == 1e-3
    x = torch.rand(2, *image_shape)
    loss, _ = module.step((x, torch.zeros(2, dtype=torch.long)), "train")
    assert loss.ndim == 0 and torch.isfinite(loss)
