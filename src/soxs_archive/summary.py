"""The summary of a run: per night and arm, what ran, was skipped, failed or was blocked.

Three forms of the same content: a table for the terminal (:func:`format_summary`),
``W/summary.json`` and ``W/summary.html``, a small static page linking each step's products
and QC plots by paths relative to the workspace (:func:`write_summary`).
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from soxs_core.io.safety import write_atomically

from .model import Plan, StepResult

__all__ = ["summarise", "format_summary", "write_summary", "STATUSES", "run_failed"]

#: Step statuses, in the order the summary counts them.
STATUSES = ("done", "skipped", "failed", "blocked")


def run_failed(results: Sequence[StepResult]) -> bool:
    """Whether any step failed or was blocked (the command's exit status is then 1)."""
    return any(r.status in ("failed", "blocked") for r in results)


def summarise(plan: Plan, results: Sequence[StepResult]) -> dict[str, Any]:
    """The run's summary as JSON-friendly data.

    Returns
    -------
    dict
        ``workspace``; ``groups``: one per night and arm (in the plan's order) with the
        count of each status, of products and of QC values out of range, and its ``steps``
        (the StepResult fields, with recipe, night, arm, paths relative to the workspace);
        ``unused_frames`` and ``impossible_steps`` of the plan (what and why).
    """
    workspace = Path(plan.workspace)
    by_id = {r.step_id: r for r in results}
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for step in plan.steps:
        result = by_id.get(step.step_id)
        if result is None:
            continue
        group = groups.setdefault((step.night, step.arm), {
            "night": step.night, "arm": step.arm, **{s: 0 for s in STATUSES},
            "products": 0, "qc_out_of_range": 0, "steps": []})
        group[result.status] += 1
        group["products"] += len(result.products)
        group["qc_out_of_range"] += len(result.qc_out_of_range)
        entry = result.to_dict()
        entry.update(recipe=step.recipe, night=step.night, arm=step.arm,
                     instrument=step.instrument,
                     products=[_relative(p, workspace) for p in result.products],
                     plots=[_relative(p, workspace) for p in result.plots],
                     qc={k: _plain(v) for k, v in result.qc.items()})
        group["steps"].append(entry)
    return {
        "workspace": str(workspace),
        "totals": {s: sum(g[s] for g in groups.values()) for s in STATUSES},
        "groups": list(groups.values()),
        "unused_frames": [{"what": u.what, "reason": u.reason} for u in plan.unused_frames],
        "impossible_steps": [{"what": u.what, "reason": u.reason}
                             for u in plan.impossible_steps],
    }


def _relative(path: str, workspace: Path) -> str:
    """``path`` relative to the workspace (as the HTML page links it), else as given."""
    try:
        return os.path.relpath(Path(path).resolve(), workspace.resolve())
    except ValueError:  # another drive
        return str(path)


def _plain(value: Any) -> Any:
    """A header value JSON can hold (numpy scalars as Python numbers)."""
    return value.item() if hasattr(value, "item") else value


def format_summary(summary: dict[str, Any]) -> str:
    """The terminal table: one row per night and arm, then failures, blocked steps and QC
    values out of range, one line each."""
    header = ("night", "arm", "run", "skipped", "failed", "blocked", "products", "QC out")
    rows = [(g["night"], g["arm"], g["done"], g["skipped"], g["failed"], g["blocked"],
             g["products"], g["qc_out_of_range"]) for g in summary["groups"]]
    totals = summary["totals"]
    rows.append(("all", "", totals["done"], totals["skipped"], totals["failed"],
                 totals["blocked"], sum(g["products"] for g in summary["groups"]),
                 sum(g["qc_out_of_range"] for g in summary["groups"])))
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(v).ljust(w) if i < 2 else str(v).rjust(w)
                       for i, (v, w) in enumerate(zip(row, widths))).rstrip()
             for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.insert(len(lines) - 1, lines[1])
    steps = [s for g in summary["groups"] for s in g["steps"]]
    for status, title in (("failed", "failed"), ("blocked", "blocked")):
        chosen = [s for s in steps if s["status"] == status]
        if chosen:
            lines += ["", f"{title}:"] + [f"  {s['step_id']}: {s['reason']}" for s in chosen]
    out_of_range = [(s["step_id"], text) for s in steps for text in s["qc_out_of_range"]]
    if out_of_range:
        lines += ["", "QC out of range:"] + [f"  {sid}: {text}" for sid, text in out_of_range]
    if summary["impossible_steps"]:
        lines += ["", "not planned:"] + [f"  {u['what']}: {u['reason']}"
                                         for u in summary["impossible_steps"]]
    return "\n".join(lines)


def _links(paths: Sequence[str]) -> str:
    return " ".join(f'<a href="{html.escape(p)}">{html.escape(Path(p).name)}</a>'
                    for p in paths)


def summary_html(summary: dict[str, Any]) -> str:
    """The summary as a small static HTML page (links relative to the workspace)."""
    esc = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>soxs-reduce summary</title>",
             "<style>body{font-family:sans-serif;margin:1em}table{border-collapse:collapse;"
             "margin-bottom:1.5em}td,th{border:1px solid #bbb;padding:2px 6px;"
             "vertical-align:top;text-align:left}.failed,.blocked{background:#fdd}"
             ".skipped{color:#666}</style></head><body>",
             f"<h1>soxs-reduce: {esc(summary['workspace'])}</h1>",
             "<p>" + ", ".join(f"{n} {s}" for s, n in summary["totals"].items()) + "</p>"]
    for group in summary["groups"]:
        parts.append(f"<h2>{esc(group['night'])} {esc(group['arm'])}</h2>")
        parts.append("<table><tr><th>step</th><th>recipe</th><th>status</th><th>reason</th>"
                     "<th>time [s]</th><th>peak RSS [MiB]</th><th>products</th>"
                     "<th>QC out of range</th><th>QC plots</th></tr>")
        for s in group["steps"]:
            parts.append(
                f'<tr class="{esc(s["status"])}"><td>{esc(s["step_id"])}</td>'
                f"<td>{esc(s['recipe'])}</td><td>{esc(s['status'])}</td>"
                f"<td>{esc(s['reason'])}</td><td>{s['seconds']:.1f}</td>"
                f"<td>{s['peak_rss_mib']:.0f}</td><td>{_links(s['products'])}</td>"
                f"<td>{'<br>'.join(esc(t) for t in s['qc_out_of_range'])}</td>"
                f"<td>{_links(s['plots'])}</td></tr>")
        parts.append("</table>")
    for key, title in (("impossible_steps", "Steps not planned"),
                       ("unused_frames", "Frames in no step")):
        if summary[key]:
            parts.append(f"<h2>{title}</h2><ul>")
            parts += [f"<li>{esc(u['what'])}: {esc(u['reason'])}</li>" for u in summary[key]]
            parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_summary(summary: dict[str, Any], workspace: str | os.PathLike
                  ) -> tuple[Path, Path]:
    """Write ``summary.json`` and ``summary.html`` into the workspace, atomically."""
    workspace = Path(workspace)
    json_path = write_atomically(workspace / "summary.json", lambda tmp: tmp.write_text(
        json.dumps(summary, indent=1, default=str) + "\n", encoding="utf-8"))
    html_path = write_atomically(workspace / "summary.html", lambda tmp: tmp.write_text(
        summary_html(summary), encoding="utf-8"))
    return Path(json_path), Path(html_path)
