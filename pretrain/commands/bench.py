"""``vitscale bench {loader,train,fewshot}``: benchmarks that print figures with the machine they ran on."""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("loader", "train", "fewshot"):
        print("usage: vitscale bench {loader,train,fewshot} [options]  (see --help of each)", file=sys.stderr)
        return 2
    if argv[0] == "fewshot":
        from pretrain.bench.fewshot import main as fewshot_main

        return int(fewshot_main(argv[1:]) or 0)
    if argv[0] == "loader":
        from pretrain.bench.loader import main as loader_main

        return int(loader_main(argv[1:]) or 0)
    from pretrain.bench.train import main as train_main

    return int(train_main(argv[1:]) or 0)
