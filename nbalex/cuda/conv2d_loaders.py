"""The operand loaders of the convolution's implicit GEMMs (:mod:`nbalex.cuda.conv2d`).

:func:`nbalex.cuda.gemm.make_gemm_kernel` builds a kernel from device functions that say,
for each operand, where a GEMM row or column starts (``setup``), how to gather its next K
elements into registers (``fetch``), which K range a block reduces (``krange``) and how a
result element is stored (``store``).  For convolution they gather straight from ``x``,
``w`` or ``dy``, so no im2col matrix is ever written; this file holds those functions, one
section per pass, and the geometry tuple they all read.
"""

from numba import cuda, float32, int32, uint64

from nbalex.cuda import gemm
from nbalex.cuda.gemm import fast_div, fast_div32, fetch_strided, inside

# Geometry tuple layout (int64): see conv_geometry.
(G_N, G_C, G_H, G_W, G_F, G_KH, G_KW, G_OH, G_OW, G_S, G_PAD, G_GROUPS, G_CG, G_FG, G_KK,
 G_RELU, G_SPLITS, G_KSPLIT,
 G_KK_MUL, G_KK_SH, G_KW_MUL, G_KW_SH, G_P_MUL, G_P_SH, G_OW_MUL, G_OW_SH,
 G_S_MUL, G_S_SH, G_HW_MUL, G_HW_SH, G_W_MUL, G_W_SH) = range(32)
GEO_LEN = 32
GEO_SIG = f"UniTuple(int64, {GEO_LEN})"


def conv_geometry(x_shape, w_shape, stride, pad, groups, relu=False, splits=1, k_split=0):
    """The int64 tuple every conv kernel reads its sizes (and fast divisors) from."""
    n, c, h, w = (int(v) for v in x_shape)
    f, cg, kh, kw = (int(v) for v in w_shape)
    stride, pad, groups = int(stride), int(pad), int(groups)
    oh = (h + 2 * pad - kh) // stride + 1
    ow = (w + 2 * pad - kw) // stride + 1
    geo = [n, c, h, w, f, kh, kw, oh, ow, stride, pad, groups, cg, f // groups, cg * kh * kw,
           int(bool(relu)), splits, k_split]
    for d in (kh * kw, kw, oh * ow, ow, stride, h * w, w):
        geo.extend(gemm.magic_divider(d))
    assert len(geo) == GEO_LEN
    return tuple(geo)


# ---- shared loader pieces ------------------------------------------------------------

@cuda.jit(device=True, inline="always")
def fetch_runs(src, base, valid, run, period, run_mul, run_sh, k, k_end, buf):
    """buf[e] = src[base + q*period + r] with (q, r) = divmod(k + e, run), where valid and
    k + e < k_end, else 0: an operand row laid out as runs of ``run`` contiguous elements,
    one every ``period`` (> run) elements.  (run_mul, run_sh) = magic_divider(run).

    k is divided once; each next element steps the offset by one, jumping period - run at
    the end of a run.  run is an int32; the offset is carried in int32.
    """
    q = fast_div(k, run_mul, run_sh)
    r = int32(k - q * run)
    off = int32(base + q * period + r)
    jump = int32(period - run)
    left = int32(k_end - k)
    for e in range(buf.shape[0]):
        ok = valid & (int32(e) < left)
        v = src[uint64(off if ok else int32(0))]
        buf[e] = v if ok else float32(0.0)
        r = int32(r + int32(1))
        off = int32(off + int32(1))
        wrap = r == run
        r = int32(0) if wrap else r
        off = int32(off + jump) if wrap else off


@cuda.jit(device=True, inline="always")
def unravel3(i, rows, cols, cols_mul, cols_sh, plane_mul, plane_sh):
    """(a, b, c) with i = (a*rows + b)*cols + c, 0 <= i < 2**31, as int64; (plane_mul,
    plane_sh) and (cols_mul, cols_sh) are magic_divider(rows*cols) and magic_divider(cols)."""
    a = fast_div(i, plane_mul, plane_sh)
    r = i - a * rows * cols
    b = fast_div(r, cols_mul, cols_sh)
    return a, b, r - b * cols


@cuda.jit(device=True, inline="always")
def decode_tap(geo, k):
    """(c, kh, kw) of a tap index k = (c*KH + kh)*KW + kw; kh and kw as int32."""
    c, kh, kw = unravel3(k, geo[G_KH], geo[G_KW], geo[G_KW_MUL], geo[G_KW_SH],
                         geo[G_KK_MUL], geo[G_KK_SH])
    return c, int32(kh), int32(kw)


