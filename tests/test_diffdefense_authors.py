"""The DiffDefense authors' variant (issue 11): the mnist-dev data command, the denoiser's data space recorded with
its weights, the respaced chain with β̃, the authors' training recipe configs, the paper-protocol attack presets
(unclipped FGSM recorded as outside the threat model, ART-default DeepFool) and binarisation in the tables."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn

from attacks.base import Attack, UnclippedFGSM
from attacks.registry import load_attack
from datamodules import mnist_dev
from datamodules.mnist_family import MNISTDataModule
from defenses.diffdefense import DiffDefense
from evaluation.loop import constraint_violations
from evaluation.runner import check_threat_model
from models.diffusion.module import DenoiserModule
from models.diffusion.schedule import DiffusionSchedule
from models.diffusion.unet import DiffDefenseUNet
from models.weights import DATA_RANGE_KEY, CheckpointError, load_weights, save_weights


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- A. python -m datamodules.mnist_dev -------------------------------------------------------------------------------
def _fake_npz(path: Path, n: int = 50) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(3)
    x = rng.randint(0, 256, size=(n, 28, 28)).astype(np.uint8)
    y = (np.arange(n) % 10).astype(np.uint8)
    np.savez(path, x=x, y=y)
    return x, y


def test_mnist_dev_writes_a_folder_that_the_mnist_datamodule_loads(tmp_path, capsys):
    x, y = _fake_npz(tmp_path / "dev.npz")
    out = tmp_path / "data"
    assert mnist_dev.main(["--src", str(tmp_path / "dev.npz"), "--out", str(out), "--train", "40", "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 40 train + 10 test images" in printed and "DEVELOPMENT SUBSET" in printed and "NOT MNIST" in printed
    raw = out / "MNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted([*mnist_dev.IDX_FILES, mnist_dev.MARKER])
    assert "NOT the MNIST dataset" in (raw / mnist_dev.MARKER).read_text()

    dm = MNISTDataModule(data_dir=str(out), val_size=8, seed=0)
    dm.setup()
    assert (len(dm.train_set) + len(dm.val_set), len(dm.val_set), len(dm.test_set)) == (40, 8, 10)
    perm = np.random.RandomState(1).permutation(50)  # the documented seeded split
    for split, idx in (("train", perm[:40]), ("test", perm[40:])):
        loaded = dm.load_split(train=split == "train")
        assert loaded.images.shape == (len(idx), 1, 28, 28) and loaded.images.dtype == torch.float32
        # Pixels round-trip exactly (uint8 / 255), in the seeded order, labels with them.
        torch.testing.assert_close(loaded.images[:, 0], torch.from_numpy(x[idx]).float() / 255.0, rtol=0, atol=0)
        assert loaded.labels.tolist() == y[idx].tolist()


def test_mnist_dev_refuses_to_overwrite_real_mnist_without_force(tmp_path, capsys):
    _fake_npz(tmp_path / "dev.npz")
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte").write_bytes(b"real mnist")
    args = ["--src", str(tmp_path / "dev.npz"), "--out", str(tmp_path / "data"), "--train", "40"]
    assert mnist_dev.main(args) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--force" in err and "probably real MNIST" in err
    assert (raw / "train-images-idx3-ubyte").read_bytes() == b"real mnist"  # untouched
    assert mnist_dev.main([*args, "--force"]) == 0
    assert (raw / mnist_dev.MARKER).is_file()
    assert mnist_dev.main(args) == 0  # our own folder: rewritten without --force
    with pytest.raises(ValueError, match="--train"):
        mnist_dev.write_mnist_dev(tmp_path / "dev.npz", tmp_path / "data", n_train=50)
    with pytest.raises(FileNotFoundError, match="development subset"):
        mnist_dev.write_mnist_dev(tmp_path / "missing.npz", tmp_path / "data")


# -- B1. the denoiser's data space, recorded with its weights ---------------------------------------------------------
def _tiny_unet() -> DiffDefenseUNet:
    torch.manual_seed(0)
    return DiffDefenseUNet(1, base_channels=8, channel_mults=(1, 2), image_size=28, blocks_per_level=1, bottleneck_blocks=1)


def _module(data_space=(-1.0, 1.0), net: nn.Module | None = None) -> DenoiserModule:
    return DenoiserModule(net or _tiny_unet(), DiffusionSchedule(), optimizer=lambda p: torch.optim.Adam(p), ema_decay=None,
                          data_space=data_space)


class RecordingNet(nn.Module):
    """ε_θ that records every (x_t, t) it is called with and returns a fixed smooth function of them."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.3))
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls.append((x_t.detach().clone(), t.detach().clone()))
        return self.w * torch.tanh(x_t) + 0.01 * t.to(x_t.dtype).view(-1, 1, 1, 1)


