"""The timm baseline of ``vitscale bench train``: timm's ViT in a plain torch loop.

For ViT-H/14 at 224 it is ``timm.create_model("vit_huge_patch14_224")``; for other models (the
CPU rehearsal's stand-ins) timm's ``VisionTransformer`` with the same dimensions
(:func:`pretrain.formats.timm.timm_kwargs`, no pre-logits layer, as timm has none). timm is
optional (installed where the GPU benchmark runs); it is imported only here, only when the baseline
is asked for (the parent checks that it is installed and otherwise records a note).
"""

from __future__ import annotations

from dataclasses import asdict

import torch
import torch.nn.functional as F

from pretrain.bench.evidence import compile_watch
from pretrain.bench.measure import NUM_CLASSES, Passes, device, measure, oom_guard
from pretrain.bench.plan import TIMM_MODEL, TIMM_REFERENCE, Case, case_config
from pretrain.data.batch import Batch
from pretrain.formats.timm import timm_kwargs
from pretrain.model.vit import ViTSpec, spec_for
from pretrain.train.config import Config
from pretrain.train.engine import param_groups


def timm_name(model: str, img_size: int) -> str:
    """What the baseline of ``model`` at ``img_size`` is called in the records."""
    return TIMM_MODEL if (model, img_size) == TIMM_REFERENCE else f"VisionTransformer({model})"


def timm_spec(model: str, img_size: int) -> ViTSpec:
    """Our spec of the baseline's architecture (1000 classes, no pre-logits)."""
    return spec_for(model, img_size=img_size, num_classes=NUM_CLASSES)


class TimmStepper:
    """timm's model in a plain torch loop: bf16 autocast over fp32 weights, AdamW (fused on CUDA)
    with our weight-decay groups, and gradient clipping as our engine does."""

    def __init__(self, model: torch.nn.Module, cfg: Config):
        self.model = model
        self.clip = cfg.train.grad_clip
        fused = {"fused": True} if torch.cuda.is_available() else {}
        o = cfg.optim
        self.opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps,
                                     **fused)
        self.device_type = device().type

    def forward(self, batch: Batch) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            logits = self.model(batch.images)
        return F.cross_entropy(logits.float(), batch.targets)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def train_step(self, batch: Batch) -> torch.Tensor:
        loss = self.forward(batch)
        self.backward(loss)
        self.step()
        return loss.detach()


def measure_timm(reference: Case, micro_batch: int, passes: Passes) -> dict:
    """:func:`pretrain.bench.measure.measure` of timm's ViT for ``reference``'s model and size
    (:func:`timm_name`; 1000 classes, random init) at ``micro_batch``, with activation
    checkpointing and block compilation as in ``reference``. Raises ImportError without timm,
    ``torch.cuda.OutOfMemoryError`` if it does not fit."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    cfg = case_config(reference, micro_batch)
    spec = timm_spec(reference.model, reference.img_size)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    def run() -> dict:
        torch.manual_seed(0)
        with torch.device(device()):
            if (reference.model, reference.img_size) == TIMM_REFERENCE:
                model = timm.create_model(TIMM_MODEL, pretrained=False, num_classes=NUM_CLASSES)
            else:
                model = VisionTransformer(**timm_kwargs(spec))
        model.train()
        if reference.act_ckpt:
            model.set_grad_checkpointing(True)
        if reference.compile:
            for block in model.blocks:
                block.compile()
        with compile_watch() as stats:
            result = measure(TimmStepper(model, cfg), spec, micro_batch, passes)
        return {**result, "compile_stats": asdict(stats) if reference.compile else None}

    return oom_guard(run, micro_batch)