@cuda.jit(device=True, inline="always")
def decode_pixel(geo, n):
    """(image, oh, ow) of an output pixel index n = (image*OH + oh)*OW + ow."""
    return unravel3(n, geo[G_OH], geo[G_OW], geo[G_OW_MUL], geo[G_OW_SH], geo[G_P_MUL],
                    geo[G_P_SH])


@cuda.jit(device=True, inline="always")
def load_pixel(src, plane, row, col, hgt, wid, ok):
    """src[plane + row*wid + col] if ok and (row, col) lies in the hgt x wid plane, else 0;
    branch-free (a masked element reads offset 0 and is replaced).  int32 offsets."""
    ok = ok & inside(row, hgt) & inside(col, wid)
    v = src[uint64(int32(plane + row * wid + col) if ok else int32(0))]
    return v if ok else float32(0.0)


@cuda.jit(device=True, inline="always")
def next_pixel(ih, iw, plane, s, ih0, iw0, ih_end, iw_end, plane_step):
    """Step (ih, iw) by s along a row of a window scan: at iw_end back to iw0 and one row
    (s) down; at ih_end back to ih0 and plane_step on to the next plane.  All int32."""
    iw = int32(iw + s)
    wrap = iw == iw_end
    iw = iw0 if wrap else iw
    ih = int32(ih + s) if wrap else ih
    wrap = ih == ih_end
    ih = ih0 if wrap else ih
    plane = int32(plane + plane_step) if wrap else plane
    return ih, iw, plane


# ---- forward -------------------------------------------------------------------------
# lab:begin loaders.forward

@cuda.jit(device=True, inline="always")
def fwd_krange(geo, z):
    return 0, geo[G_KK]


@cuda.jit(device=True, inline="always")
def fwd_setup_w(w, geo, z, m):
    """Row m (filter m of group z) of A = w viewed as (F, Cg*KH*KW)."""
    return ((z * geo[G_FG] + m) * geo[G_KK], m < geo[G_FG])


@cuda.jit(device=True, inline="always")
def fwd_fetch_w(w, geo, st, k, step, k_end, buf):
    fetch_strided(w, st[0], 1, st[1], k, step, k_end, buf)


@cuda.jit(device=True, inline="always")
def fwd_setup_x(x, geo, z, n):
    """Column n = (image, oh, ow) of the implicit im2col matrix of x, group z:
    (offset of x[image, z*Cg, 0, 0], ih0 = oh*s-pad, iw0 = ow*s-pad, valid), int32."""
    valid = n < geo[G_N] * geo[G_OH] * geo[G_OW]
    img, oh, ow = decode_pixel(geo, n if valid else 0)
    ih0 = int32(oh * geo[G_S] - geo[G_PAD])
    iw0 = int32(ow * geo[G_S] - geo[G_PAD])
    base = int32((img * geo[G_C] + z * geo[G_CG]) * geo[G_H] * geo[G_W])
    return (base, ih0, iw0, valid)


@cuda.jit(device=True, inline="always")
def fwd_fetch_x(x, geo, st, k, step, k_end, buf):
    """x at rows k, k+1, ... = (c, kh, kw) of column st, 0 in the padding (step is 1).

    k is decoded once; each next row steps iw, carrying into ih and the channel plane.
    The carried indices are int32 (32-bit SASS arithmetic; tensors are < 2**31 elements).
    """
    hgt = int32(geo[G_H])
    wid = int32(geo[G_W])
    c, kh, kw = decode_tap(geo, k)
    ih = int32(st[1] + kh)
    iw = int32(st[2] + kw)
    ih_end = int32(st[1] + geo[G_KH])
    iw_end = int32(st[2] + geo[G_KW])
    plane = int32(st[0] + c * geo[G_H] * geo[G_W])
    left = int32(k_end - k)
    plane_step = int32(hgt * wid)
    for e in range(buf.shape[0]):
        buf[e] = load_pixel(x, plane, ih, iw, hgt, wid, st[3] & (int32(e) < left))
        ih, iw, plane = next_pixel(ih, iw, plane, int32(1), st[1], st[2], ih_end, iw_end,
                                   plane_step)


