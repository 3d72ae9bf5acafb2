"""APE-GAN (Shen et al. 2017, "APE-GAN: Adversarial Perturbation Elimination with GAN"; the JATP paper's APE-G
baseline) as the authors released it (``shenqixiaojiang/APE-GAN``, TensorFlow, ``model.py`` + DCGAN-tensorflow's
``ops.py``), trained on (adversarial, clean) pairs against a frozen target.

Generator G (the release's ``generator``; ``conv2d``/``deconv2d`` are 5×5, stride 2, 'SAME'):

    conv 5×5/2 C → w   → BN → LeakyReLU 0.2        (g_h0_conv, g_bn0)
    conv 5×5/2 w → 2w  → BN → LeakyReLU 0.2        (g_h1_conv, g_bn1)
    deconv 5×5/2 2w → w → BN → ReLU                (g_h2_deconv, g_bn2)
    deconv 5×5/2 w → C → tanh                      (g_h3_deconv)

Discriminator D (the release's ``discriminator``): conv 5×5/2 C → w → LeakyReLU; conv → 2w → BN → LeakyReLU;
conv → 4w → BN → LeakyReLU; linear → one logit. w = 64 (``gf_dim`` = ``df_dim`` = 64).

Images here are in [0, 1]; the release works in [−1, 1] (its README: "for each pixel, the value should be in the
range of [-1,1]"). G maps x to 2x − 1, runs the release's network and maps its tanh back, (tanh(h) + 1)/2 ∈ (0, 1)
(``output: tanh``, default). The paper's sigmoid output (``output: sigmoid``: the same layers on x itself, σ(h)
out) is the alternative; (tanh(h) + 1)/2 = σ(2h) and the first BatchNorm absorbs the input's affine map, so the two
differ by a factor 2 on the last layer's pre-activation — both keep the output strictly inside (0, 1), no clamp.
The losses are computed in the release's [−1, 1] space (D sees 2·image − 1, the RMSE is that of 2·(G(x̃) − x)),
so the release's loss weights keep their meaning. The loss weights themselves: the release's last version
(2017-10-22) has 0.02·adv + 0.9·√MSE, its first version and the paper 0.3 / 0.7 (see ``APEGANModule``).

Sizes: the release ran 28×28 MNIST and 32×32 CIFAR-10 with this network unchanged; so do we (any H, W: the
transposed convolutions are given the encoder's sizes, as 'SAME' deconvolutions to ``s_h2``/``s_h`` in the release).
PyTorch pads 2 on each side where TF 'SAME' pads 1 before and 2 after (even sizes): same shapes, a half-pixel shift,
irrelevant to weights trained here. Initialisation as DCGAN-tensorflow: N(0, 0.02) weights (truncated for convs),
zero biases, BN γ = 1, β = 0.

BatchNorm: the release calls its batch norm with ``train=True`` everywhere, sampler included, so even its test-time
reconstructions use batch statistics. Here G uses running statistics in eval mode (momentum 0.1 = TF decay 0.9), so
the purifier is deterministic and an image's reconstruction does not depend on the rest of its batch.
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.jatp.adversaries import AdversarySource, adversary_cache, cached_adversaries, check_adversaries, usable_cache
from models.lit_base import LitBase, OptimizerFactory

OUTPUTS = ("tanh", "sigmoid")


def to_release_space(images: Tensor) -> Tensor:
    """[0, 1] → [−1, 1], the data space of the authors' code (and of the losses here)."""
    return 2.0 * images - 1.0


