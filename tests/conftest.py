"""Shared fixtures: real Fashion-MNIST (offline, from Debian's package) and a briefly trained victim.

Everything here is CPU-sized: a few thousand images and seconds of training, so the suite stays
within its budget while asserting real behaviour (attacks lower accuracy of a model that has some).
"""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torch import nn

FMNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session data folder; Fashion-MNIST is unpacked into it on first use."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def fmnist_dm(data_dir: Path):
    from datamodules.mnist_family import FashionMNISTDataModule

    if not Path(FMNIST_SYSTEM_DIR).is_dir():
        pytest.fail(f"{FMNIST_SYSTEM_DIR} missing: run `make install` (apt-get install -y dataset-fashion-mnist)")
    dm = FashionMNISTDataModule(data_dir=str(data_dir), system_dir=FMNIST_SYSTEM_DIR, batch_size=128, train_subset=8000)
    dm.setup()
    return dm


@pytest.fixture(scope="session")
def fmnist_test_batch(fmnist_dm) -> tuple[torch.Tensor, torch.Tensor]:
    """The first 200 Fashion-MNIST test images and labels."""
    x = torch.stack([fmnist_dm.test_set[i][0] for i in range(200)])
    y = torch.stack([fmnist_dm.test_set[i][1] for i in range(200)])
    return x, y


def train_briefly(model: nn.Module, dm, epochs: int = 1, lr: float = 1e-3, seed: int = 0) -> nn.Module:
    """A plain Adam loop: the fixtures need a model with real accuracy, not the training module under test."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for x, y in dm.train_dataloader():
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def trained_victim(fmnist_dm) -> nn.Module:
    """Classifier A (DiffDefense) trained for one epoch on 8000 Fashion-MNIST images (≈80 % clean accuracy)."""
    from models.victims import build_victim
    from models.victims.mnist import ClassifierA

    torch.manual_seed(0)
    victim = build_victim(ClassifierA(), mean=[0.2860], std=[0.3530])
    return train_briefly(victim, fmnist_dm)


@pytest.fixture(scope="session")
def trained_surrogate(fmnist_dm) -> nn.Module:
    """Classifier B (the transfer surrogate), trained like ``trained_victim``."""
    from models.victims import build_victim
    from models.victims.mnist import ClassifierB

    torch.manual_seed(1)
    victim = build_victim(ClassifierB(), mean=[0.2860], std=[0.3530])
    return train_briefly(victim, fmnist_dm)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.fixture
def acc():
    """``acc(model, x, y)`` → accuracy in [0, 1]."""
    return accuracy


CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def compose_config(config_name: str, overrides: list[str], tmp: Path, data_dir: Path):
    """Compose the real config with every path pointed into ``tmp`` (nothing written to the repo)."""
    from hydra import compose, initialize_config_dir

    base = [
        f"paths.root_dir={tmp}",
        f"paths.data_dir={data_dir}",
        f"paths.checkpoint_dir={tmp / 'checkpoints'}",
        f"paths.output_dir={tmp / 'out'}",
    ]
    if config_name == "evaluate":
        base += [f"eval.cache_dir={tmp / 'cache'}", "eval.progress=false"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=base + list(overrides))


@pytest.fixture
def compose(tmp_path: Path, data_dir: Path):
    """``compose("evaluate", ["attack=fgsm"])`` → the resolved-ready DictConfig with tmp paths."""
    return lambda name, overrides=(): compose_config(name, list(overrides), tmp_path, data_dir)


def _fit_on_batch(victim: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 60, lr: float = 1e-2) -> nn.Module:
    """Full-batch Adam on (x, y) for ``steps`` steps; the frozen, eval-mode victim (it needs accuracy to lose)."""
    opt = torch.optim.Adam(victim.parameters(), lr)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(victim(x), y).backward()
        opt.step()
    return victim.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def fit_on_batch():
    """``fit_on_batch(victim, x, y)`` → the victim fitted to that batch, frozen in eval mode."""
    return _fit_on_batch


@pytest.fixture(scope="module")
def fitted(fmnist_test_batch, fit_on_batch):
    """(victim, x, y): a tiny conv net (the JATP and baseline tests) fitted to 128 Fashion-MNIST test images (it needs accuracy to lose)."""
    x, y = fmnist_test_batch
    x, y = x[:128], y[:128]
    torch.manual_seed(0)
    victim = nn.Sequential(nn.Conv2d(1, 8, 5, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 12 * 12, 10))
    return fit_on_batch(victim, x, y), x, y


class SpyPreprocessor(nn.Module):
    """P(x) = 1 − x, recording every call: how many ran under an input gradient (an attack's steps) and how many not,
    its mode and its input each time — the JATP and baseline tests check that adversaries go through P."""

    def __init__(self) -> None:
        super().__init__()
        self.with_grad, self.without_grad, self.modes, self.inputs = 0, 0, [], []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            self.with_grad += 1
        else:
            self.without_grad += 1
        self.modes.append(self.training)
        self.inputs.append(x.detach().clone())
        return 1.0 - x


def _missing_weights_message(cfg) -> str:
    """Build ``cfg.defense.purifier`` whose weights file does not exist; assert the error is one FileNotFoundError line
    and return it (each trained defense's test then checks that it names the file and the train.py command)."""
    from hydra.utils import instantiate

    from evaluation.cli import root_cause

    with pytest.raises(Exception) as err:
        instantiate(cfg.defense.purifier)
    cause = root_cause(err.value)
    assert isinstance(cause, FileNotFoundError) and "\n" not in str(cause), cause
    return str(cause)


@pytest.fixture
def missing_weights_message():
    """``missing_weights_message(cfg)`` → the one-line error of a trained defense whose weights file is missing."""
    return _missing_weights_message


def parse_grid(table: str) -> dict[tuple[str, str], str]:
    """The first Markdown table of ``evaluation.tables.render`` (the row × column grid) as {(row, column): cell}."""
    after = list(itertools.dropwhile(lambda line: not line.startswith("|"), table.splitlines()))
    lines = list(itertools.takewhile(lambda line: line.startswith("|"), after))
    split = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]  # noqa: E731
    columns = split(lines[0])[1:]
    assert set(lines[1]) <= set("|-"), lines[1]
    return {(row[0], col): cell for row in map(split, lines[2:]) for col, cell in zip(columns, row[1:]) if cell}


@pytest.fixture
def grid_cells():
    """``grid_cells(render(folder))`` → {(row, column): cell text} of the table's grid."""
    return parse_grid
