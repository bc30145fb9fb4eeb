"""What `dqprof regress` prints and writes: the terminal cells, summary.md (fits
$GITHUB_STEP_SUMMARY) and JUnit XML (one testcase per point)."""

from __future__ import annotations

from xml.etree import ElementTree as ET

from dqprof.gate.compare import (
    FAILED,
    IMPROVEMENT,
    MISSING,
    NEW,
    REGRESSION,
    UNCHANGED,
    Change,
    Point,
    Report,
)
from dqprof.results import dig


def fmt_seconds(s: float) -> str:
    return f"{s * 1e6:.4g} µs" if s < 1e-3 else f"{s * 1e3:.4g} ms"


def fmt_joules(j: float) -> str:
    return f"{j * 1e6:.4g} µJ" if j < 1e-3 else f"{j * 1e3:.4g} mJ"


def fmt_change(c: Change | None) -> str:
    if c is None:
        return ""
    return f"{c.rel:+.1%} (band ±{c.band:.1%})"


def describe(c: Change | None) -> str:
    if c is None:
        return ""
    fmt = fmt_seconds if c.metric == "time" else fmt_joules
    return f"{fmt(c.base)} → {fmt(c.cur)}"


def _md_rows(points: list[Point]) -> list[str]:
    rows = ["| point | time | Δ time | energy | Δ energy | note |", "|---|---|---|---|---|---|"]
    for p in points:
        t, e = p.change("time"), p.change("energy")
        cells = (f"`{p.key}`", describe(t), fmt_change(t), describe(e), fmt_change(e), p.note)
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return rows


def to_markdown(report: Report) -> str:
    """A summary that fits $GITHUB_STEP_SUMMARY: headline first, details folded away."""
    g = report.gate
    icon = "❌" if report.exit_code else "✅"
    b_commit = dig(report.baseline.run, "environment", "git", "commit") or "?"
    c_commit = dig(report.current.run, "environment", "git", "commit") or "?"
    lines = [f"## {icon} {report.headline()}", "",
             f"baseline `{report.baseline.path}` (commit `{b_commit[:12]}`), "
             f"current `{report.current.path}` (commit `{c_commit[:12]}`), "
             f"GPU {dig(report.current.run, 'environment', 'gpu', 'name') or '?'}.", "",
             f"A regression is a change beyond both the threshold (time +{g.max_slowdown:.1%}, "
             f"energy +{g.max_energy_increase:.1%}) and the point's noise band "
             f"({g.noise_k:g} × the root-sum-square of both sides' relative spreads).", ""]
    if report.warnings:
        lines += ["> [!WARNING]"] + [f"> {w}  " for w in report.warnings] + [""]
    sections = ((f"Regressions{' and failures' if report.of(FAILED) else ''}",
                 report.of(REGRESSION, FAILED)),
                ("Improvements", report.of(IMPROVEMENT)),
                ("Missing (baseline ok, not measured now; or new in this run)",
                 report.of(MISSING, NEW)))
    for title, points in sections:
        if points:
            lines += [f"### {title}", "", *_md_rows(points), ""]
    unchanged = report.of(UNCHANGED)
    if unchanged:
        lines += ["<details><summary>Unchanged points</summary>", "", *_md_rows(unchanged), "",
                  "</details>", ""]
    return "\n".join(lines)


def to_junit(report: Report) -> str:
    """One testcase per point; regressions fail, missing and new points are skipped."""
    suite = ET.Element("testsuite", name="dqprof regress", tests=str(len(report.points)),
                       failures=str(len(report.of(REGRESSION, FAILED))),
                       skipped=str(len(report.of(MISSING, NEW))), errors="0")
    props = ET.SubElement(suite, "properties")
    for name, value in (("baseline", report.baseline.path), ("current", report.current.path),
                        ("max_slowdown", report.gate.max_slowdown),
                        ("max_energy_increase", report.gate.max_energy_increase),
                        ("noise_k", report.gate.noise_k)):
        ET.SubElement(props, "property", name=name, value=str(value))
    for p in report.points:
        model, _, rest = p.key.partition("|")
        layer, _, name = rest.partition("|")
        case = ET.SubElement(suite, "testcase", classname=f"{model}.{layer}", name=name,
                             time="0")
        detail = "; ".join(f"{c.metric} {describe(c)} {fmt_change(c)}" for c in p.changes)
        text = "; ".join(x for x in (detail, p.note) if x)
        if p.status in (REGRESSION, FAILED):
            ET.SubElement(case, "failure", message=f"{p.status}: {text}"[:500]).text = text
        elif p.status in (MISSING, NEW):
            ET.SubElement(case, "skipped", message=p.note)
        elif text:
            ET.SubElement(case, "system-out").text = text
    if report.warnings:
        ET.SubElement(suite, "system-err").text = "\n".join(report.warnings)
    root = ET.Element("testsuites", name="dqprof regress")
    root.append(suite)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


