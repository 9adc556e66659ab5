"""Handout excerpts cut from the package's own files by marker comments.

A region of a source file is marked by two comment lines::

    # lab:begin NAME
    ...the excerpt...
    # lab:end NAME

(indented like the code around them; a ``lab:end`` inside a function, after its docstring,
ends an excerpt that shows the function's header and contract but not its body).  The
excerpt is the text between the two marker lines, exactly as it stands in the file, so a
handout cannot drift from the code: :func:`excerpt` reads it afresh every time.
"""

import os
import re

_MARKER = re.compile(r"^[ \t]*# lab:(begin|end) ([A-Za-z0-9_.-]+)[ \t]*$")

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
"""The directory of the ``nbalex`` package: excerpt paths are relative to it."""


class MarkerError(ValueError):
    """A marker pair is missing, unbalanced or repeated."""


def regions(text):
    """{name: excerpt text} of every marked region in ``text``; MarkerError when a region is
    opened twice, closed without being opened, or never closed."""
    found, open_at = {}, {}
    lines = text.splitlines(keepends=True)
    for number, line in enumerate(lines):
        match = _MARKER.match(line.rstrip("\n"))
        if not match:
            continue
        kind, name = match.groups()
        if kind == "begin":
            if name in open_at or name in found:
                raise MarkerError(f"lab marker {name!r} begins twice (line {number + 1})")
            open_at[name] = number
        else:
            if name not in open_at:
                raise MarkerError(f"lab:end {name} at line {number + 1} has no lab:begin")
            start = open_at.pop(name)
            body = [ln for ln in lines[start + 1:number] if not _MARKER.match(ln.rstrip("\n"))]
            found[name] = "".join(body)
    if open_at:
        raise MarkerError(f"lab markers never ended: {', '.join(sorted(open_at))}")
    return found


def source_path(relpath):
    """The absolute path of ``relpath`` (e.g. ``cuda/relu.py``) inside the package."""
    return os.path.join(PACKAGE_ROOT, relpath)


def excerpt(relpath, name):
    """The text of region ``name`` in the package file ``relpath``; MarkerError if absent."""
    with open(source_path(relpath), encoding="utf-8") as f:
        found = regions(f.read())
    if name not in found:
        raise MarkerError(f"{relpath} has no '# lab:begin {name}' ... '# lab:end {name}'")
    return found[name]
