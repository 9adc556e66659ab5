"""Which CPU convolution path runs for a shape and pass (:mod:`nbalex.cpu.conv2d` has the paths).

:func:`choose` is a pure function of the convolution's shape, its pass (forward, backward
data, backward weights) and of whether cblas_sgemm is reachable, so the same command takes
the same path and gives the same bits:

``pointwise``  1x1, stride 1, unpadded: batched GEMMs on the NCHW arrays, no im2col.
``tap_rows``   stride 1 on maps larger than SMALL_MAP_PIXELS (the forward pass: larger than
               TAP_FORWARD_PIXELS; never for backward data): per image, KH accumulating GEMMs
               on a column matrix KH times smaller than im2col's.
``winograd``   3x3, stride 1, pad <= 2 on maps larger than SMALL_MAP_PIXELS, at least
               WINOGRAD_BATCH images, every pass (backward weights: when cblas_sgemm is
               reachable; :mod:`nbalex.cpu.winograd`, :mod:`nbalex.cpu.winograd_weights`):
               16 GEMMs on transformed tiles, 1.9x fewer multiplies on 13x13 maps.
``im2col``     everything else: batch-parallel im2col chunks of several images each, one
               GEMM per group and chunk, nb*P >= conv2d.TARGET_WIDTH columns wide
               (STRIDE1_WIDTH for stride 1).

Since im2col copies runs with unsigned offsets (0.16 ns an element), it beats the kernel-row
path on AlexNet's 13x13 maps forward and on every map for backward data; AlexNet at batch 32
on the 2-core Xeon, ms kernel-row -> im2col, forward / backward data / backward weights:
conv2 (27x27) 59.9/58.6/71.2 -> 61.7/55.3/69.0, conv3 (13x13) 39.8/40.7/40.2 ->
36.1/34.3/41.7, conv4 34.2/33.5/34.6 -> 31.4/29.6/36.5, conv5 25.8/24.0/26.6 ->
23.9/22.3/26.7.  Backward weights keeps the kernel-row path (conv2's difference is noise).

Why small maps leave the kernel-row path: its GEMMs are one image wide, P columns, and a 5x5
map gives P = 25, far too narrow for BLAS; a chunk of images makes them hundreds wide.
Measured on the 2-core EPYC, alexnet-mini at batch 32, best of 9, ms forward / backward data
/ backward weights, kernel-row -> im2col: conv2 (12x12) 12.2/11.8/8.2 -> 4.6/3.5/7.4,
conv3 (5x5) 4.6/4.2/5.1 -> 3.2/2.2/4.4, conv4 6.2/5.8/5.8 -> 3.1/2.0/3.7, conv5
5.7/6.7/5.9 -> 3.5/1.3/2.4; at batch 1, conv3-5 0.3/0.3/0.5 -> 0.2/0.1/0.4.  AlexNet's
13x13 and larger maps stay on the kernel-row path, which won there (see nbalex.cpu.conv2d).

Folding the whole batch into one GEMM per group was measured as well and lost: with OpenBLAS's
threads inside the GEMM (their jobs wait on each other spinning; on shared cores a descheduled
job stalled a 2 ms GEMM for 16-24 ms), and with its columns split between the workers
(single-threaded BLAS each), which was no faster than the chunks above.
"""

from . import workers

# The largest output map (OH*OW pixels) that takes the im2col path when the kernel-row path
# could run: alexnet-mini's conv2 (12x12) does, AlexNet's 13x13 conv3-5 do not.
SMALL_MAP_PIXELS = 12 * 12

# The forward pass takes the kernel-row path only on maps larger than this (AlexNet's 27x27
# conv2, not its 13x13 conv3-5).
TAP_FORWARD_PIXELS = 13 * 13

PASSES = ("forward", "backward_data", "backward_weights")

# Winograd's filter transforms are paid once a call, its chunks want several images: below
# this batch the other paths run.  AlexNet at batch 32 on the 2-core Xeon, ms im2col ->
# Winograd, forward / backward data: conv3 33.6/34.5 -> 27.3/28.6, conv4 31.5/27.7 ->
# 24.6/24.0, conv5 20.8/18.9 -> 16.9/16.2; backward weights, kernel-row -> Winograd, inside
# a training step: conv3 40.0 -> 26.8, conv4 34.3 -> 26.4, conv5 24.4 -> 22.0.  F(2x2, 5x5)
# (6x6 transforms) was measured for AlexNet's conv2 and lost every pass, ms forward /
# backward data / backward weights: 59 -> 63, 56 -> 77, 69 -> 82; its transforms hold 9
# values per output, and with 48 channels a group the GEMMs are too short to pay for them.
WINOGRAD_BATCH = 4


