"""``nbalex lab start``: the handout (Markdown) and the starter module of a lab.

Both are cut from the package's own files, so neither can drift from the code: the math is
the reference module's docstring and functions (``nbalex/reference/<op>.py``), the thread
mapping is each kernel's header and docstring, the launcher contract is the package's
launchers, all read through the ``# lab:begin`` / ``# lab:end`` markers of
:mod:`nbalex.labs.excerpts`.  The starter is the package's file with each kernel body left
to write: same imports, same helpers, same launchers, hence the same interface.
"""

import ast
import os
import tempfile

from nbalex.labs import registry
from nbalex.labs.excerpts import excerpt, source_path


def starter_text(lab):
    """The starter module: imports and helpers as given, kernels as stubs, launchers given."""
    parts = [f'"""Lab {lab.name}: {lab.teaches}.\n\nWrite the kernel bodies marked "Your code '
             f'here" (the launchers below are the\npackage\'s own), then grade this file with\n\n'
             f'    nbalex lab check {lab.name} {lab.name}.py\n\nThe handout beside it has the '
             f'math, the thread mapping and what the grader checks.\n"""\n']
    for marker, stub in lab.starter:
        text = excerpt(lab.solution, marker)
        if stub is not registry.GIVEN:
            text = text + stub
        parts.append(text)
    return "\n\n".join(p.rstrip("\n") + "\n" for p in parts)


def _reference_math(lab):
    """The reference module's docstring and source (the math, written to be read)."""
    path = source_path(lab.reference)
    with open(path, encoding="utf-8") as f:
        source = f.read()
    doc = ast.get_docstring(ast.parse(source)) or ""
    return doc, source


def handout_text(lab):
    """The handout, Markdown."""
    doc, source = _reference_math(lab)
    out = [f"# Lab {lab.name}: {lab.teaches}", "",
           f"Write the CUDA kernels of `{lab.op}` in Numba. The starter `{lab.name}.py` has "
           f"the package's launcher interface ({', '.join(f'`{n}`' for n in lab.launchers)}) "
           "with the kernel bodies left to write. Grade it with", "", "```",
           f"nbalex lab check {lab.name} {lab.name}.py", "```", "",
           "Without a GPU the kernels run under Numba's simulator "
           "(`NUMBA_ENABLE_CUDASIM=1`, set by the grader): every GPU thread is a Python "
           "thread, so the shapes are small.", "",
           "## The math", "", doc, "",
           f"The NumPy reference (`nbalex/{lab.reference}`), the oracle the grader compares "
           "with:", "", "```python", source.rstrip(), "```", "",
           "## The thread mapping", "",
           "Each kernel's contract: which thread computes what, the shapes, what is written.",
           ""]
    for marker, stub in lab.starter:
        if stub is not registry.GIVEN:
            out += ["```python", excerpt(lab.solution, marker).rstrip(), "```", ""]
    out += ["## The launchers' contract", "",
            "The launchers own the grid arithmetic and launch on an explicit stream "
            "(given in the starter, as in the package):", "", "```python",
            excerpt(lab.solution, lab.starter[-1][0]).rstrip(), "```", ""]
    for relpath, marker, title in lab.excerpts:
        out += [f"## {title}", "", f"From `nbalex/{relpath}`:", "", "```python",
                excerpt(relpath, marker).strip("\n"), "```", ""]
    if lab.hints:
        out += ["## Hints", ""] + [f"- {h}" for h in lab.hints] + [""]
    out += ["## What the grader checks", "",
            "Each case is one launcher call; its outputs are filled with a canary first, so "
            "an element your kernel never writes shows as \"never written\". A failure lists "
            "the array, its shape, how many elements are wrong, the first ones (index, "
            "expected, got) and a hint read from the pattern of errors.", ""]
    for case in lab.case_list():
        tol = ", ".join(f"{n} rtol {r:g} atol {a:g}" for n, (r, a) in case.tol.items())
        out.append(f"- `{case.label}`: " + (f"within {tol}" if tol else "exact"))
    out += ["", "Each lab runs in a child process with a time limit (a kernel that never "
            "ends is reported, not waited for). `--json` prints the score for an "
            "autograder; the exit status is 0 when every case passes, 1 otherwise.", ""]
    return "\n".join(out)


def write_atomic(path, text):
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def start(name, folder, force=False):
    """Write ``<folder>/<name>.md`` (the handout) and ``<folder>/<name>.py`` (the starter);
    returns their paths.  A ValueError, before anything is written, when either exists
    (unless ``force``: a student's work is never overwritten by accident)."""
    lab = registry.get(name)
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, f"{lab.name}.md"), os.path.join(folder, f"{lab.name}.py")]
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not force:
        raise ValueError(f"{existing[0]} exists (your work?); pass --force to replace it")
    write_atomic(paths[0], handout_text(lab))
    write_atomic(paths[1], starter_text(lab))
    return paths
