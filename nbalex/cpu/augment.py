"""Device-side augmentation on the CPU backend: crop, flip, colour shift, mean, HWC -> NCHW.

Same contract as :func:`nbalex.backends` ``augment_batch``; the random draws are made on the
host (:mod:`nbalex.io.augment`), so this only applies them.
"""

import numpy as np
from numba import njit, prange

from nbalex import checks


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


@checks.checked(checks.augment_batch, "cpu")
def augment_batch(out, images, crop_y, crop_x, flip, rgb_shift, mean, stream=None):
    """out[b,c,i,j] = images[b,y+i,x+jj,c] - mean[y+i,x+jj,c] + rgb_shift[b,c] (nbalex.backends).

    out float32 (B,3,Cr,Cr) is overwritten; images uint8 (B,S,S,3); crop_y, crop_x int32 (B,);
    flip uint8 (B,); rgb_shift float32 (B,3); mean float32 (S,S,3).  ``stream`` is ignored.
    """
    _augment(out, images, crop_y, crop_x, flip, rgb_shift, mean)
