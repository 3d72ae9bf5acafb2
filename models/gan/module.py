"""Trains a WGAN-GP (Gulrajani et al. 2017) generator for Defense-GAN (Samangouei et al. 2018) on clean
images in [0, 1]: the critic is updated on every batch, the generator after every ``n_critic``-th critic
update (Lightning manual optimisation, two optimisers), and a PNG grid of samples from fixed latents is
saved every few epochs. ``export()`` is the generator, which ``defenses.defense_gan.DefenseGAN`` loads.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from models.lit_base import LitBase, OptimizerFactory


def gradient_penalty(
    critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, alpha: torch.Tensor | None = None
) -> torch.Tensor:
    """WGAN-GP penalty E[(‖∇_x̂ D(x̂)‖₂ − 1)²] at x̂ = real + α (fake − real), α ~ U[0, 1] per sample.

    The norm is over all of a sample's pixels (Gulrajani et al. 2017, Alg. 1). The graph is kept
    (``create_graph=True``) so the penalty trains the critic. ``alpha`` (shape (N,)) may be given for tests.
    """
    if alpha is None:
        alpha = torch.rand(real.shape[0], device=real.device, dtype=real.dtype)
    alpha = alpha.view(-1, *([1] * (real.dim() - 1)))
    x_hat = (real.detach() + alpha * (fake.detach() - real.detach())).requires_grad_(True)
    with torch.enable_grad():
        scores = critic(x_hat)
        (grad,) = torch.autograd.grad(scores.sum(), x_hat, create_graph=True)
    return ((grad.flatten(1).norm(2, dim=1) - 1.0) ** 2).mean()


class WGANModule(LitBase):
    """WGAN-GP training of ``generator: z (N, latent_dim) → x in [0, 1]`` against ``critic: x → (N,)``.

    Args:
        generator / critic: e.g. ``models.gan.networks.DefenseGANGenerator`` / ``DefenseGANCritic``.
        generator_optimizer / critic_optimizer: partial optimiser factories (the generator's is LitBase's).
        n_critic: critic updates per generator update (Defense-GAN and WGAN-GP: 5).
        gp_lambda: weight λ of the gradient penalty (Defense-GAN and WGAN-GP: 10).
        latent_dim: size of z ~ N(0, I); default: ``generator.latent_dim``.
        sample_every_n_epochs / n_samples: a PNG grid of ``n_samples`` images from fixed latents (seed 0)
            in ``<trainer.log_dir>/samples/`` after every such epoch (0/None: never).
        export_path: where ``train.py`` writes the generator's state dict.

    One training batch = one critic update (loss D(fake) − D(real) + λ·GP on fresh z); every ``n_critic``-th
    batch is also followed by one generator update (loss −D(G(z))). With manual optimisation Lightning counts
    both optimisers' steps in ``trainer.global_step``: ``max_steps`` = critic + generator updates.
    Logged: ``train/loss`` (the critic loss), ``train/wasserstein``, ``train/gradient_penalty``,
    ``train/generator_loss``.
    Validation/test report the critic's Wasserstein estimate E[D(real)] − E[D(G(z))] (``wasserstein``) and,
    as ``loss``, the critic loss without the penalty (gradients are off there).
    """

    def __init__(
        self,
        generator: nn.Module,
        critic: nn.Module,
        generator_optimizer: OptimizerFactory,
        critic_optimizer: OptimizerFactory,
        n_critic: int = 5,
        gp_lambda: float = 10.0,
        latent_dim: int | None = None,
        sample_every_n_epochs: int | None = 1,
        n_samples: int = 64,
        export_path: str | None = None,
    ) -> None:
        super().__init__(generator_optimizer, None, export_path)
        if n_critic < 1:
            raise ValueError(f"n_critic must be >= 1, got {n_critic}")
        if gp_lambda < 0:
            raise ValueError(f"gp_lambda must be >= 0, got {gp_lambda}")
        self.automatic_optimization = False
        self.generator = generator
        self.critic = critic
        self.critic_optimizer_factory = critic_optimizer
        self.n_critic = int(n_critic)
        self.gp_lambda = float(gp_lambda)
        self.latent_dim = int(latent_dim if latent_dim is not None else getattr(generator, "latent_dim"))
        self.sample_every_n_epochs = sample_every_n_epochs or 0
        self.n_samples = n_samples
        self.critic_updates = 0  # saved in Lightning checkpoints, so the n_critic cycle survives a resume

    # -- the model used outside training -------------------------------------------------------
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z)

    def export(self) -> nn.Module:
        """A copy of the generator in eval mode (its state dict loads into a fresh generator of the config)."""
        return copy.deepcopy(self.generator).eval()

    def latents(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` latents z ~ N(0, I); drawn on the CPU when ``generator`` is given (same draw on any device)."""
        if generator is not None:
            return torch.randn(n, self.latent_dim, generator=generator).to(self.device)
        return torch.randn(n, self.latent_dim, device=self.device)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        was_training = self.generator.training
        self.generator.eval()
        try:
            return self.generator(self.latents(n, generator))
        finally:
            self.generator.train(was_training)

    # -- losses ----------------------------------------------------------------------------------
    def critic_loss(
        self, real: torch.Tensor, fake: torch.Tensor, penalty: bool = True
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """−(E[D(real)] − E[D(fake)]) + λ·GP (the penalty only when ``penalty`` and λ > 0), and logs."""
        wasserstein = self.critic(real).mean() - self.critic(fake).mean()
        logs = {"wasserstein": wasserstein.detach()}
        loss = -wasserstein
        if penalty and self.gp_lambda > 0:
            gp = gradient_penalty(self.critic, real, fake)
            logs["gradient_penalty"] = gp.detach()
            loss = loss + self.gp_lambda * gp
        return loss, logs

    def generator_loss(self, n: int) -> torch.Tensor:
        return -self.critic(self.generator(self.latents(n))).mean()

    def step(self, batch: Any, stage: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Validation/test: the critic loss without the penalty, and the Wasserstein estimate."""
        real = batch[0] if isinstance(batch, (tuple, list)) else batch
        fake = self.generator(self.latents(real.shape[0]))
        return self.critic_loss(real, fake, penalty=False)

    # -- training ----------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        return [
            self.optimizer_factory(list(self.generator.parameters())),
            self.critic_optimizer_factory(list(self.critic.parameters())),
        ]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        real = batch[0] if isinstance(batch, (tuple, list)) else batch
        n = real.shape[0]
        gen_opt, critic_opt = self.optimizers()

        self.toggle_optimizer(critic_opt)
        with torch.no_grad():
            fake = self.generator(self.latents(n))
        loss, logs = self.critic_loss(real, fake)
        critic_opt.zero_grad()
        self.manual_backward(loss)
        critic_opt.step()
        self.untoggle_optimizer(critic_opt)
        self.critic_updates += 1

        if self.critic_updates % self.n_critic == 0:
            self.toggle_optimizer(gen_opt)
            gen_loss = self.generator_loss(n)
            gen_opt.zero_grad()
            self.manual_backward(gen_loss)
            gen_opt.step()
            self.untoggle_optimizer(gen_opt)
            self.log("train/generator_loss", gen_loss.detach(), on_step=True, on_epoch=True, batch_size=n)

        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=True, batch_size=n)
        for key, value in logs.items():
            self.log(f"train/{key}", value, prog_bar=key == "wasserstein", on_step=False, on_epoch=True, batch_size=n)
        return loss.detach()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["critic_updates"] = self.critic_updates

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.critic_updates = int(checkpoint.get("critic_updates", 0))

    # -- samples -------------------------------------------------------------------------------
    def on_train_epoch_end(self) -> None:
        every = self.sample_every_n_epochs
        if not every or (self.current_epoch + 1) % every or self._trainer is None:
            return
        images = self.sample(self.n_samples, generator=torch.Generator().manual_seed(0))
        self.save_sample_grid(images)