def test_denoiser_module_in_unit_space_computes_its_loss_on_raw_images():
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 10, 50, 99])
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    schedule = DiffusionSchedule()
    raw, ours = _module((0, 1), RecordingNet()), _module((-1, 1), RecordingNet())
    loss = raw.denoising_loss(x, t, noise)
    x_t, t_seen = raw.denoiser.calls[-1]
    # The DDPM of the raw module diffuses x itself (not 2x − 1): x_t = √ᾱ_t x + √(1 − ᾱ_t) ε.
    torch.testing.assert_close(x_t, schedule.q_sample(x, t, noise))
    assert torch.equal(t_seen, t)
    with torch.no_grad():
        expected = F.mse_loss(raw.denoiser(schedule.q_sample(x, t, noise), t), noise)
    torch.testing.assert_close(loss, expected)
    ours.denoising_loss(x, t, noise)
    torch.testing.assert_close(ours.denoiser.calls[-1][0], schedule.q_sample(2 * x - 1, t, noise))  # ours: 2x − 1
    assert raw.data_space == (0.0, 1.0) and ours.data_space == (-1.0, 1.0)
    with pytest.raises(ValueError, match=r"data_space must be \[-1, 1\] or \[0, 1\]"):
        _module((0, 2))


def test_unit_space_export_records_its_data_space_and_default_export_is_unchanged(tmp_path):
    net = _tiny_unet()
    raw = _module([0, 1], net).export_denoiser()
    assert raw.state_dict()[DATA_RANGE_KEY].tolist() == [0.0, 1.0]
    ours = _module((-1, 1), net).export_denoiser()
    assert set(ours.state_dict()) == set(net.state_dict())  # exactly as before the space was recorded
    path = save_weights(raw, tmp_path / "d.pt")
    on_disk = torch.load(path, weights_only=True)
    assert on_disk[DATA_RANGE_KEY].tolist() == [0.0, 1.0]
    fresh = _tiny_unet()
    assert load_weights(fresh, path, "-", data_range=(0, 1)) == (0.0, 1.0)  # the entry never reaches the net
    assert DATA_RANGE_KEY not in fresh.state_dict()


def test_a_data_space_mismatch_fails_in_one_line(tmp_path):
    schedule = DiffusionSchedule()
    raw_file = save_weights(_module((0, 1)).export_denoiser(), tmp_path / "mnist" / "denoiser-diffdefense_unet_authors.pt")
    ours_file = save_weights(_module((-1, 1)).export_denoiser(), tmp_path / "mnist" / "denoiser-diffdefense_unet.pt")
    # Matching spaces load.
    assert DiffDefense(_tiny_unet(), schedule, weights=str(raw_file), t_star=2, data_space=(0, 1)).data_space == (0.0, 1.0)
    DiffDefense(_tiny_unet(), schedule, weights=str(ours_file), t_star=2)
    # Either mismatch: one line naming both spaces.
    for weights, space, recorded, wanted in ((raw_file, (-1, 1), "[0, 1]", "[-1, 1]"), (ours_file, (0, 1), "[-1, 1]", "[0, 1]")):
        with pytest.raises(CheckpointError) as err:
            DiffDefense(_tiny_unet(), schedule, weights=str(weights), t_star=2, data_space=space)
        message = str(err.value)
        assert len(message.splitlines()) == 1, message
        assert f"trained in data space {recorded}, but it is loaded for data space {wanted}" in message and str(weights) in message
    # Loaders that state no space (DiffPure, DensePure …) expect [−1, 1]: they refuse a [0, 1] denoiser too.
    with pytest.raises(CheckpointError, match=r"trained in data space \[0, 1\]"):
        load_weights(_tiny_unet(), raw_file, "-")
    # A missing authors' denoiser says how to train it the authors' way.
    with pytest.raises(FileNotFoundError, match="python train.py model=denoiser_authors dataset=mnist"):
        DiffDefense(_tiny_unet(), schedule, weights=str(tmp_path / "mnist" / "missing.pt"), t_star=2, data_space=(0, 1))
    with pytest.raises(ValueError, match="clip_x0"):
        DiffDefense(_tiny_unet(), schedule, t_star=2, data_space=(0, 1), clip_x0=True)


