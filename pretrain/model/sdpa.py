"""Which scaled_dot_product_attention backend runs for the configured shapes, and why not flash.

The dispatcher tries its backends in a priority order (flash, memory-efficient, math, cuDNN in
torch 2.13, read from torch when it exposes it) and runs the first whose constraints hold for the
inputs (device, dtype, head_dim, GPU architecture, dropout, layout). :func:`sdpa_backend` asks
the dispatcher directly: it allows one backend at a time with ``torch.nn.attention.sdpa_kernel``,
in that order, and calls SDPA on small real tensors laid out like the model's (a view of the
fused qkv projection); the first call that succeeds names the backend that runs in training.

Names: ``"flash"``, ``"efficient"``, ``"cudnn"``, ``"math"`` on CUDA; on other devices the
device type is prefixed, e.g. ``"cpu-flash"`` (torch's CPU flash kernel) or ``"cpu-math"``.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from pretrain.core.errors import UserError

_NAMES = {
    SDPBackend.FLASH_ATTENTION: "flash",
    SDPBackend.EFFICIENT_ATTENTION: "efficient",
    SDPBackend.MATH: "math",
    SDPBackend.CUDNN_ATTENTION: "cudnn",
}
_DEFAULT_ORDER = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH,
                  SDPBackend.CUDNN_ATTENTION]
_ENABLED = {
    SDPBackend.FLASH_ATTENTION: torch.backends.cuda.flash_sdp_enabled,
    SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.mem_efficient_sdp_enabled,
    SDPBackend.MATH: torch.backends.cuda.math_sdp_enabled,
    SDPBackend.CUDNN_ATTENTION: torch.backends.cuda.cudnn_sdp_enabled,
}


@dataclass
class SdpaReport:
    """The backend that runs, and for each backend tried before it, why it did not."""

    backend: str
    rejected: dict[str, list[str]] = field(default_factory=dict)


def _clean(message: str) -> str | None:
    """A dispatcher warning without its source location; None for bare headers."""
    text = re.sub(r"\s*\(Triggered internally at [^)]*\)\.?", "", message).strip()
    if not text or text.endswith("because:"):
        return None
    if text.startswith("No viable backend"):
        return "no kernel of this backend accepts these inputs on this device"
    return text


def _priority_order() -> list[SDPBackend]:
    getter = getattr(torch._C, "_get_sdp_priority_order", None)
    if getter is None:
        return list(_DEFAULT_ORDER)
    by_value = {int(b): b for b in _DEFAULT_ORDER}
    return [by_value[v] for v in getter() if v in by_value]


def _name(backend: SDPBackend, device: torch.device) -> str:
    base = _NAMES[backend]
    return base if device.type == "cuda" else f"{device.type}-{base}"


def _resolve_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def sdpa_report(batch: int, heads: int, seq_len: int, head_dim: int, dtype: torch.dtype = torch.bfloat16,
                device: torch.device | str | None = None, dropout_p: float = 0.0,
                requires_grad: bool = True) -> SdpaReport:
    """Run SDPA under each enabled backend in priority order; see the module docstring.

    The dispatcher's constraints depend on device, dtype, head_dim, layout, dropout and
    ``requires_grad``, not on batch size, so ``min(batch, 2)`` samples are used; ``seq_len`` is
    the real one. Nothing is kept after the call.
    """
    dev = _resolve_device(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    qkv = torch.randn(min(max(batch, 1), 2), seq_len, 3, heads, head_dim, generator=gen)
    qkv = qkv.to(device=dev, dtype=dtype).requires_grad_(requires_grad and dtype.is_floating_point)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, T, hs)
    report = SdpaReport(backend="none")
    for backend in _priority_order():
        name = _name(backend, dev)
        if not _ENABLED[backend]():
            report.rejected[name] = ["disabled (torch.backends.cuda.enable_*_sdp(False))"]
            continue
        with warnings.catch_warnings(record=True) as caught, sdpa_kernel([backend]):
            warnings.simplefilter("always")
            try:
                F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
            except RuntimeError as err:
                why = [_clean(str(w.message)) for w in caught] or [_clean(str(err).splitlines()[0])]
                report.rejected[name] = [w for w in why if w] or ["rejected by the dispatcher"]
                continue
        report.backend = name
        return report
    return report


def sdpa_backend(batch: int, heads: int, seq_len: int, head_dim: int, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None, dropout_p: float = 0.0) -> str:
    """Name of the SDPA backend that runs for these shapes (``"none"`` if no backend can)."""
    return sdpa_report(batch, heads, seq_len, head_dim, dtype, device, dropout_p).backend


def flash_blockers(head_dim: int, dtype: torch.dtype, device: torch.device | str | None = None,
                   requires_grad: bool = True) -> list[str]:
    """Known reasons FlashAttention (CUDA) cannot run, from its documented constraints:
    fp16/bf16 only, head_dim <= 256, an sm80+ GPU (Ampere, Hopper and later), and no backward
    for head_dim > 192 on sm86/sm89. Empty when none applies."""
    dev = _resolve_device(device)
    reasons = []
    if dev.type != "cuda":
        reasons.append(f"device is {dev.type}: FlashAttention runs only on NVIDIA GPUs of compute "
                       f"capability 8.0+ (Ampere, Hopper); on {dev.type} SDPA uses its own kernels")
    if dtype not in (torch.float16, torch.bfloat16):
        reasons.append(f"dtype {str(dtype).removeprefix('torch.')}: flash needs bfloat16 or float16 "
                       f"(set train.bf16=true)")
    if head_dim > 256:
        reasons.append(f"head_dim {head_dim} > 256, the flash kernel's maximum (use more heads)")
    if dev.type == "cuda" and torch.cuda.is_available():
        cap = torch.cuda.get_device_capability(dev)
        gpu = torch.cuda.get_device_name(dev)
        if cap < (8, 0):
            reasons.append(f"GPU {gpu} is sm_{cap[0]}{cap[1]}; flash needs sm_80 or newer (A100, H100)")
        elif cap in ((8, 6), (8, 9)) and head_dim > 192 and requires_grad:
            reasons.append(f"GPU {gpu} (sm_{cap[0]}{cap[1]}) has no flash backward for head_dim > 192")
    return reasons


def require_flash(batch: int, heads: int, seq_len: int, head_dim: int, dtype: torch.dtype = torch.bfloat16,
                  device: torch.device | str | None = None, dropout_p: float = 0.0) -> str:
    """Return ``"flash"`` if the CUDA FlashAttention kernel runs for these shapes, else raise
    :class:`UserError` naming the reasons (device, dtype, head_dim, GPU architecture) and the
    backend that would run instead. torch's CPU flash kernel does not count: the option exists to
    guarantee the GPU kernel."""
    report = sdpa_report(batch, heads, seq_len, head_dim, dtype, device, dropout_p)
    if report.backend == "flash":
        return report.backend
    reasons = flash_blockers(head_dim, dtype, device)
    reasons += [r for r in report.rejected.get("flash", []) if r not in reasons]
    because = "; ".join(reasons) or "the dispatcher rejected it without a reason"
    raise UserError(
        f"model.require_flash=true but FlashAttention cannot run for heads={heads}, seq_len={seq_len}, "
        f"head_dim={head_dim}, dtype={str(dtype).removeprefix('torch.')}: {because}. SDPA would use "
        f"{report.backend!r} instead; fix the cause above or set model.require_flash=false to accept it"
    )
