"""The exercises, in the order they build on each other.

Each :class:`Lab` names the op it teaches, the package file whose launchers are its solution
(``solution``, relative to the package), the launchers a student module must export, and how
its starter and handout are cut from that file: ``starter`` lists marked regions (see
:mod:`nbalex.labs.excerpts`) in file order, each either ``GIVEN`` (copied as it is: imports,
helpers, the launchers) or a stub (the kernel's header and contract, with the body to write).
"""

import dataclasses

from nbalex.labs import cases as case_sets
from nbalex.labs import conv_cases

GIVEN = None
"""A starter region copied verbatim (any other value is the stub body put under it)."""

TODO = ("    # Your code here: the docstring above is the contract (which thread computes what).\n"
        "    pass\n")


@dataclasses.dataclass(frozen=True)
class Lab:
    name: str
    op: str                       # the op, as nbalex.ops names it
    teaches: str                  # one line: what the exercise teaches
    solution: str                 # package file (relative) whose launchers solve it
    launchers: tuple              # functions the student module must export
    starter: tuple                # ((marker, GIVEN or stub body), ...) in file order
    cases: object                 # () -> [cases.Case]
    reference: str                # reference file (relative) the math is read from
    hints: tuple = ()
    excerpts: tuple = ()          # extra ((file, marker, title), ...) shown in the handout
    static: str = "STATIC_SIGNATURES"   # the module list of (kernel, signature, ...) --static reads
    package: tuple = ()           # (file, kernel name) the static report compares with, else
                                  # every entry of the solution's list

    def case_list(self):
        return self.cases()


def _layer(name, op, teaches, kernels, cases, hints, helpers=(), launchers=None, stubs=None):
    """A lab over one of nbalex/cuda/<name>.py's files: imports, helpers (given), kernels
    (stubs), launchers (given)."""
    stubs = stubs or {}
    regions = [(f"{name}.imports", GIVEN)] + [(f"{name}.{h}", GIVEN) for h in helpers] + \
        [(f"{name}.{k}", stubs.get(k, TODO)) for k in kernels] + [(f"{name}.launchers", GIVEN)]
    return Lab(name, op, teaches, f"cuda/{name}.py",
               tuple(launchers or (f"{op}_forward", f"{op}_backward")), tuple(regions), cases,
               f"reference/{name}.py", tuple(hints))


LABS = (
    _layer("relu", "relu", "one thread per element, a grid-stride loop, bounds",
           ("forward_kernel", "backward_kernel"), case_sets.relu_cases,
           ("cuda.grid(1) is this thread's first element and cuda.gridsize(1) the step to its "
            "next one: the loop covers any length with any grid.",
            "The backward pass multiplies (dy * (y > 0)) so that a NaN in dy stays NaN.")),
    _layer("dropout", "dropout", "a counter-based hash: random numbers without state",
           ("mix32", "forward_kernel", "backward_kernel"), case_sets.dropout_cases,
           ("mix32 is nbalex.backends.mix32 in uint32 arithmetic: every multiply through mul32, "
            "every shift by a uint32.",
            "The draw for element i uses offset + i, not i: a slice of a batch draws what the "
            "whole batch would.",
            "Divide by keep = 1-p (do not multiply by 1/keep): the reference divides."),
           helpers=("helpers",),
           stubs={"mix32": "    # Your code here: lowbias32 (three xor-shifts, two multiplies).\n"
                           "    return x\n"}),
    _layer("maxpool", "maxpool", "windows that overlap; the argmax kept for a gather backward",
           ("forward_kernel", "backward_kernel"), case_sets.maxpool_cases,
           ("Ties go to the first element in row-major window order: replace the best only "
            "when strictly greater.",
            "The backward pass is a gather: each input element sums the dy of the windows that "
            "chose it, so no two threads write the same element (no atomics).",
            "Window (oh, ow) starts at (oh*stride, ow*stride): the stride, not the size."),
           helpers=("helpers",)),
    _layer("lrn", "lrn", "a running window sum across channels, one thread per column",
           ("forward_kernel", "backward_kernel"), case_sets.lrn_cases,
           ("The window of channel c is [c - size//2, c + size//2] clipped to [0, C).",
            "Keep the window sum running: add the channel entering, subtract the one leaving.",
            "alpha is not divided by size (the paper's formula)."),
           helpers=("helpers",)),
    _layer("softmax_xent", "softmax_xent", "a block reduction in shared memory (max, then sum)",
           ("forward_kernel", "backward_kernel"), case_sets.softmax_xent_cases,
           ("Subtract the row's max before exp: logits of 50 overflow float32's exp otherwise.",
            "Every thread must reach every cuda.syncthreads(): no barrier inside an if that "
            "some threads skip.",
            "The backward pass divides by N, the batch size (the loss is the batch mean)."),
           ),
    _layer("sgd", "sgd", "one pass over flat buffers with per-tensor multipliers",
           ("update_kernel", "single_kernel"), case_sets.sgd_cases,
           ("Tensor t holds elements offsets[t] <= i < offsets[t+1]; a tensor may be empty.",
            "v first, then w += v (the new v), in float32.",
            "nonfinite[0] = 1 when an updated w is NaN or infinite; never clear it."),
           helpers=("helpers",), launchers=("sgd_update",)),
)


