"""The tiled SGEMM core that convolution and the fully-connected layers are built on.

Every GEMM here computes ``C[m, n] = sum_k A[m, k] * B[k, n]`` where A, B and C are never
materialised: small device functions ("operand loaders") read A and B straight out of the
layer's own arrays (for convolution, an implicit im2col gather from ``x`` or ``dy``), and a
"store" device function writes each finished C element where the layer wants it (adding the
bias, applying ReLU, or into its split-K slice of a workspace).  :func:`make_gemm_kernel`
closes a kernel over those functions, so Numba specialises one kernel per use.

Tiling (the register-blocked SGEMM scheme of cuda-convnet2 / MAGMA):

* a block computes a ``BM x BN`` tile of C with ``(BM/8) * (BN/8)`` threads;
* each thread computes an 8x8 sub-tile held in registers, as four 4x4 quadrants: rows
  ``ty*4 + {0..3}`` and ``BM/2 + ty*4 + {0..3}``, columns ``tx*4 + {0..3}`` and
  ``BN/2 + tx*4 + {0..3}``, so that its operand fragments are two aligned float4 loads per
  operand (``LDS.128``) and a warp reads shared memory without bank conflicts;
* K is walked in ``ceil(K/BK)`` tiles of ``BK = 8``.  Each thread fetches its share of the
  next A and B tiles from global memory into registers *before* computing on the current
  tile (the loads are in flight during the 512 FMAs) and writes them into the other half of a
  double-buffered shared tile afterwards, so one barrier per K tile suffices.

Simulator-friendly by construction: every thread runs every iteration and every barrier;
out-of-range operands are loaded as zeros; only the final store is guarded.

Operand loaders.  For an operand whose tile is ``BK x R`` (R = BM for A, BN for B) each
thread loads ``E = BK*R/threads`` elements, all in one row ``r`` (an m of A or an n of B) of
the tile.  The *layout* of a loader says which index is contiguous in memory, so that a warp
reads consecutive addresses:

* ``K_FAST``: threads of a row split the k range (``r = tid // (BK/E)``, k = ``(tid %
  (BK/E))*E + e``), for operands stored with k contiguous or nearly so (``w`` in conv
  forward, ``x`` and ``w`` in linear forward, and the im2col gathers, whose consecutive k
  are neighbouring taps or pixels);
* ``ROW_FAST``: consecutive threads take consecutive rows (``r = tid % R``, k = ``tid // R +
  e*(threads/R)``), for operands stored with m or n contiguous (``w`` in linear
  backward-data, ``dy`` and ``x`` in linear backward-weights).

A loader is a pair of device functions: ``setup(src, geo, z, row) -> state`` runs once per
thread before the K loop (decoding the row index, e.g. n -> (image, oh, ow)), and
``fetch(src, geo, state, k, step, k_end, buf)`` runs once per K tile and fills the thread's
``E`` registers ``buf[e]`` with the operand at k + e*step, 0 where ``k + e*step >= k_end``
or outside the operand.  Fetching a whole tile share at once lets a loader decode k once and
step through the rest incrementally (the im2col loaders do; they are only used with
``K_FAST``, where step is 1).  Loads are branch-free: out-of-range elements read a safe
address and are replaced by 0.  ``krange(geo, z) -> (k_begin, k_end)`` gives the block's K
range (split-K uses ``blockIdx.z``), and ``store(out, bias, geo, z, m, n, value)`` writes
one C element, checking ``m < M`` and ``n < N`` itself.  ``geo`` is a tuple of int64
geometry the launcher builds.
"""

import functools

import numpy as np
from numba import config, cuda, float32, int32, int64, uint32, uint64

from nbalex.backends import workspace_view
from nbalex.cuda import tiling

BK = tiling.BK    # K depth of one shared-memory tile
TM = 8            # rows of C per thread
TN = 8            # columns of C per thread
K_FAST = 0        # loader layout: k is the contiguous index of the operand in memory
ROW_FAST = 1      # loader layout: the row index (m or n) is the contiguous one

# 16-byte aligned shared tiles let NVVM fuse the fragment reads into LDS.128; the simulator
# rejects any alignment request (and needs none).
SMEM_ALIGN = None if config.ENABLE_CUDASIM else 16

