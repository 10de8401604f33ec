"""Draw the report: one PNG per figure (matplotlib, Agg: no display needed), ``report.json`` with
the data behind them (:func:`pretrain.report.series.report_data`) and ``index.html``, a page
with no outside resources that shows the header table and the PNGs beside it.

Runs overlay on the same axes, one colour per run; within a run the series of a panel differ by
line style. A panel without data says "no data". matplotlib is imported when a report is
drawn, not before: it is an optional extra (``pip install 'vitscale[report]'``).
"""

from __future__ import annotations

import html
import json
import textwrap
from pathlib import Path

from pretrain.core.errors import UserError
from pretrain.core.version import package_version
from pretrain.report.series import RunData, report_data

PAGE = "index.html"
DATA = "report.json"
_STYLES = ["-", "--", ":", "-."]
_HEADER_ROWS = [("status", "status"), ("mode", "mode"), ("model", "model"), ("recipe", "recipe"),
                ("world size", "world_size"), ("ZeRO stage", "zero_stage"), ("steps", "steps"),
                ("of", "total_steps"), ("wall time", "wall_time_s"), ("starts", "starts"),
                ("resumed from", "resumed_from"), ("final loss", "final_loss"), ("best eval", "best_eval"),
                ("lost samples", "lost_samples"), ("skipped steps", "skipped_steps"),
                ("checkpoints", "checkpoints"), ("unreadable lines", "unreadable_lines"),
                ("vitscale version", "version"), ("path", "path")]


def pyplot():
    """matplotlib's pyplot on the Agg backend; a :class:`UserError` naming the package without it."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("vitscale report draws with matplotlib, which is not installed: "
                        "pip install 'vitscale[report]'") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def write_report(runs: list[RunData], out: Path) -> Path:
    """Figures, ``report.json`` and the page for ``runs`` under ``out``; returns the page's path."""
    plt = pyplot()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = report_data(runs)
    colours = {run.name: f"C{i % 10}" for i, run in enumerate(runs)}
    for key, figure in data["figures"].items():
        figure["png"] = f"{key}.png"
        _draw(plt, figure, colours, len(runs) > 1, out / figure["png"])
    data["vitscale_version"] = package_version()
    (out / DATA).write_text(json.dumps(data, indent=1))
    (out / PAGE).write_text(_page(data))
    return out / PAGE


def _draw(plt, figure: dict, colours: dict[str, str], several: bool, path: Path) -> None:
    from matplotlib.ticker import PercentFormatter

    panels = figure["panels"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.4), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        ax.set_title(panel["title"], fontsize=10)
        ax.set_xlabel(panel["xlabel"], fontsize=9)
        ax.set_ylabel(panel["ylabel"], fontsize=9)
        ax.tick_params(labelsize=8)
        if not panel["series"]:
            ax.text(0.5, 0.5, textwrap.fill(panel["empty"], 36), ha="center", va="center", transform=ax.transAxes,
                    color="0.5", fontsize=11)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        if panel["kind"] == "barh":
            _bars(ax, panel, colours, several)
        else:
            _lines(ax, panel, colours, several)
            if panel["percent"]:
                ax.yaxis.set_major_formatter(PercentFormatter(1.0))
            ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(figure["title"], fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def _lines(ax, panel: dict, colours: dict[str, str], several: bool) -> None:
    per_run: dict[str, int] = {}
    for s in panel["series"]:
        n = per_run[s["run"]] = per_run.get(s["run"], -1) + 1
        colour, label = colours[s["run"]], f"{s['run']}: {s['label']}" if several else s["label"]
        y = [float("nan") if v is None else v for v in s["y"]]
        if s["style"] == "points":
            ax.plot(s["x"], y, "x", color=colour, label=label)
        elif s["style"] == "stem":
            ax.vlines(s["x"], 0, y, color=colour, alpha=0.6)
            ax.plot(s["x"], y, "o", color=colour, label=label, markersize=4)
        else:
            ax.plot(s["x"], y, _STYLES[n % len(_STYLES)], color=colour, label=label,
                    drawstyle="steps-post" if s["style"] == "steps" else "default",
                    marker="o" if len(s["x"]) < 4 else None, markersize=3)
        if "low" in s:
            ax.fill_between(s["x"], s["low"], s["high"], color=colour, alpha=0.15)
    for m in panel["markers"]:
        ax.axvline(m["x"], color=colours[m["run"]], linestyle=":", alpha=0.7)
        ax.annotate(m["label"], (m["x"], 1.0), xycoords=("data", "axes fraction"), fontsize=7, rotation=90,
                    va="top", ha="right", color=colours[m["run"]])


def _bars(ax, panel: dict, colours: dict[str, str], several: bool) -> None:
    names = list(dict.fromkeys(x for s in panel["series"] for x in s["x"]))
    height = 0.8 / len(panel["series"])
    for i, s in enumerate(panel["series"]):
        value = dict(zip(s["x"], s["y"], strict=True))
        rows = [k for k, name in enumerate(names) if name in value]
        ax.barh([k + i * height for k in rows], [value[names[k]] for k in rows], height=height,
                color=colours[s["run"]], label=s["run"] if several else s["label"])
    ax.set_yticks([k + 0.4 - height / 2 for k in range(len(names))], names, fontsize=7)
    ax.invert_yaxis()


def _cell(value) -> str:
    if value is None or value == []:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "<br>".join(_cell(v) for v in value)
    if isinstance(value, dict):
        return html.escape(", ".join(f"{k} {v}" for k, v in value.items()))
    return html.escape(str(value))


def _page(data: dict) -> str:
    runs = data["runs"]
    head = "".join(f"<th>{html.escape(r['run'])}</th>" for r in runs)
    rows = "\n".join(f"<tr><th>{label}</th>" + "".join(f"<td>{_wall(r[key]) if key == 'wall_time_s' else _cell(r[key])}"
                                                      f"</td>" for r in runs) + "</tr>"
                     for label, key in _HEADER_ROWS)
    figures = "\n".join(
        f'<figure><img src="{html.escape(f["png"])}" alt="{html.escape(f["title"])}">'
        f"<figcaption>{html.escape(f['title'])}</figcaption></figure>" for f in data["figures"].values())
    title = "vitscale report: " + ", ".join(r["run"] for r in runs)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.85em; margin-bottom: 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }}
figure {{ margin: 0 0 1.2em 0; }} figcaption {{ font-size: 0.8em; color: #555; }}
img {{ max-width: 100%; }}
</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p>Read from metrics.jsonl, summary.json and the checkpoint meta files; the data behind every figure is in
<a href="{DATA}">{DATA}</a>. Written by vitscale {html.escape(data["vitscale_version"])}.</p>
<table><tr><th></th>{head}</tr>
{rows}
</table>
{figures}
</body></html>
"""


def _wall(seconds) -> str:
    if seconds is None:
        return "–"
    h, rest = divmod(int(seconds), 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d} (first to last record)"
