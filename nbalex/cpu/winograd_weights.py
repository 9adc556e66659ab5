"""Backward weights of a 3x3 stride-1 convolution through Winograd F(2x2, 3x3).

The forward pass of :mod:`nbalex.cpu.winograd` is, per group, M[xi] = U[xi] V[xi] for each
element xi of the 4x4 transforms, then Y = A^T M A per 2x2 tile of outputs, with
U = G g G^T.  Its gradient with respect to the filters g follows the same three steps
backwards::

    dM = A dY A^T                 per 2x2 block of dy (outputs past the map count as 0)
    dU[xi] = sum over the tiles of every image of dM[xi] V[xi]^T        16 GEMMs a chunk
    dg = G^T dU G                 per (filter, channel), the workers' dU added in order

so that, like the forward pass, the GEMMs multiply 16 * T per (filter, channel) where the
kernel-row and im2col paths multiply 9 * OH*OW: 1.9x fewer on 13x13 maps.  The transforms
add, subtract and halve only.  A worker's dU is (16, C/G x F/G per group), the sum over its
images, accumulated by the GEMMs (beta = 1) chunk after chunk; the filter transform adds the
workers' sums in worker order, so the bits depend on the shape and the number of workers,
never on timing.  A NaN or inf in x or dy reaches the gradient of every filter it touches.
"""

import numpy as np
from numba import njit

from nbalex.backends import host_array, workspace_view

from . import im2col as k
from . import openblas
from . import winograd as wg
from . import workers


@njit(inline="always", cache=True)
def _a_row(p, q):
    """(p, q) A^T, A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]: its 4 entries."""
    return p, p + q, p - q, -q


@njit(nogil=True, cache=True, error_model="numpy")
def grad_transform(dm, dy, n0, nb, th, tw):
    """dm[xi, f*T*nb + (ti*TW + tj)*nb + j] = (A dY A^T)[xi] for the 2x2 block dY of
    dy[n0 + j, f] at (2ti, 2tj), its entries past the map taken as 0: every element of
    dm[:, :F*T*nb] written (T = TH*TW tiles).  The images are innermost, as in dm."""
    f_out, oh, ow = dy.shape[1], dy.shape[2], dy.shape[3]
    flat = dm.reshape(dm.size)
    step = np.uint64(dm.shape[1])
    zero = np.float32(0.0)
    for f in range(f_out):
        for ti in range(th):
            i0 = 2 * ti
            down = i0 + 1 < oh
            for tj in range(tw):
                c0 = 2 * tj
                right = c0 + 1 < ow
                col = np.uint64(f * th * tw * nb + (ti * tw + tj) * nb)
                for j in range(nb):
                    g = dy[n0 + j, f]
                    a = g[i0, c0]
                    b = g[i0, c0 + 1] if right else zero
                    c = g[i0 + 1, c0] if down else zero
                    d = g[i0 + 1, c0 + 1] if down and right else zero
                    at = col + np.uint64(j)
                    # A dY has the rows (a, b), (a + c, b + d), (a - c, b - d), (-c, -d)
                    wg.store4(flat, 0, step, at, _a_row(a, b))
                    wg.store4(flat, 4, step, at, _a_row(a + c, b + d))
                    wg.store4(flat, 8, step, at, _a_row(a - c, b - d))
                    wg.store4(flat, 12, step, at, _a_row(-c, -d))


@njit(inline="always", cache=True)
def _gt(e0, e1, e2, e3, half):
    """G^T applied to the 4-vector (e0, e1, e2, e3): its 3 entries."""
    return e0 + half * (e1 + e2), half * (e1 - e2), half * (e1 + e2) + e3


@njit(inline="always", cache=True)
def _summed(du, xi, col):
    """du[0, xi, col] + du[1, xi, col] + ... (the workers' sums, in worker order)."""
    acc = du[0, xi, col]
    for w in range(1, du.shape[0]):
        acc += du[w, xi, col]
    return acc


