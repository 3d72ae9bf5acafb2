"""Speed-ups behind the ``eval.amp`` / ``eval.channels_last`` / ``eval.compile`` flags (issue 15, item 2).

Why flags, each off by default: every one of them changes the floating-point arithmetic of the model, so each must
be shown to leave the numbers unchanged (``tests/test_speedups.py``: the same accuracy as fp32 on a fixed subset,
within a stated tolerance) and to pay on the machine at hand (``make bench``, rows ``flag …``: each flag's speed
ratio against fp32 eager, measured side by side). A run records what it used (results.json ``speedups``) and the
resume caches are keyed by the flags that are on (``evaluation.runner.cache_key``), so batches computed in bf16 are
never read back as fp32 ones.

Where they act: on the two modules every threat model reuses, ``defended.victim`` and ``defended.purifier`` — the
EOT / BPDA wrappers and ``bpda_defended`` are built around these very modules, so the attack, the scoring and every
gradient path see the same arithmetic. Nothing else is touched: an attack's own arithmetic (projections, step
sizes, FAB's linear algebra) stays fp32 because the autocast region ends where each module's forward ends, and the
module's output is cast back to its input's dtype (fp32 logits and images for the attack).

Known traps, handled here once: FAB overflows in reduced precision and AutoAttack (pyautoattack, with FAB-T and an
APGD whose step-size rule compares loss values that bf16 logits quantise) has no bf16 path of its own — ``eval.amp``
with one of those attacks is refused in one line (run them with ``eval.amp=null``). Refused rather than silently run
in fp32: a config that says bf16 then always means bf16, so results.json and the resume caches (keyed by the config,
the clean-prediction cache shared across attacks) can never mix the two precisions.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch
from torch import nn

#: ``eval.amp`` values → autocast dtypes.
AMP_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}

#: The ``eval`` keys of the speed-up flags (``evaluation.runner.cache_key`` keys a run by those that are on).
SPEED_FLAGS = ("amp", "channels_last", "compile")

#: Attack classes (the ``builder``'s target) whose own numerics break under reduced precision: ``eval.amp`` is
#: refused with them. Keyed by class name so that the check needs no import of optional backends.
FP32_ONLY_ATTACKS: dict[str, str] = {
    "FAB": "FAB overflows in reduced precision",
    "StandardAutoAttack": "AutoAttack has no bf16 path of its own (FAB-T; APGD's step-size rule compares quantised losses)",
    "AutoAttack": "AutoAttack has no bf16 path of its own (FAB-T; APGD's step-size rule compares quantised losses)",
    "APGD": "pyautoattack's APGD has no bf16 path (its step-size rule compares losses that bf16 logits quantise)",
}


@dataclass(frozen=True)
class SpeedUps:
    """The speed-up flags of one evaluation, validated."""

    amp: str | None = None
    channels_last: bool = False
    compile: bool = False

    @classmethod
    def from_config(cls, eval_cfg: Mapping[str, Any], attack: Any = None) -> "SpeedUps":
        """``eval.amp|channels_last|compile`` (absent keys = off); one-line ``ValueError`` for a bad ``amp`` or for
        ``amp`` with an attack of ``FP32_ONLY_ATTACKS``."""
        amp = eval_cfg.get("amp")
        amp = None if amp in (None, "", "null", "none", "fp32") else str(amp)
        if amp is not None and amp not in AMP_DTYPES:
            raise ValueError(f"eval.amp: unknown value {amp!r}; valid: null, {', '.join(AMP_DTYPES)}")
        flags = cls(amp=amp, channels_last=bool(eval_cfg.get("channels_last", False)), compile=bool(eval_cfg.get("compile", False)))
        flags.check_attack(attack)
        return flags

    def check_attack(self, attack: Any) -> None:
        """One-line ``ValueError`` when ``amp`` is set for an attack that has no reduced-precision path."""
        reason = fp32_only_reason(attack)
        if self.amp is not None and reason is not None:
            name = getattr(attack, "name", type(attack).__name__)
            raise ValueError(f"eval.amp={self.amp} with attack {name!r}: {reason}; run it with eval.amp=null")

    @property
    def active(self) -> bool:
        return self.amp is not None or self.channels_last or self.compile

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def cache_suffix(self) -> str:
        """A suffix for caches keyed without ``eval`` (the shared adversarial batches): empty when every flag is off."""
        on = [f"{k}={v}" if not isinstance(v, bool) else k for k, v in self.as_dict().items() if v not in (None, False)]
        return "" if not on else "-" + "-".join(on)

    def apply(self, defended: nn.Module) -> nn.Module:
        """``defended`` with its victim and purifier switched to these settings (in place; returned for chaining)."""
        if self.compile:
            defended.victim = torch.compile(defended.victim)
        for module in (defended.victim, defended.purifier):
            if self.channels_last:
                use_channels_last(module)
            if self.amp is not None:
                use_autocast(module, AMP_DTYPES[self.amp])
        return defended


def fp32_only_reason(attack: Any) -> str | None:
    """Why ``attack`` (an ``attacks.base.Attack`` or its builder) must run in fp32, or ``None``."""
    builder = getattr(attack, "builder", attack)
    target = getattr(builder, "func", builder)
    return FP32_ONLY_ATTACKS.get(getattr(target, "__name__", ""))


def use_channels_last(module: nn.Module) -> nn.Module:
    """4-D weights and every 4-D input of ``module`` in channels_last (NHWC) memory format: convolutions then run
    NHWC kernels without layout conversions (cuDNN / oneDNN prefer it; tensor cores need it)."""
    module.to(memory_format=torch.channels_last)
    module.register_forward_pre_hook(_channels_last_inputs)
    return module


def _channels_last_inputs(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.contiguous(memory_format=torch.channels_last) if torch.is_tensor(a) and a.dim() == 4 else a for a in args)


def use_autocast(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Run ``module``'s forward under ``torch.autocast(dtype)`` and cast its output back to its input's dtype.

    Why hooks and not a wrapper module: purifiers carry the attributes the evaluation reads (``stochastic``,
    ``differentiable``, ``votes``, ``weakened()`` …) and are shallow-copied by ``weakened()``; hooks keep the
    class, the attributes and the state dict as they are. The region is entered in a forward pre-hook and left
    in a forward hook that runs even when the forward raises (``always_call``), so autocast never leaks out.
    """
    region = _AutocastRegion(dtype)
    module.register_forward_pre_hook(region.enter)
    module.register_forward_hook(region.leave, always_call=True)
    return module


