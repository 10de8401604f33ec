"""Run under torchrun: train the tiny ViT with our Engine and report per-rank facts as JSON.

Usage: python -m torch.distributed.run --nproc-per-node 2 tests/scripts/zero_train.py STAGE STEPS OUT.json
"""

import sys

import torch

from pretrain.data.synthetic import SyntheticTrain
from pretrain.model.vit import build_model
from pretrain.train.config_file import load_config
from pretrain.train.engine import Engine, init_distributed
from pretrain.train.loop import train_step
from tests.scripts.rank_end import write_and_exit

stage, steps, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rank, world, _ = init_distributed()
cfg = load_config(None, ["model.name=vit_test4", "model.img_size=16", "model.num_classes=4",
                         "train.micro_batch=16", f"zero.stage={stage}", "optim.lr=0.003"])
torch.manual_seed(0)
model = build_model(cfg.model.spec())
total = sum(p.numel() for p in model.parameters())
cfg = cfg.for_world(world)
engine = Engine(model, cfg, world)
data = SyntheticTrain(cfg.loader(), rank, world)
losses = []
for _ in range(steps):
    loss, applied = train_step(engine, [data.next_batch()], cfg, 4, cfg.optim.lr)
    losses.append(loss.item())
facts = {"rank": rank, "losses": losses, "total_params": total, "held_params": engine.partitioned_numel(),
         "param_dtype": str(next(engine.module.parameters()).dtype)}
write_and_exit(rank, facts, out)
