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

BM = 128                 # rows of C per block of the largest tile (nbalex.cuda.gemm.BM)
BN = 128                 # columns of C per block of the largest tile (nbalex.cuda.gemm.BN)
BK = 8                   # K depth of one shared-memory tile (nbalex.cuda.gemm.BK)
TM = TN = 8              # C elements per thread along M and N
TILES = ((128, 128), (128, 64), (64, 128), (64, 64))   # (bm, bn): every tile the core is built at
MIN_BLOCKS = {256: 2, 128: 3, 64: 6}
"""Launch bound (resident blocks per SM) of an instance by its threads per block: 128
registers per thread at 256 threads; 168 for the smaller tiles, whose threads each load
twice the operand elements per K tile (at 128 registers they spill)."""
TILE_COST = {(128, 128): 1.0, (128, 64): 1.06, (64, 128): 1.06, (64, 64): 1.12}
"""Relative time per executed multiply-add of each tile: a smaller tile loads more operand
elements per thread per K tile (16 for 64x64, 8 for 128x128) for the same 512 FFMA, so its
main loop's FFMA share is lower (static report, conv forward: 0.72 at 128x128, 0.68 at
128x64, 0.63 at 64x128, 0.62 at 64x64)."""
CONV_TILES = {
    # the instances each conv pass is built at: those without spills and with a main-loop
    # FFMA share of at least 0.60 (nbalex bench static); the im2col gathers of
    # backward-data cost the most per element, so its smaller tiles miss that bar
    "forward": TILES,
    "backward-data": ((128, 128),),
    "backward-data-unit-stride": ((128, 128), (128, 64), (64, 128)),
    "backward-weights": ((128, 128), (128, 64), (64, 128)),
}
LINEAR_TILES = TILES     # every fc pass is built at every tile
SM_COUNT = 132           # the default SM count (an H100 SXM): the simulator's, the plan's
TABLE_SM_COUNTS = (132, 114, 132)   # SMs of the plan's --gpu table (h100-sxm, h100-pcie, h200)
BLOCKS_PER_SM = 2        # split-K of a small grid aims for this many 256-thread blocks per SM
MIN_SPLIT_TILES = 16     # ...while giving every slice at least this many K tiles
WAVE_SPLIT_LOSS = 1.2    # a grid whose last wave rounds its time up by this much or more is split

PASSES = ("forward", "backward-data", "backward-weights")


