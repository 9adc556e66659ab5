"""Training-time augmentation of a batch: crop, horizontal flip, mean subtraction, colour noise.

Shapes::

    images    uint8 (B, S, S, 3)    HWC RGB, as stored on disk
    mean      (S, S, 3)             per-pixel training mean
    crop_y, crop_x  int32 (B,)      top-left corner of each crop
    flip      uint8 (B,)            1 = mirror left-right
    rgb_shift (B, 3)                per-image colour shift (the paper's PCA noise, already
                                    projected onto RGB)
    out       (B, 3, Cr, Cr)        NCHW network input

Math, with y = crop_y[b], x = crop_x[b], jj = Cr-1-j if flip[b] else j::

    out[b, c, i, j] = images[b, y+i, x+jj, c] - mean[y+i, x+jj, c] + rgb_shift[b, c]
"""

from nbalex import checks


@checks.checked(checks.augment_batch, "reference")
def augment_batch(out, images, crop_y, crop_x, flip, rgb_shift, mean, stream=None):
    """out (B,3,Cr,Cr) <- cropped, maybe mirrored, mean-subtracted, colour-shifted images."""
    crop = out.shape[2]
    for b in range(images.shape[0]):
        y, x = int(crop_y[b]), int(crop_x[b])
        patch = images[b, y:y + crop, x:x + crop, :].astype(out.dtype)    # (Cr, Cr, 3) HWC
        patch -= mean[y:y + crop, x:x + crop, :]
        if flip[b]:
            patch = patch[:, ::-1, :]                                      # mirror columns
        out[b] = patch.transpose(2, 0, 1) + rgb_shift[b].reshape(3, 1, 1)  # HWC -> CHW
