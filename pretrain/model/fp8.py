"""FP8 matmuls in the transformer blocks (``model.fp8``), through torchao's float8 training.

``model.fp8=tensorwise`` or ``rowwise`` swaps every ``nn.Linear`` inside ``blocks`` (``attn.qkv``,
``attn.proj``, ``mlp.fc1``, ``mlp.fc2``) for torchao's ``Float8Linear`` with
``convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe),
module_filter_fn=is_block_linear)``. The patch embedding (a convolution), the pre-logits layer,
the CLIP projection and the head stay in bf16, as does attention itself (SDPA) and every
LayerNorm: FP8 changes the precision of four GEMMs per block (their inputs, weights and output
gradients are scaled and cast to e4m3 / e5m2 per step, dynamically), not the FLOP count and not
what is stored.

What this does not change, on purpose:

- the parameters: ``Float8Linear`` keeps the same ``weight`` / ``bias`` tensors (plain bf16 under
  DeepSpeed, fp32 master copies in the optimizer), so the state dict, every checkpoint and every
  converted file have exactly the keys and tensors of a bf16 model; a checkpoint resumes with
  ``model.fp8`` on or off, and scaling is dynamic (no amax history), so there is no FP8 state to
  save;
- the FLOP count: :mod:`pretrain.model.costs` counts the model without FP8 (see there for what
  MFU means with FP8).

Where it runs: FP8 GEMMs need an NVIDIA GPU of compute capability 8.9 or newer (Ada: L40S,
RTX 4090; Hopper: H100, H200; Blackwell). On a CPU the same casts run and the GEMMs are emulated
(``Float8LinearConfig(emulate=True)``: torchao multiplies the dequantised FP8 values in fp32), so
the numerics of FP8 training, the engines and the checkpoints are exercised on CPU; an older GPU
is refused (:func:`fp8_blocker`), never silently emulated.

Recipes (torchao's): ``tensorwise`` scales each tensor with one factor (cuBLAS FP8 GEMM, the
fastest); ``rowwise`` scales per row, with power-of-two scales (CUTLASS kernel; more accurate,
slower). torchao's own ``_auto_filter_for_recipe`` would leave ViT-B's 768-wide ``proj`` and
``fc2`` in bf16 as too small to gain; :func:`is_block_linear` converts all four, which the
benchmark can measure (``bench/results/README.md``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import torch
from torch import nn

from pretrain.core.errors import UserError

FP8_MODES = ("off", "tensorwise", "rowwise")  # the values of model.fp8
MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (sm89), Hopper (sm90), Blackwell
FP8_ALIGN = 16  # torch._scaled_mm wants both dimensions of each FP8 operand divisible by 16
INSTALL = "pip install 'vitscale[fp8]' (torchao)"


def is_block_linear(module: nn.Module, fqn: str) -> bool:
    """The module filter: a Linear layer inside ``blocks`` (qkv, proj, fc1, fc2), nothing else."""
    return isinstance(module, nn.Linear) and fqn.startswith("blocks.")


@contextlib.contextmanager
def _quiet_import():
    """torchao 0.18 under torch 2.14 logs a deprecation warning of torch's pytree at import; it is
    about torchao's code, not the user's."""
    log = logging.getLogger("torch.utils._pytree")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def torchao_float8():
    """``torchao.float8``, imported quietly; ImportError when torchao is missing or too old."""
    with _quiet_import():
        import torchao.float8 as float8
    if "emulate" not in {f.name for f in dataclasses.fields(float8.Float8LinearConfig)}:
        raise ImportError("this torchao has no Float8LinearConfig(emulate=...): need torchao >= 0.14")
    return float8


def fp8_config(recipe: str, emulate: bool):
    """torchao's ``Float8LinearConfig`` for ``recipe``, with the GEMMs emulated when ``emulate``."""
    float8 = torchao_float8()
    return dataclasses.replace(float8.Float8LinearConfig.from_recipe_name(recipe), emulate=emulate)


def torchao_blocker() -> str | None:
    """Why torchao's float8 training cannot be imported here (with the install hint); None if it can."""
    try:
        torchao_float8()
    except ImportError as err:
        return f"torchao's float8 training is not available ({err}); {INSTALL}"
    return None


def fp8_blocker(device: torch.device | str, capability: tuple[int, int] | None = None,
                recipe: str = "tensorwise") -> str | None:
    """Why ``model.fp8`` cannot train on ``device``; None when it can.

    ``cuda``: the compute capability (``capability``, else read from the device) must be at least
    :data:`MIN_CAPABILITY`. ``cpu``: one emulated FP8 linear layer runs forward and backward here
    (milliseconds), so a torch or torchao that cannot emulate is caught before training. Either
    way torchao must import."""
    device = torch.device(device)
    missing = torchao_blocker()
    if missing is not None:
        return missing
    if device.type == "cuda":
        cap = capability or torch.cuda.get_device_capability(device)
        if tuple(cap) < MIN_CAPABILITY:
            return (f"this GPU has compute capability {cap[0]}.{cap[1]}; FP8 matmuls need "
                    f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+ (L40S, RTX 4090, H100, H200, B200)")
        return None
    if device.type != "cpu":
        return f"FP8 training runs on NVIDIA GPUs (sm89+) or emulated on the CPU, not on {device.type}"
    try:
        _probe_emulation(recipe)
    except Exception as err:  # any failure of the probe means training would fail the same way
        return f"torchao's emulated FP8 matmul does not run on this CPU ({type(err).__name__}: {err})"
    return None


def _probe_emulation(recipe: str) -> None:
    float8 = torchao_float8()
    layer = nn.Sequential(nn.Linear(FP8_ALIGN, FP8_ALIGN)).to(torch.bfloat16)
    float8.convert_to_float8_training(layer, config=fp8_config(recipe, emulate=True))
    x = torch.randn(FP8_ALIGN, FP8_ALIGN, dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().sum().backward()
    if x.grad is None or not torch.isfinite(x.grad).all():
        raise RuntimeError("the probe's gradient is not finite")


def convert_blocks_to_fp8(model: nn.Module, recipe: str) -> list[str]:
    """Swap the blocks' Linear layers of ``model`` for torchao's ``Float8Linear`` (in place) and
    return their names. Emulated GEMMs without CUDA, FP8 kernels on the current GPU otherwise;
    :class:`UserError` naming ``model.fp8`` when this machine cannot (:func:`fp8_blocker`).
    Build the model, set activation checkpointing and do any surgery first; compile and hand it
    to the engine after."""
    if recipe not in FP8_MODES[1:]:
        raise ValueError(f"FP8 recipe {recipe!r} is not one of {', '.join(FP8_MODES[1:])}")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    blocker = fp8_blocker(device, recipe=recipe)
    if blocker is not None:
        raise UserError(f"config model.fp8={recipe!r}: {blocker}; or set model.fp8=off")
    names = [name for name, m in model.named_modules() if is_block_linear(m, name)]
    torchao_float8().convert_to_float8_training(model, module_filter_fn=is_block_linear,
                                                config=fp8_config(recipe, emulate=not cuda))
    return names


def fp8_layers(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` that run FP8 matmuls (torchao's ``Float8Linear``)."""
    return [name for name, m in model.named_modules() if type(m).__name__ == "Float8Linear"]