def _rung(name, teaches, hints, excerpts=()):
    """A rung of the GEMM ladder: nbalex/labs/solutions/<name>.py behind sgemm(c, a, b)."""
    return Lab(name, "sgemm", teaches, f"labs/solutions/{name}.py", ("sgemm",),
               ((f"{name}.imports", GIVEN), (f"{name}.kernel", TODO),
                (f"{name}.launchers", GIVEN)),
               case_sets.sgemm_cases, "reference/linear.py", tuple(hints), tuple(excerpts))


LABS = LABS + (
    _rung("gemm_naive", "GEMM rung 1: one thread per element of C",
          ("c = a @ b with a (M, K), b (K, N): c[i, j] is row i of a times column j of b.",
           "x is the fast index of cuda.grid(2): give it the column, so neighbouring threads "
           "read neighbouring b[k, j] (coalesced).",
           "Guard the threads past the edge of C: the grid is rounded up to whole blocks.")),
    _rung("gemm_tiled", "GEMM rung 2: shared-memory tiles, two barriers per K step",
          ("Load a partial tile with zeros past the edge, so every thread runs every step and "
           "reaches every cuda.syncthreads().",
           "The first barrier: the tile is loaded before anyone reads it; the second: nobody "
           "overwrites it while others still read.",
           "Guard only the final store.")),
    _rung("gemm_register", "GEMM rung 3: a 4x4 tile of C per thread, in registers",
          ("Store the A tile transposed (a_s[k, m]) so a thread's four rows are adjacent.",
           "Each step kk: 4 loads of A, 4 of B, 16 multiply-adds (an outer product).",
           "Sum in k order: a different order changes the last bits."),
          (("cuda/gemm.py", "gemm.fma_step",
            "The next rung: the package's GEMM (8x8 per thread, double-buffered)"),)),
)


def _conv(name, kernel, teaches, cases, hints, loaders):
    """A convolution pass, nbalex/labs/solutions/conv2d.py's region conv2d.<name>, graded
    on the launcher of nbalex.cuda.conv2d; the handout quotes the package's loaders."""
    launcher = f"conv2d_{name}"
    signatures = f"{name.upper()}_SIGNATURES"
    return Lab(launcher, "conv2d", teaches, "labs/solutions/conv2d.py", (launcher,),
               (("conv2d.imports", GIVEN), (f"conv2d.{name}_kernel", TODO),
                (f"conv2d.{name}_launcher", GIVEN)),
               cases, "reference/conv2d.py", tuple(hints),
               (("cuda/conv2d.py", "conv2d.contracts",
                 "The package's kernels: the same GEMM, tiled (their contracts)"),) +
               tuple(("cuda/conv2d_loaders.py", f"loaders.{m}", title) for m, title in loaders),
               signatures, ("cuda/conv2d.py", kernel))


LABS = LABS + (
    _conv("forward", "conv_forward_kernel", "convolution as an implicit GEMM: im2col gathered "
          "on the fly", conv_cases.conv2d_forward_cases,
          ("Column n of C is the output pixel (image, oh, ow) and k = (c, kh, kw): decode both "
           "with // and %, innermost index last.",
           "The window of (oh, ow) starts at (oh*stride - pad, ow*stride - pad); a position "
           "outside [0, H) x [0, W) is padding and reads 0 (guard both sides).",
           "Group g's filters g*F/G ... read input channels g*C/G ...: w holds only C/G "
           "channels, x all C.",
           "Add the bias once, after the sum; ReLU last."),
          (("forward", "The package's loaders of the forward GEMM (the same index math, "
            "walked instead of divided)"),)),
    _conv("backward_data", "conv_backward_data_kernel", "backward-data: a transposed "
          "convolution, taps that divide exactly", conv_cases.conv2d_backward_data_cases,
          ("Input pixel (h, w) received dy[oh, ow] through tap (kh, kw) when "
           "h + pad - kh = oh*stride: only when stride divides it exactly, inside dy.",
           "Test h + pad - kh >= 0 before % and //: a negative quotient rounds the other way "
           "on a GPU (C's %, not Python's).",
           "The reduction is over the group's filters f and the taps (kh, kw): "
           "K = F/G*KH*KW."),
          (("backward_data", "The package's loaders of the backward-data GEMM"),)),
    _conv("backward_weights", "conv_backward_weights_kernel", "backward-weights: a reduction "
          "over every image and pixel, db as an extra column", 
          conv_cases.conv2d_backward_weights_cases,
          ("dw[f, c, kh, kw] sums over K = N*OH*OW (every image, every output pixel): the "
           "longest reduction of the three passes.",
           "db[f] is the sum of dy over the same K: im2col(x) with one more column of ones.",
           "Padding reads 0 as in the forward pass: the guard is the same."),
          (("backward_weights", "The package's loaders of the backward-weights GEMM "
            "(split-K: each slice sums a range of K)"),)),
)


def names():
    return [lab.name for lab in LABS]


def get(name):
    """The Lab called ``name``; a ValueError listing the labs when there is none."""
    for lab in LABS:
        if lab.name == name:
            return lab
    raise ValueError(f"no lab {name!r}: choose one of {', '.join(names())} "
                     "(`nbalex lab list` describes them)")