def small_map(oh, ow):
    """Whether an (oh, ow) output map counts as small (at most SMALL_MAP_PIXELS pixels)."""
    return oh * ow <= SMALL_MAP_PIXELS


# A lone image's GEMMs (batch 1) run on threaded BLAS only from this many multiply-adds a
# GEMM: handing a call's jobs to the second core costs tens of microseconds.  At batch 1 on
# the 2-core Xeon, ms threaded -> single-threaded BLAS: alexnet-mini conv1 (2.9 M a GEMM)
# 0.43 -> 0.32, AlexNet conv1 (105 M) 2.5 -> 3.0, conv3's kernel rows (50 M) 3.4 -> 4.3.
THREADED_GEMM_MACS = 16 * 1000 * 1000


def serial_blas(gemm_macs):
    """Whether a lone image's convolution keeps BLAS single-threaded, for GEMMs of
    ``gemm_macs`` multiply-adds each (:func:`nbalex.cpu.workers.run`)."""
    return gemm_macs < THREADED_GEMM_MACS


def split_filters(n, gemm_macs):
    """Whether a batch of one image shares its filters between the workers (each with
    single-threaded BLAS, one handoff per call) instead of threading each GEMM's BLAS: the
    images cannot be shared, and OpenBLAS's threads cost a handoff per GEMM.  AlexNet at
    batch 1 (2-core Xeon), forward ms, threaded BLAS -> filters split: conv2 4.1 -> 2.6,
    conv4 3.1 -> 1.7 (with the filters rearranged by a kernel of their own)."""
    return n == 1 and workers.WORKERS > 1 and not serial_blas(gemm_macs)


def group_parts(lo, hi, fg):
    """(group, first, end) of the filters lo..hi-1 in each group they touch (fg a group)."""
    return [(g, max(lo, g * fg), min(hi, (g + 1) * fg)) for g in range(lo // fg, -(-hi // fg))]


def geometry(x_shape, w_shape, stride, pad, groups):
    """(N, C, F, C/G, KH, KW, OH, OW) of a convolution whose arguments were checked already
    (by the launcher's check, :func:`nbalex.checks.conv2d_geometry`'s rules): plain
    arithmetic, since a launch derives its sizes from it several times (the checked form
    cost about 65 us a convolution call, most of a small layer's time at batch 1)."""
    n, c, h, w = x_shape
    f, cg, kh, kw = w_shape
    return (n, c, f, cg, kh, kw, (h + 2 * pad - kh) // stride + 1,
            (w + 2 * pad - kw) // stride + 1)


def is_pointwise(kh, kw, stride, pad):
    return kh == 1 and kw == 1 and stride == 1 and pad == 0


def choose(oh, ow, kh, kw, stride, pad, has_gemm, pass_="forward", batch=None):
    """'pointwise', 'winograd', 'tap_rows' or 'im2col' for (oh, ow) outputs of a (kh, kw)
    kernel in ``pass_`` (one of PASSES) on ``batch`` images (None: a large batch).

    ``has_gemm``: whether cblas_sgemm is reachable (the kernel-row path needs it).
    """
    if pass_ not in PASSES:
        raise ValueError(f"pass_ must be one of {PASSES}, got {pass_!r}")
    if (kh == kw == 3 and stride == 1 and pad <= 2 and not small_map(oh, ow)
            and (has_gemm or pass_ != "backward_weights")
            and (batch is None or batch >= WINOGRAD_BATCH)):
        return "winograd"
    if is_pointwise(kh, kw, stride, pad):        # its dw: one im2col GEMM per chunk
        return "pointwise" if pass_ != "backward_weights" else "im2col"
    if not has_gemm or stride != 1 or small_map(oh, ow) or pass_ == "backward_data":
        return "im2col"
    if pass_ == "forward" and oh * ow <= TAP_FORWARD_PIXELS:
        return "im2col"
    return "tap_rows"
