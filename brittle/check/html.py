"""``report.html``: one page with the summary table, the plots and the settings.

The page has no scripts and no external styles or fonts; the plots are PNG
files next to it, referenced by relative path, so the output directory can be
moved or archived as a whole.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

from brittle.calibrate.report import percent
from brittle.check.console import (
    ADAPTIVE_NAMES,
    flag_text,
    fmt,
    per_class_text,
    robust_accuracy_text,
    timings_text,
)
from brittle.check.plots import PLOT_FILES, PLOT_HINT

__all__ = ["write_html"]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25em 0.8em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr.chosen { background: #eef6ee; font-weight: 600; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.3em 0; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.note { color: #666; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _score_table(p: dict[str, Any]) -> str:
    head = (
        "<tr><th>score</th><th>tau</th><th>95% CI</th><th>AUROC</th><th>AUPR</th>"
        f"<th>FPR@{percent(p['target_tpr'])}TPR</th><th>threshold</th></tr>"
    )
    rows = []
    entries = [
        (k, m, p["score_thresholds"].get(k), k == p["chosen"]) for k, m in p["metrics"].items()
    ]
    entries += [
        (f"{k} (baseline)", m, m.get("threshold"), False) for k, m in p["baselines"].items()
    ]
    for name, m, threshold, chosen in entries:
        lo, hi = m["tau_ci"]
        rows.append(
            f"<tr{' class=chosen' if chosen else ''}><td>{_e(name)}{' (chosen)' if chosen else ''}"
            f"</td><td>{fmt(m['tau'])}</td><td>[{fmt(lo, '.2f')}, {fmt(hi, '.2f')}]</td>"
            f"<td>{fmt(m['auroc'])}</td><td>{fmt(m['aupr'])}</td><td>{fmt(m['fpr_at_tpr'])}</td>"
            f"<td>{fmt(threshold, '.4g')}</td></tr>"
        )
    return f"<table>{head}{''.join(rows)}</table>"


def _facts(p: dict[str, Any]) -> str:
    ra, adv = p["robust_accuracy_estimate"], p["adversarial"]
    facts = [
        ("model", p["model"]),
        ("data", f"{p['data']} ({p['n_data']} samples, {p['n']} attacked)"),
        ("threat model", f"{p['norm']}, eps {p['eps']:.4g}"),
        ("clean accuracy", fmt(p["accuracy"], ".1%")),
        ("non-robust at eps", fmt(p["nonrobust_fraction"], ".1%")),
        ("chosen score", f"{p['chosen']}: {p['reason']}"),
        ("flag", flag_text(p)),
        (f"{ra['quantity']}", robust_accuracy_text(ra).split(": ", 1)[1]),
        ("per class", per_class_text(p["per_class"]).split(": ", 1)[1]),
    ]
    for name in ("pgd", "fgsm"):
        if name in adv:
            facts.append(
                (
                    f"{name.upper()} examples flagged",
                    f"{fmt(adv[name]['flagged_of_successful'], '.1%')} of "
                    f"{adv[name]['n_successful']} successful",
                )
            )
    adaptive = p.get("adaptive") or {}
    for name, outcome in adaptive.get("attacks", {}).items():
        if name in ADAPTIVE_NAMES and name != "pgd":
            facts.append(
                (
                    f"{ADAPTIVE_NAMES[name]} (knows the monitor) flagged",
                    f"{fmt(outcome['flagged_of_successful'], '.1%')} of "
                    f"{outcome['n_successful']} successful",
                )
            )
    if p.get("gate"):
        g = p["gate"]
        facts.append(
            (
                "gate",
                f"{'passed' if g['passed'] else 'FAILED'}: tau {fmt(g['tau'])} "
                f"vs --min-tau {g['min_tau']}",
            )
        )
    rows = "".join(
        f"<tr><td>{_e(k)}</td><td style='text-align:left'>{_e(v)}</td></tr>" for k, v in facts
    )
    return f"<table>{rows}</table>"


def _per_class_table(p: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td>{r['class']}</td><td>{r['n']}</td><td>{fmt(r['accuracy'], '.1%')}</td>"
        f"<td>{fmt(r['nonrobust_by_margin'], '.1%')}</td><td>{fmt(r['nonrobust_by_flag'], '.1%')}"
        f"</td><td>{fmt(r['tau'], '.2f')}</td></tr>"
        for r in p["per_class"]["classes"]
    )
    return (
        "<table><tr><th>class</th><th>n</th><th>accuracy</th><th>non-robust (margin)</th>"
        f"<th>flagged</th><th>tau</th></tr>{rows}</table>"
    )


def _section(p: dict[str, Any], plots: list[Path], page_dir: Path) -> str:
    parts = [f"<h2>{_e(p['title'])}</h2>", _facts(p), "<h3>Scores</h3>", _score_table(p)]
    if plots:
        for plot in plots:
            src = Path(os.path.relpath(plot, page_dir)).as_posix()
            caption = PLOT_FILES.get(plot.stem, plot.stem)
            parts.append(
                f"<h3>{_e(caption)}</h3><a href='{_e(src)}'><img src='{_e(src)}' "
                f"alt='{_e(caption)}'></a>"
            )
    else:
        parts.append(f"<p class=note>{_e(PLOT_HINT)}</p>")
    parts += ["<h3>Per class</h3>", _per_class_table(p)]
    parts.append(f"<p class=note>timings: {_e(timings_text(p))}</p>")
    return "\n".join(parts)


def write_html(
    entries: list[tuple[dict[str, Any], list[Path]]], out_dir: Path, *, summary: str | None = None
) -> Path:
    """Write ``out_dir/report.html`` for one or more models.

    Args:
        entries: ``(payload, plot files)`` per model, in display order.
        out_dir: Directory of the page; plots are linked relative to it.
        summary: Optional preformatted side-by-side table shown first.

    Returns:
        The page's path.

    """
    out_dir.mkdir(parents=True, exist_ok=True)
    title = "brittle check: " + ", ".join(p["name"] for p, _ in entries)
    body = [f"<h1>{_e(title)}</h1>"]
    if summary:
        body.append(f"<pre>{_e(summary)}</pre>")
    body += [_section(p, plots, out_dir) for p, plots in entries]
    settings = {p["name"]: {"check": p["check_settings"], "fit": p["settings"]} for p, _ in entries}
    body.append("<h2>Settings</h2><pre>" + _e(json.dumps(settings, indent=2)) + "</pre>")
    page = (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
