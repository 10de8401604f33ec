"""``vitscale bench {loader,train,fewshot}``: benchmarks that print figures with the machine they ran on."""

from __future__ import annotations

import sys

USAGE = """usage: vitscale bench {loader,train,fewshot} [options]  (vitscale bench KIND --help for each)

  loader     images/s of the input pipeline on real shards, ours vs the alternatives
  train      training throughput, MFU, memory and step phases per configuration
  fewshot    what few-shot evaluation costs (the solver, and the whole evaluator on the CPU twin)"""


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if not argv or argv[0] not in ("loader", "train", "fewshot"):
        print(USAGE, file=sys.stderr)
        return 2
    if argv[0] == "fewshot":
        from pretrain.bench.fewshot import main as fewshot_main

        return int(fewshot_main(argv[1:]) or 0)
    if argv[0] == "loader":
        from pretrain.bench.loader import main as loader_main

        return int(loader_main(argv[1:]) or 0)
    from pretrain.bench.train import main as train_main

    return int(train_main(argv[1:]) or 0)