# -- B2. the authors' respaced chain ----------------------------------------------------------------------------------
def _authors_stepddim_chain(eps_model, z: torch.Tensor, t_star: int, noise: list[torch.Tensor]) -> torch.Tensor:
    """The authors' DDPM.sample written out from their code (float64): a fresh linear schedule of T* steps β 1e-4 → 0.02,
    stepDDIM (η = 1: σ² = (1 − ᾱ_{t−1})/(1 − ᾱ_t)·(1 − ᾱ_t/ᾱ_{t−1})) for t > 0, their `step` (Eq. 11, no noise) at t = 0,
    the network called with t itself. ``noise[k]`` is the noise of the k-th step (t = T*−1−k)."""
    betas = torch.linspace(1e-4, 0.02, t_star, dtype=torch.float64)
    alphas = 1 - betas
    ab = torch.cumprod(alphas, 0)
    x = z.double()
    for k, t in enumerate(reversed(range(t_star))):
        eps = eps_model(x.float(), torch.full((x.shape[0],), t, dtype=torch.long)).double()
        if t > 0:
            x0 = (x - (1 - ab[t]).sqrt() * eps) / ab[t].sqrt()
            sigma2 = (1 - ab[t - 1]) / (1 - ab[t]) * (1 - ab[t] / ab[t - 1])
            x = ab[t - 1].sqrt() * x0 + (1 - ab[t - 1] - sigma2).sqrt() * eps + sigma2.sqrt() * noise[k].double()
        else:
            x = (x - (1 - alphas[0]) / (1 - ab[0]).sqrt() * eps) / alphas[0].sqrt()
    return x.float()


@pytest.mark.parametrize("output", ["sigmoid", "clamp"])
def test_respaced_chain_is_the_authors_stepddim_with_posterior_variance(output):
    t_star = 5
    net = RecordingNet()
    dd = DiffDefense(net, DiffusionSchedule(), t_star=t_star, chain="respaced", data_space=(0, 1), output=output)
    chain = dd.chain_schedule
    assert (chain.num_steps, chain.variance) == (t_star, "posterior")
    torch.testing.assert_close(chain.betas[[0, -1]], torch.tensor([1e-4, 0.02]))
    z = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    out = dd.generate(z, torch.Generator().manual_seed(7))
    # The U-Net is fed the time indices T*−1, …, 0, one call per step, as the authors' sample() does.
    assert [c[1].tolist() for c in net.calls] == [[t] * 3 for t in reversed(range(t_star))]
    assert all(c[1].dtype == torch.long for c in net.calls)
    g = torch.Generator().manual_seed(7)  # generate() draws one noise tensor per step (t = 0's is unused)
    noise = [torch.randn(z.shape, generator=g) for _ in range(t_star)]
    net.calls.clear()
    z0 = _authors_stepddim_chain(net, z, t_star, noise)
    expected = torch.sigmoid(z0) if output == "sigmoid" else z0.clamp(0, 1)  # data space [0, 1]: z_0 is the image
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # σ² = β̃, not β: the same chain with variance β gives another result.
    beta_chain = DiffusionSchedule(t_star, 1e-4, 0.02, variance="beta")
    g = torch.Generator().manual_seed(7)
    with_beta = beta_chain.sample_loop(net, z, t_start=t_star, noise_fn=lambda x, i: torch.randn(x.shape, generator=g))
    assert not torch.allclose(z0, with_beta, atol=1e-3)
    # The trained chain (ours) runs the trained T = 100 coefficients with σ² = β, same time indices.
    ours = DiffDefense(net, DiffusionSchedule(), t_star=t_star, data_space=(0, 1), output=output)
    assert ours.chain_schedule is ours.schedule and ours.schedule.variance == "beta"
    net.calls.clear()
    assert not torch.allclose(ours.generate(z, torch.Generator().manual_seed(7)), out, atol=1e-3)
    assert [c[1][0].item() for c in net.calls] == list(reversed(range(t_star)))
    with pytest.raises(ValueError, match="chain"):
        DiffDefense(net, DiffusionSchedule(), t_star=2, chain="ddim")


