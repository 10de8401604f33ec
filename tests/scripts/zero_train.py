"""Run under torchrun: the tiny ViT on our Engine, and per-rank facts as JSON.

Usage: python -m torch.distributed.run --nproc-per-node 2 tests/scripts/zero_train.py STAGE STEPS OUT.json

Two phases on one engine (gradient accumulation 3):

1. four steps with Mixup, counting the host syncs our code makes per step: every Tensor method
   that makes the host wait for the device (item, tolist, cpu, numpy, bool, float, int) is
   wrapped, and a call counts when the frame that makes it is in the pretrain package;
2. STEPS plain steps, their losses recorded (does it learn), and how many parameters this rank
   holds (ZeRO-3 partitions them).
"""

import sys

import torch

from pretrain.data.synthetic import SyntheticTrain
from pretrain.model.vit import build_model
from pretrain.train.config_file import load_config
from pretrain.train.engine import Engine, init_distributed
from pretrain.train.loop import run_step, train_step
from pretrain.train.mixing import build_mixer
from tests.scripts.rank_end import write_and_exit

ACCUM, COUNTED = 3, 4
stage, steps, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rank, world, _ = init_distributed()
cfg = load_config(None, ["model.name=vit_test4", "model.img_size=16", "model.num_classes=4", "train.micro_batch=8",
                         f"train.grad_accum={ACCUM}", f"zero.stage={stage}", "optim.lr=0.003",
                         "augment.mixup_alpha=0.5"])
torch.manual_seed(0)
model = build_model(cfg.model.spec())
total = sum(p.numel() for p in model.parameters())
cfg = cfg.for_world(world)
engine = Engine(model, cfg, world)
data = SyntheticTrain(cfg.loader(), rank, world)

# phase 1: host syncs per step
mixer = build_mixer(cfg.augment, 4, cfg.train.loss, 0.0, 0)
counts = {"n": 0}


def counting(name):
    original = getattr(torch.Tensor, name)

    def wrapper(self, *args, **kwargs):
        if "/pretrain/" in sys._getframe(1).f_code.co_filename:
            counts["n"] += 1
        return original(self, *args, **kwargs)

    return original, wrapper


patched = {name: counting(name) for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")}
syncs = []
for step in range(1, COUNTED + 1):
    batches = [data.next_batch() for _ in range(ACCUM)]
    for name, (_, wrapper) in patched.items():
        setattr(torch.Tensor, name, wrapper)
    counts["n"] = 0
    outcome = run_step(engine, batches, cfg, 4, 1e-3, mixer=mixer, step=step, rank=rank, flags=(0.0, 0.0))
    for name, (original, _) in patched.items():
        setattr(torch.Tensor, name, original)
    syncs.append({"syncs": counts["n"], "applied": outcome.applied})

# phase 2: learning
losses = []
for _ in range(steps):
    loss, applied = train_step(engine, [data.next_batch() for _ in range(ACCUM)], cfg, 4, cfg.optim.lr)
    losses.append(loss.item())
facts = {"rank": rank, "syncs": syncs, "losses": losses, "total_params": total,
         "held_params": engine.partitioned_numel(), "param_dtype": str(next(engine.module.parameters()).dtype)}
write_and_exit(rank, facts, out)
