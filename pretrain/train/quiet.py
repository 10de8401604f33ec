"""Keep the ranks' console to our step lines, events and errors.

Third-party libraries print the same notices from every rank: torch's FutureWarnings about the
deprecated collectives DeepSpeed calls (with their ``return func(...)`` source line, every step
under ZeRO-3), the C++-extension loader's "No CUDA runtime" note, DeepSpeed's op-build and
accelerator banners. In a rank these are silenced; rank 0 keeps third-party *errors* and
DeepSpeed warnings, the other ranks print nothing on stdout (their errors still reach stderr). The
Python processes a rank starts (loader workers from a forkserver) filter the same warnings.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings


def quiet_third_party(rank: int) -> None:
    """Filter the known third-party notices in this rank process (call before training)."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=r".*TypedStorage is deprecated.*")
    # Python processes this rank starts (the DataLoader forkserver and its workers, the resource
    # tracker) begin with the interpreter's default filters, not these: the same ones through the
    # environment, before the user's own PYTHONWARNINGS (which take precedence)
    ours = "ignore::FutureWarning,ignore::DeprecationWarning,ignore:TypedStorage is deprecated"
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [ours, os.environ.get("PYTHONWARNINGS")]))
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    ds_level = logging.WARNING if rank == 0 else logging.ERROR
    logging.getLogger("DeepSpeed").setLevel(ds_level)
    if rank != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
