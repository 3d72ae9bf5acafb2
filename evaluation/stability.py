"""How many of a defended classifier's labels change when its input moves by Gaussian noise far below one grey level.

    python -m evaluation.stability defense=rap_reverse victim=mnist_cnn dataset=fashion_mnist denoiser=rap_tiny \
        denoiser.num_steps=10 dataset.eval_split=val dataset.eval_subset=64

Why: a smooth surrogate (``threat.model.gradient=surrogate``, audit check (j)) can only match a purifier whose labels
are a stable function of its input. If labels flip under noise of σ = 1e-6 … 1e-4 — 1/255 is 4e-3 — the chain is
chaotic at the scale any gradient or surrogate sees, so no choice of the surrogate's settings can make (j) hold, and
a robustness number from it is a number about that chaos. Prints, for each σ, the share of labels that differ from the
noise-free pass (after checking that two noise-free passes agree), and the clean accuracy of the defended and the
bare victim. Reads the Hydra overrides of ``evaluate.py``; runs on the evaluation split it names (use val).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from evaluation.runner import build_defended

ROOT = Path(__file__).resolve().parents[1]

SIGMAS = (1e-6, 1e-4, 1e-2)


def label_stability(defended: torch.nn.Module, x: torch.Tensor, sigmas: tuple[float, ...] = SIGMAS, seed: int = 0,
                    base: torch.Tensor | None = None) -> dict[str, float]:
    """{"repeat": share of labels differing between two clean passes, "sigma=<s>": share differing under noise s};
    ``base``: the labels of a clean pass already made (saves one pass through a costly chain)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        base = defended(x).argmax(1) if base is None else base
        out = {"repeat": (defended(x).argmax(1) != base).float().mean().item()}
        for s in sigmas:
            noisy = (x + s * torch.randn(x.shape, generator=generator)).clamp(0, 1)
            out[f"sigma={s:g}"] = (defended(noisy).argmax(1) != base).float().mean().item()
    return out


def main(overrides: list[str]) -> int:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("evaluate", overrides)
    torch.manual_seed(cfg.seed)
    datamodule = instantiate(cfg.dataset.datamodule)
    datamodule.setup("test")
    images, labels = zip(*datamodule.test_dataloader())
    x, y = torch.cat(images), torch.cat(labels)
    defended = build_defended(cfg).eval()
    with torch.no_grad():
        base = defended(x).argmax(1)
        acc = (base == y).float().mean().item()
        bare = (defended.victim(x).argmax(1) == y).float().mean().item()
    print(f"{cfg.defense.name} on {len(x)} {cfg.dataset.eval_split} images: clean accuracy {100 * acc:.1f} % "
          f"(victim alone {100 * bare:.1f} %)")
    for key, rate in label_stability(defended, x, base=base).items():
        print(f"labels changed, {key}: {100 * rate:.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