BM = tiling.BM    # rows of C per block of the largest tile (256 threads at 8x8 each)
BN = tiling.BN    # columns of C per block of the largest tile


@cuda.jit(device=True, inline="always")
def fast_div(n, magic, shift):
    """floor(n / d) for 0 <= n < 2**31, with (magic, shift) = :func:`magic_divider` (d)."""
    return (int64(n) * magic) >> shift


@cuda.jit(device=True, inline="always")
def fast_div32(n, magic, shift):
    """fast_div as int32, with both factors masked to 32 bits (magic < 2**32): one
    32 x 32 -> 64-bit multiply and a shift, where fast_div's int64 operands cost a full
    64-bit multiply (and the registers to hold them) inside a K loop."""
    low = uint64(0xFFFFFFFF)
    return int32(((uint64(n) & low) * (uint64(magic) & low)) >> uint64(shift))


if config.ENABLE_CUDASIM:
    @cuda.jit(device=True, inline="always")
    def inside(i, n):
        """0 <= i < n (for n >= 0)."""
        return (i >= 0) & (i < n)
else:
    @cuda.jit(device=True, inline="always")
    def inside(i, n):
        """0 <= i < n (for n >= 0), as one unsigned comparison (the simulator cannot cast
        negative Python ints to unsigned, so it gets the two-sided test above)."""
        return uint32(i) < uint32(n)