def resident_threads(bm, bn):
    """Threads of ``bm x bn`` instances an SM holds at once (the launch bound's)."""
    threads = (bm // TM) * (bn // TN)
    return threads * MIN_BLOCKS[threads]


def instance_name(base, bm, bn):
    """The kernel name of the ``bm x bn`` instance of GEMM kernel ``base``: the 128x128
    instance keeps the base name, the others get ``_{bm}x{bn}``."""
    return base if (bm, bn) == (BM, BN) else f"{base}_{bm}x{bn}"


def cdiv(a, b):
    """ceil(a / b) for positive integers."""
    return -(-a // b)


def split_k(blocks, inner, sm_count=SM_COUNT, threads=256):
    """(splits, k_split): how the reduction (length ``inner``) of a grid of ``blocks`` output
    blocks of ``threads`` threads is cut on a GPU of ``sm_count`` SMs.

    A grid that fills the SMs once (``blocks*threads >= sm_count*256``) is not split here:
    (1, inner).  A smaller one gets ``BLOCKS_PER_SM*sm_count*256 // (blocks*threads)``
    slices, fewer if a slice would hold under MIN_SPLIT_TILES K tiles; ``k_split`` is a
    multiple of BK and ``splits`` is recounted from it so that every slice holds work.  For
    256-thread blocks at ``sm_count = 132`` this is, bit for bit, the rule the launchers used
    before tiles other than 128x128 existed.
    """
    work = blocks * threads
    if work >= sm_count * 256:
        return 1, inner
    k_tiles = cdiv(inner, BK)
    splits = max(1, min(BLOCKS_PER_SM * sm_count * 256 // work, k_tiles // MIN_SPLIT_TILES))
    if splits == 1:
        return 1, inner
    k_split = cdiv(k_tiles, splits) * BK
    return cdiv(inner, k_split), k_split


def split_to_whole_waves(blocks, inner, sm_count=SM_COUNT, bm=BM, bn=BN):
    """(splits, k_split) for a grid that fills the SMs but is stuck just above a whole number
    of waves (its last, partial wave costs WAVE_SPLIT_LOSS or more of the ideal time): the
    smallest split, up to 4 slices of at least MIN_SPLIT_TILES K tiles, whose waves round up
    by less; (1, inner) when none does."""
    per_wave = sm_count * resident_threads(bm, bn) // ((bm // TM) * (bn // TN))
    k_tiles = cdiv(inner, BK)
    if _wave_loss(blocks, per_wave) < WAVE_SPLIT_LOSS:
        return 1, inner
    for splits in range(2, 5):
        if k_tiles // splits < MIN_SPLIT_TILES:
            break
        if _wave_loss(blocks * splits, per_wave) < WAVE_SPLIT_LOSS:
            k_split = cdiv(k_tiles, splits) * BK
            return cdiv(inner, k_split), k_split
    return 1, inner


def _wave_loss(blocks, per_wave):
    waves = blocks / per_wave
    return -(-blocks // per_wave) / waves
@dataclass(frozen=True)
class GemmShape:
    """One pass's GEMM: C (m x n) = A (m x k) @ B (k x n), ``groups`` times; ``splittable``
    when its launcher may split K; ``useful_macs``: the layer's multiply-adds in it (for
    conv backward-weights the extra db column of N is not counted); ``tiles``: the tiles its
    kernel is built at."""
    m: int
    n: int
    k: int
    groups: int = 1
    splittable: bool = False
    useful_macs: int = 0
    tiles: tuple = TILES


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
    """The tile, grid and split-K of GEMM ``shape`` on a GPU of ``sm_count`` SMs.

    Every tile of ``shape.tiles`` that TILES holds (when none is, ``shape.tiles[0]``) is cut (its split-K by :func:`split_k`, then
    :func:`split_to_whole_waves`, when the shape is splittable) and priced by
    :func:`tiling_cost`; the cheapest wins, the earlier in TILES (the larger) among equals.
    A pure function of the shape and the SM count: the same launch on every run.
    """
    if min(shape.m, shape.n, shape.k, shape.groups, sm_count) < 1:
        raise ValueError(f"GEMM sizes and SM count must be positive, got {shape}, {sm_count} SMs")
    best = None
    for bm, bn in [tile for tile in shape.tiles if tile in TILES] or shape.tiles[:1]:
        threads = (bm // TM) * (bn // TN)
        blocks = cdiv(shape.m, bm) * cdiv(shape.n, bn) * shape.groups
        splits, k_split = 1, shape.k
        if shape.splittable:
            splits, k_split = split_k(blocks, shape.k, sm_count, threads)
            if splits == 1:
                splits, k_split = split_to_whole_waves(blocks, shape.k, sm_count, bm, bn)
        t = GemmTiling(shape, bm, bn, BK, splits, k_split)
        cost = tiling_cost(t, sm_count)
        if best is None or cost < best[0] * (1 - 1e-9):
            best = (cost, t)
    return best[1]


def tiling_cost(t, sm_count):
    """Relative GPU time of tiling ``t``: its executed multiply-adds, times its tile's
    TILE_COST, rounded up to whole waves of ``sm_count`` x resident_threads."""
    per_wave = sm_count * resident_threads(t.bm, t.bn) // t.threads
    waves = t.blocks / per_wave
    return t.executed_macs * TILE_COST[(t.bm, t.bn)] * (-(-t.blocks // per_wave) / waves)


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
        return GemmShape(fg, n * oh * ow, taps, groups, False, macs, CONV_TILES[pass_name])
    if pass_name == "backward-data":
        tiles = CONV_TILES["backward-data-unit-stride" if int(stride) == 1 else pass_name]
        return GemmShape(cg, n * h * w, fg * kh * kw, groups, False, macs, tiles)
    if pass_name == "backward-weights":
        return GemmShape(fg, taps + 1, n * oh * ow, groups, True, macs, CONV_TILES[pass_name])
    raise ValueError(f"unknown pass {pass_name!r}; expected one of {', '.join(PASSES)}")


def linear_gemm(pass_name, batch, inputs, outputs):
    """The GemmShape of fully-connected pass ``pass_name`` (x (batch, inputs), w (outputs, inputs))."""
    macs = batch * inputs * outputs
    if pass_name == "forward":
        return GemmShape(batch, outputs, inputs, 1, True, macs, LINEAR_TILES)
    if pass_name == "backward-data":
        return GemmShape(batch, inputs, outputs, 1, True, macs, LINEAR_TILES)
    if pass_name == "backward-weights":
        return GemmShape(outputs, inputs, batch, 1, False, macs, LINEAR_TILES)
    raise ValueError(f"unknown pass {pass_name!r}; expected one of {', '.join(PASSES)}")
