"""Run under torchrun: count the host syncs our code makes per training step (ZeRO-2, 2 ranks).

Usage: python -m torch.distributed.run --nproc-per-node 2 tests/scripts/count_syncs.py STEPS ACCUM OUT.json

Every Tensor method that makes the host wait for the device (item, tolist, cpu, numpy, bool,
float, int) is wrapped; a call counts when the frame that makes it is in the pretrain package.
"""

import sys

import torch

from pretrain.data.synthetic import SyntheticTrain
from pretrain.model.vit import build_model
from pretrain.train.config_file import load_config
from pretrain.train.engine import Engine, init_distributed
from pretrain.train.loop import run_step
from tests.scripts.rank_end import write_and_exit

steps, accum, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rank, world, _ = init_distributed()
cfg = load_config(None, ["model.name=vit_test4", "model.img_size=16", "model.num_classes=4", "train.micro_batch=8",
                         f"train.grad_accum={accum}", "zero.stage=2", "augment.mixup_alpha=0.5"]).for_world(world)
torch.manual_seed(0)
engine = Engine(build_model(cfg.model.spec()), cfg, world)
data = SyntheticTrain(cfg.loader(), rank, world)
from pretrain.train.mixing import build_mixer  # noqa: E402

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
per_step = []
for step in range(1, steps + 1):
    batches = [data.next_batch() for _ in range(accum)]
    for name, (_, wrapper) in patched.items():
        setattr(torch.Tensor, name, wrapper)
    counts["n"] = 0
    outcome = run_step(engine, batches, cfg, 4, 1e-3, mixer=mixer, step=step, rank=rank, flags=(0.0, 0.0))
    for name, (original, _) in patched.items():
        setattr(torch.Tensor, name, original)
    per_step.append({"syncs": counts["n"], "applied": outcome.applied})
write_and_exit(rank, per_step, out)
