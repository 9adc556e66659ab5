"""How each GEMM pass of a convolution or fully-connected layer is cut into blocks: the block
tile, the grid and the split of K, as pure functions of the GEMM's shape and the GPU's SM
count.  No Numba, no GPU: the plan (``nbalex bench plan``) and the launchers ask the same
functions, so what is planned is what is launched.

The GEMM of a pass computes ``C (M x N) = A (M x K) @ B (K x N)``, ``groups`` times (one per
convolution group, ``blockIdx.z``).  Today every pass uses one tile, ``BM x BN = 128 x 128``
with a K tile of ``BK = 8`` (:mod:`nbalex.cuda.gemm`), and three passes may split K over
``blockIdx.z`` (:func:`split_k`): convolution backward-weights, linear forward and linear
backward-data.  The GEMM shapes of the passes (``nbalex.cuda.conv2d``, ``nbalex.cuda.linear``):

===================  =====================  ===================  ===================  =====
pass                 M                      N                    K                    split
===================  =====================  ===================  ===================  =====
conv forward         F/G                    batch*OH*OW          C/G*KH*KW            no
conv backward-data   C/G                    batch*H*W            F/G*KH*KW            no
conv backward-w.     F/G                    C/G*KH*KW + 1 (db)   batch*OH*OW          yes
fc forward           batch                  outputs              inputs               yes
fc backward-data     batch                  inputs               outputs              yes
fc backward-w.       outputs                inputs               batch                no
===================  =====================  ===================  ===================  =====
"""

from dataclasses import dataclass

BM = 128                 # rows of C per block (nbalex.cuda.gemm.BM)
BN = 128                 # columns of C per block (nbalex.cuda.gemm.BN)
BK = 8                   # K depth of one shared-memory tile (nbalex.cuda.gemm.BK)
TM = TN = 8              # C elements per thread along M and N
SM_COUNT = 132           # the SM count the launchers size split-K for today (an H100 SXM)
BLOCKS_PER_SM = 2        # split-K aims for at most this many blocks per SM
MIN_SPLIT_TILES = 16     # ...while giving every slice at least this many K tiles

PASSES = ("forward", "backward-data", "backward-weights")


def cdiv(a, b):
    """ceil(a / b) for positive integers."""
    return -(-a // b)


def split_k(blocks, inner, sm_count=SM_COUNT):
    """(splits, k_split): how the reduction (length ``inner``) of a grid of ``blocks`` output
    blocks is cut on a GPU of ``sm_count`` SMs.

    A grid of at least ``sm_count`` blocks is not split: (1, inner).  A smaller one gets
    ``BLOCKS_PER_SM*sm_count // blocks`` slices, fewer if a slice would hold under
    MIN_SPLIT_TILES K tiles; ``k_split`` is a multiple of BK and ``splits`` is recounted from
    it so that every slice holds work.  At ``sm_count = 132`` this is, bit for bit, the rule
    of ``nbalex.cuda.gemm.split_k``.
    """
    if blocks >= sm_count:
        return 1, inner
    k_tiles = cdiv(inner, BK)
    splits = max(1, min(BLOCKS_PER_SM * sm_count // blocks, k_tiles // MIN_SPLIT_TILES))
    if splits == 1:
        return 1, inner
    k_split = cdiv(k_tiles, splits) * BK
    return cdiv(inner, k_split), k_split


@dataclass(frozen=True)
class GemmShape:
    """One pass's GEMM: C (m x n) = A (m x k) @ B (k x n), ``groups`` times; ``splittable``
    when its launcher may split K; ``useful_macs``: the layer's multiply-adds in it (for
    conv backward-weights the extra db column of N is not counted)."""
    m: int
    n: int
    k: int
    groups: int = 1
    splittable: bool = False
    useful_macs: int = 0


@dataclass(frozen=True)
class GemmTiling:
    """A GEMM cut into blocks: tile ``bm x bn x bk``, ``splits`` K slices of ``k_split``."""
    shape: GemmShape
    bm: int
    bn: int
    bk: int
    splits: int
    k_split: int

    @property
    def grid(self):
        """(blocks along N, blocks along M, groups*splits): the launch grid."""
        return (cdiv(self.shape.n, self.bn), cdiv(self.shape.m, self.bm),
                self.shape.groups * self.splits)

    @property
    def threads(self):
        return (self.bm // TM) * (self.bn // TN)

    @property
    def blocks(self):
        x, y, z = self.grid
        return x * y * z

    @property
    def executed_macs(self):
        """Multiply-adds the blocks execute: whole tiles, each slice padded to whole K tiles."""
        last = self.shape.k - (self.splits - 1) * self.k_split
        depth = ((self.splits - 1) * cdiv(self.k_split, self.bk) + cdiv(last, self.bk)) * self.bk
        x, y, _ = self.grid
        return x * self.bn * y * self.bm * depth * self.shape.groups


def gemm_tiling(shape, sm_count=SM_COUNT):
    """The tile, grid and split-K of GEMM ``shape`` on a GPU of ``sm_count`` SMs."""
    if min(shape.m, shape.n, shape.k, shape.groups, sm_count) < 1:
        raise ValueError(f"GEMM sizes and SM count must be positive, got {shape}, {sm_count} SMs")
    blocks = cdiv(shape.m, BM) * cdiv(shape.n, BN) * shape.groups
    splits, k_split = split_k(blocks, shape.k, sm_count) if shape.splittable else (1, shape.k)
    return GemmTiling(shape, BM, BN, BK, splits, k_split)


def conv_output(size, kernel, stride, pad):
    """Output length of a convolution along one axis."""
    return (size + 2 * pad - kernel) // stride + 1


def conv_gemm(pass_name, x_shape, w_shape, stride, pad, groups):
    """The GemmShape of convolution pass ``pass_name`` (x (N,C,H,W), w (F,C/G,KH,KW))."""
    n, _, h, w = (int(v) for v in x_shape)
    f, cg, kh, kw = (int(v) for v in w_shape)
    fg, taps = f // groups, cg * kh * kw
    oh, ow = conv_output(h, kh, stride, pad), conv_output(w, kw, stride, pad)
    macs = groups * fg * taps * n * oh * ow
    if pass_name == "forward":
        return GemmShape(fg, n * oh * ow, taps, groups, False, macs)
    if pass_name == "backward-data":
        return GemmShape(cg, n * h * w, fg * kh * kw, groups, False, macs)
    if pass_name == "backward-weights":
        return GemmShape(fg, taps + 1, n * oh * ow, groups, True, macs)
    raise ValueError(f"unknown pass {pass_name!r}; expected one of {', '.join(PASSES)}")


def linear_gemm(pass_name, batch, inputs, outputs):
    """The GemmShape of fully-connected pass ``pass_name`` (x (batch, inputs), w (outputs, inputs))."""
    macs = batch * inputs * outputs
    if pass_name == "forward":
        return GemmShape(batch, outputs, inputs, 1, True, macs)
    if pass_name == "backward-data":
        return GemmShape(batch, inputs, outputs, 1, True, macs)
    if pass_name == "backward-weights":
        return GemmShape(outputs, inputs, batch, 1, False, macs)
    raise ValueError(f"unknown pass {pass_name!r}; expected one of {', '.join(PASSES)}")