@njit(nogil=True, cache=True, error_model="numpy")
def filter_grad_transform(dw, du, fg, lo, hi):
    """dw[grp*fg + o, i] = G^T D G (written) for the rows lo <= grp*cg + i < hi of the
    groups' dU^T blocks (cg = dw.shape[1] channels, fg filters a group, block grp at
    grp*cg*fg of each du[w, xi], (cg, fg)), where D[xi] is the sum over the workers
    w = 0, 1, ... in order of du[w, xi, (grp*cg + i)*fg + o]."""
    cg = dw.shape[1]
    half = np.float32(0.5)
    flat = dw.reshape(dw.size)
    for r in range(lo, hi):
        grp = r // cg
        i = r - grp * cg
        for o in range(fg):
            col = r * fg + o
            # t = G^T D, one column b at a time: tb = (t[0][b], t[1][b], t[2][b])
            t0 = _gt(_summed(du, 0, col), _summed(du, 4, col), _summed(du, 8, col),
                     _summed(du, 12, col), half)
            t1 = _gt(_summed(du, 1, col), _summed(du, 5, col), _summed(du, 9, col),
                     _summed(du, 13, col), half)
            t2 = _gt(_summed(du, 2, col), _summed(du, 6, col), _summed(du, 10, col),
                     _summed(du, 14, col), half)
            t3 = _gt(_summed(du, 3, col), _summed(du, 7, col), _summed(du, 11, col),
                     _summed(du, 15, col), half)
            at = np.uint64(((grp * fg + o) * cg + i) * 9)
            for p in range(3):                      # row p of t G
                e0, e1, e2 = _gt(t0[p], t1[p], t2[p], t3[p], half)
                q = at + np.uint64(3 * p)
                flat[q] = e0
                flat[q + np.uint64(1)] = e1
                flat[q + np.uint64(2)] = e2


def workspace_size(n, c_in, c_out, groups, oh, ow, workers_n):
    """float32 elements: per worker its dU sum, then per worker its chunk buffers."""
    return workers_n * (16 * wg.row_length(c_out * (c_in // groups))
                        + wg.chunk_floats(n, c_in, c_out, oh, ow, workers_n))


def backward_weights(dw, db, dy, x, pad, groups, workspace):
    """dw (F, C/G, 3, 3), db (F,) <- dL/dw, dL/db of the 3x3 stride-1 convolution of x
    (N, C, H, W) padded by ``pad``, given dy (N, F, OH, OW).  Both overwritten.  Needs
    cblas_sgemm (:data:`nbalex.cpu.openblas.gemm`) for the accumulating GEMMs."""
    n, c_in = x.shape[0], x.shape[1]
    c_out, oh, ow = dy.shape[1], dy.shape[2], dy.shape[3]
    cgi, cgo = c_in // groups, c_out // groups
    th, tw = wg.tiles(oh, ow)
    hp, wp = wg.padded(th, tw)
    t = th * tw
    nb = wg.chunk_images(n, workers.WORKERS)
    u_row = wg.row_length(c_out * cgi)
    ws = workspace_view(workspace, workspace_size(n, c_in, c_out, groups, oh, ow,
                                                  workers.WORKERS), host_array)
    du = ws[:workers.WORKERS * 16 * u_row].reshape(workers.WORKERS, 16, u_row)
    per = wg.chunk_floats(n, c_in, c_out, oh, ow, workers.WORKERS)

    def work(wid, lo, hi):
        xp, v, m = wg.chunk_buffers(ws[du.size + wid * per:], c_in, c_out, nb, t, hp, wp)
        for n0 in range(lo, hi, nb):
            mm = min(nb, hi - n0)
            width = t * mm
            k.pack_images(xp, x, n0, mm, pad, hp, wp)
            wg.input_transform(v, xp, c_in, mm, hp, wp, th, tw)
            grad_transform(m, dy, n0, mm, th, tw)
            beta = 0.0 if n0 == lo else 1.0
            for xi in range(16):
                vf = v[xi, :c_in * width].reshape(c_in, width)
                mf = m[xi, :c_out * width].reshape(c_out, width)
                uf = du[wid, xi]
                for g in range(groups):
                    block = uf[g * cgi * cgo:(g + 1) * cgi * cgo].reshape(cgi, cgo)
                    openblas.gemm(vf[g * cgi:(g + 1) * cgi], mf[g * cgo:(g + 1) * cgo], block,
                                  beta, trans_b=True)

    busy = workers.run(work, n, serial_blas=True)
    workers.for_ranges(filter_grad_transform, c_in, dw, du[:len(busy)], cgo,
                       work=16 * len(busy) * c_out * cgi)
    workers.for_ranges(k.bias_grad, c_out, db, dy, work=dy.size)
