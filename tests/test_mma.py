"""MMA training (models.training_losses.MMA): the AN-PGD margin adversary, the loss as the reference composes it,
that training raises the input-space margin, and the Hydra config."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn

from models.training_losses import MMA, logit_margin, soft_logit_margin


class TinyCNN(nn.Module):
    """No BatchNorm or dropout: train and eval mode compute the same function (the loss is checkable by hand)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(16 * 7 * 7, 10),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.fixture(scope="module")
def data(fmnist_test_batch):
    x, y = fmnist_test_batch
    return x[:32], y[:32]


@pytest.fixture
def fitted(data, fit_on_batch):
    """A tiny CNN fitted to the 32 images (every one correctly classified), trainable again."""
    torch.manual_seed(0)
    return fit_on_batch(TinyCNN(), *data).requires_grad_(True)


def test_margins_are_the_softmax_and_argmax_boundaries():
    torch.manual_seed(0)
    logits, y = torch.randn(500, 10) * 3, torch.randint(0, 10, (500,))
    p_y = logits.softmax(1).gather(1, y[:, None]).squeeze(1)
    assert torch.equal(soft_logit_margin(logits, y) >= 0, p_y <= 0.5)
    assert torch.equal(logit_margin(logits, y) >= 0, logits.argmax(1) != y)


@pytest.mark.parametrize("search_loss", ["slm", "lm"])
def test_an_pgd_finds_a_misclassifying_margin_within_d_max(fitted, data, search_loss):
    x, y = data
    mma = MMA(eps=0.05, hinge_maxeps=0.2, search_loss=search_loss)
    fitted.train()
    grads_before = [p.grad for p in fitted.parameters()]
    torch.manual_seed(1)
    x_adv, eps = mma.an_pgd(fitted, x, y, torch.full((32,), 0.05))
    assert fitted.training and all(p.grad is g for p, g in zip(fitted.parameters(), grads_before))

    assert (eps >= 0).all() and (eps <= 1.05 * 0.2 + 1e-7).all()  # the search range [0, 1.05·d_max]
    assert ((x_adv - x).flatten(1).abs().amax(1) <= eps + 1e-6).all() and x_adv.min() >= 0 and x_adv.max() <= 1
    inside = eps < mma.hinge_maxeps  # the examples the hinge trains on
    assert inside.float().mean() >= 0.75  # a 100 %-accurate tiny CNN has margins well below 0.2 on most images
    with torch.no_grad():
        logits = fitted(x_adv[inside])
    # "misclassified" in the search's own sense: p_y ≤ ½ (slm, the reference), argmax ≠ y (lm)
    assert (mma._margin(logits, y[inside]) >= 0).all()
    if search_loss == "lm":
        assert (logits.argmax(1) != y[inside]).all()
    # and ε is a margin, not the budget: the bisection stopped well inside [0, d_max] for many images
    assert eps[inside].std() > 0.01 and eps[inside].min() < 0.1


def test_the_adversary_is_the_margin_adversary_of_correct_examples_only(fitted, data):
    x, y = data
    y_wrong = y.clone()
    y_wrong[:8] = (y[:8] + 1) % 10  # the fitted model gets these "wrong"
    x_adv = MMA(eps=0.05, hinge_maxeps=0.2).adversary(fitted, x, y_wrong)
    assert torch.equal(x_adv[:8], x[:8])
    assert ((x_adv[8:] - x[8:]).flatten(1).abs().amax(1) > 0).all()
    assert ((x_adv - x).abs().amax() <= 1.05 * 0.2 + 1e-6)


