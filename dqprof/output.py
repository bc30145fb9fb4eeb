"""What dqprof's table-printing commands print: one set of rows, four formats.

``--format table`` (a terminal table that never cuts a number: at a narrow width it takes
short headers, then leaves out the columns marked optional (``--wide`` keeps them, and says
so under the table), then stacks each row as ``header  value`` lines), ``csv`` and ``json``
(the raw fields, unrounded, for pipes and notebooks) and ``md`` (the terminal's cells as a
Markdown table, for pasting into an issue).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from dqprof.errors import DqprofError

FORMATS = ("table", "csv", "json", "md")
DASH = "–"
GAP = 2  # spaces between columns in the terminal table

FormatOpt = Annotated[str, typer.Option(
    "--format", help="table (the terminal), csv, json (raw fields, unrounded) or md.")]
WideOpt = Annotated[bool, typer.Option(
    "--wide", help="Every column, whatever the terminal's width.")]


def text(v: Any) -> str:
    """A raw value as a cell: numbers to 3 significant digits, None/NaN as a dash."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return DASH
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


@dataclass(frozen=True)
class Col:
    header: str
    cell: Callable[[dict[str, Any]], str]  # the row's cell text
    num: bool = False  # right-aligned, never wrapped
    short: str = ""  # the header when the full one does not fit
    optional: bool = False  # left out first when the table does not fit the width
    style: Callable[[dict[str, Any]], str] | None = None  # rich style of the cell


def col(key: str, header: str | None = None, fmt: Callable[[Any], str] = text,
        **kw: Any) -> Col:
    """A column showing one field of the row, formatted by ``fmt``."""
    return Col(header or key, lambda r: fmt(r.get(key)), **kw)


@dataclass
class Rows:
    """Records (raw, JSON-able values: what csv and json print, keys in ``fields`` order)
    and the columns a person reads (what table and md print)."""

    fields: list[str]
    records: list[dict[str, Any]]
    cols: list[Col]
    title: str = ""
    notes: list[str] = field(default_factory=list)  # lines under the terminal table


# -- machine formats ---------------------------------------------------------------------
def to_csv(rows: Rows) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, rows.fields, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows.records:
        w.writerow({k: "" if r.get(k) is None else r.get(k) for k in rows.fields})
    return buf.getvalue()


