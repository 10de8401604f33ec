"""``vitscale inspect PATH [--json]``: what a checkpoint or weights file holds (see
:mod:`pretrain.formats.inspect`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pretrain.formats import format_names
from pretrain.formats.inspect import inspect


def _text(info: dict) -> str:
    lines = [f"{info['path']}: {info['format']}"]
    spec = info.get("spec")
    if spec:
        lines.append("model: " + ", ".join(f"{k}={v}" for k, v in spec.items()))
    for key, value in info.items():
        if key in ("path", "format", "spec", "files", "config"):
            continue
        if isinstance(value, int) and not isinstance(value, bool):
            value = f"{value:,}"
        elif value == "":
            value = "''"
        lines.append(f"{key}: {value}")
    files = info.get("files")
    if isinstance(files, dict):
        lines.append(f"files ({len(files)}):")
        lines += [f"  {name:<52} {size / 2**20:10.2f} MiB" for name, size in files.items()]
    elif files:
        lines.append(f"files: {', '.join(files)}")
    if "config" in info:
        lines.append("config: " + json.dumps(info["config"], sort_keys=True))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="vitscale inspect",
                                description="What a checkpoint or weights file holds: format, model "
                                            "dimensions, dtype, parameters, step, world size, ZeRO stage.")
    p.add_argument("path", type=Path, help="checkpoint file or directory")
    p.add_argument("--from", dest="fmt", choices=format_names(), help="format (detected by default)")
    p.add_argument("--heads", type=int, help="attention heads, for formats that do not store them")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    info = inspect(args.path, args.fmt, args.heads)
    print(json.dumps(info, indent=1, default=str) if args.json else _text(info))
    return 0
