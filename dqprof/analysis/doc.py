"""The report's content as a list of blocks, rendered to Markdown (summary.md) and to one
self-contained HTML page (report.html, figures embedded as base64 PNG)."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Para:
    text: str


@dataclass
class Items:
    items: list[str]
    ordered: bool = False


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    caption: str = ""


    def frame(self):
        """As a pandas DataFrame (for notebooks)."""
        import pandas as pd

        return pd.DataFrame(self.rows, columns=self.headers)


@dataclass
class Plot:
    name: str  # file stem: <name>.png and <name>.svg sit next to the report
    caption: str
    png: bytes = b""


@dataclass
class Doc:
    blocks: list = field(default_factory=list)

    def add(self, *blocks: Heading | Para | Items | Table | Plot) -> None:
        self.blocks.extend(blocks)


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(doc: Doc) -> str:
    out: list[str] = []
    plots = []
    for b in doc.blocks:
        if isinstance(b, Heading):
            out.append("#" * b.level + " " + b.text)
        elif isinstance(b, Para):
            out.append(b.text)
        elif isinstance(b, Items):
            out.append("\n".join(f"{i + 1}. {t}" if b.ordered else f"- {t}"
                                 for i, t in enumerate(b.items)))
        elif isinstance(b, Table):
            lines = ["| " + " | ".join(map(_md_cell, b.headers)) + " |",
                     "|" + "|".join(" --- " for _ in b.headers) + "|"]
            lines += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in b.rows]
            if b.caption:
                lines.append(f"\n{b.caption}")
            out.append("\n".join(lines))
        elif isinstance(b, Plot):
            plots.append(f"`{b.name}.png`")
    if plots:
        out.append("Plots (PNG and SVG next to this file, embedded in report.html): "
                   + ", ".join(plots))
    return "\n\n".join(out) + "\n"


CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;
color:#222}table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.9em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#f3f3f3}
td:first-child,td:nth-child(2){text-align:left}figure{margin:1em 0 2em}img{max-width:100%}
figcaption,.caption{color:#555;font-size:.9em}h1{font-size:1.6em}h2{border-bottom:1px solid #ddd}"""


def to_html(doc: Doc, title: str) -> str:
    esc = html.escape
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
           f"<style>{CSS}</style></head><body>"]
    for b in doc.blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{esc(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            out.append(f"<p>{_inline(b.text)}</p>")
        elif isinstance(b, Items):
            tag = "ol" if b.ordered else "ul"
            out.append(f"<{tag}>" + "".join(f"<li>{_inline(t)}</li>" for t in b.items)
                       + f"</{tag}>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{esc(h)}</th>" for h in b.headers)
            body = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in r) + "</tr>"
                           for r in b.rows)
            cap = f"<p class='caption'>{_inline(b.caption)}</p>" if b.caption else ""
            out.append(f"<table><tr>{head}</tr>{body}</table>{cap}")
        elif isinstance(b, Plot):
            data = base64.b64encode(b.png).decode()
            out.append(f"<figure><img alt='{esc(b.name)}' src='data:image/png;base64,{data}'>"
                       f"<figcaption>{_inline(b.caption)} (<code>{esc(b.name)}.png</code>, "
                       f"<code>{esc(b.name)}.svg</code>)</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out)


def _inline(text: str) -> str:
    """Escape, then render `code` spans (the only Markdown the report's prose uses)."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
