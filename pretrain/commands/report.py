"""``vitscale report RUN [RUN ...] [--out DIR]``: figures and a header table of one or more runs
as an HTML page (several runs overlay on the same axes).

Reads only ``metrics.jsonl``, ``summary.json`` and the checkpoint meta files of each run, so it
works on a run that is still going, on one that crashed and on a copy pulled from a cluster.
Writes ``index.html``, one PNG per figure and ``report.json`` (the data behind every figure) to
``--out`` (default: ``RUN/report`` for one run, ``./report`` for several) and prints the page's
path. Needs matplotlib: ``pip install 'vitscale[report]'``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pretrain.core.errors import UserError
from pretrain.core.help_text import doc_help
from pretrain.train.sinks import METRICS_FILE


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="vitscale report", description=doc_help(__doc__))
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run directory (run.dir of a job)")
    p.add_argument("--out", type=Path, help="where to write the page (default: RUN/report, or ./report for several)")
    args = p.parse_args(argv)
    from pretrain.report.page import pyplot, write_report
    from pretrain.report.series import load_run, run_names

    pyplot()  # before any reading: without matplotlib, one line and exit 2
    for run in args.runs:
        if not run.is_dir():
            raise UserError(f"{run}: no such run directory (give the run.dir of a pretrain or finetune job)")
    empty = [str(r) for r in args.runs if not (r / METRICS_FILE).is_file()]
    if len(empty) == len(args.runs):
        raise UserError(f"no {METRICS_FILE} in {', '.join(empty)}: is that the run.dir of a job that started?")
    out = args.out or (args.runs[0] / "report" if len(args.runs) == 1 else Path("report"))
    runs = [load_run(path, name) for path, name in zip(args.runs, run_names(args.runs), strict=True)]
    page = write_report(runs, out)
    for run in runs:
        if run.unreadable_lines:
            print(f"{run.name}: {run.unreadable_lines} line(s) of {METRICS_FILE} could not be read and were left out")
    print(page)
    return 0