def _dcgan_init(module: nn.Module) -> None:
    """DCGAN-tensorflow's initialisers: conv weights ~ truncated N(0, 0.02), deconv / linear ~ N(0, 0.02), zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.trunc_normal_(m.weight, std=0.02, a=-0.04, b=0.04)
        elif isinstance(m, (nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, std=0.02)
        else:
            continue
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def _conv(c_in: int, c_out: int) -> nn.Conv2d:
    # 5×5, stride 2, padding 2: ⌈size/2⌉ like TF 'SAME'.
    return nn.Conv2d(c_in, c_out, 5, stride=2, padding=2)


def _deconv(c_in: int, c_out: int) -> nn.ConvTranspose2d:
    # 5×5, stride 2, padding 2; forward() passes output_size (= TF's output_shape), which fixes the output padding.
    return nn.ConvTranspose2d(c_in, c_out, 5, stride=2, padding=2)


class APEGANGenerator(nn.Module):
    """G: images (N, C, H, W) in [0, 1] → images of the same shape in (0, 1) (see the module docstring).

    Args:
        in_channels: C (3; 1 for the grey MNIST family).
        width: w, the first layer's channels (the release's ``gf_dim`` = 64).
        output: ``"tanh"`` (the release, default) or ``"sigmoid"`` (the paper).
    """

    def __init__(self, in_channels: int = 3, width: int = 64, output: str = "tanh") -> None:
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"APEGANGenerator: unknown output {output!r}; valid: {', '.join(OUTPUTS)}")
        if int(in_channels) < 1 or int(width) < 1:
            raise ValueError(f"APEGANGenerator: in_channels and width must be >= 1, got {in_channels}, {width}")
        self.in_channels, self.width, self.output = int(in_channels), int(width), output
        c, w = self.in_channels, self.width
        self.conv1, self.bn1 = _conv(c, w), nn.BatchNorm2d(w)
        self.conv2, self.bn2 = _conv(w, 2 * w), nn.BatchNorm2d(2 * w)
        self.deconv1, self.bn3 = _deconv(2 * w, w), nn.BatchNorm2d(w)
        self.deconv2 = _deconv(w, c)
        _dcgan_init(self)

    def extra_repr(self) -> str:
        return f"width={self.width}, output={self.output}"

    def logits(self, x: Tensor) -> Tensor:
        """The last transposed convolution's output h (before tanh / sigmoid)."""
        h0 = to_release_space(x) if self.output == "tanh" else x
        h1 = F.leaky_relu(self.bn1(self.conv1(h0)), 0.2)
        h2 = F.leaky_relu(self.bn2(self.conv2(h1)), 0.2)
        h3 = F.relu(self.bn3(self.deconv1(h2, output_size=h1.shape[-2:])))
        return self.deconv2(h3, output_size=x.shape[-2:])

    def forward(self, x: Tensor) -> Tensor:
        h = self.logits(x)
        return (torch.tanh(h) + 1.0) / 2.0 if self.output == "tanh" else torch.sigmoid(h)


class APEGANDiscriminator(nn.Module):
    """D: images (N, C, S, S) in the release's [−1, 1] space → one logit per image (N,).

    Args:
        in_channels: C.
        image_size: S (the linear layer reads the ⌈S/8⌉² × 4w map: 4×4 at 28 and 32).
        width: w (the release's ``df_dim`` = 64).
    """

    def __init__(self, in_channels: int = 3, image_size: int = 32, width: int = 64) -> None:
        super().__init__()
        if min(int(in_channels), int(image_size), int(width)) < 1:
            raise ValueError(f"APEGANDiscriminator: in_channels, image_size and width must be >= 1, "
                             f"got {in_channels}, {image_size}, {width}")
        c, w = int(in_channels), int(width)
        self.in_channels, self.image_size, self.width = c, int(image_size), w
        self.conv1 = _conv(c, w)
        self.conv2, self.bn2 = _conv(w, 2 * w), nn.BatchNorm2d(2 * w)
        self.conv3, self.bn3 = _conv(2 * w, 4 * w), nn.BatchNorm2d(4 * w)
        side = math.ceil(math.ceil(math.ceil(self.image_size / 2) / 2) / 2)
        self.linear = nn.Linear(side * side * 4 * w, 1)
        _dcgan_init(self)

    def forward(self, x: Tensor) -> Tensor:
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"APEGANDiscriminator: expected images of shape (N, {', '.join(map(str, expected))}), "
                             f"got {tuple(x.shape)}")
        h = F.leaky_relu(self.conv1(x), 0.2)
        h = F.leaky_relu(self.bn2(self.conv2(h)), 0.2)
        h = F.leaky_relu(self.bn3(self.conv3(h)), 0.2)
        return self.linear(h.flatten(1)).squeeze(1)


