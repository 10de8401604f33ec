"""``python bench/train_throughput.py ARGS`` is ``vitscale bench train ARGS`` (see pretrain/bench_train.py).

Kept as a script so that a checkout without an installed package can run the benchmark; results
and their fields are described in bench/results/README.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", "train", *sys.argv[1:]]))