def _json_value(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN
    if isinstance(v, tuple):
        return list(v)
    return v


def to_json(rows: Rows) -> str:
    return json.dumps([{k: _json_value(r.get(k)) for k in rows.fields} for r in rows.records],
                      indent=1) + "\n"


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def to_markdown(rows: Rows) -> str:
    lines = ["| " + " | ".join(_md_cell(c.header) for c in rows.cols) + " |",
             "|" + "|".join("---:" if c.num else "---" for c in rows.cols) + "|"]
    for r in rows.records:
        lines.append("| " + " | ".join(_md_cell(c.cell(r)) for c in rows.cols) + " |")
    return "\n".join(lines) + "\n"


# -- the terminal table ------------------------------------------------------------------
def _longest_word(s: str) -> int:
    return max((len(w) for w in s.split()), default=0)


def _min_width(c: Col, cells: list[str], header: str) -> int:
    """The narrowest the column can be without cutting a word (a number is one word; a
    numeric column is not wrapped at all)."""
    fit = len if c.num else _longest_word
    return max([_longest_word(header), *(fit(s) for s in cells)])


def _max_width(cells: list[str], header: str) -> int:
    return max([len(header), *(len(s) for s in cells)])


@dataclass
class Layout:
    cols: list[Col]
    headers: list[str]
    left_out: list[Col]
    widths: list[int] = field(default_factory=list)  # each column's text width
    stacked: bool = False


def _widths(mins: list[int], maxs: list[int], width: int | None) -> list[int]:
    """Each column at least its minimum; the space left goes, a character at a time, to the
    column that still lacks most of its natural width (so text wraps evenly)."""
    if width is None or sum(maxs) + GAP * (len(maxs) - 1) <= width:
        return list(maxs)
    out = list(mins)
    spare = width - sum(mins) - GAP * (len(mins) - 1)
    while spare > 0:
        lack = [mx - w for w, mx in zip(out, maxs, strict=True)]
        i = max(range(len(out)), key=lack.__getitem__)
        if lack[i] <= 0:
            break
        out[i] += 1
        spare -= 1
    return out


def layout(rows: Rows, width: int | None) -> Layout:
    """The first that fits ``width`` of: every column with full headers, with short
    headers, without optional columns (one more left out each time), stacked rows;
    ``width`` None fits anything."""
    cells = {id(c): [c.cell(r) for r in rows.records] for c in rows.cols}
    tries = [(rows.cols, False), (rows.cols, True)]
    kept = list(rows.cols)
    for c in reversed(rows.cols):  # the optional columns go one by one, the last first
        if c.optional:
            kept = [k for k in kept if k is not c]
            tries.append((kept, True))
    for cols, short in tries:
        headers = [(c.short or c.header) if short else c.header for c in cols]
        mins = [_min_width(c, cells[id(c)], h) for c, h in zip(cols, headers, strict=True)]
        if width is None or sum(mins) + GAP * (len(cols) - 1) <= width:
            maxs = [_max_width(cells[id(c)], h) for c, h in zip(cols, headers, strict=True)]
            return Layout(cols, headers, [c for c in rows.cols if c not in cols],
                          _widths(mins, maxs, width))
    return Layout(rows.cols, [c.header for c in rows.cols], [], stacked=True)


def _table(rows: Rows, lay: Layout) -> Table:
    t = Table(title=rows.title or None, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
              padding=(0, 0, 0, GAP - 1), title_justify="left")
    for c, h, w in zip(lay.cols, lay.headers, lay.widths, strict=True):
        # a fixed width: rich's own shrinking can go below a word and cut it
        t.add_column(h, justify="right" if c.num else "left", overflow="fold", width=w)
    for r in rows.records:
        t.add_row(*(Text(c.cell(r), style=c.style(r) if c.style else "") for c in lay.cols))
    return t


def _stacked(rows: Rows) -> list[Table]:
    """One block per record: its first cell as the heading, then ``header  value`` lines."""
    blocks = []
    for r in rows.records:
        g = Table.grid(padding=(0, GAP, 0, 0))
        g.add_column(no_wrap=True)
        g.add_column(overflow="fold")
        for c in rows.cols[1:]:
            g.add_row(Text("  " + c.header), Text(c.cell(r), style=c.style(r) if c.style else ""))
        g.title = rows.cols[0].cell(r) if rows.cols else None
        g.title_justify = "left"
        blocks.append(g)
    return blocks


def terminal_width(console: Console) -> int | None:
    """The width to fit: the terminal's, or $COLUMNS; None (no limit) for a log or a pipe,
    where nothing folds lines and whole rows are what people grep for."""
    if console.is_terminal or os.environ.get("COLUMNS"):
        return console.width
    return None


def print_table(rows: Rows, console: Console, wide: bool = False) -> None:
    width = None if wide else terminal_width(console)
    lay = layout(rows, width)
    out = console if width is not None else Console(width=10_000, file=console.file,
                                                    force_terminal=console.is_terminal)
    if lay.stacked:
        if rows.title:
            out.print(Text(rows.title))
        for block in _stacked(rows):
            out.print(block)
    else:
        table = _table(rows, lay)
        if width is None:  # as wide as the content, not as the fallback console
            out = Console(width=sum(lay.widths) + GAP * (len(lay.widths) - 1),
                          file=console.file, force_terminal=console.is_terminal)
        out.print(table)
    if lay.left_out:
        names = ", ".join(c.header for c in lay.left_out)
        console.print(Text(f"left out at {width} columns: {names}; --wide or --format "
                           f"csv|json|md shows every column", style="dim"))
    for note in rows.notes:
        console.print(Text(note))


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise DqprofError(f"--format takes {', '.join(FORMATS)} (got '{fmt}')")
    return fmt


def emit(rows: Rows, fmt: str, console: Console, wide: bool = False) -> None:
    """Print ``rows`` in ``fmt``; the machine formats go to stdout alone, unstyled."""
    check_format(fmt)
    if fmt == "table":
        print_table(rows, console, wide)
        return
    render = {"csv": to_csv, "json": to_json, "md": to_markdown}[fmt]
    print(render(rows), end="")