class APEGANModule(LitBase):
    """APE-GAN training against a frozen target, on adversaries from ``models.jatp.adversaries``.

    One training batch (x, y), as the release's loop:

        x̃ = source(G, T, x, y)                        (oblivious: PGD on T; full: PGD on T∘G, G's current weights)
        D step:     L_D = BCE(D(x), 1) + BCE(D(G(x̃)), 0)
        G step ×2:  L_G = adv_weight · BCE(D(G(x̃)), 1) + rmse_weight · √mean((G(x̃) − x)²)

    all in the release's [−1, 1] space (D sees 2·image − 1; the RMSE is that of the [−1, 1] images), D and G in train
    mode (batch statistics, as the release), the target frozen in eval mode. The release runs G's optimiser twice
    per D step ("to make sure that d_loss does not go to zero (different from paper)"): ``generator_steps`` = 2.
    Loss weights: the release's last version (2017-10-22) has 0.02·adv + 0.9·√MSE; its first version and the paper
    0.3 / 0.7 (``adv_weight`` / ``rmse_weight`` set either).

    Manual optimisation (two optimisers, as ``models.gan.WGANModule``): Lightning's ``global_step`` counts every
    optimiser step, 1 + ``generator_steps`` per batch. Validation: G's loss on fresh adversaries of the validation
    images (``loss``), their RMSE and the target's accuracy on G(x̃) (``acc``) and on G(x) (``clean_acc``).

    Args:
        generator / discriminator: ``APEGANGenerator`` / ``APEGANDiscriminator``.
        victim: the trained target T (inputs in [0, 1]); frozen (eval mode, no parameter gradients).
        generator_optimizer / discriminator_optimizer: partial optimiser factories (the release: Adam 2e-4, β₁ 0.5).
        adversaries: ``"oblivious"`` or ``"full"``.
        attack: keyword arguments of ``AdversarySource`` (eps, steps, alpha, random_start).
        adv_weight / rmse_weight: the weights of G's adversarial and RMSE terms.
        generator_steps: G updates per D update.
        reuse_adversaries: attack each training image once and reuse its example (``oblivious`` only, ``full`` is always fresh; the release's
            fixed adversarial set, ``models.jatp.adversaries.AdversaryCache``); ``False`` crafts one per visit.
        export_path: where ``train.py`` writes G.
    """

    def __init__(
        self,
        generator: APEGANGenerator,
        discriminator: APEGANDiscriminator,
        victim: nn.Module,
        generator_optimizer: OptimizerFactory,
        discriminator_optimizer: OptimizerFactory,
        adversaries: str = "oblivious",
        attack: dict[str, Any] | None = None,
        adv_weight: float = 0.02,
        rmse_weight: float = 0.9,
        generator_steps: int = 2,
        reuse_adversaries: bool = False,
        export_path: str | None = None,
    ) -> None:
        super().__init__(generator_optimizer, None, export_path)
        check_adversaries(adversaries, "APEGANModule")
        if min(adv_weight, rmse_weight) < 0 or adv_weight + rmse_weight == 0:
            raise ValueError(f"APEGANModule: loss weights must be >= 0 and not both 0, got adv_weight={adv_weight}, "
                             f"rmse_weight={rmse_weight}")
        if int(generator_steps) < 1:
            raise ValueError(f"APEGANModule: generator_steps must be >= 1, got {generator_steps}")
        self.automatic_optimization = False
        self.generator = generator
        self.discriminator = discriminator
        self.victim = victim.eval().requires_grad_(False)
        self.source = AdversarySource(adversaries, **dict(attack or {}))
        self.adversaries = adversaries
        self.adversary_cache = adversary_cache(reuse_adversaries, adversaries, self.source.eps)
        self.discriminator_optimizer_factory = discriminator_optimizer
        self.adv_weight, self.rmse_weight = float(adv_weight), float(rmse_weight)
        self.generator_steps = int(generator_steps)

    def train(self, mode: bool = True) -> "APEGANModule":
        """The frozen target stays in eval mode whatever Lightning sets."""
        super().train(mode)
        self.victim.eval()
        return self

    def on_fit_start(self) -> None:
        self.adversary_cache = usable_cache(self.adversary_cache, self.trainer)

    def forward(self, x: Tensor) -> Tensor:
        return self.generator(x)

    def export(self) -> nn.Module:
        """A copy of G in eval mode (running BN statistics): what ``defenses.ape_gan.APEGAN`` loads."""
        return copy.deepcopy(self.generator).eval()

    # -- losses ------------------------------------------------------------------------------------------
    def make_adversaries(self, x: Tensor, y: Tensor) -> Tensor:
        """x̃ from the configured source, with G's current weights (used only by ``full``); in training, from the
        cache when ``reuse_adversaries`` is on."""
        return cached_adversaries(self.adversary_cache, self.training, x,
                                  lambda i: self.source(self.generator, self.victim, x[i], y[i]))

    def discriminator_loss(self, x: Tensor, x_adv: Tensor) -> Tensor:
        """BCE(D(x), 1) + BCE(D(G(x̃)), 0), G's output detached (the release's ``d_loss``)."""
        with torch.no_grad():
            fake = self.generator(x_adv)
        real_logits = self.discriminator(to_release_space(x))
        fake_logits = self.discriminator(to_release_space(fake))
        return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
                + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))

    def generator_loss(self, x: Tensor, x_adv: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """adv_weight · BCE(D(G(x̃)), 1) + rmse_weight · √mean((G(x̃) − x)²) in [−1, 1] space, and its terms."""
        fake = to_release_space(self.generator(x_adv))
        logits = self.discriminator(fake)
        adv = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
        rmse = (fake - to_release_space(x)).pow(2).mean().sqrt()
        return self.adv_weight * adv + self.rmse_weight * rmse, {"adv": adv.detach(), "rmse": rmse.detach()}

    def step(self, batch: Any, stage: str) -> tuple[Tensor, dict[str, Tensor]]:
        """Validation / test: G's loss on fresh adversaries of the batch, its terms and the target's accuracies."""
        x, y = batch
        x_adv = self.make_adversaries(x, y)
        loss, logs = self.generator_loss(x, x_adv)
        with torch.no_grad():
            logs["acc"] = (self.victim(self.generator(x_adv)).argmax(1) == y).float().mean()
            logs["clean_acc"] = (self.victim(self.generator(x)).argmax(1) == y).float().mean()
        return loss, logs

    # -- training ----------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        return [
            self.optimizer_factory(list(self.generator.parameters())),
            self.discriminator_optimizer_factory(list(self.discriminator.parameters())),
        ]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        n = x.shape[0]
        gen_opt, disc_opt = self.optimizers()
        x_adv = self.make_adversaries(x, y)

        d_loss = self.manual_update(disc_opt, lambda: self.discriminator_loss(x, x_adv))
        g_loss, logs = self.manual_update(gen_opt, lambda: self.generator_loss(x, x_adv), times=self.generator_steps)

        self.log("train/loss", g_loss.detach(), prog_bar=True, on_step=True, on_epoch=True, batch_size=n)
        self.log("train/d_loss", d_loss.detach(), prog_bar=True, on_step=False, on_epoch=True, batch_size=n)
        if self.adversary_cache is not None:
            logs["adv_reused"] = torch.tensor(self.adversary_cache.last_reused)
        for key, value in logs.items():
            self.log(f"train/{key}", value, on_step=False, on_epoch=True, batch_size=n)
        return g_loss.detach()
