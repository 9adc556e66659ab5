"""Winograd F(2x2, 3x3) for the CPU's 3x3 stride-1 convolutions (Lavin & Gray, 2016).

Each 2x2 block ("tile") of outputs comes from a 4x4 block of the padded input ``d``::

    Y = A^T [ U (.) V ] A,   U = G g G^T (per filter and channel),   V = B^T d B (per tile)

    B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
    G   = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]
    A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]

so that the sum over channels becomes 16 GEMMs, one per element xi of the 4x4 transforms:
M[xi] (F/G, T*nb) = U[xi] (F/G, C/G) @ V[xi] (C/G, T*nb) per group, T tiles per image, where
direct convolution multiplies 9 * OH*OW per (filter, channel) and these 16 * T: on 13x13
maps (T = 49 tiles, 14x14 covered) 784 against 1521, 1.9x fewer.  The transforms add and
halve only (exact in binary), so the error stays a few float32 roundings per sum; the
tests hold it to the tolerances of every other path.  A NaN or inf in a 4x4 block reaches
all four outputs of its tile, and inf - inf in a transform is NaN: special values may spread
or turn into NaN, never vanish (tests/test_nan.py).

Backward data of a 3x3 stride-1 convolution is itself one (pad 2 - pad, the filters turned
by 180 degrees, channels and filters swapped within each group): :func:`filter_transform`
builds that U with ``flipped``.  Layouts: the chunk's images innermost as in
:mod:`nbalex.cpu.im2col`, column (ti*TW + tj)*nb + j of V and M for image j's tile (ti, tj).
"""

import numpy as np
from numba import njit

from nbalex.backends import host_array, workspace_view

from . import im2col as k
from . import workers


