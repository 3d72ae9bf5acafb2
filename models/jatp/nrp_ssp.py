"""NRP (Naseer et al. 2020, "A Self-supervised Approach for Adversarial Robustness", ``Muzammal-Naseer/NRP``; the JATP
paper's NRP baseline): NRP's generator P trained on self-supervised perturbations (SSP), no labels and no target.

What the release gives (read: ``networks.py``, ``ssp.py``, ``purify.py``; it ships **no training script**):

* the generator, ``NRP(3, 3, 64, 23)`` — here ``models.jatp.networks.NRPGenerator`` with 3 blocks, as the JATP paper
  ("only reduce the number of basic blocks to 3"), in the release's form (``skip: false``: P(x) = NRP(x));
* SSP (``ssp.py``): a VGG-16 ``features[:16]`` (conv1_1 … relu3_3) of ImageNet-normalised images; the adversary starts
  at ``torch.randn(img.shape)`` (standard normal, not the image), then ``iters`` = 100 sign steps of 0.01 on
  MSE(VGG(adv), VGG(img)), each followed by the projection onto the L∞ ball ε = 16/255 around the image and the clamp
  to [0, 1]. The first step is taken at the normal sample and projected, so the walk starts from a random point of the
  ε-box's boundary (each pixel at x − ε or x + ε by the sign of N(0, 1) − x, rarely inside). ``SSPAttack`` is that loop.

What the release does not give — the purifier's loss — is NRP's paper (its Eq. for L_NRP and implementation details,
not in this project's offline library; the numbers below are our reading of it, each a config value):

    L_G = λ·MSE(F(P(x')), F(x)) + γ·MSE(P(x'), x) + α·L_adv,     λ = 1, γ = 1e-2, α = 5e-3

F the same VGG-16 ``features[:16]``; x' the SSP adversary of x (made with F alone: it never sees P); L_adv a
relativistic GAN term against a discriminator. The discriminator and the relativistic-*average* form are those of
CAFD (``dwDavidxd/CAFD``, ``CIFAR-10/networks/networks_NRP.py`` ``Discriminator`` and ``train_denoiser.py``: the
JATP authors' own 32×32 adaptation of NRP's training, whose ``weight_adv`` is the same 5e-3):

    L_D   = ½[BCE(D(x) − E D(P(x')), 1) + BCE(D(P(x')) − E D(x), 0)]
    L_adv = ½[BCE(D(x) − E D(P(x')), 0) + BCE(D(P(x')) − E D(x), 1)]

One D step, then one P step, per batch. All three terms see NRP's raw output (the release has no clamp; the clamp
to [0, 1] is the purifier's at evaluation, ``defenses.nrp``). ``adv_weight: 0`` drops D and its step.

The feature network (``feature_net``): there are no ImageNet weights on this offline machine.

* ``vgg16`` (default, NRP's): torchvision's ImageNet VGG-16 state dict read from ``vgg_weights`` (torchvision's file
  ``vgg16-397923af.pth``, under ``<checkpoint_dir>/pretrained/`` by default); a missing file is one line saying where to
  put it and naming the fallback.
* ``vgg16_random`` (our adaptation, not NRP): the same layers, randomly initialised (torchvision's init, seeded by
  ``feature_seed``) and frozen. Random convolutional features are a known working perceptual space (texture synthesis
  and image representation with random-weight networks: Ustyuzhaninov et al. 2017, He et al. 2016), and keep NRP
  self-supervised and target-free; they are not ImageNet features, so its numbers are not NRP's. The weights file name
  carries the choice (``nrp-vgg16_random.pt``), so the two never share a row.

Inputs with one channel (the grey MNIST family) are repeated to three before the ImageNet normalisation.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import vgg as tv_vgg

from attacks.base import check_images, eval_mode
from models.jatp.adversaries import adversary_cache, cached_adversaries, usable_cache
from models.jatp.networks import NRPGenerator
from models.lit_base import LitBase, OptimizerFactory
from models.weights import CheckpointError, read_state_dict

FEATURE_NETS = ("vgg16", "vgg16_random")
#: torchvision's ImageNet VGG-16 weights file (``VGG16_Weights.IMAGENET1K_V1``).
VGG16_FILE = "vgg16-397923af.pth"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def vgg_missing_hint() -> str:
    return (f"put torchvision's ImageNet VGG-16 state dict there ({VGG16_FILE}, "
            f"torchvision.models.VGG16_Weights.IMAGENET1K_V1, from {tv_vgg.VGG16_Weights.IMAGENET1K_V1.url}) or set "
            f"model.vgg_weights to where it is; without it, model.feature_net=vgg16_random trains on a random VGG-16 "
            f"(an adaptation, not NRP)")


class VGGFeatures(nn.Module):
    """x in [0, 1] → VGG-16 ``features[:layers]`` of the ImageNet-normalised x (SSP's ``perceptual_criteria``); frozen.

    Args:
        feature_net: ``"vgg16"`` (ImageNet weights from ``weights``) or ``"vgg16_random"`` (torchvision's init, seeded).
        weights: torchvision's VGG-16 state dict (only ``features.<i>`` with i < ``layers`` is read); ``vgg16`` only.
        layers: how many modules of ``features`` (ssp.py's ``--ssp_layer``: 16, up to relu3_3).
        seed: the random VGG's seed (``vgg16_random``), so every run and test builds the same network.
    """

    def __init__(self, feature_net: str = "vgg16", weights: str | None = None, layers: int = 16, seed: int = 0) -> None:
        super().__init__()
        if feature_net not in FEATURE_NETS:
            raise ValueError(f"unknown feature_net {feature_net!r}; valid: {', '.join(FEATURE_NETS)}")
        full = tv_vgg.make_layers(tv_vgg.cfgs["D"])  # VGG-16's features only: no 100-M-parameter classifier
        if not 1 <= int(layers) <= len(full):
            raise ValueError(f"VGGFeatures: layers must be in 1..{len(full)}, got {layers}")
        self.feature_net, self.layers = feature_net, int(layers)
        self.net = full[: self.layers]
        if feature_net == "vgg16":
            if not weights:
                raise ValueError(f"feature_net=vgg16 needs model.vgg_weights: {vgg_missing_hint()}")
            self._load(weights)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed))
                for m in self.net.modules():
                    if isinstance(m, nn.Conv2d):  # torchvision's VGG init
                        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                        nn.init.zeros_(m.bias)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    def _load(self, path: str) -> None:
        state = read_state_dict(path, vgg_missing_hint())
        wanted = {k for k in self.net.state_dict()}
        picked = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.") and k[len("features."):] in wanted}
        missing = sorted(wanted - set(picked))
        if missing:
            raise CheckpointError(f"checkpoint {path} is not torchvision's VGG-16 state dict: no features.{missing[0]} "
                                  f"(and {len(missing) - 1} more of the first {self.layers} layers)")
        try:
            self.net.load_state_dict(picked, strict=True)
        except RuntimeError as err:
            detail = str(err).strip().splitlines()[-1].strip()
            raise CheckpointError(f"checkpoint {path} does not match VGG-16's features: {detail[:200]}") from err

    def train(self, mode: bool = True) -> "VGGFeatures":
        """Frozen: always eval mode (it has no BatchNorm or dropout, but a wrapper's ``train()`` must not matter)."""
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.net((x - self.mean) / self.std)


class SSPAttack:
    """SSP as ``ssp.py`` runs it, as ``attack(features, x) -> x'`` (detached): see the module docstring.

    Args:
        eps: L∞ radius (ssp.py ``--eps 16`` → 16/255).
        step_size: sign-step size (ssp.py: 0.01).
        steps: iterations (ssp.py: 100).
    """

    def __init__(self, eps: float = 16 / 255, step_size: float = 0.01, steps: int = 100) -> None:
        if not eps > 0 or not step_size > 0:
            raise ValueError(f"SSPAttack: eps and step_size must be > 0, got eps={eps}, step_size={step_size}")
        if int(steps) < 1:
            raise ValueError(f"SSPAttack: steps must be >= 1, got {steps}")
        self.eps, self.step_size, self.steps = float(eps), float(step_size), int(steps)

    def __repr__(self) -> str:
        return f"SSPAttack(eps={self.eps:g}, step_size={self.step_size:g}, steps={self.steps})"

    def __call__(self, features: nn.Module, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        check_images(x.detach())
        with torch.inference_mode(False), torch.enable_grad(), eval_mode(features):
            x = x.detach().clone()  # an ordinary tensor even inside Lightning's inference-mode loops
            with torch.no_grad():
                ref = features(x)
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu" if generator else x.device)
            adv = noise.to(x.device)  # ssp.py: adv = torch.randn(img.shape)
            for _ in range(self.steps):
                adv = adv.detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(F.mse_loss(features(adv), ref), [adv])
                adv = adv.detach() + self.step_size * grad.sign()
                adv = torch.min(torch.max(adv, x - self.eps), x + self.eps).clamp(0.0, 1.0)
        adv = adv.detach()
        if not torch.isfinite(adv).all():
            raise RuntimeError("SSPAttack produced non-finite images")
        return adv


class NRPDiscriminator(nn.Module):
    """CAFD's 32×32 VGG-style discriminator (``networks_NRP.Discriminator``, from BasicSR's VGGStyleDiscriminator128):
    four stages of (3×3 conv, 4×4 stride-2 conv) with BatchNorm and LeakyReLU 0.2, then linear → 100 → 1 logit.
    CAFD hard-codes 32×32 inputs; ``image_size`` sizes the linear layer for others (28 → 1×1 maps)."""

    def __init__(self, in_channels: int = 3, image_size: int = 32, width: int = 32) -> None:
        super().__init__()
        w = int(width)
        chans = [(in_channels, w, w), (w, 2 * w, 2 * w), (2 * w, 4 * w, 4 * w), (4 * w, 4 * w, 4 * w)]
        layers: list[nn.Module] = []
        size = int(image_size)
        for i, (cin, cmid, cout) in enumerate(chans):
            layers.append(nn.Conv2d(cin, cmid, 3, 1, 1, bias=i == 0))  # CAFD: conv0_0 has a bias and no BN
            if i:
                layers.append(nn.BatchNorm2d(cmid))
            layers += [nn.LeakyReLU(0.2), nn.Conv2d(cmid, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2)]
            size //= 2
        if size < 1:
            raise ValueError(f"NRPDiscriminator: image_size must be >= 16 (four stride-2 stages), got {image_size}")
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * size * size, 100), nn.LeakyReLU(0.2), nn.Linear(100, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def relativistic_average_losses(real: Tensor, fake: Tensor) -> tuple[Tensor, Tensor]:
    """(L_D, L_G) of the relativistic average GAN on logits D(x), D(P(x')) (CAFD's / ESRGAN's form)."""
    ones, zeros = torch.ones_like(real), torch.zeros_like(real)
    real_rel, fake_rel = real - fake.mean(), fake - real.mean()
    d_loss = (F.binary_cross_entropy_with_logits(real_rel, ones) + F.binary_cross_entropy_with_logits(fake_rel, zeros)) / 2
    g_loss = (F.binary_cross_entropy_with_logits(real_rel, zeros) + F.binary_cross_entropy_with_logits(fake_rel, ones)) / 2
    return d_loss, g_loss


class NRPSSPModule(LitBase):
    """NRP's purifier training on SSP (see the module docstring) on the shared Lightning base.

    Args:
        preprocessor: the ``NRPGenerator`` P (NRP's release form: ``skip=False``).
        attack: the ``SSPAttack`` (made with the feature network alone).
        generator_optimizer / discriminator_optimizer: partial optimiser factories (the latter unused without D).
        discriminator: the ``NRPDiscriminator``; required when ``adv_weight`` > 0.
        feature_net / vgg_weights / feature_layers / feature_seed: the feature network F (``VGGFeatures``).
        feature_weight / pixel_weight / adv_weight: λ, γ, α of L_G (0 switches a term off; not all 0).
        reuse_adversaries: compute each training image's SSP example once and reuse it (SSP depends on the image and
            the frozen F only; ``models.jatp.adversaries.AdversaryCache``) — a CPU reduction: NRP draws a fresh
            one per batch.
    """

    def __init__(
        self,
        preprocessor: NRPGenerator,
        attack: SSPAttack,
        generator_optimizer: OptimizerFactory,
        discriminator_optimizer: OptimizerFactory | None = None,
        discriminator: nn.Module | None = None,
        feature_net: str = "vgg16",
        vgg_weights: str | None = None,
        feature_layers: int = 16,
        feature_seed: int = 0,
        feature_weight: float = 1.0,
        pixel_weight: float = 1e-2,
        adv_weight: float = 5e-3,
        reuse_adversaries: bool = False,
        export_path: str | None = None,
    ) -> None:
        super().__init__(generator_optimizer, None, export_path)
        if min(feature_weight, pixel_weight, adv_weight) < 0 or feature_weight + pixel_weight + adv_weight == 0:
            raise ValueError(f"NRPSSPModule: loss weights must be >= 0 and not all 0, got feature_weight={feature_weight}, "
                             f"pixel_weight={pixel_weight}, adv_weight={adv_weight}")
        if adv_weight > 0 and (discriminator is None or discriminator_optimizer is None):
            raise ValueError("NRPSSPModule: adv_weight > 0 needs a discriminator and a discriminator_optimizer "
                             "(or adv_weight=0 for no GAN term)")
        self.automatic_optimization = False
        self.preprocessor = preprocessor
        self.features = VGGFeatures(feature_net, vgg_weights, feature_layers, feature_seed)
        self.attack = attack
        self.adversary_cache = adversary_cache(reuse_adversaries, "oblivious", attack.eps)
        self.discriminator = discriminator if adv_weight > 0 else None
        self.discriminator_optimizer_factory = discriminator_optimizer
        self.feature_weight, self.pixel_weight, self.adv_weight = float(feature_weight), float(pixel_weight), float(adv_weight)

    def on_fit_start(self) -> None:
        self.adversary_cache = usable_cache(self.adversary_cache, self.trainer)

    def forward(self, x: Tensor) -> Tensor:
        return self.preprocessor(x)

    def export(self) -> nn.Module:
        return copy.deepcopy(self.preprocessor).eval()

    # -- losses ----------------------------------------------------------------------------------------
    def adversaries(self, x: Tensor) -> Tensor:
        """x' = SSP(x) with the feature network (P plays no part); in training, from the cache when
        ``reuse_adversaries`` is on."""
        return cached_adversaries(self.adversary_cache, self.training, x, lambda i: self.attack(self.features, x[i]))

    def discriminator_loss(self, x: Tensor, x_adv: Tensor) -> Tensor:
        assert self.discriminator is not None
        with torch.no_grad():
            fake = self.preprocessor.raw(x_adv)
        return relativistic_average_losses(self.discriminator(x), self.discriminator(fake))[0]

    def generator_loss(self, x: Tensor, x_adv: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """L_G = λ·feat + γ·pix + α·adv on P's raw output, and its terms (``feat_adv``: the distortion before P)."""
        out = self.preprocessor.raw(x_adv)
        with torch.no_grad():
            ref = self.features(x)
            feat_adv = F.mse_loss(self.features(x_adv), ref)
        zero = out.new_zeros(())
        feat = F.mse_loss(self.features(out), ref) if self.feature_weight else zero
        pix = F.mse_loss(out, x) if self.pixel_weight else zero
        adv = zero
        if self.discriminator is not None:
            adv = relativistic_average_losses(self.discriminator(x), self.discriminator(out))[1]
        loss = self.feature_weight * feat + self.pixel_weight * pix + self.adv_weight * adv
        return loss, {"feat": feat.detach(), "pix": pix.detach(), "adv": adv.detach(), "feat_adv": feat_adv}

    def step(self, batch: Any, stage: str) -> tuple[Tensor, dict[str, Tensor]]:
        """Validation / test: L_G on fresh SSP adversaries of the batch and its terms."""
        x, _ = batch
        return self.generator_loss(x, self.adversaries(x))

    # -- training ----------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        gen = self.optimizer_factory(list(self.preprocessor.parameters()))
        if self.discriminator is None:
            return gen
        assert self.discriminator_optimizer_factory is not None
        return [gen, self.discriminator_optimizer_factory(list(self.discriminator.parameters()))]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, _ = batch
        n = x.shape[0]
        optimizers = self.optimizers()
        gen_opt = optimizers[0] if isinstance(optimizers, (list, tuple)) else optimizers
        x_adv = self.adversaries(x)
        if self.discriminator is not None:
            disc_opt = optimizers[1]
            d_loss = self.manual_update(disc_opt, lambda: self.discriminator_loss(x, x_adv))
            self.log("train/d_loss", d_loss.detach(), on_step=False, on_epoch=True, batch_size=n)
        g_loss, logs = self.manual_update(gen_opt, lambda: self.generator_loss(x, x_adv))
        if self.adversary_cache is not None:
            logs["adv_reused"] = torch.tensor(self.adversary_cache.last_reused)
        self.log("train/loss", g_loss.detach(), prog_bar=True, on_step=True, on_epoch=True, batch_size=n)
        for key, value in logs.items():
            self.log(f"train/{key}", value, on_step=False, on_epoch=True, batch_size=n)
        return g_loss.detach()


def nrp_weights_name(feature_net: str) -> str:
    """``nrp-<feature_net>.pt``: the file name carries the feature network (ImageNet VGG-16 or the random one)."""
    if feature_net not in FEATURE_NETS:
        raise ValueError(f"unknown feature_net {feature_net!r}; valid: {', '.join(FEATURE_NETS)}")
    return f"nrp-{feature_net}.pt"


def nrp_train_hint(path: str | Path, feature_net: str) -> str:
    """The ``train.py`` command that writes ``<checkpoint_dir>/<dataset>/nrp-<feature_net>.pt``."""
    command = f"python train.py model=nrp dataset={Path(path).parent.name}"
    if feature_net != "vgg16":
        command += f" model.feature_net={feature_net}"
    return f"train it first with `{command}`"