def test_respaced_reconstruction_runs_and_improves_the_fit():
    torch.manual_seed(0)
    x = (torch.rand(2, 1, 28, 28) > 0.7).float()
    dd = DiffDefense(RecordingNet(), DiffusionSchedule(), t_star=3, iterations=5, restarts=2, chain="respaced", data_space=(0, 1))
    with torch.no_grad():
        torch.manual_seed(1)
        res = dd.reconstruct(x)
        torch.manual_seed(1)
        first = DiffDefense(RecordingNet(), DiffusionSchedule(), t_star=3, iterations=1, restarts=2, chain="respaced",
                            data_space=(0, 1)).reconstruct(x)
    assert res.reconstruction.shape == x.shape and 0 <= res.reconstruction.min() and res.reconstruction.max() <= 1
    assert (res.mse_best < first.mse_best).all()


# -- B3. configs: defense, denoiser, training recipes -----------------------------------------------------------------
def test_authors_defense_config_is_the_authors_variant(compose):
    cfg = compose("evaluate", ["defense=diffdefense_authors", "dataset=mnist"])
    node = cfg.defense.purifier
    assert cfg.defense.name == "diffdefense_authors" and node.weights.endswith("mnist/denoiser-diffdefense_unet_authors.pt")
    dd = instantiate(node, weights=None)
    assert (dd.chain, dd.data_space, dd.t_star, dd.chain_betas) == ("respaced", (0.0, 1.0), 15, (1e-4, 0.02))
    assert (dd.iterations, dd.restarts, dd.optimizer, dd.output, dd.grad_through_denoiser) == (5, 5, "adam", "sigmoid", False)
    # Piece by piece: our chain with the authors' denoiser, our denoiser with the authors' chain.
    trained = compose("evaluate", ["defense=diffdefense_authors", "defense.purifier.chain=trained"]).defense.purifier
    assert instantiate(trained, weights=None).chain == "trained"
    ours_denoiser = compose("evaluate", ["defense=diffdefense_authors", "denoiser@defense.denoiser=diffdefense_unet"])
    assert ours_denoiser.defense.purifier.weights.endswith("denoiser-diffdefense_unet.pt")
    assert instantiate(ours_denoiser.defense.purifier, weights=None).data_space == (-1.0, 1.0)
    today = instantiate(compose("evaluate", ["defense=diffdefense"]).defense.purifier, weights=None)
    assert (today.chain, today.data_space) == ("trained", (-1.0, 1.0))


def test_authors_training_recipes(compose):
    cfg = compose("train", ["model=denoiser_authors", "logger=csv", "dataset=mnist"])
    module = instantiate(cfg.model)
    assert isinstance(module, DenoiserModule) and module.data_space == (0.0, 1.0) and module.ema is None
    assert module.export_path.endswith("mnist/denoiser-diffdefense_unet_authors.pt")  # never the [−1, 1] file
    opt = module.configure_optimizers()
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["lr"] == 1e-3
    assert module.schedule.num_steps == 100 and torch.allclose(module.schedule.betas[[0, -1]], torch.tensor([1e-5, 0.02]))
    assert compose("train", ["model=denoiser", "logger=csv"]).denoiser.name == "diffdefense_unet"
    cfg = compose("train", ["training=sgd_authors", "logger=csv"])
    clf = instantiate(cfg.model)
    opt = clf.configure_optimizers()
    assert isinstance(opt, torch.optim.SGD) and (opt.defaults["lr"], opt.defaults["momentum"]) == (0.01, 0.9)
    assert cfg.victim.weights.endswith("classifier_a-sgd_authors.pt") and cfg.dataset.datamodule.batch_size == 128
    text = (Path(__file__).resolve().parents[1] / "conf" / "training" / "sgd_authors.yaml").read_text()
    assert "trainer.max_epochs=30" in text


