"""Training objectives (models.training_losses): maths, mode/grad hygiene, inner attacks, configs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from models.training_losses import FGSMAT, MART, MMA, PGDAT, TRADES, Standard, TrainingLoss, madry_alpha

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "training"
EPS = 0.3


class TinyCNN(nn.Module):
    def __init__(self, num_classes: int = 10, bn: bool = True) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, stride=2, padding=1),
            nn.BatchNorm2d(8) if bn else nn.Identity(),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def make_losses() -> dict[str, TrainingLoss]:
    return {
        "standard": Standard(),
        "fgsm_at": FGSMAT(eps=EPS),
        "pgd_at": PGDAT(eps=EPS, steps=3),
        "trades": TRADES(eps=EPS, steps=3),
        "mart": MART(eps=EPS, steps=3),
    }


LOSS_NAMES = list(make_losses())
ADV_NAMES = [n for n in LOSS_NAMES if n != "standard"]


@pytest.fixture
def model() -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN()


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(64, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    return x, y


def modes(m: nn.Module) -> list[bool]:
    return [sub.training for sub in m.modules()]


# ---------------------------------------------------------------- scalar, grads, logs, modes
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_loss_is_scalar_with_grads_and_restores_mode(name, training, model, batch):
    x, y = batch
    loss_fn = make_losses()[name]
    model.train(training)
    before = modes(model)
    loss, logs = loss_fn(model, x, y)
    assert modes(model) == before
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.grad_fn is not None
    assert all(p.grad is None for p in model.parameters()), "the inner attack touched parameter grads"
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert logs, "every objective logs something"
    for k, v in logs.items():
        assert isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad and torch.isfinite(v), k


@pytest.mark.parametrize("name", ADV_NAMES)
def test_adversary_restores_mixed_modes_and_leaves_bn_stats_and_grads(name, model, batch):
    x, y = batch
    model.train()
    model.features[1].eval()  # a frozen BatchNorm inside a training model
    before = modes(model)
    bn = model.features[1]
    mean, var, tracked = bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()
    make_losses()[name].adversary(model, x, y)
    assert modes(model) == before
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    assert torch.equal(bn.num_batches_tracked, tracked)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", ADV_NAMES)
def test_mode_restored_when_model_raises(name, batch):
    class Boom(TinyCNN):
        def forward(self, x):
            raise RuntimeError("boom")

    m = Boom().train()
    with pytest.raises(RuntimeError):
        make_losses()[name].adversary(m, *batch)
    assert all(modes(m))


def test_standard_has_no_adversary(model, batch):
    with pytest.raises(TypeError, match="no adversary"):
        Standard().adversary(model, *batch)


# ---------------------------------------------------------------- adversaries
@pytest.mark.parametrize("ctx", ["grad", "no_grad", "inference_mode"])
@pytest.mark.parametrize("name", ADV_NAMES)
def test_adversary_in_ball_under_any_autograd_context(name, ctx, model, batch):
    x, y = batch
    loss_fn = make_losses()[name]
    context = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[ctx]
    with context():
        x_adv = loss_fn.adversary(model, x, y)
    assert x_adv.shape == x.shape and x_adv.device == x.device and x_adv.dtype == x.dtype
    assert not x_adv.requires_grad
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x).abs().max() > 0.5 * EPS, "the attack did not move"


@pytest.mark.parametrize("name", ["pgd_at", "mart", "fgsm_at"])
def test_ce_adversary_raises_ce(name, model, batch):
    x, y = batch
    model.eval()
    x_adv = make_losses()[name].adversary(model, x, y)
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)


def test_trades_adversary_raises_kl(model, batch):
    x, y = batch
    model.eval()
    x_adv = TRADES(eps=EPS, steps=3).adversary(model, x, y)
    with torch.no_grad():
        p = F.softmax(model(x), 1)
        kl_adv = F.kl_div(F.log_softmax(model(x_adv), 1), p, reduction="batchmean")
        kl_noise = F.kl_div(F.log_softmax(model((x + 0.001 * torch.randn_like(x)).clamp(0, 1)), 1), p, reduction="batchmean")
    assert kl_adv > 10 * kl_noise


def test_loss_call_under_no_grad_is_finite(model, batch):
    for name, loss_fn in make_losses().items():
        with torch.no_grad():
            loss, _ = loss_fn(model, *batch)
        assert torch.isfinite(loss) and loss.grad_fn is None, name


# ---------------------------------------------------------------- maths
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_trades_beta_zero_is_clean_ce(training, model, batch):
    x, y = batch
    model.train(training)
    loss, logs = TRADES(eps=EPS, steps=2, beta=0.0)(model, x, y)
    torch.testing.assert_close(loss, F.cross_entropy(model(x), y))
    assert logs["robust_loss"] > 0


def test_trades_matches_official_formula(model, batch):
    x, y = batch
    model.eval()  # deterministic forward passes
    trades = TRADES(eps=EPS, steps=3, beta=6.0)
    torch.manual_seed(5)
    loss, _ = trades(model, x, y)
    torch.manual_seed(5)
    x_adv = trades.adversary(model, x, y)
    kl = nn.KLDivLoss(reduction="sum")
    official = F.cross_entropy(model(x), y) + 6.0 * (1.0 / len(x)) * kl(
        F.log_softmax(model(x_adv), dim=1), F.softmax(model(x), dim=1)
    )
    torch.testing.assert_close(loss, official)


def test_mart_matches_official_formula(model, batch):
    x, y = batch
    model.eval()
    mart = MART(eps=EPS, steps=3, beta=6.0)
    torch.manual_seed(5)
    loss, _ = mart(model, x, y)
    torch.manual_seed(5)
    x_adv = mart.adversary(model, x, y)
    # transcription of mart_loss from github.com/YisenWang/MART (train part)
    kl = nn.KLDivLoss(reduction="none")
    logits, logits_adv = model(x), model(x_adv)
    adv_probs = F.softmax(logits_adv, dim=1)
    tmp1 = torch.argsort(adv_probs, dim=1)[:, -2:]
    new_y = torch.where(tmp1[:, -1] == y, tmp1[:, -2], tmp1[:, -1])
    loss_adv = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), new_y)
    nat_probs = F.softmax(logits, dim=1)
    true_probs = torch.gather(nat_probs, 1, (y.unsqueeze(1)).long()).squeeze()
    loss_robust = (1.0 / len(x)) * torch.sum(
        torch.sum(kl(torch.log(adv_probs + 1e-12), nat_probs), dim=1) * (1.0000001 - true_probs)
    )
    torch.testing.assert_close(loss, loss_adv + 6.0 * loss_robust)


def test_fgsm_at_weights(model, batch):
    x, y = batch
    model.eval()
    x_adv = FGSMAT(eps=EPS).adversary(model, x, y)  # FGSM is deterministic
    clean, adv = F.cross_entropy(model(x), y), F.cross_entropy(model(x_adv), y)
    torch.testing.assert_close(FGSMAT(eps=EPS, clean_weight=1.0)(model, x, y)[0], clean)
    torch.testing.assert_close(FGSMAT(eps=EPS, clean_weight=0.0)(model, x, y)[0], adv)
    torch.testing.assert_close(FGSMAT(eps=EPS, clean_weight=0.25)(model, x, y)[0], 0.25 * clean + 0.75 * adv)


def test_pgd_at_is_ce_on_adversary(model, batch):
    x, y = batch
    model.eval()
    pgd = PGDAT(eps=EPS, steps=3)
    torch.manual_seed(3)
    loss, logs = pgd(model, x, y)
    torch.manual_seed(3)
    x_adv = pgd.adversary(model, x, y)
    torch.testing.assert_close(loss, F.cross_entropy(model(x_adv), y))
    torch.testing.assert_close(logs["adv_acc"], (model(x_adv).argmax(1) == y).float().mean())


def test_alpha_rule_and_validation():
    assert madry_alpha(0.3, 10) == pytest.approx(0.075)
    for cls in (PGDAT, TRADES, MART):
        assert cls(eps=0.3, steps=10).alpha == pytest.approx(0.075)
        assert cls(eps=0.3, alpha=0.01, steps=40).alpha == 0.01
        with pytest.raises(ValueError):
            cls(eps=-0.1)
        with pytest.raises(ValueError):
            cls(eps=0.3, steps=0)
    with pytest.raises(ValueError):
        FGSMAT(clean_weight=1.5)
    with pytest.raises(ValueError):
        TRADES(eps=0.3, beta=-1.0)


# ---------------------------------------------------------------- training lowers the loss
def test_pgd_at_training_lowers_loss():
    torch.manual_seed(0)
    n = 64
    y = torch.arange(n) % 2
    lo = torch.rand(n, 1, 28, 28) * 0.3
    x = torch.where(y.view(-1, 1, 1, 1) == 1, lo + 0.7, lo)  # class 0 dark, class 1 bright
    model = TinyCNN(num_classes=2, bn=False).train()
    pgd = PGDAT(eps=0.1, steps=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def seeded_loss() -> float:
        torch.manual_seed(123)
        with torch.no_grad():
            return float(pgd(model, x, y)[0])

    start = seeded_loss()
    for _ in range(25):
        opt.zero_grad()
        loss, _ = pgd(model, x, y)
        loss.backward()
        opt.step()
    end = seeded_loss()
    assert end < 0.5 * start, (start, end)


# ---------------------------------------------------------------- configs
EXPECTED = {"standard": Standard, "fgsm_at": FGSMAT, "pgd_at": PGDAT, "pgd_at_l2": PGDAT, "trades": TRADES, "mart": MART,
            "sgd_authors": Standard, "mma": MMA}


def test_every_training_config_is_tested():
    assert {p.stem for p in CONF_DIR.glob("*.yaml")} == set(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_training_config_instantiates(name, model, batch):
    cfg = OmegaConf.create({"dataset": {"eps": {"linf": 0.3, "l2": 0.3}}, "training": OmegaConf.load(CONF_DIR / f"{name}.yaml")})
    assert cfg.training.name == name
    loss_fn = instantiate(cfg.training.loss)
    assert type(loss_fn) is EXPECTED[name]
    if EXPECTED[name] is not Standard:  # clean training (standard, the authors' SGD recipe) has no ε
        assert loss_fn.eps == pytest.approx(0.3)
    if name in ("pgd_at", "pgd_at_l2", "trades", "mart"):
        assert loss_fn.alpha == pytest.approx(2.5 * 0.3 / loss_fn.steps)
    x, y = batch
    loss, _ = loss_fn(model, x[:8], y[:8])  # the configured steps, on a small batch
    assert torch.isfinite(loss) and loss.grad_fn is not None


# ---------------------------------------------------------------- inside Lightning
@pytest.mark.parametrize("name", ["pgd_at", "trades"])
def test_inside_lightning_training_and_validation_steps(name, tmp_path):
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    loss_fn = make_losses()[name]

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = TinyCNN()
            self.seen: list[float] = []

        def training_step(self, b, _):
            loss, logs = loss_fn(self.net, *b)
            assert self.net.training, "mode restored inside training_step"
            self.log_dict({f"train/{k}": v for k, v in logs.items()})
            return loss

        def validation_step(self, b, _):  # Lightning runs this under inference_mode
            x, y = b
            x_adv = loss_fn.adversary(self.net, x, y)
            self.seen.append(float((x_adv - x).abs().max()))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g))
    module = Module()
    before = [p.detach().clone() for p in module.parameters()]
    trainer = L.Trainer(
        fast_dev_run=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(module, DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters())), "no optimiser step happened"
    assert module.seen and all(0 < s <= EPS + 1e-6 for s in module.seen)


def test_l2_pgd_at_trains_on_l2_adversaries_inside_the_l2_ball(model, batch):
    """AT(ℓ2) (RAP Table 4): the inner attack stays in the ℓ2 ball, leaves the ℓ∞ one, and raises the loss."""
    x, y = batch
    x, y = x[:16], y[:16]
    at = PGDAT(eps=1.0, steps=5, norm="L2")
    x_adv = at.adversary(model, x, y)
    delta = (x_adv - x).flatten(1)
    assert float(delta.norm(dim=1).max()) <= 1.0 + 1e-4 and float(delta.abs().max()) > 2.5 * 1.0 / 5 / 784**0.5
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)
    with pytest.raises(ValueError, match="valid: Linf, L2"):
        PGDAT(eps=1.0, norm="L1")
