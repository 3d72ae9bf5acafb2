"""Drop-in subclasses of torchattacks 3.5.1 attacks with their bugs fixed (same arguments).

- ``TIFGSM``: upstream smooths the gradient with a depthwise convolution hard-coded to ``groups=3``
  (crashes on grey-scale images) and divides by the mean absolute gradient (NaN for an all-zero
  gradient, i.e. a saturated softmax). Here the kernel follows the channel count, the division is
  guarded, and ``alpha=None`` means ``eps / steps`` (Dong et al.'s step for iterative attacks).
  Dong et al. (CVPR 2019) settings: Gaussian kernel 15×15, ``nsig=3``, no momentum (``decay=0``;
  TI-MI-FGSM otherwise), no input diversity (``diversity_prob=0``; TI-DIM otherwise). The 15×15
  kernel was tuned on 299×299 ImageNet images; on 28×28 images it smooths much more.
- ``DeepFool``: upstream loops over images one by one, builds each Jacobian with one backward per
  class (leaving ``.grad`` on the model's parameters), and applies the overshoot to every step
  instead of to the total perturbation. Here the batch is processed at once (per-image gradients of
  summed logits, exact for models without cross-batch interaction, i.e. in eval mode) and the
  overshoot multiplies the accumulated perturbation, as in Moosavi-Dezfooli et al. (2016).
- ``CW`` / ``EADEN``: upstream computes the true-class logit as ``max(one_hot * logits)`` and the
  best other logit as ``max((1 - one_hot) * logits)``, i.e. 0 replaces a negative logit, so the
  margin is wrong whenever the true logit is negative (CW: and whenever all other logits are).
  Upstream CW also maps pixels at exactly 0 or 1 to ``atanh(±1) = ±inf``, where the gradient is 0:
  those pixels can never move (half of every MNIST-family image). Here the margin uses the true
  logits and tanh space is entered as ``atanh((2x − 1)·(1 − 1e-6))`` as in Carlini & Wagner's code.
- ``EADEN`` also wraps the images themselves in ``nn.Parameter`` (shared storage), so its first
  gradient step moves the *reference* images (outputs leave [0, 1], distances are measured from the
  wrong point); it never restarts from the clean images between binary-search steps (Chen et al.'s
  code does); and its early-abort check divides by zero for ``max_iterations < 10``. All fixed here.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchattacks


def _true_and_best_other(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: the logit of ``labels`` and the largest logit of any other class."""
    real = logits.gather(1, labels[:, None]).squeeze(1)
    other = logits.scatter(1, labels[:, None], float("-inf")).amax(1)
    return real, other


class TIFGSM(torchattacks.TIFGSM):
    """``torchattacks.TIFGSM`` for C-channel images; ``steps=1`` is TI-FGSM, ``steps>1`` TI-BIM.

    Same arguments as ``torchattacks.TIFGSM`` (defaults changed to the paper's pure TI attack:
    ``decay=0``, ``diversity_prob=0``), plus ``alpha=None`` → ``eps / steps``.

    Examples::
        >>> atk = TIFGSM(model, eps=0.3, steps=10)  # TI-BIM, step 0.03
        >>> x_adv = atk(x, y)
    """

    def __init__(
        self,
        model,
        eps: float = 8 / 255,
        alpha: float | None = None,
        steps: int = 10,
        decay: float = 0.0,
        kernel_name: str = "gaussian",
        len_kernel: int = 15,
        nsig: int = 3,
        resize_rate: float = 0.9,
        diversity_prob: float = 0.0,
        random_start: bool = False,
    ) -> None:
        if steps < 1:
            raise ValueError(f"TIFGSM needs steps >= 1, got {steps}")
        alpha = eps / steps if alpha is None else alpha
        super().__init__(
            model,
            eps=eps,
            alpha=alpha,
            steps=steps,
            decay=decay,
            kernel_name=kernel_name,
            len_kernel=len_kernel,
            nsig=nsig,
            resize_rate=resize_rate,
            diversity_prob=diversity_prob,
            random_start=random_start,
        )
        self.attack = "TIFGSM"

    def smooth(self, grad: torch.Tensor) -> torch.Tensor:
        """Depthwise convolution of every channel of ``grad`` with the (normalised) kernel."""
        c = grad.shape[1]
        kernel = self.stacked_kernel[:1].to(grad.device, grad.dtype).repeat(c, 1, 1, 1)
        return F.conv2d(grad, kernel, stride=1, padding="same", groups=c)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        images = images.clone().detach().to(self.device)
        labels = labels.clone().detach().to(self.device)
        target_labels = self.get_target_label(images, labels) if self.targeted else None
        loss = nn.CrossEntropyLoss()
        momentum = torch.zeros_like(images)
        adv = images.clone()
        if self.random_start:
            adv = (adv + torch.empty_like(adv).uniform_(-self.eps, self.eps)).clamp(0, 1)
        for _ in range(self.steps):
            adv.requires_grad_(True)
            outputs = self.get_logits(self.input_diversity(adv) if self.diversity_prob > 0 else adv)
            cost = -loss(outputs, target_labels) if self.targeted else loss(outputs, labels)
            grad = self.smooth(torch.autograd.grad(cost, adv)[0])
            grad = grad / grad.abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
            grad = grad + momentum * self.decay
            momentum = grad
            adv = adv.detach() + self.alpha * grad.sign()
            adv = (images + (adv - images).clamp(-self.eps, self.eps)).clamp(0, 1).detach()
        return adv