def test_loss_is_the_references_weighted_clean_and_margin_loss(fitted, data):
    x, y = data
    y = y.clone()
    y[:8] = (y[:8] + 1) % 10  # 8 wrong examples: their clean CE enters the MMA term
    ce = lambda logits, t: F.cross_entropy(logits, t, reduction="none")  # noqa: E731

    # c = 1: the clean loss alone
    torch.manual_seed(2)
    loss, logs = MMA(eps=0.05, hinge_maxeps=0.2, clean_loss_coeff=1.0)(fitted, x, y)
    assert loss.item() == pytest.approx(ce(fitted(x), y).mean().item(), rel=1e-6) and loss.grad_fn is not None

    # c = 0 (OMMA): (Σ_{correct, ε < d_max} CE(x_adv) + Σ_wrong CE(x)) / N, recomputed from the same random start
    mma, again = MMA(eps=0.05, hinge_maxeps=0.2, clean_loss_coeff=0.0), MMA(eps=0.05, hinge_maxeps=0.2)
    torch.manual_seed(3)
    loss, logs = mma(fitted, x, y)
    torch.manual_seed(3)
    with torch.no_grad():
        correct = soft_logit_margin(fitted(x), y) < 0
        x_adv, eps = again.an_pgd(fitted, x[correct], y[correct])
        used = eps < 0.2
        expected = (ce(fitted(x_adv[used]), y[correct][used]).sum() + ce(fitted(x[~correct]), y[~correct]).sum()) / 32
    assert (~correct[:8]).all() and 0 < used.sum() < correct.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert logs["in_hinge"].item() == pytest.approx(used.float().mean().item())
    assert mma._warm_eps == pytest.approx(max(0.005, eps.mean().item()))  # the next batch starts from this ε

    # a hinge below every margin leaves only the misclassified examples' clean CE
    torch.manual_seed(4)
    loss, _ = MMA(eps=0.05, hinge_maxeps=1e-3, mineps=0.0, clean_loss_coeff=0.0)(fitted, x, y)
    assert loss.item() == pytest.approx(ce(fitted(x[:8]), y[:8]).sum().item() / 32, rel=1e-5)


def test_a_few_steps_lower_the_loss_and_mma_steps_raise_the_margin(data):
    x, y = data
    torch.manual_seed(0)
    net = TinyCNN()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    mma = MMA(eps=0.05, hinge_maxeps=0.2)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss, _ = mma(net, x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses

    def mean_margin() -> float:  # the same start ε and random start before and after
        torch.manual_seed(7)
        correct = soft_logit_margin(net(x), y) < 0
        return mma.an_pgd(net, x[correct], y[correct], torch.full((int(correct.sum()),), 0.05))[1].mean().item()

    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(10):  # once it fits, MMA's steps push the decision boundary away from the images
        opt.zero_grad()
        mma(net, x, y)[0].backward()
        opt.step()
    before = mean_margin()
    for _ in range(15):
        opt.zero_grad()
        mma(net, x, y)[0].backward()
        opt.step()
    assert mean_margin() > before + 0.005


def test_bad_values_name_the_valid_ones():
    with pytest.raises(ValueError, match="valid: slm, lm"):
        MMA(eps=0.03, search_loss="xent")
    with pytest.raises(ValueError, match="clean_loss_coeff"):
        MMA(eps=0.03, clean_loss_coeff=1.5)
    with pytest.raises(ValueError, match=r"mineps must lie in \[0, maxeps_factor·d_max\)"):
        MMA(eps=0.03, hinge_maxeps=0.01, mineps=0.05)


def test_mma_config_composes_for_train(compose):
    cfg = compose("train", ["training=mma", "dataset=fashion_mnist_rgb32", "victim=resnet18", "logger=csv"])
    module = instantiate(cfg.model)
    mma = module.loss
    assert isinstance(mma, MMA) and cfg.victim_training == "mma" and cfg.victim.weights.endswith("resnet18-mma.pt")
    assert mma.eps == pytest.approx(8 / 255) and mma.hinge_maxeps == pytest.approx(32 / 255)  # MMA-32
    assert mma.maxeps == pytest.approx(1.05 * 32 / 255) and mma.mineps == 0.005
    assert (mma.steps, mma.eps_iter_scale, mma.search_steps, mma.search_loss) == (10, 2.5, 10, "slm")
    assert mma.clean_loss_coeff == pytest.approx(1 / 3)
