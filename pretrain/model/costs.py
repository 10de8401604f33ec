"""What a model costs: parameters, forward MACs, training FLOPs, MFU (pure functions).

MACs are counted by running the real forward under ``torch.utils.flop_counter`` on the meta
device, so nothing is allocated and the count follows the model code (SDPA included).
Training FLOPs per image = 6 x forward MACs (forward 2, backward 4; activation recompute is not
counted, as in the PaLM/MFU convention).
"""

from __future__ import annotations

import functools

import torch
from torch.utils.flop_counter import FlopCounterMode

from pretrain.model.vit import ViTSpec, build_model

# Dense bf16 peak FLOP/s per device, by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "4090": 165e12,
    "B200": 2250e12,
}


@functools.lru_cache(maxsize=64)
def model_costs(spec: ViTSpec, patch_dropout: float = 0.0) -> dict:
    """Parameter counts, forward GMACs and training TFLOPs per image for ``spec``; with
    ``patch_dropout`` the training FLOPs are those of the tokens a training image keeps (the
    forward is counted in training mode), while ``gmacs_fwd`` stays the full (eval) forward."""
    model = build_model(spec, device="meta", patch_dropout=patch_dropout)
    total = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("head.", "pre_logits.")))
    macs = _forward_macs(model.eval(), spec)
    train_macs = _forward_macs(model.train(), spec) if patch_dropout else macs
    return {
        "params": total,
        "params_backbone": total - head,
        "gmacs_fwd": macs / 1e9,
        "train_tflops_per_image": 6 * train_macs / 1e12,
        "seq_len": spec.seq_len,
        "head_dim": spec.head_dim,
    }


def _forward_macs(model: torch.nn.Module, spec: ViTSpec) -> float:
    x = torch.empty(1, 3, spec.img_size, spec.img_size, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 2


def param_count(spec: ViTSpec) -> int:
    """Number of parameters of ``build_model(spec)``, in closed form (no model is built)."""
    d, m, p = spec.width, spec.mlp_dim, spec.patch_size
    n = 3 * p * p * d + spec.seq_len * d + 2 * d
    n += d if spec.patch_bias else 0
    n += 2 * d if spec.pre_norm else 0
    n += d if spec.pool == "cls" else 0
    n += spec.depth * (4 * d * d + 2 * d * m + 9 * d + m)
    n += d * spec.proj_dim if spec.proj_dim else 0
    f, rep = spec.feature_dim, spec.representation_size
    if rep:
        n += f * rep + rep
    if spec.num_classes:
        n += (rep or f) * spec.num_classes + spec.num_classes
    return n


def peak_flops_for(device_name: str) -> float | None:
    """Table lookup of dense bf16 peak FLOP/s for a CUDA device name; None if unknown."""
    for key, peak in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return peak
    return None


def mfu(images_per_s: float, train_flops_per_image: float, peak_flops: float | None,
        world_size: int) -> float | None:
    """Model FLOPs utilisation over all devices, or None without a known peak."""
    if not peak_flops:
        return None
    return images_per_s * train_flops_per_image / (peak_flops * world_size)