class DeepFool(torchattacks.DeepFool):
    """Batched DeepFool (Moosavi-Dezfooli et al. 2016), unbounded; torchattacks' arguments plus ``norm``.

    Every step linearises the classifier around the current point of each still-correct image,
    moves to the nearest linearised decision boundary, and sets ``x_adv = clip(x + (1 + overshoot)·r)``
    with ``r`` the accumulated perturbation. Images stop as soon as they are misclassified.
    ``norm="Linf"`` is the paper's ℓp generalisation (§3.3) at p = ∞: distances |f_k|/‖w_k‖₁ (the dual
    norm) and steps along sign(w_k) — foolbox's LinfDeepFoolAttack; RAP's Table 3 has an ℓ∞ DeepFool row.
    """

    NORMS = ("L2", "Linf")

    def __init__(self, model, steps: int = 50, overshoot: float = 0.02, norm: str = "L2") -> None:
        if norm not in self.NORMS:
            raise ValueError(f"DeepFool: unknown norm {norm!r}; valid: {', '.join(self.NORMS)}")
        super().__init__(model, steps=steps, overshoot=overshoot)
        self.norm = norm

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        images = images.clone().detach().to(self.device)
        labels = labels.clone().detach().to(self.device)
        adv = images.clone()
        r_tot = torch.zeros_like(images)
        active = torch.ones(len(images), dtype=torch.bool, device=images.device)
        for _ in range(self.steps):
            idx = active.nonzero().squeeze(1)
            if len(idx) == 0:
                break
            x = adv[idx].clone().requires_grad_(True)
            logits = self.get_logits(x)
            y = labels[idx]
            still = logits.argmax(1) == y
            active[idx[~still]] = False
            if not still.any():
                break
            n_classes = logits.shape[1]
            # Jacobian (n, K, *x.shape[1:]): one backward per class on the summed logits.
            jac = torch.stack(
                [torch.autograd.grad(logits[:, k].sum(), x, retain_graph=k + 1 < n_classes)[0] for k in range(n_classes)],
                dim=1,
            )
            logits, jac = logits.detach()[still], jac[still]
            y, idx = y[still], idx[still]
            rows = torch.arange(len(y), device=y.device)
            f = logits - logits.gather(1, y[:, None])  # (n, K), 0 at the true class
            w = jac - jac[rows, y][:, None]  # (n, K, ...): gradients of f
            linf = self.norm == "Linf"
            w_norm = w.flatten(2).norm(p=1 if linf else 2, dim=2)  # (n, K): the dual norm of the attack's
            dist = f.abs() / w_norm.clamp_min(1e-12)  # distances to the linearised boundaries
            dist[rows, y] = float("inf")
            k_hat = dist.argmin(1)
            w_k = w[rows, k_hat]
            # Moosavi-Dezfooli et al.'s step: (|f_k|/‖w_k‖ + 1e-4) · w_k/‖w_k‖ (L2), (|f_k|/‖w_k‖₁ + 1e-4) · sign(w_k) (L∞)
            dist_k = (dist[rows, k_hat] + 1e-4).view(-1, *([1] * (images.dim() - 1)))
            step = w_k.sign() if linf else w_k / w_norm[rows, k_hat].clamp_min(1e-12).view_as(dist_k)
            r_tot[idx] = r_tot[idx] + dist_k * step
            adv[idx] = (images[idx] + (1 + self.overshoot) * r_tot[idx]).clamp(0, 1).detach()
        return adv