def test_classifier_b_configs(compose):
    from models.victims import mnist

    b = instantiate(compose("evaluate", ["victim=classifier_b"]).victim, weights=None)
    old = instantiate(compose("evaluate", ["victim=classifier_b_defensegan"]).victim, weights=None)
    assert type(b.net) is mnist.ClassifierB and type(old.net) is mnist.ClassifierBDefenseGAN
    surrogate = compose("evaluate", ["threat=transfer", "victim@threat.surrogate=classifier_b_defensegan"]).threat.surrogate
    assert surrogate.weights.endswith("classifier_b_defensegan-standard.pt")


# -- C. paper-protocol attack presets ---------------------------------------------------------------------------------
class Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(28 * 28, 10)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.fc(self.drop(x.flatten(1)))


def test_unclipped_fgsm_leaves_the_box_and_is_counted_there():
    attack = load_attack("fgsm_unclipped")
    assert isinstance(attack, Attack) and attack.outside_threat_model and not load_attack("fgsm").outside_threat_model
    model = Linear().eval()
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    x[:, :, :4] = 0.0  # black and white pixels, as MNIST's
    x[:, :, -4:] = 1.0
    y = torch.arange(8)
    x_adv = attack(model, x, y)
    assert (x_adv - x).abs().amax().item() == pytest.approx(0.3, abs=1e-6)  # exactly ε in L∞
    assert x_adv.min().item() == pytest.approx(-0.3, abs=1e-6) and x_adv.max().item() == pytest.approx(1.3, abs=1e-6)
    assert constraint_violations(x, x_adv, attack).all()  # evaluation.loop counts every such example
    # The reference: x + ε sign ∇ CE at the model's own predictions (cleverhans without y), no clip.
    xr = x.clone().requires_grad_(True)
    F.cross_entropy(model(xr), model(x).argmax(1)).backward()
    torch.testing.assert_close(x_adv, x + 0.3 * xr.grad.sign())
    # True labels and the clipped FGSM: different examples; the clipped one stays in the box.
    true = UnclippedFGSM(model, eps=0.3, labels="true")(x, y)
    assert not constraint_violations(x, load_attack("fgsm")(model, x, y), load_attack("fgsm")).any()
    assert true.shape == x.shape
    # train_mode: dropout on for the attack (the authors'), the model's own modes restored afterwards.
    UnclippedFGSM(model, eps=0.3, train_mode=True)(x, y)
    assert not model.training and not model.drop.training


def _metrics(violations: int, max_perturbation: float) -> dict:
    return {"violations": violations, "n_images": 16, "max_perturbation": max_perturbation}


def test_check_threat_model_records_a_declared_box_violation_and_still_refuses_the_rest():
    unclipped, clipped = load_attack("fgsm_unclipped"), load_attack("fgsm")
    metrics = _metrics(16, 0.3)
    with pytest.warns(UserWarning, match="OUTSIDE THE THREAT MODEL"):
        check_threat_model(unclipped, metrics)
    assert metrics["outside_threat_model"] is True and "16 of 16" in metrics["threat_model_note"]
    with pytest.raises(RuntimeError, match="broke the threat model on 16 of 16"):
        check_threat_model(clipped, _metrics(16, 0.3))  # every other attack still raises
    with pytest.raises(RuntimeError, match="broke its ε-ball") as err:
        check_threat_model(unclipped, _metrics(16, 0.6))  # the declaration covers the box only
    assert len(str(err.value).splitlines()) == 1
    plain = _metrics(0, 0.3)
    check_threat_model(clipped, plain)
    assert "outside_threat_model" not in plain


def test_unclipped_fgsm_run_writes_results_marked_outside_the_threat_model(compose):
    from evaluation.runner import run_evaluation

    cfg = compose("evaluate", ["attack=fgsm_unclipped", "threat=oblivious", "dataset.eval_subset=16", "eval.max_batches=1",
                               "eval.grid=false"])
    torch.manual_seed(0)
    save_weights(instantiate(cfg.victim, weights=None), cfg.victim.weights)
    with pytest.warns(UserWarning, match="OUTSIDE THE THREAT MODEL"):
        result = run_evaluation(cfg)
    out = Path(cfg.paths.output_dir)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["outside_threat_model"] is True and on_disk["violations"] > 0 and on_disk["attack"] == "fgsm_unclipped"
    assert result["outside_threat_model"] is True
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert "outside_threat_model" in header and "threat_model_note" in header
    assert on_disk["table"]["column"] == "fgsm_unclipped"  # its own cells, never the threat-model fgsm's


