"""GPU teaching labs built from the package's own kernels (``nbalex lab``).

A lab is one op: a handout (the math from ``nbalex/reference``, each kernel's thread mapping,
the launchers' contract, hints, what is graded) and a starter module with the package's
launcher interface and the kernel bodies left to write.  The grader imports any module with
that interface, fills the outputs with a canary, runs its launchers at small awkward shapes
(under Numba's simulator when there is no GPU) in a child process with a time limit, and
compares with the reference; the package's own modules are the solutions and pass every lab.

On a GPU the child then runs each lab at AlexNet's layer shapes, checked against the
package's launcher and timed beside it and PyTorch (never graded on time).

Modules: :mod:`registry` (the exercises), :mod:`cases` and :mod:`conv_cases` (what is
graded), :mod:`static_report` (``--static``: registers, shared memory, spills), :mod:`compare`
(errors and their hints), :mod:`run` (the child's side), :mod:`grader` (the child process,
the report), :mod:`gpu_shapes` (the GPU leg: AlexNet's shapes, checked and timed; its shapes
in :mod:`alexnet_shapes` and the two plan modules, PyTorch's ops in :mod:`torch_ops`),
:mod:`handout` (handout and starter), :mod:`excerpts` (the markers they are cut by),
``solutions/`` (the GEMM ladder's lower rungs).
"""

from nbalex.labs.registry import LABS, get, names

__all__ = ["LABS", "get", "names"]
