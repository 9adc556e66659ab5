"""Augmentation on the GPU: crop, flip, PCA colour shift, mean, uint8 HWC -> float32 NCHW.

The random draws are made on the host (:mod:`nbalex.io.augment`) and copied with the batch,
so every backend applies the same numbers.
"""

import numpy as np
from numba import cuda, float32

from nbalex import checks
from nbalex.cuda.launch import stream_or_default

THREADS_PER_BLOCK = 256


@cuda.jit
def augment_batch_kernel(out, images, crop_y, crop_x, flip, rgb_shift, mean):
    """One thread per output pixel (b, i, j), writing its 3 channels.

    1-D grid over t = b*Cr*Cr + i*Cr + j, t < B*Cr*Cr (threads past the end do nothing).
    images uint8 (B,S,S,3), out float32 (B,3,Cr,Cr) written (never accumulated),
    crop_y/crop_x int32 (B,), flip uint8 (B,), rgb_shift float32 (B,3), mean float32 (S,S,3):
      out[b,c,i,j] = images[b,y+i,x+jj,c] - mean[y+i,x+jj,c] + rgb_shift[b,c],
      y = crop_y[b], x = crop_x[b], jj = Cr-1-j when flip[b] else j.
    Adjacent threads read adjacent pixels (3 bytes apart) and write adjacent floats per channel.
    """
    t = cuda.grid(1)
    crop = out.shape[2]
    plane = crop * crop
    if t < out.shape[0] * plane:
        b = t // plane
        p = t - b * plane
        i = p // crop
        j = p - i * crop
        jj = crop - 1 - j if flip[b] != 0 else j
        y = crop_y[b] + i
        x = crop_x[b] + jj
        for c in range(3):
            out[b, c, i, j] = float32(images[b, y, x, c]) - mean[y, x, c] + rgb_shift[b, c]


@checks.checked(checks.augment_batch, "cuda")
def augment_batch(out, images, crop_y, crop_x, flip, rgb_shift, mean, stream=None):
    """Launch :func:`augment_batch_kernel` on ``stream``; all arrays are device arrays.

    out float32 (B,3,Cr,Cr) (any strides, e.g. one view of a ten-crop batch), images uint8
    (B,S,S,3), crop_y/crop_x int32 (B,), flip uint8 (B,), rgb_shift float32 (B,3), mean
    float32 (S,S,3).  Crop offsets must lie in 0..S-Cr (checked by the host code that draws them).
    """
    batch, crop = out.shape[0], out.shape[2]
    if batch == 0:
        return
    blocks = (batch * crop * crop + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK
    launch = augment_batch_kernel[blocks, THREADS_PER_BLOCK, stream_or_default(stream)]
    launch(out, images, crop_y, crop_x, flip, rgb_shift, mean)


STATIC_SIGNATURES = [
    (augment_batch_kernel,
     "void(float32[:, :, :, ::1], uint8[:, :, :, ::1], int32[::1], int32[::1], uint8[::1], "
     "float32[:, ::1], float32[:, :, ::1])", False),
]
