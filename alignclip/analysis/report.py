"""Markdown reports: tables of figures and the embedded plots."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, Sequence


def format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)


def markdown_table(rows: Mapping[str, Mapping[str, float]], columns: Sequence[str] | None = None,
                   first_header: str = "model") -> str:
    """rows: row name -> {column: value}. Columns default to the union in first-seen order; a gap shows '-'."""
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows.values() for key in row))
    lines = ["| " + " | ".join([first_header, *columns]) + " |", "|" + "---|" * (len(columns) + 1)]
    for name, row in rows.items():
        lines.append("| " + " | ".join([name, *(format_value(row[c]) if c in row else "-" for c in columns)]) + " |")
    return "\n".join(lines)


def write_markdown(path: str | Path, title: str, sections: Iterable[tuple[str, str]],
                   images: Iterable[tuple[str, str | Path]] = ()) -> Path:
    """A report: a title, (heading, body) sections, then each (caption, png) embedded relative to the report."""
    path = Path(path)
    parts = [f"# {title}", ""]
    for heading, body in sections:
        parts += [f"## {heading}", "", body.strip(), ""]
    images = list(images)
    if images:
        parts += ["## Plots", ""]
        for caption, png in images:
            rel = Path(png).resolve().relative_to(path.parent.resolve()) if Path(png).is_absolute() else Path(png)
            parts += [f"### {caption}", "", f"![{caption}]({rel.as_posix()})", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))
    return path
