"""Write a tiny ZeRO checkpoint the way a vitscale training run lays it out (test fixture).

Run with ``python -m torch.distributed.run --nproc-per-node N ds_save_tiny.py RUN_DIR [--stage S]``
on CPU (gloo). Takes two AdamW steps in bf16, saves with tag ``step_00000002`` under
``RUN_DIR/checkpoints``, writes ``latest`` and ``vitscale.json``, and, on rank 0, writes
``RUN_DIR/reference.pt``: the fp32 master weights (gathered with ``safe_get_full_fp32_param``),
the fixed input and the logits of an fp32 model built from those weights.

With ``--load-universal UDIR`` it instead resumes, with whatever process count it runs on, from
the universal checkpoint UDIR the way a run would (DeepSpeed ``checkpoint.load_universal`` and
``engine.load_checkpoint(dirname(UDIR))``, which follows ``latest_universal``), and writes the
restored fp32 master weights to ``RUN_DIR/restored.pt``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param

from pretrain.model.vit import build_model, spec_for
from pretrain.train.spawn import exit_rank

TAG = "step_00000002"


def _gather_fp32(engine) -> dict[str, torch.Tensor]:
    """Full fp32 master weights (a collective: every rank calls it)."""
    return {n: safe_get_full_fp32_param(p).detach().clone() for n, p in engine.module.named_parameters()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--stage", type=int, default=3)
    parser.add_argument("--load-universal", type=Path, help="instead: resume from this universal checkpoint "
                        "dir and write the restored fp32 master weights to RUN_DIR/restored.pt")
    args = parser.parse_args()

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    spec = spec_for("vit_test4", img_size=16, num_classes=5, representation_size="auto")
    model = build_model(spec)
    with torch.no_grad():
        model.head.weight.normal_(std=0.02)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": args.stage},
        "bf16": {"enabled": True},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1000,
    }
    if args.load_universal:
        config["checkpoint"] = {"load_universal": True}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    if args.load_universal:
        engine.load_checkpoint(str(args.load_universal.parent))
        restored = _gather_fp32(engine)
        if rank == 0:
            torch.save(restored, args.run_dir / "restored.pt")
        dist.barrier()
        return

    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(2):
        x = torch.randn(2, 3, 16, 16, generator=gen).to(torch.bfloat16)
        y = torch.randint(0, 5, (2,), generator=gen)
        loss = torch.nn.functional.cross_entropy(engine(x).float(), y)
        engine.backward(loss)
        engine.step()

    ckdir = args.run_dir / "checkpoints"
    engine.save_checkpoint(str(ckdir), tag=TAG)
    master = _gather_fp32(engine)
    dist.barrier()
    if rank == 0:
        meta = {"format": "vitscale-deepspeed", "model_spec": spec.to_dict(), "step": 2, "world_size": world,
                "zero_stage": args.stage, "version": "0.1.0", "config": {"model": {"name": "vit_test4"}}}
        (ckdir / TAG / "vitscale.json").write_text(json.dumps(meta, indent=1))
        (ckdir / "latest").write_text(TAG)
        ref = build_model(spec)
        ref.load_state_dict(master)
        ref.eval()
        x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            logits = ref(x)
        torch.save({"state_dict": master, "input": x, "logits": logits}, args.run_dir / "reference.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_rank(0)  # as a finished rank of `vitscale pretrain` ends: no C++ teardown at exit
