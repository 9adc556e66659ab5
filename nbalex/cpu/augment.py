"""Device-side augmentation on the CPU backend: crop, flip, colour shift, mean, HWC -> NCHW.

Same contract as :func:`nbalex.backends` ``augment_batch``; the random draws are made on the
host (:mod:`nbalex.io.augment`), so this only applies them.
"""

import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True)
def _augment(out, images, crop_y, crop_x, flip, rgb_shift, mean):
    batch, crop = out.shape[0], out.shape[2]
    for row in prange(batch * crop):
        b = row // crop
        i = row - b * crop
        y = crop_y[b] + i
        for j in range(crop):
            jj = crop - 1 - j if flip[b] else j
            x = crop_x[b] + jj
            for c in range(3):
                out[b, c, i, j] = np.float32(images[b, y, x, c]) - mean[y, x, c] + rgb_shift[b, c]


def augment_batch(out, images, crop_y, crop_x, flip, rgb_shift, mean, stream=None):
    """out[b,c,i,j] = images[b,y+i,x+jj,c] - mean[y+i,x+jj,c] + rgb_shift[b,c] (nbalex.backends).

    out float32 (B,3,Cr,Cr) is overwritten; images uint8 (B,S,S,3); crop_y, crop_x int32 (B,);
    flip uint8 (B,); rgb_shift float32 (B,3); mean float32 (S,S,3).  ``stream`` is ignored.
    """
    batch, channels, crop, crop_w = out.shape
    size = images.shape[1]
    if channels != 3 or crop != crop_w or images.shape[0] != batch or images.shape[3] != 3:
        raise ValueError(f"augment_batch: out {out.shape} and images {images.shape} do not match")
    if mean.shape != (size, size, 3) or rgb_shift.shape != (batch, 3):
        raise ValueError(f"augment_batch: mean {mean.shape} or rgb_shift {rgb_shift.shape} "
                         "has the wrong shape")
    lowest, highest = min(crop_y.min(), crop_x.min()), max(crop_y.max(), crop_x.max())
    if batch and (lowest < 0 or highest > size - crop):
        raise ValueError(f"augment_batch: crop offsets outside 0..{size - crop}")
    _augment(out, images, crop_y, crop_x, flip, rgb_shift, mean)