@cuda.jit(device=True, inline="always")
def fwd_store_y(y, b, geo, z, m, n, v):
    """y[img, z*Fg+m, oh, ow] = v + b (ReLU'd when asked), n = (img, oh, ow)."""
    p = int32(geo[G_OH] * geo[G_OW])
    if m < geo[G_FG] and n < geo[G_N] * p:
        f = int32(z * geo[G_FG] + m)
        img = int32(fast_div(n, geo[G_P_MUL], geo[G_P_SH]))
        v += b[uint64(f)]
        if geo[G_RELU] != 0 and v < float32(0.0):
            v = float32(0.0)
        y[uint64(int32(img * int32(geo[G_F] - 1) * p + f * p + n))] = v

# lab:end loaders.forward


# ---- backward data -----------------------------------------------------------------
# lab:begin loaders.backward_data

@cuda.jit(device=True, inline="always")
def bwd_data_krange(geo, z):
    return 0, geo[G_FG] * geo[G_KH] * geo[G_KW]


@cuda.jit(device=True, inline="always")
def bwd_data_setup_w(w, geo, z, m):
    """Row m (input channel m of group z) of A[c, (f,kh,kw)] = w[z*Fg+f, c, kh, kw]."""
    khkw = geo[G_KH] * geo[G_KW]
    return ((z * geo[G_FG] * geo[G_CG] + m) * khkw, m < geo[G_CG])


@cuda.jit(device=True, inline="always")
def bwd_data_fetch_w(w, geo, st, k, step, k_end, buf):
    """w at rows k, k+1, ... = (f, kh*KW+kw) of row st (step is 1): runs of KH*KW, then the
    next filter, Cg*KH*KW further on."""
    khkw = int32(geo[G_KH] * geo[G_KW])
    fetch_runs(w, st[0], st[1], khkw, geo[G_CG] * khkw, geo[G_KK_MUL], geo[G_KK_SH], k,
               k_end, buf)


@cuda.jit(device=True, inline="always")
def bwd_data_setup_dy(dy, geo, z, n):
    """Column n = (image, h, w) of B[(f,kh,kw), (image,h,w)] = dy[image, z*Fg+f, oh, ow]:
    (offset of dy[image, z*Fg, 0, 0], th = h+pad, tw = w+pad, th // s, th % s, tw // s,
    tw % s, valid), int32."""
    s = geo[G_S]
    valid = n < geo[G_N] * geo[G_H] * geo[G_W]
    img, h, w = unravel3(n if valid else 0, geo[G_H], geo[G_W], geo[G_W_MUL], geo[G_W_SH],
                         geo[G_HW_MUL], geo[G_HW_SH])
    th = h + geo[G_PAD]
    tw = w + geo[G_PAD]
    qh = fast_div(th, geo[G_S_MUL], geo[G_S_SH])
    qw = fast_div(tw, geo[G_S_MUL], geo[G_S_SH])
    base = int32((img * geo[G_F] + z * geo[G_FG]) * geo[G_OH] * geo[G_OW])
    return (base, int32(th), int32(tw), int32(qh), int32(th - qh * s), int32(qw),
            int32(tw - qw * s), valid)


@cuda.jit(device=True, inline="always")
def bwd_data_fetch_dy(dy, geo, st, k, step, k_end, buf):
    """dy[image, f, oh, ow] at rows k, k+1, ... = (f, kh, kw) (step is 1), where
    (th - kh, tw - kw) = s*(oh, ow) exactly, inside dy; 0 elsewhere.

    th - kh is tracked as oh*s + rh (likewise tw - kw): each step of kw lowers rw by one,
    borrowing from ow, and a row wrap resets it, so no division runs per element.
    """
    s = int32(geo[G_S])
    kwid = int32(geo[G_KW])
    khgt = int32(geo[G_KH])
    ohgt = int32(geo[G_OH])
    owid = int32(geo[G_OW])
    f, kh, kw = decode_tap(geo, k)
    th = st[1] - kh
    tw = st[2] - kw
    oh = int32(fast_div(th if th > 0 else 0, geo[G_S_MUL], geo[G_S_SH]))
    ow = int32(fast_div(tw if tw > 0 else 0, geo[G_S_MUL], geo[G_S_SH]))
    rh = int32(th - oh * s)
    rw = int32(tw - ow * s)
    plane = int32(st[0] + f * geo[G_OH] * geo[G_OW])
    left = int32(k_end - k)
    for e in range(buf.shape[0]):
        buf[e] = load_pixel(dy, plane, oh, ow, ohgt, owid,
                            st[7] & (int32(e) < left) & ((rh | rw) == 0))
        # next kw: tw - kw drops by one
        kw = int32(kw + int32(1))
        rw = int32(rw - int32(1))
        borrow = rw < 0
        rw = int32(rw + s) if borrow else rw
        ow = int32(ow - int32(1)) if borrow else ow
        wrap = kw == kwid                  # next kh: reset the w side, th - kh drops by one
        kw = int32(0) if wrap else kw
        ow = st[5] if wrap else ow
        rw = st[6] if wrap else rw
        kh = int32(kh + int32(1)) if wrap else kh
        rh = int32(rh - int32(1)) if wrap else rh
        borrow = rh < 0
        rh = int32(rh + s) if borrow else rh
        oh = int32(oh - int32(1)) if borrow else oh
        wrap = kh == khgt                  # next filter: reset the h side
        kh = int32(0) if wrap else kh
        oh = st[3] if wrap else oh
        rh = st[4] if wrap else rh
        plane = int32(plane + ohgt * owid) if wrap else plane