class CW(torchattacks.CW):
    """torchattacks' fixed-``c`` C&W L2 with the margin and tanh-space fixes (see the module doc)."""

    def inverse_tanh_space(self, x: torch.Tensor) -> torch.Tensor:
        return torch.atanh((x * 2 - 1).clamp(-1, 1) * (1 - 1e-6))

    def f(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        real, other = _true_and_best_other(outputs, labels)
        if self.targeted:
            return torch.clamp(other - real, min=-self.kappa)
        return torch.clamp(real - other, min=-self.kappa)


class EADEN(torchattacks.EADEN):
    """torchattacks' EAD (elastic-net decision rule) with its bugs fixed (see the module doc)."""

    def __init__(self, model, *args, **kwargs) -> None:
        super().__init__(model, *args, **kwargs)
        if self.max_iterations < 10 and self.abort_early:
            # upstream checks ``iteration % (max_iterations // 10)``: ZeroDivisionError below 10
            self.abort_early = False

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        images = images.clone().detach().to(self.device)
        labels = labels.clone().detach().to(self.device)
        if self.targeted:
            labels = self.get_target_label(images, labels)
        with torch.no_grad():
            outputs = self.get_logits(images)
        batch_size = images.shape[0]
        lower_bound = torch.zeros(batch_size, device=self.device)
        const = torch.ones(batch_size, device=self.device) * self.initial_const
        upper_bound = torch.ones(batch_size, device=self.device) * 1e10
        final_adv_images = images.clone()
        y_one_hot = torch.eye(outputs.shape[1], device=self.device)[labels]
        o_bestl1 = torch.full((batch_size,), 1e10, device=self.device)
        o_bestscore = torch.full((batch_size,), -1.0, device=self.device)

        for outer_step in range(self.binary_search_steps):
            # every binary-search step restarts from the clean images (Chen et al.'s code);
            # upstream's nn.Parameter(images) shares storage with ``images`` and its first gradient
            # step shifts the reference images themselves (outputs leave [0, 1]).
            x_k = images.clone()
            y_k = images.clone().requires_grad_(True)
            self.global_step = 0
            bestl1 = torch.full((batch_size,), 1e10, device=self.device)
            bestscore = torch.full((batch_size,), -1.0, device=self.device)
            prevloss = 1e6
            if self.repeat and outer_step == (self.binary_search_steps - 1):
                const = upper_bound
            lr = self.lr
            for iteration in range(self.max_iterations):
                output = self.get_logits(y_k)
                cost = self.EAD_loss(output, y_one_hot, None, self.L2_loss(y_k, images), const)
                grad = torch.autograd.grad(cost, y_k)[0]
                self.global_step += 1
                y_k = (y_k.detach() - lr * grad).requires_grad_(True)
                lr = self.lr * (1 - self.global_step / self.max_iterations) ** 0.5
                x_k, y_k = self.FISTA(images, x_k, y_k)  # sets y_k.data in place
                x_k = x_k.detach()
                with torch.no_grad():
                    output = self.get_logits(x_k)
                    L2_loss = self.L2_loss(x_k, images)
                    L1_loss = self.L1_loss(x_k, images)
                    loss = self.EAD_loss(output, y_one_hot, L1_loss, L2_loss, const)
                    if self.abort_early and iteration % (self.max_iterations // 10) == 0:
                        if loss > prevloss * 0.999999:
                            break
                        prevloss = loss
                    cost = L2_loss + L1_loss * self.beta  # EN decision rule
                    self.adjust_best_result(
                        x_k, labels, output, cost, bestl1, bestscore, o_bestl1, o_bestscore, final_adv_images
                    )
            self.adjust_constant(labels, bestscore, const, upper_bound, lower_bound)
        return final_adv_images

    def EAD_loss(self, output, one_hot_labels, L1_loss, L2_loss, const):  # noqa: N802 (upstream name)
        labels = one_hot_labels.argmax(1)
        real, other = _true_and_best_other(output, labels)
        if self.targeted:
            f_loss = torch.clamp(other - real, min=-self.kappa)
        else:
            f_loss = torch.clamp(real - other, min=-self.kappa)
        loss = torch.sum(const * f_loss) + torch.sum(L2_loss)
        if L1_loss is not None:
            loss = loss + torch.sum(self.beta * L1_loss)
        return loss
