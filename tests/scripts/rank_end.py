"""How the torchrun test scripts end: gather every rank's facts, write them as JSON (rank 0),
leave the process group in step and end the process as a finished `vitscale pretrain` rank
does (``exit_rank``: no C++ teardown at interpreter exit)."""

import json

from pretrain.train.engine import Comm, destroy
from pretrain.train.spawn import exit_rank


def write_and_exit(rank: int, facts, out: str) -> None:
    gathered = Comm.all_gather_object(facts)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    Comm.barrier()
    destroy()
    exit_rank(0)
