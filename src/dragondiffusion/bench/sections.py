"""Sections of a shared markdown file (docs/benchmarks.md), each between its own markers.

Every benchmark writes only its own section, `<!-- KEY:start -->` … `<!-- KEY:end -->`, so the
cost table and the quality table (and one section per model) do not clobber each other.
"""

from __future__ import annotations

from pathlib import Path

from ..io import atomic_write


def write_section(path: str | Path, key: str, title: str, body: str) -> Path:
    """Put `body` under `## title` in the file at `path`, replacing the earlier section of `key`;
    a new section goes at the end, a new file starts with "# Benchmarks"."""
    path = Path(path)
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    section = f"{start}\n## {title}\n\n{body}\n{end}"
    if start in text:
        head, rest = text.split(start, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
