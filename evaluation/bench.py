"""``make bench``: speed figures of the evaluation stack (prints; never asserts).

Measures images/s of the metric loop for clean scoring and for FGSM / PGD-20 / batched EOT-PGD on
classifier A (1×28×28) and a CIFAR-sized ResNet-18, plus the speed-up of batching EOT samples in one
forward pass over torchattacks' sequential EOTPGD. Weights are random: speed does not depend on them.
"""
from __future__ import annotations

import argparse
import functools
import time

import torch
import torchattacks

from attacks.base import Attack
from attacks.eot_pgd import BatchedEOTPGD
from defenses.base import Defended
from defenses.gaussian_noise import GaussianNoise
from evaluation.loop import evaluate
from evaluation.results import device_name
from models.victims import build_victim
from models.victims.mnist import ClassifierA


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_loop(victim: torch.nn.Module, shape: tuple[int, ...], n: int, device: torch.device) -> list[tuple[str, float]]:
    x, y = torch.rand(n, *shape), torch.randint(0, 10, (n,))
    batches = [(x, y)]
    attacks = {
        "clean": None,
        "fgsm": Attack("fgsm", functools.partial(torchattacks.FGSM, eps=0.03), "Linf", 0.03),
        "pgd-20": Attack("pgd", functools.partial(torchattacks.PGD, eps=0.03, alpha=0.003, steps=20), "Linf", 0.03),
    }
    rows = []
    for name, attack in attacks.items():
        out = evaluate(victim, batches, attack, progress=False, device=device)
        rows.append((name, out["images_per_s"]))
    return rows


def bench_eot(n: int, samples: int, steps: int, device: torch.device) -> tuple[float, float]:
    torch.manual_seed(0)
    victim = build_victim(ClassifierA(), [0.5], [0.5]).to(device)
    noisy = Defended(GaussianNoise(0.1), victim).eval()
    x, y = torch.rand(n, 1, 28, 28, device=device), torch.randint(0, 10, (n,), device=device)
    batched = Attack("eot", functools.partial(BatchedEOTPGD, eps=0.3, alpha=0.01, steps=steps, eot_samples=samples), "Linf", 0.3, handles_eot=True)
    sequential = Attack("eot_seq", functools.partial(torchattacks.EOTPGD, eps=0.3, alpha=0.01, steps=steps, eot_iter=samples), "Linf", 0.3, handles_eot=True)
    t_batched = _timed(lambda: batched(noisy, x, y))
    t_seq = _timed(lambda: sequential(noisy, x, y))
    return n / t_batched, n / t_seq


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256, help="images per measurement")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(f"device: {device_name(device)}; torch {torch.__version__}")
    from models.victims.cifar import resnet18

    models = {
        "classifier_a 1x28x28": (build_victim(ClassifierA(), [0.5], [0.5]), (1, 28, 28)),
        "resnet18 3x32x32": (build_victim(resnet18(num_classes=10), [0.5] * 3, [0.5] * 3), (3, 32, 32)),
    }
    print(f"\n| model | attack | images/s (n={args.n}) |\n|---|---|---|")
    for label, (victim, shape) in models.items():
        n = args.n if "classifier" in label else max(32, args.n // 8)
        for name, ips in bench_loop(victim.to(device), shape, n, device):
            print(f"| {label} | {name} | {ips:.1f} |")
    batched, seq = bench_eot(n=64, samples=10, steps=5, device=device)
    print("\n| EOT-PGD (classifier_a + Gaussian noise, 10 samples, 5 steps) | images/s |\n|---|---|")
    print(f"| batched (attacks.eot_pgd.BatchedEOTPGD) | {batched:.1f} |")
    print(f"| sequential (torchattacks.EOTPGD) | {seq:.1f} |")
    print(f"| speed-up | {batched / seq:.2f}x |")


if __name__ == "__main__":
    main()