def magic_divider(d):
    """(magic, shift) such that ``(n * magic) >> shift == n // d`` for all 0 <= n < 2**31.

    With l = ceil(log2 d), shift = 31 + l and magic = ceil(2**shift / d) < 2**32, the error
    n*(magic*d - 2**shift)/(d*2**shift) < 2**-l <= 1/d never carries past an integer, and
    n * magic < 2**63 fits an int64.  Integer division costs ~20 SASS instructions; this
    costs a multiply and a shift, which matters inside the GEMM's K loop.
    """
    d = int(d)
    if d < 1:
        raise ValueError(f"divisor must be >= 1, got {d}")
    shift = 31 + (d - 1).bit_length()
    magic = -(-(1 << shift) // d)
    return magic, shift


@cuda.jit(device=True, inline="always")
def fetch_strided(src, base, stride, valid, k, step, k_end, buf):
    """buf[e] = src[base + (k + e*step)*stride] where valid and k + e*step < k_end, else 0.

    The loader of a plain row-major operand (a row of A or B at a fixed stride in k); the
    index is carried in int32 (operands have fewer than 2**31 elements) and widened to 64
    bits as an unsigned 32-bit value: sign extension would cost every element a shift and a
    second select for the high word, and the registers to hold them; zero-extended, the
    address is one shift-and-add with a zero high word (``LEA.HI.X ... RZ``).
    """
    idx = int32(base + k * stride)
    delta = int32(step * stride)
    left = int32(k_end - k)
    for e in range(buf.shape[0]):
        ok = valid & (int32(e * step) < left)
        v = src[uint64(uint32(idx if ok else int32(0)))]
        buf[e] = v if ok else float32(0.0)
        idx = int32(idx + delta)


def cdiv(a, b):
    """ceil(a / b) for positive integers."""
    return -(-a // b)


# ---- the tile and split of a launch, and the SMs they are sized for -----------------------

SUM_THREADS = 256


def sm_count():
    """SMs of the current device, read once per device; the simulator (which has no SMs) and
    a machine without a GPU get tiling.SM_COUNT, the plan's default card."""
    if config.ENABLE_CUDASIM or not cuda.is_available():
        return tiling.SM_COUNT
    return _device_sm_count(cuda.get_current_device().id)


@functools.lru_cache(maxsize=None)
def _device_sm_count(device_id):
    return int(cuda.get_current_device().MULTIPROCESSOR_COUNT)


def workspace_sm_counts():
    """The SM counts a workspace is sized for: the device's on a GPU; without one (the
    simulator, an arena sized on a CPU-only machine) every card of the plan's --gpu table,
    so that the workspace holds the largest split any of them would choose."""
    if config.ENABLE_CUDASIM or not cuda.is_available():
        return tiling.TABLE_SM_COUNTS
    return (sm_count(),)


def launch_tiling(kernels, shape):
    """(kernel, threads, tiling) of GEMM ``shape`` on the current device: the instance of
    ``kernels`` (a make_gemm_kernels dict) for the tile tiling.gemm_tiling chooses."""
    t = tiling.gemm_tiling(shape, sm_count())
    kernel, threads = kernels[(t.bm, t.bn)]
    return kernel, threads, t


def largest_split(shape):
    """The most K slices tiling.gemm_tiling gives ``shape`` over workspace_sm_counts()."""
    return max(tiling.gemm_tiling(shape, sms).splits for sms in workspace_sm_counts())


@cuda.jit
def sum_slices_kernel(out, parts, size, splits):
    """out[i] = parts[i] + parts[size + i] + ... + parts[(splits-1)*size + i], summed in that
    order, for every i < size (grid-stride loop; reads and writes coalesce along i).

    out (size,) written, parts (splits*size,): flat float32.
    """
    for i in range(cuda.grid(1), size, cuda.gridsize(1)):
        total = parts[i]
        for z in range(1, splits):
            total += parts[z * size + i]
        out[i] = total


def sum_slices(out, parts, splits, stream):
    """Launch sum_slices_kernel: the flat ``out`` = the sum of the ``splits`` slices of
    ``parts`` (each ``out.size`` long), in slice order."""
    size = out.size
    threads = min(SUM_THREADS, 32 * cdiv(size, 32))
    sum_slices_kernel[min(cdiv(size, threads), 1024), threads, stream](out, parts, size, splits)


def split_workspace(workspace, size):
    """A flat float32 device view of ``size`` elements for split-K slices: the start of
    ``workspace``, or a new device array when it is None (the ops façade; a network passes
    its arena's workspace).  The slices are indexed in int32, so size must be < 2**31."""
    if size >= 2 ** 31:
        raise ValueError("split-K slices must have fewer than 2**31 elements")
    return workspace_view(workspace, size, lambda n: cuda.device_array(n, dtype=np.float32))


STATIC_SIGNATURES = [(sum_slices_kernel, "void(float32[::1], float32[::1], int64, int64)", False,
                      SUM_THREADS)]


def make_gemm_kernels(setup_a, fetch_a, layout_a, setup_b, fetch_b, layout_b, krange, store,
                      name, tiles=tiling.TILES):
    """{(bm, bn): (kernel, threads)}: one :func:`make_gemm_kernel` instance per tile of
    ``tiles``, named by tiling.instance_name, each with launch bound tiling.MIN_BLOCKS of its
    threads per block."""
    return {(bm, bn): make_gemm_kernel(
        setup_a, fetch_a, layout_a, setup_b, fetch_b, layout_b, krange, store, bm=bm, bn=bn,
        name=tiling.instance_name(name, bm, bn),
        min_blocks=tiling.MIN_BLOCKS[(bm // TM) * (bn // TN)])
        for bm, bn in tiles}


def static_signatures(kernels, signature):
    """STATIC_SIGNATURES rows of every instance of a make_gemm_kernels dict."""
    return [(kernel, signature, True, threads) for kernel, threads in kernels.values()]


def make_gemm_kernel(setup_a, fetch_a, layout_a, setup_b, fetch_b, layout_b, krange, store,
                     bm=BM, bn=BN, name="gemm_kernel", min_blocks=2):
    """A CUDA kernel ``kernel(out, src_a, src_b, bias, geo)`` computing one GEMM use.

    ``min_blocks`` is the launch bound's resident blocks per SM: 2 caps registers at 128
    (65536 / 512 threads); a loader whose state does not fit that without spilling uses 1.

    Launch with grid ``(ceil(N/bn), ceil(M/bm), Z)`` and ``(bm//8)*(bn//8)`` threads per
    block; ``blockIdx.z`` (0..Z-1) is handed to the loaders, ``krange`` and ``store`` (conv
    uses it for the group and the split-K slice).  See the module docstring for the loader
    protocol.
    """
    threads = (bm // TM) * (bn // TN)
    threads_x = bn // TN                   # threads along n in the compute layout
    ea = BK * bm // threads                # A elements each thread loads per K tile
    eb = BK * bn // threads
    sa = bm + 4                            # padded shared row strides (floats): the k-major
    sb = bn + 4                            # transposed stores do not collide on banks
    half_m = bm // 2
    half_n = bn // 2
    a_tile = BK * sa
    b_tile = BK * sb
    acc_len = TM * TN
    a_smem = 2 * a_tile
    b_smem = 2 * b_tile
    assert ea * threads == BK * bm and eb * threads == BK * bn and BK % ea == 0 and BK % eb == 0
    a_kgroups = BK // ea                   # K_FAST: threads sharing one row of A
    b_kgroups = BK // eb
    a_step = threads // bm if threads >= bm else 0   # ROW_FAST: k distance between elements
    b_step = threads // bn if threads >= bn else 0
    assert layout_a == K_FAST or a_step * ea == BK
    assert layout_b == K_FAST or b_step * eb == BK

    @cuda.jit(device=True, inline="always")
    def a_row_k(tid):
        """(row of the A tile, first k offset, k offset step) this thread loads."""
        if layout_a == K_FAST:
            return tid // a_kgroups, (tid % a_kgroups) * ea, 1
        return tid % bm, tid // bm, a_step

    @cuda.jit(device=True, inline="always")
    def b_row_k(tid):
        if layout_b == K_FAST:
            return tid // b_kgroups, (tid % b_kgroups) * eb, 1
        return tid % bn, tid // bn, b_step

    # lab:begin gemm.fma_step
    @cuda.jit(device=True, inline="always")
    def fma_step(acc, a_s, b_s, ra, rb):
        """acc += A[:, kk] (x) B[kk, :] for this thread's 8x8 tile; ra, rb: fragment offsets."""
        a_frag = cuda.local.array(TM, float32)
        b_frag = cuda.local.array(TN, float32)
        for i in range(4):
            a_frag[i] = a_s[ra + uint64(i)]
            a_frag[4 + i] = a_s[ra + uint64(half_m + i)]
            b_frag[i] = b_s[rb + uint64(i)]
            b_frag[4 + i] = b_s[rb + uint64(half_n + i)]
        for i in range(TM):
            for j in range(TN):
                acc[i * TN + j] += a_frag[i] * b_frag[j]
    # lab:end gemm.fma_step

    @cuda.jit(device=True, inline="always")
    def store_column(out, bias, geo, z, mrow, n, acc, j):
        """Store column j of this thread's tile (C column n; rows mrow + {0..3} and
        mrow + bm/2 + {0..3})."""
        for i in range(4):
            store(out, bias, geo, z, mrow + i, n, acc[i * TN + j])
            store(out, bias, geo, z, mrow + half_m + i, n, acc[(4 + i) * TN + j])

    def gemm_kernel(out, src_a, src_b, bias, geo):
        """C = A @ B for one (bm x bn) block tile; thread (ty, tx) = divmod(tid, bn/8) owns
        C rows m0 + ty*4 + {0..3, bm/2..bm/2+3}, columns n0 + tx*4 + {0..3, bn/2..bn/2+3}
        and hands each to ``store`` (which writes or accumulates ``out``)."""
        tid = cuda.threadIdx.x
        tx = tid % threads_x
        ty = tid // threads_x
        z = cuda.blockIdx.z
        m0 = cuda.blockIdx.y * bm
        n0 = cuda.blockIdx.x * bn

        # Double-buffered tiles, laid out [buffer][k][m] (row stride sa) and [buffer][k][n].
        a_s = cuda.shared.array(a_smem, float32, alignment=SMEM_ALIGN)
        b_s = cuda.shared.array(b_smem, float32, alignment=SMEM_ALIGN)
        acc = cuda.local.array(acc_len, float32)
        a_next = cuda.local.array(ea, float32)
        b_next = cuda.local.array(eb, float32)
        for i in range(acc_len):
            acc[i] = float32(0.0)

        a_row, a_k, a_dk = a_row_k(tid)
        b_row, b_k, b_dk = b_row_k(tid)
        a_state = setup_a(src_a, geo, z, m0 + a_row)
        b_state = setup_b(src_b, geo, z, n0 + b_row)
        k_begin, k_end = krange(geo, z)
        n_tiles = (k_end - k_begin + BK - 1) // BK

        # Prologue: tile 0 into buffer 0.
        fetch_a(src_a, geo, a_state, k_begin + a_k, a_dk, k_end, a_next)
        fetch_b(src_b, geo, b_state, k_begin + b_k, b_dk, k_end, b_next)
        for e in range(ea):
            a_s[uint64((a_k + e * a_dk) * sa + a_row)] = a_next[e]
        for e in range(eb):
            b_s[uint64((b_k + e * b_dk) * sb + b_row)] = b_next[e]
        cuda.syncthreads()  # tile 0 is in shared memory before anyone reads it

        for t in range(n_tiles):
            cur = (t % 2) * a_tile
            cur_b = (t % 2) * b_tile
            # Fetch tile t+1 into registers (zeros past the end); the loads overlap the FMAs.
            k_next = k_begin + (t + 1) * BK
            fetch_a(src_a, geo, a_state, k_next + a_k, a_dk, k_end, a_next)
            fetch_b(src_b, geo, b_state, k_next + b_k, b_dk, k_end, b_next)

            ra = uint64(cur + ty * 4)
            rb = uint64(cur_b + tx * 4)
            fma_step(acc, a_s, b_s, ra, rb)
            fma_step(acc, a_s, b_s, ra + uint64(1 * sa), rb + uint64(1 * sb))
            fma_step(acc, a_s, b_s, ra + uint64(2 * sa), rb + uint64(2 * sb))
            fma_step(acc, a_s, b_s, ra + uint64(3 * sa), rb + uint64(3 * sb))
            fma_step(acc, a_s, b_s, ra + uint64(4 * sa), rb + uint64(4 * sb))
            fma_step(acc, a_s, b_s, ra + uint64(5 * sa), rb + uint64(5 * sb))
            fma_step(acc, a_s, b_s, ra + uint64(6 * sa), rb + uint64(6 * sb))
            fma_step(acc, a_s, b_s, ra + uint64(7 * sa), rb + uint64(7 * sb))

            nxt = a_tile - cur
            nxt_b = b_tile - cur_b
            for e in range(ea):
                a_s[uint64(nxt + (a_k + e * a_dk) * sa + a_row)] = a_next[e]
            for e in range(eb):
                b_s[uint64(nxt_b + (b_k + e * b_dk) * sb + b_row)] = b_next[e]
            # Tile t+1 is complete in the other buffer, and everyone has finished reading
            # tile t's buffer, which the next iteration overwrites.
            cuda.syncthreads()

        # Epilogue, column by column (written out so that every accumulator index is a
        # constant and acc stays in registers): a column's index decoding is shared by its
        # 8 rows, and each stored column frees 8 accumulator registers.
        mrow = m0 + ty * 4
        ncol = n0 + tx * 4
        store_column(out, bias, geo, z, mrow, ncol, acc, 0)
        store_column(out, bias, geo, z, mrow, ncol + 1, acc, 1)
        store_column(out, bias, geo, z, mrow, ncol + 2, acc, 2)
        store_column(out, bias, geo, z, mrow, ncol + 3, acc, 3)
        store_column(out, bias, geo, z, mrow, ncol + half_n, acc, 4)
        store_column(out, bias, geo, z, mrow, ncol + half_n + 1, acc, 5)
        store_column(out, bias, geo, z, mrow, ncol + half_n + 2, acc, 6)
        store_column(out, bias, geo, z, mrow, ncol + half_n + 3, acc, 7)

    gemm_kernel.__name__ = gemm_kernel.__qualname__ = name
    if config.ENABLE_CUDASIM:              # the simulator's jit takes no launch bounds
        return cuda.jit(gemm_kernel), threads
    # Promise ptxas at most `threads` per block and ask for `min_blocks` resident blocks.
    return cuda.jit(gemm_kernel, launch_bounds=(threads, min_blocks)), threads
