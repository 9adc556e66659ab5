"""Inverted dropout on the GPU, with the counter-based mask of nbalex.backends.dropout_keep.

The mask is a pure function of (seed, flat element index), so the forward kernel draws it
and applies it in the same pass (no random-state buffers), and every backend draws the same
mask for the same seed.  The hash is computed in uint32 arithmetic: each multiply is done
as uint64 and masked to 32 bits, which is exact (no overflow) in the simulator and compiles
to a plain 32-bit multiply on the device.
"""

# lab:begin dropout.imports
import numpy as np
from numba import cuda, float32, uint8, uint32, uint64

from nbalex import checks
from nbalex.backends import dropout_threshold, mix32 as mix32_host
from nbalex.cuda.launch import flat, grid_1d, stream_or_default, THREADS_PER_BLOCK
# lab:end dropout.imports

# lab:begin dropout.helpers
SEED_SALT = 0x9E3779B9
"""XORed into the seed before it is mixed (see nbalex.backends.dropout_keep)."""


@cuda.jit(device=True, inline=True)
def mul32(x, c):
    """(x * c) mod 2**32 for uint32 x and c."""
    return uint32((uint64(x) * uint64(c)) & uint64(0xFFFFFFFF))
# lab:end dropout.helpers


# lab:begin dropout.mix32
@cuda.jit(device=True, inline=True)
def mix32(x):
    """lowbias32, bit for bit the same as nbalex.backends.mix32, on a uint32."""
    # lab:end dropout.mix32
    x ^= x >> uint32(16)
    x = mul32(x, 0x7FEB352D)
    x ^= x >> uint32(15)
    x = mul32(x, 0x846CA68B)
    x ^= x >> uint32(16)
    return x


# lab:begin dropout.forward_kernel
@cuda.jit
def dropout_forward_kernel(y, mask, x, seed_mix, offset, threshold, keep):
    """Draw the mask and apply it: for every flat index i,
    mask[i] = 1 if (mix32((offset + i mod 2**32) ^ seed_mix) >> 8) >= threshold else 0,
    y[i] = x[i] / keep if kept else x[i] * 0 (a multiply as in the reference: a dropped NaN or
    inf gives NaN, a dropped number 0).

    x, y: 1-D float32; mask: 1-D uint8 (all the same length), y and mask written; y may be x.
    seed_mix = mix32(seed ^ 0x9E3779B9), computed once on the host; offset (uint32) = the
    index of x[0] in the whole batch (data parallelism); threshold = floor(p*2**24);
    keep = 1-p (a division, not a multiply by 1/keep: bit for bit the reference's y).
    One grid-stride loop over the elements.
    """
    # lab:end dropout.forward_kernel
    start = cuda.grid(1)
    step = cuda.gridsize(1)
    for i in range(start, x.shape[0], step):
        u = mix32(uint32((uint64(offset) + uint64(i)) & uint64(0xFFFFFFFF)) ^ seed_mix)
        if (u >> uint32(8)) >= threshold:
            mask[i] = uint8(1)
            y[i] = x[i] / keep
        else:
            mask[i] = uint8(0)
            y[i] = x[i] * float32(0.0)


# lab:begin dropout.backward_kernel
@cuda.jit
def dropout_backward_kernel(dx, dy, mask, keep):
    """dx[i] = dy[i] / keep where mask[i] is nonzero, else dy[i] * 0 (keep = 1-p; NaN stays).

    dx, dy: 1-D float32; mask: 1-D uint8 (same length); dx written, may be dy.
    One grid-stride loop over the elements.
    """
    # lab:end dropout.backward_kernel
    start = cuda.grid(1)
    step = cuda.gridsize(1)
    for i in range(start, dy.shape[0], step):
        g = dy[i]
        dx[i] = g / keep if mask[i] != 0 else g * float32(0.0)


# lab:begin dropout.launchers
STATIC_SIGNATURES = [
    (dropout_forward_kernel,
     "void(float32[::1], uint8[::1], float32[::1], uint32, uint32, uint32, float32)", False),
    (dropout_backward_kernel, "void(float32[::1], float32[::1], uint8[::1], float32)", False),
]


@checks.checked(checks.dropout_forward, "cuda")
def dropout_forward(y, mask, x, p, seed, offset=0, stream=None):
    """y = x * mask / (1-p) with mask (uint8, 1 = kept) drawn from (seed, offset + flat
    index); any shape, float32; y and mask are written, y may be x."""
    keep = np.float32(1.0 - p)
    if x.size == 0:
        return
    seed_mix = np.uint32(mix32_host((int(seed) & 0xFFFFFFFF) ^ SEED_SALT))
    threshold = np.uint32(dropout_threshold(p))
    dropout_forward_kernel[grid_1d(x.size), THREADS_PER_BLOCK, stream_or_default(stream)](
        flat(y), flat(mask), flat(x), seed_mix, np.uint32(int(offset) & 0xFFFFFFFF), threshold,
        keep)


@checks.checked(checks.dropout_backward, "cuda")
def dropout_backward(dx, dy, mask, p, stream=None):
    """dx = dy * mask / (1-p), any shape, float32 (mask: uint8 from dropout_forward);
    dx may be dy."""
    keep = np.float32(1.0 - p)
    if dy.size == 0:
        return
    dropout_backward_kernel[grid_1d(dy.size), THREADS_PER_BLOCK, stream_or_default(stream)](
        flat(dx), flat(dy), flat(mask), keep)
# lab:end dropout.launchers