@cuda.jit(device=True, inline="always")
def bwd_data_fetch_dy_unit_stride(dy, geo, st, k, step, k_end, buf):
    """:func:`bwd_data_fetch_dy` for stride 1, where (oh, ow) = (th - kh, tw - kw) and every
    step of kw just lowers ow by one."""
    kwid = int32(geo[G_KW])
    khgt = int32(geo[G_KH])
    ohgt = int32(geo[G_OH])
    owid = int32(geo[G_OW])
    f, kh, kw = decode_tap(geo, k)
    oh = int32(st[1] - kh)
    ow = int32(st[2] - kw)
    plane = int32(st[0] + f * geo[G_OH] * geo[G_OW])
    left = int32(k_end - k)
    for e in range(buf.shape[0]):
        buf[e] = load_pixel(dy, plane, oh, ow, ohgt, owid, st[7] & (int32(e) < left))
        kw = int32(kw + int32(1))
        ow = int32(ow - int32(1))
        wrap = kw == kwid                  # next kh: reset ow, oh drops by one
        kw = int32(0) if wrap else kw
        ow = st[2] if wrap else ow
        kh = int32(kh + int32(1)) if wrap else kh
        oh = int32(oh - int32(1)) if wrap else oh
        wrap = kh == khgt                  # next filter: reset oh
        kh = int32(0) if wrap else kh
        oh = st[1] if wrap else oh
        plane = int32(plane + ohgt * owid) if wrap else plane


@cuda.jit(device=True, inline="always")
def bwd_data_store_dx(dx, unused, geo, z, m, n, v):
    """dx[image, z*Cg+m, h, w] = v, n = (image, h, w)."""
    hw = geo[G_H] * geo[G_W]
    if m < geo[G_CG] and n < geo[G_N] * hw:
        img = fast_div(n, geo[G_HW_MUL], geo[G_HW_SH])
        dx[uint64((img * geo[G_C] + z * geo[G_CG] + m) * hw + n - img * hw)] = v

# lab:end loaders.backward_data


# ---- backward weights --------------------------------------------------------------
# lab:begin loaders.backward_weights

@cuda.jit(device=True, inline="always")
def bwd_w_krange(geo, z):
    """Split z // groups of the K = N*OH*OW reduction: [s*k_split, min((s+1)*k_split, K))."""
    split = z // geo[G_GROUPS]
    total = geo[G_N] * geo[G_OH] * geo[G_OW]
    begin = split * geo[G_KSPLIT]
    end = begin + geo[G_KSPLIT]
    return begin, (end if end < total else total)


@cuda.jit(device=True, inline="always")
def bwd_w_setup_dy(dy, geo, z, m):
    """Row m (filter m of group z % groups) of A[f, (image,oh,ow)] = dy[image, g*Fg+f, oh, ow]:
    (offset of dy[0, g*Fg+m, 0, 0] as int32, valid)."""
    g = z % geo[G_GROUPS]
    return (int32((g * geo[G_FG] + m) * geo[G_OH] * geo[G_OW]), m < geo[G_FG])