class _AutocastRegion:
    """Enter/leave a ``torch.autocast`` region around one module's forward (re-entrant: a stack)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.stack: list[tuple[torch.autocast, torch.dtype | None]] = []

    def enter(self, module: nn.Module, args: tuple) -> None:
        first = next((a for a in args if torch.is_tensor(a)), None)
        device_type = first.device.type if first is not None else "cpu"
        region = torch.autocast(device_type, dtype=self.dtype)
        region.__enter__()
        self.stack.append((region, first.dtype if first is not None and first.is_floating_point() else None))

    def leave(self, module: nn.Module, args: tuple, output: Any) -> Any:
        region, dtype = self.stack.pop()
        region.__exit__(None, None, None)
        return _cast_floating(output, dtype or torch.float32)


def _cast_floating(output: Any, dtype: torch.dtype) -> Any:
    """Floating tensors of ``output`` (a tensor, or a tuple/list of them) cast to ``dtype``; anything else as is."""
    if torch.is_tensor(output):
        return output.to(dtype) if output.is_floating_point() and output.dtype != dtype else output
    if isinstance(output, (tuple, list)) and not hasattr(output, "_fields"):
        return type(output)(_cast_floating(o, dtype) for o in output)
    return output


def ignored_note(flags: SpeedUps, mode: str) -> str | None:
    """One line when flags are set for a mode that ignores them (the audit, detection and certification run fp32:
    the audit's finite-difference checks need fp32 gradients)."""
    if not flags.active:
        return None
    return f"eval.amp / channels_last / compile speed up the attack evaluation only; {mode} runs in fp32 eager"


__all__ = ["AMP_DTYPES", "FP32_ONLY_ATTACKS", "SPEED_FLAGS", "SpeedUps", "fp32_only_reason", "ignored_note", "use_autocast", "use_channels_last"]