def tiles(oh, ow):
    """(TH, TW): 2x2 output tiles covering an (oh, ow) map."""
    return -(-oh // 2), -(-ow // 2)


@njit(inline="always", cache=True)
def _g_rows(a, b, c, half):
    """(G applied to the 3-vector (a, b, c)): its 4 entries."""
    return a, half * ((a + b) + c), half * ((a - b) + c), c


@njit(nogil=True, cache=True, error_model="numpy")
def filter_transform(u, ins, w, flipped, lo, hi):
    """u[xi, o*ins + i] = (G g G^T)[xi] for output channels lo <= o < hi (written); u is
    (16, >= outs*ins), its rows padded apart (see ROW_PAD).

    Plain: g = w[o, i] (u is (16, F, C/G)).  ``flipped`` (backward data): within each group
    of fg = F/G filters and cg = C/G channels, output channel o = group*cg + c of dx takes
    g[p, q] = w[group*fg + i, c, 2 - p, 2 - q] for its input channel i (u is (16, C, F/G)).
    """
    cg = w.shape[1]
    half = np.float32(0.5)
    flat = u.reshape(u.size)
    wf = w.reshape(w.size)
    step = np.uint64(u.shape[1])
    for o in range(lo, hi):
        for i in range(ins):
            at = np.uint64(o * ins + i)
            if flipped:
                grp = o // cg
                s0 = np.uint64(((grp * ins + i) * cg + o - grp * cg) * 9)
                g0, g1, g2 = wf[s0 + np.uint64(8)], wf[s0 + np.uint64(7)], wf[s0 + np.uint64(6)]
                g3, g4, g5 = wf[s0 + np.uint64(5)], wf[s0 + np.uint64(4)], wf[s0 + np.uint64(3)]
                g6, g7, g8 = wf[s0 + np.uint64(2)], wf[s0 + np.uint64(1)], wf[s0]
            else:
                s0 = np.uint64((o * cg + i) * 9)
                g0, g1, g2 = wf[s0], wf[s0 + np.uint64(1)], wf[s0 + np.uint64(2)]
                g3, g4, g5 = wf[s0 + np.uint64(3)], wf[s0 + np.uint64(4)], wf[s0 + np.uint64(5)]
                g6, g7, g8 = wf[s0 + np.uint64(6)], wf[s0 + np.uint64(7)], wf[s0 + np.uint64(8)]
            # t = G g, one column (q) at a time: rows t_a = (t_a0, t_a1, t_a2)
            t00, t10, t20, t30 = _g_rows(g0, g3, g6, half)
            t01, t11, t21, t31 = _g_rows(g1, g4, g7, half)
            t02, t12, t22, t32 = _g_rows(g2, g5, g8, half)
            store4(flat, 0, step, at, _g_rows(t00, t01, t02, half))   # rows of t G^T
            store4(flat, 4, step, at, _g_rows(t10, t11, t12, half))
            store4(flat, 8, step, at, _g_rows(t20, t21, t22, half))
            store4(flat, 12, step, at, _g_rows(t30, t31, t32, half))


@njit(inline="always", cache=True)
def store4(a, first, step, at, e):
    """a[(first + r)*step + at] = e[r] for r < 4 (a flat, unsigned offsets)."""
    u = np.uint64
    base = u(first) * step + at
    a[base] = e[0]
    a[base + step] = e[1]
    a[base + u(2) * step] = e[2]
    a[base + u(3) * step] = e[3]


@njit(inline="always", cache=True)
def _bt(d0, d1, d2, d3):
    """B^T applied to the 4-vector (d0, d1, d2, d3)."""
    return d0 - d2, d1 + d2, d2 - d1, d1 - d3


@njit(nogil=True, cache=True, error_model="numpy")
def input_transform(v, xp, c_in, nb, hp, wp, th, tw):
    """v[xi, c*T*nb + (ti*TW + tj)*nb + j] = (B^T d B)[xi] for the 4x4 block d at (2ti, 2tj) of
    the padded chunk xp (:func:`nbalex.cpu.im2col.pack_images`): every element of v[:, :, :T*nb] written.
    The images are innermost in both, so the loop over them reads and writes unit strides."""
    u = np.uint64
    row = u(wp * nb)
    flat = v.reshape(v.size)
    step = u(v.shape[1])
    tnb = th * tw * nb
    for c in range(c_in):
        for ti in range(th):
            for tj in range(tw):
                o = u(((c * hp + 2 * ti) * wp + 2 * tj) * nb)
                col = u(c * tnb + (ti * tw + tj) * nb)
                nbu = u(nb)
                for j in range(nb):
                    p0 = o + u(j)               # d[a][b] = xp[p0 + a*row + b*nb]
                    p1, p2, p3 = p0 + row, p0 + u(2) * row, p0 + u(3) * row
                    # r = B^T d, column b at a time: r[a][b] = ca[b]
                    c0 = _bt(xp[p0], xp[p1], xp[p2], xp[p3])
                    c1 = _bt(xp[p0 + nbu], xp[p1 + nbu], xp[p2 + nbu], xp[p3 + nbu])
                    c2 = _bt(xp[p0 + u(2) * nbu], xp[p1 + u(2) * nbu], xp[p2 + u(2) * nbu],
                             xp[p3 + u(2) * nbu])
                    c3 = _bt(xp[p0 + u(3) * nbu], xp[p1 + u(3) * nbu], xp[p2 + u(3) * nbu],
                             xp[p3 + u(3) * nbu])
                    at = col + u(j)             # V row a = B^T applied to r's row a
                    store4(flat, 0, step, at, _bt(c0[0], c1[0], c2[0], c3[0]))
                    store4(flat, 4, step, at, _bt(c0[1], c1[1], c2[1], c3[1]))
                    store4(flat, 8, step, at, _bt(c0[2], c1[2], c2[2], c3[2]))
                    store4(flat, 12, step, at, _bt(c0[3], c1[3], c2[3], c3[3]))


@njit(nogil=True, cache=True, error_model="numpy")
def output_transform(y, m, b, n0, nb, relu, th, tw):
    """y[n0 + j, f, 2ti + a, 2tj + c] = (A^T M A)[a, c] + b[f] (then max(., 0) if relu; b
    may be None) for the outputs inside y (N, F, OH, OW), from m (16, >= F*T*nb): element
    f*T*nb + (ti*TW + tj)*nb + j of each row."""
    f_out, oh, ow = y.shape[1], y.shape[2], y.shape[3]
    s = np.empty((2, 4), np.float32)
    for f in range(f_out):
        bias = np.float32(0.0) if b is None else b[f]
        for j in range(nb):
            out = y[n0 + j, f]
            for ti in range(th):
                for tj in range(tw):
                    col = np.uint64(f * th * tw * nb + (ti * tw + tj) * nb + j)
                    for c in range(4):              # s = A^T M
                        m0 = m[0 * 4 + c, col]
                        m1 = m[1 * 4 + c, col]
                        m2 = m[2 * 4 + c, col]
                        m3 = m[3 * 4 + c, col]
                        s[0, c] = (m0 + m1) + m2
                        s[1, c] = (m1 - m2) - m3
                    for a in range(2):              # Y = s A
                        i = 2 * ti + a
                        if i >= oh:
                            continue
                        for cc in range(2):
                            jj = 2 * tj + cc
                            if jj >= ow:
                                continue
                            if cc == 0:
                                val = (s[a, 0] + s[a, 1]) + s[a, 2]
                            else:
                                val = (s[a, 1] - s[a, 2]) - s[a, 3]
                            val += bias
                            out[i, jj] = np.float32(0.0) if (relu and val < 0.0) else val


# Images per chunk: V and M of a chunk are 16 * (C + F) * T * nb floats (AlexNet's conv3 at
# 8 images: 16 MB), read back by the GEMMs from the large last-level cache.
CHUNK = 8


def chunk_images(n, workers_n):
    return max(1, min(CHUNK, -(-n // workers_n)))


# Floats added to each of the 16 rows of U, V and M: rows a multiple of 4 KiB apart (AlexNet's
# conv3: 256 * 392 floats) map the 16 streams a transform writes onto the same cache sets,
# which made the input transform 10x slower than its arithmetic.
ROW_PAD = 16


def row_length(n):
    return n + ROW_PAD


def padded(th, tw):
    """(HP, WP) of the padded chunk: every tile's 4x4 block inside it."""
    return 2 * th + 2, 2 * tw + 2


def chunk_floats(n, c_in, c_out, oh, ow, workers_n):
    """float32 elements of one worker's chunk buffers: its padded chunk, V and M (or dM)."""
    th, tw = tiles(oh, ow)
    hp, wp = padded(th, tw)
    nb = chunk_images(n, workers_n)
    t = th * tw * nb
    return c_in * hp * wp * nb + 16 * (row_length(c_in * t) + row_length(c_out * t))


def chunk_buffers(base, c_in, c_out, nb, t, hp, wp):
    """(padded chunk, V, M) carved from the start of a worker's slice ``base`` (t tiles an
    image, nb images)."""
    v_row, m_row = row_length(c_in * t * nb), row_length(c_out * t * nb)
    xp = base[:c_in * hp * wp * nb]
    v = base[xp.size:xp.size + 16 * v_row].reshape(16, v_row)
    m = base[xp.size + v.size:xp.size + v.size + 16 * m_row].reshape(16, m_row)
    return xp, v, m


def workspace_size(n, c_in, c_out, groups, oh, ow, workers_n):
    """float32 elements: the transformed filters, then per worker its chunk buffers."""
    return 16 * row_length(c_out * (c_in // groups)) + workers_n * chunk_floats(
        n, c_in, c_out, oh, ow, workers_n)


def convolve(y, x, w, flipped, pad, groups, b, relu, workspace):
    """y (N, CO, OH, OW) <- the 3x3 stride-1 convolution of x (N, CI, H, W) padded by
    ``pad``, with the filters of w as :func:`filter_transform` reads them (``flipped``: the
    backward-data form), + b (None: no bias), then max(., 0) if relu.  y is overwritten."""
    n, c_in = x.shape[0], x.shape[1]
    c_out, oh, ow = y.shape[1], y.shape[2], y.shape[3]
    cgi, cgo = c_in // groups, c_out // groups
    th, tw = tiles(oh, ow)
    hp, wp = padded(th, tw)
    t = th * tw
    nb = chunk_images(n, workers.WORKERS)
    u_row = row_length(c_out * cgi)
    ws = workspace_view(workspace, workspace_size(n, c_in, c_out, groups, oh, ow,
                                                  workers.WORKERS), host_array)
    per = chunk_floats(n, c_in, c_out, oh, ow, workers.WORKERS)
    u = ws[:16 * u_row].reshape(16, u_row)
    workers.for_ranges(filter_transform, c_out, u, cgi, w, flipped, work=16 * 16 * c_out * cgi)

    def work(wid, lo, hi):
        xp, v, m = chunk_buffers(ws[u.size + wid * per:], c_in, c_out, nb, t, hp, wp)
        for n0 in range(lo, hi, nb):
            mm = min(nb, hi - n0)
            width = t * mm
            k.pack_images(xp, x, n0, mm, pad, hp, wp)
            input_transform(v, xp, c_in, mm, hp, wp, th, tw)
            for xi in range(16):
                uf = u[xi, :c_out * cgi].reshape(c_out, cgi)
                vf = v[xi, :c_in * width].reshape(c_in, width)
                mf = m[xi, :c_out * width].reshape(c_out, width)
                for g in range(groups):
                    np.matmul(uf[g * cgo:(g + 1) * cgo], vf[g * cgi:(g + 1) * cgi],
                              out=mf[g * cgo:(g + 1) * cgo])
            output_transform(y, m, b, n0, mm, relu, th, tw)

    workers.run(work, n, serial_blas=True)