@cuda.jit(device=True, inline="always")
def bwd_w_fetch_dy(dy, geo, st, k, step, k_end, buf):
    """dy at rows k, k+1, ... = (image, oh*OW+ow) of row st (step is 1): runs of OH*OW, then
    the next image, F*OH*OW further on.

    k is divided once, in 32 bits; each next element steps the offset by one, jumping
    (F-1)*OH*OW at the end of a run.  All indices are int32.  (fetch_runs' walk, written
    out: calling fetch_runs costs this kernel 16 bytes of spill at 128 registers.)
    """
    p = int32(geo[G_OH] * geo[G_OW])
    left = int32(k_end - k)
    k = int32(k)
    img = fast_div32(k, geo[G_P_MUL], geo[G_P_SH])
    r = int32(k - img * p)
    jump = int32(int32(geo[G_F] - 1) * p)
    off = int32(st[0] + k + img * jump)
    for e in range(buf.shape[0]):
        ok = st[1] & (int32(e) < left)
        v = dy[uint64(off if ok else int32(0))]
        buf[e] = v if ok else float32(0.0)
        r = int32(r + int32(1))
        off = int32(off + int32(1))
        wrap = r == p
        r = int32(0) if wrap else r
        off = int32(off + jump) if wrap else off


@cuda.jit(device=True, inline="always")
def bwd_w_setup_x(x, geo, z, n):
    """Column n = (c, kh, kw) of B[(image,oh,ow), (c,kh,kw)] = x[image, g*Cg+c, ih, iw]:
    (offset of x[0, g*Cg+c, 0, 0], kh-pad, kw-pad, n is a tap, n is the ones column), with
    the offsets int32.  Column Cg*KH*KW is all ones, so that C's last column is db."""
    g = z % geo[G_GROUPS]
    valid = n < geo[G_KK]
    c, kh, kw = decode_tap(geo, n if valid else 0)
    dh = int32(kh - geo[G_PAD])
    dw = int32(kw - geo[G_PAD])
    base = int32((g * geo[G_CG] + c) * geo[G_H] * geo[G_W])
    return (base, dh, dw, valid, n == geo[G_KK])


@cuda.jit(device=True, inline="always")
def bwd_w_fetch_x(x, geo, st, k, step, k_end, buf):
    """x[image, c, oh*s+kh-pad, ow*s+kw-pad] at rows k, k+1, ... = (image, oh, ow) (step is
    1), 0 in the padding.

    k is decoded once, in 32 bits; each next row steps ow, carrying into oh and the image.
    (ih, iw) are recomputed from (oh, ow) per row, so that the wraps compare against OW and
    OH, the same for every thread, rather than against per-thread ends that would stay in
    registers across the K loop.  All indices are int32.
    """
    s = int32(geo[G_S])
    hgt = int32(geo[G_H])
    wid = int32(geo[G_W])
    ohgt = int32(geo[G_OH])
    owid = int32(geo[G_OW])
    image = int32(geo[G_C] * geo[G_H] * geo[G_W])
    left = int32(k_end - k)
    k = int32(k)
    img = fast_div32(k, geo[G_P_MUL], geo[G_P_SH])
    pix = int32(k - img * int32(geo[G_OH] * geo[G_OW]))
    oh = fast_div32(pix, geo[G_OW_MUL], geo[G_OW_SH])
    ow = int32(pix - oh * owid)
    plane = int32(st[0] + img * image)
    for e in range(buf.shape[0]):
        inl = int32(e) < left
        v = load_pixel(x, plane, int32(oh * s + st[1]), int32(ow * s + st[2]), hgt, wid,
                       st[3] & inl)
        buf[e] = float32(1.0) if st[4] & inl else v
        ow = int32(ow + int32(1))
        wrap = ow == owid
        ow = int32(0) if wrap else ow
        oh = int32(oh + int32(1)) if wrap else oh
        wrap = oh == ohgt
        oh = int32(0) if wrap else oh
        plane = int32(plane + image) if wrap else plane


@cuda.jit(device=True, inline="always")
def bwd_w_store_dw(dw, db, geo, z, m, n, v):
    """dw[s, g*Fg+m, n] = v, or db[s, g*Fg+m] = v for the ones column n = Cg*KH*KW, where
    g = z % groups and s = z // groups is the K slice: with split-K, dw and db are the
    workspace's (splits, F*Cg*KH*KW) and (splits, F) slices; unsplit, dw and db themselves."""
    if m < geo[G_FG] and n <= geo[G_KK]:
        split = int32(z // geo[G_GROUPS])
        row = int32(split * geo[G_F] + z % geo[G_GROUPS] * geo[G_FG] + m)
        if n < geo[G_KK]:
            dw[uint64(int32(row * int32(geo[G_KK]) + n))] = v
        else:
            db[uint64(row)] = v
# lab:end loaders.backward_weights
