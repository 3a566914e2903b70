"""Sections of a shared markdown file (docs/benchmarks.md), each between its own markers.

Every benchmark writes only its own section, `<!-- KEY:start -->` … `<!-- KEY:end -->`, so the
cost table and the quality table (and one section per model) do not clobber each other.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from ..io import atomic_write, folder_problem


def markers(key: str) -> tuple[str, str]:
    """The start and end markers of section `key`."""
    return f"<!-- {key}:start -->", f"<!-- {key}:end -->"


def check_sections(path: str | Path, key: str) -> None:
    """Raise InputError unless `write_section` can write section `key` into the file at `path`:
    a folder or non-text file there, a path whose folder cannot be made or written in, or the
    section's start marker without its end marker."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{str(path)!r} is a folder; give the markdown file for the section")
    problem = folder_problem(path.parent)
    if problem is not None:
        raise InputError(f"cannot write {str(path)!r} ({problem}); give another markdown file")
    if not path.exists():
        return
    start, end = markers(key)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{str(path)!r} is not UTF-8 text; give the markdown file") from None
    if start in text and end not in text.split(start, 1)[1]:
        raise InputError(
            f"{str(path)!r} has the start marker of section {key} but no end marker; restore "
            f"`{end}` or remove the start"
        )


def write_section(path: str | Path, key: str, title: str, body: str) -> Path:
    """Put `body` under `## title` in the file at `path`, replacing the earlier section of `key`;
    a new section goes at the end, a new file starts with "# Benchmarks". See `check_sections`."""
    check_sections(path, key)
    path = Path(path)
    start, end = markers(key)
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    section = f"{start}\n## {title}\n\n{body}\n{end}"
    if start in text:
        head, rest = text.split(start, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
