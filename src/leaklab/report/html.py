"""The audit report as one self-contained HTML file: inline CSS, plots as PNG data URIs, no script, no
network access (a Content-Security-Policy forbids any fetch), readable printed."""

from __future__ import annotations

import base64
import copy
import io
import json
from html import escape
from importlib import resources
from string import Template
from typing import Any

KEEP_CHARS = 6  # characters of a private or recovered text left visible by --redact
MASK = "•"


def figure_uri(fig: Any) -> str:
    """A matplotlib figure as a PNG data URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def mask_text(text: str, keep: int = KEEP_CHARS) -> str:
    """``text`` with every non-space character after the first ``keep`` replaced by a mask character."""
    return text[:keep] + "".join(c if c.isspace() else MASK for c in text[keep:])


def redact_report(report: dict[str, Any]) -> dict[str, Any]:
    """A copy of the report whose example texts (private and recovered) are masked beyond their first
    characters."""
    out = copy.deepcopy(report)
    for section in out["surfaces"]:
        for ex in section.get("examples", []):
            ex["private"] = mask_text(ex["private"])
            ex["recovered"] = mask_text(ex["recovered"])
    return out


def _risk(level: str) -> str:
    return f'<span class="risk risk-{escape(level)}">{escape(level)}</span>'


def _value(v: Any) -> str:
    return "–" if v is None else f"{v:.3f}" if isinstance(v, float) else escape(str(v))


def _table(t: dict[str, Any]) -> str:
    head = "".join(f"<th>{escape(c)}</th>" for c in t["columns"])
    rows = "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>" for row in t["rows"])
    return f"<h3>{escape(t['title'])}</h3><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _examples(examples: list[dict[str, Any]]) -> str:
    if not examples:
        return ""
    rows = "".join(
        f"<tr><td>{escape(e['private'])}</td><td>{escape(e['recovered']) or '<span class=muted>(nothing)</span>'}"
        f"</td><td class='score num'>{_value(e.get('score'))}<br>"
        f"<span class=muted>{escape(e['where'])}</span></td></tr>"
        for e in examples
    )
    return (
        "<h3>Private vs recovered</h3><table class='examples'><thead><tr><th>private text</th>"
        f"<th>recovered by the attacker</th><th>ROUGE-1</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def _summary(report: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td><a href='#surface-{escape(s['surface'])}'>{escape(s['title'])}</a></td><td>{_risk(s['risk'])}</td>"
        f"<td class=num>{escape(s['metric'])} = {_value(s['value'])}</td><td>{escape(s['detail'])}</td>"
        f"<td>{escape(s['recommendation'] or '–')}</td></tr>"
        for s in report["summary"]
    )
    threat = "".join(
        f"<h3>{escape(s['title'])}</h3><div class='threat'>{escape(s['threat_model'])}<ul>"
        + "".join(f"<li>{escape(f)}</li>" for f in s["flags"])
        + "</ul></div>"
        for s in report["summary"]
    )
    skipped = len(report["not_assessed"])
    note = f"<p>{skipped} surface(s) not assessed: see <a href='#not-assessed'>below</a>.</p>" if skipped else ""
    return (
        "<section id='summary' data-section='summary'><h2>Executive summary</h2>"
        "<table><thead><tr><th>surface</th><th>risk</th><th>evidence</th><th>where</th>"
        f"<th>recommended mitigation</th></tr></thead><tbody>{rows}</tbody></table>{note}"
        f"<h3>Threat models</h3>{threat}</section>"
    )


def _surface(s: dict[str, Any]) -> str:
    parts = [
        f"<section class='surface' id='surface-{escape(s['surface'])}' data-surface='{escape(s['surface'])}'>",
        f"<h2>{escape(s['title'])} {_risk(s['evidence']['risk'])}</h2>",
        f"<p><b>Evidence:</b> {escape(s['evidence']['metric'])} = {_value(s['evidence']['value'])} "
        f"({escape(s['evidence']['detail'])}). Steps run: {s['steps']['ran']} of {s['steps']['planned']}.</p>",
        f"<div class='threat'><b>Threat model.</b> {escape(s['threat_model'])}<ul>"
        + "".join(f"<li>{escape(f)}</li>" for f in s["flags"])
        + "</ul></div>",
    ]
    if s.get("recommendation"):
        parts.append(f"<div class='reco'><b>Recommended mitigation.</b> {escape(s['recommendation'])}</div>")
    parts += [_table(t) for t in s["tables"]]
    parts += [
        f"<figure><img alt='{escape(p['title'])}' src='{p['uri']}'><figcaption>{escape(p['title'])}; the star marks "
        "the recommended mitigation</figcaption></figure>"
        for p in s["plots"]
    ]
    parts.append(_examples(s["examples"]))
    parts += [f"<p class='muted'>{escape(n)}</p>" for n in s.get("notes", [])]
    parts.append("</section>")
    return "".join(parts)


def _not_assessed(items: list[dict[str, str]]) -> str:
    rows = "".join(
        f"<tr><td>{escape(i['title'])} (<code>{escape(i['surface'])}</code>)</td><td>{escape(i['reason'])}</td>"
        f"<td>{escape(i.get('would_assess', ''))}</td></tr>"
        for i in items
    )
    body = (
        f"<table><thead><tr><th>surface</th><th>why not</th><th>what it would assess</th></tr></thead><tbody>{rows}"
        "</tbody></table>"
        if items
        else "<p>Every known surface was assessed.</p>"
    )
    return f"<section id='not-assessed' data-section='not-assessed'><h2>Not assessed</h2>{body}</section>"


def _scaling(sc: dict[str, Any]) -> str:
    changes = "".join(f"<li>{escape(c)}</li>" for c in sc["changes"]) or "<li>none: the battery fit the budget</li>"
    not_run = "".join(
        f"<li>{escape(n['surface'])}: {escape(n['step'])} ({escape(n['reason'])})</li>" for n in sc["not_run"]
    )
    return (
        "<section id='scaling' data-section='scaling'><h2>Time budget and scaling</h2>"
        f"<p>Budget {sc['budget_min']:g} min; scale {sc['scale']:g} of the configured battery.</p><ul>{changes}</ul>"
        + (f"<h3>Steps not run</h3><ul>{not_run}</ul>" if not_run else "")
        + "</section>"
    )


def _reproducibility(r: dict[str, Any]) -> str:
    env = r["environment"]
    packages = "".join(f"<tr><td>{escape(k)}</td><td>{escape(str(v))}</td></tr>" for k, v in env["packages"].items())
    return (
        "<section id='reproducibility' data-section='reproducibility'><h2>Reproducibility</h2>"
        f"<p><b>Command:</b> <code>{escape(r['command'])}</code></p>"
        f"<p><b>Seed:</b> {r['seed']} · <b>device:</b> {escape(env['device'])} · <b>duration:</b> {r['duration_s']:g} s"
        f" ({r['steps_from_cache']} step(s) from the cache) · <b>started:</b> {escape(env['started_utc'])} · "
        f"<b>leaklab</b> {escape(str(env['leaklab']))} · Python {escape(env['python'])} · {escape(env['platform'])}"
        f"{' · texts redacted' if r['redacted'] else ''}"
        f"{' · report of the cached steps only (--cached-only)' if r.get('cached_only') else ''}</p>"
        f"<h3>Configuration</h3><pre>{escape(json.dumps(r['config'], indent=2, default=str))}</pre>"
        f"<h3>Package versions</h3><table><tbody>{packages}</tbody></table></section>"
    )


def render_html(report: dict[str, Any]) -> str:
    """The report as one HTML page (no external resource, no script)."""
    template = Template(resources.files("leaklab.report").joinpath("templates/audit.html").read_text("utf-8"))
    env = report["reproducibility"]["environment"]
    surfaces = report["surfaces"]
    nav = (
        "<a href='#summary'>Summary</a>"
        + "".join(f"<a href='#surface-{escape(s['surface'])}'>{escape(s['title'])}</a>" for s in surfaces)
        + "<a href='#not-assessed'>Not assessed</a><a href='#scaling'>Scaling</a>"
        + "<a href='#reproducibility'>Reproducibility</a>"
    )
    subtitle = (
        f"<p>Which private text leaks through which surface, and which mitigation stops it at what cost.</p>"
        f"<p>Started {escape(env['started_utc'])} · {report['reproducibility']['duration_s']:g} s · "
        f"config {escape(str(report['reproducibility']['config_file']))}</p>"
    )
    body = (
        _summary(report)
        + "".join(_surface(s) for s in surfaces)
        + _not_assessed(report["not_assessed"])
        + _scaling(report["scaling"])
        + _reproducibility(report["reproducibility"])
    )
    return template.substitute(title=escape(report["title"]), subtitle=subtitle, nav=nav, body=body)
