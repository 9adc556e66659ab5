"""Softmax + cross-entropy on the GPU: probabilities and per-sample losses in one kernel.

One block per row (grid-stride over rows).  Each thread sweeps its strided share of the
row once with an online max/sum-of-exponentials (the sum is rescaled whenever the max
grows), the block merges the (max, sum) pairs in a shared-memory tree, and a second sweep
writes exp(z - max) / sum.  The logits are read twice and the probabilities written once;
subtracting the row max keeps exp() finite for any logits.
"""

# lab:begin softmax_xent.imports
import math

import numpy as np
from numba import cuda, float32

from nbalex import checks
from nbalex.cuda.launch import THREADS_PER_BLOCK, grid_1d, stream_or_default

ROW_THREADS = 128
"""Threads per row in the forward kernel (a power of two: the tree halves it)."""

MAX_ROW_BLOCKS = 65535
"""Cap on the forward grid; blocks loop over rows beyond it."""
# lab:end softmax_xent.imports


# lab:begin softmax_xent.forward_kernel
@cuda.jit
def softmax_xent_forward_kernel(losses, probs, logits, labels):
    """probs[n, :] = softmax(logits[n, :]) and losses[n] = logsumexp(logits[n, :]) -
    logits[n, labels[n]] (NaN when labels[n] is outside [0, K)).  NaN and infinities as in the
    reference: a row whose max is not finite (a NaN, a +inf, or every logit -inf) gives NaN
    probabilities and loss; a -inf logit elsewhere gets probability 0 (loss +inf at the label).

    logits (N, K) float32, labels (N,) int32; probs (N, K) and losses (N,) float32 written.
    Launched with ROW_THREADS threads per block; block b handles rows b, b + gridDim.x, ...
    Thread t covers columns t, t + ROW_THREADS, ... of its row.
    """
    # lab:end softmax_xent.forward_kernel
    n_rows, n_cls = logits.shape
    t = cuda.threadIdx.x
    part_max = cuda.shared.array(ROW_THREADS, float32)
    part_sum = cuda.shared.array(ROW_THREADS, float32)
    for row in range(cuda.blockIdx.x, n_rows, cuda.gridDim.x):
        # online (max, sum of exp(z - max)) over this thread's columns
        m = float32(-math.inf)
        s = float32(0.0)
        for j in range(t, n_cls, ROW_THREADS):
            z = logits[row, j]
            if z > m:
                s = s * math.exp(m - z) + float32(1.0)
                m = z
            elif z != z:
                m = z  # a NaN max sticks: nothing is > NaN
            elif z > float32(-math.inf):  # a -inf adds exp(-inf) = 0 (and -inf - -inf is NaN)
                s += math.exp(z - m)
        part_max[t] = m
        part_sum[t] = s
        cuda.syncthreads()  # every thread's pair is in shared memory before the merge
        width = ROW_THREADS // 2
        while width > 0:
            if t < width:
                m1 = part_max[t]
                s1 = part_sum[t]
                m2 = part_max[t + width]
                s2 = part_sum[t + width]
                if m2 != m2:  # a NaN max wins the merge
                    part_max[t] = m2
                elif s2 > 0:  # an empty pair (no columns, or only -inf) is (-inf, 0): skip it
                    if m2 > m1:
                        part_sum[t] = s1 * math.exp(m1 - m2) + s2
                        part_max[t] = m2
                    else:
                        part_sum[t] = s1 + s2 * math.exp(m2 - m1)
            cuda.syncthreads()  # this level's merges are done before the next level reads them
            width //= 2
        m = part_max[0]
        s = part_sum[0]
        if not math.isfinite(m):  # a NaN, a +inf, or only -inf: the reference's row is NaN
            m = float32(math.nan)
            s = float32(math.nan)
        inv_s = float32(1.0) / s
        for j in range(t, n_cls, ROW_THREADS):
            probs[row, j] = math.exp(logits[row, j] - m) * inv_s
        if t == 0:
            label = labels[row]
            if 0 <= label < n_cls:
                # (max - z) first: it does not lose digits when the logits are large
                losses[row] = (m - logits[row, label]) + math.log(s)
            else:
                losses[row] = math.nan
        cuda.syncthreads()  # all threads have read part_max[0]/part_sum[0] before the next row


# lab:begin softmax_xent.backward_kernel
@cuda.jit
def softmax_xent_backward_kernel(dlogits, probs, labels, inv_n):
    """dlogits[n, k] = (probs[n, k] - (k == labels[n])) * inv_n, inv_n = 1/N.

    probs, dlogits (N, K) float32 (dlogits written, may be probs), labels (N,) int32.
    One thread per element, grid-stride over N*K in C order.
    """
    # lab:end softmax_xent.backward_kernel
    n_rows, n_cls = probs.shape
    start = cuda.grid(1)
    step = cuda.gridsize(1)
    for i in range(start, n_rows * n_cls, step):
        row = i // n_cls
        k = i - row * n_cls
        g = probs[row, k]
        if k == labels[row]:
            g -= float32(1.0)
        dlogits[row, k] = g * inv_n


# lab:begin softmax_xent.launchers
STATIC_SIGNATURES = [
    (softmax_xent_forward_kernel,
     "void(float32[::1], float32[:, ::1], float32[:, ::1], int32[::1])", False, ROW_THREADS),
    (softmax_xent_backward_kernel,
     "void(float32[:, ::1], float32[:, ::1], int32[::1], float32)", False),
]


@checks.checked(checks.softmax_xent_forward, "cuda")
def softmax_xent_forward(losses, probs, logits, labels, stream=None):
    """probs = softmax(logits) row-wise and losses = per-sample cross-entropy, for logits
    (N, K) float32 and labels (N,) int32; probs (N, K) and losses (N,) are written."""
    n, k = logits.shape
    if n == 0 or k == 0:
        return
    blocks = min(n, MAX_ROW_BLOCKS)
    softmax_xent_forward_kernel[blocks, ROW_THREADS, stream_or_default(stream)](
        losses, probs, logits, labels)


@checks.checked(checks.softmax_xent_backward, "cuda")
def softmax_xent_backward(dlogits, probs, labels, stream=None):
    """dlogits = (probs - onehot(labels)) / N for probs (N, K) float32 and labels (N,) int32;
    dlogits (N, K) is written (it may be probs)."""
    n, k = probs.shape
    if n == 0 or k == 0:
        return
    softmax_xent_backward_kernel[grid_1d(n * k), THREADS_PER_BLOCK, stream_or_default(stream)](
        dlogits, probs, labels, np.float32(1.0 / n))
# lab:end softmax_xent.launchers