def test_deepfool_art_preset_has_arts_defaults():
    attack = load_attack("deepfool_art")
    df = attack.builder(nn.Linear(1, 1))
    assert (df.steps, df.overshoot) == (100, 1e-6) and attack.norm == "none" and attack.eps is None
    ours = load_attack("deepfool").builder(nn.Linear(1, 1))
    assert (ours.steps, ours.overshoot) == (50, 0.02) and type(ours) is type(df)
    assert not attack.outside_threat_model


# -- D. binarisation in the tables -------------------------------------------------------------------------------------
@pytest.mark.parametrize("experiment, column", [("diffdefense_table1", "oblivious bit_depth"), ("diffdefense_table2", "bit_depth standard")])
def test_bit_depth_is_swept_in_the_diffdefense_tables(compose, experiment, column):
    from omegaconf import OmegaConf

    text = (Path(__file__).resolve().parents[1] / "conf" / "experiment" / f"{experiment}.yaml").read_text()
    sweep = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "experiment" / f"{experiment}.yaml")
    assert sweep.hydra.sweeper.params.defense.split(",") == ["none", "diffdefense", "diffdefense_authors", "bit_depth"]
    cfg = compose("evaluate", [f"experiment={experiment}", "defense=bit_depth", "dataset=mnist", "attack=fgsm"])
    assert cfg.defense.name == "bit_depth" and cfg.defense.purifier.bits == 1
    assert cfg.table.column == column  # its own cells, beside none and diffdefense
    assert "fgsm_unclipped" in text and "deepfool_art" in text and "diffdefense_authors" in text  # the paper-protocol command
    paper_protocol = compose("evaluate", [f"experiment={experiment}", "attack=fgsm_unclipped", "dataset=mnist"])
    assert paper_protocol.table.row == "mnist fgsm_unclipped"  # a row of its own, beside the paper's "mnist fgsm"
    for threat in ("oblivious", "transfer", "white_box_adaptive"):
        compose("evaluate", [f"experiment={experiment}", "defense=bit_depth", f"threat={threat}"])


# -- E. `make diffdefense-mnistdev`: each variant gets its own validation-tuned T* ----------------------------------------
def _makefile_vars() -> dict[str, str]:
    """``NAME := value`` lines of the Makefile (continuation lines joined)."""
    text = (Path(__file__).resolve().parents[1] / "Makefile").read_text().replace("\\\n", " ")
    return {m[0]: " ".join(m[1].split()) for m in re.findall(r"^([A-Z_]+) := (.*)$", text, flags=re.M)}


def test_mnistdev_target_passes_each_variant_its_own_tuned_t_star(compose):
    make = _makefile_vars()
    ours, authors = int(make["DEV_TSTAR"]), int(make["DEV_TSTAR_AUTHORS"])
    base = make["DEV_BASE"].replace("$(DEV_TSTAR_AUTHORS)", str(authors)).replace("$(DEV_TSTAR)", str(ours)).split()
    assert base[0] == "dataset=mnist"
    for defense, t_star in (("diffdefense", ours), ("diffdefense_authors", authors)):
        cfg = compose("evaluate", ["experiment=diffdefense_table1", *base, f"defense={defense}"])
        assert instantiate(cfg.defense.purifier, weights=None).t_star == t_star
    # The same overrides leave the undefended and binarisation columns composable (no defense.purifier.t_star key).
    for defense in ("none", "bit_depth"):
        compose("evaluate", ["experiment=diffdefense_table1", *base, f"defense={defense}"])
    # Without them, full MNIST keeps the authors' released default: nothing tuned on mnist-dev leaks into dataset=mnist.
    plain = compose("evaluate", ["experiment=diffdefense_table1", "dataset=mnist", "defense=diffdefense_authors"])
    assert instantiate(plain.defense.purifier, weights=None).t_star == 15
