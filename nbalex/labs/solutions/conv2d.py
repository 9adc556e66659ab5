"""2-D convolution with groups as three implicit GEMMs, one thread per element of C.

The first rung of the package's convolution (:mod:`nbalex.cuda.conv2d`): the same GEMM view
of each pass, the same grid (x: a column of C, y: a row of C, z: the group), the same index
math, without the tiles.  No im2col matrix is written: a thread decodes each index of its K
loop and gathers the operands straight from ``x``, ``w`` or ``dy``.  Per group g, with
``Cg = C/groups``, ``Fg = F/groups``, ``s = stride``:

* forward:          C[f, (n,oh,ow)] = sum_{(c,kh,kw)} w[g*Fg+f, c, kh, kw] * x[n, g*Cg+c, oh*s-pad+kh, ow*s-pad+kw]
* backward-data:    C[c, (n,h,w)] = sum_{(f,kh,kw)} w[g*Fg+f, c, kh, kw] * dy[n, g*Fg+f, oh, ow]
                    where (h+pad-kh, w+pad-kw) = s*(oh, ow) exactly, inside dy
* backward-weights: C[f, (c,kh,kw)] = sum_{(n,oh,ow)} dy[n, g*Fg+f, oh, ow] * x[n, g*Cg+c, oh*s-pad+kh, ow*s-pad+kw]
                    plus one more column of C, (c,kh,kw) = Cg*KH*KW, that is db[f] = sum dy

Positions outside x (the padding) read 0.  Each pass lists its kernel for ``nbalex lab check
--static`` in its own ``*_SIGNATURES`` (a lab's starter holds one pass).
"""

# lab:begin conv2d.imports
from numba import cuda, float32

from nbalex.cuda.launch import stream_or_default

TILE = 16
"""Threads per block along x (columns of C) and y (rows of C)."""


def _grid(rows, cols, groups):
    return ((cols + TILE - 1) // TILE, (rows + TILE - 1) // TILE, groups)
# lab:end conv2d.imports


# lab:begin conv2d.forward_kernel
@cuda.jit
def conv_forward_kernel(y, x, w, b, stride, pad, relu):
    """y[n, g*Fg+f, oh, ow] = b[g*Fg+f] + sum over k = (c, kh, kw) of
    w[g*Fg+f, c, kh, kw] * x[n, g*Cg+c, oh*stride-pad+kh, ow*stride-pad+kw] (0 outside x),
    summed in k order in float32, then max(., 0) when relu.

    y (N, F, OH, OW) written, x (N, C, H, W), w (F, Cg, KH, KW), b (F,), float32.  Grid
    (ceil(N*OH*OW/TILE), ceil(Fg/TILE), groups), TILE x TILE threads: the thread at
    cuda.grid(2) = (col, row) in block z computes filter f = row of group g = z for the output
    pixel col = (n*OH + oh)*OW + ow; threads past Fg or N*OH*OW do nothing.
    """
    # lab:end conv2d.forward_kernel
    col, row = cuda.grid(2)
    g = cuda.blockIdx.z
    groups = cuda.gridDim.z
    batch, channels, hgt, wid = x.shape
    filters, cg, khgt, kwid = w.shape
    ohgt, owid = y.shape[2], y.shape[3]
    fg = filters // groups
    if row < fg and col < batch * ohgt * owid:
        n = col // (ohgt * owid)
        oh = col % (ohgt * owid) // owid
        ow = col % owid
        f = g * fg + row
        acc = float32(0.0)
        for k in range(cg * khgt * kwid):
            c = k // (khgt * kwid)
            kh = k % (khgt * kwid) // kwid
            kw = k % kwid
            ih = oh * stride - pad + kh
            iw = ow * stride - pad + kw
            if 0 <= ih and ih < hgt and 0 <= iw and iw < wid:
                acc += w[f, c, kh, kw] * x[n, g * cg + c, ih, iw]
        acc += b[f]
        if relu and acc < float32(0.0):
            acc = float32(0.0)
        y[n, f, oh, ow] = acc


# lab:begin conv2d.forward_launcher
FORWARD_SIGNATURES = [
    (conv_forward_kernel, "void(float32[:, :, :, ::1], float32[:, :, :, ::1], "
     "float32[:, :, :, ::1], float32[::1], int64, int64, boolean)", True, TILE * TILE)]


def conv2d_workspace_size(x_shape, w_shape, stride, pad, groups):
    """float32 elements of workspace the launchers need: none (0)."""
    return 0


def conv2d_forward(y, x, w, b, stride, pad, groups, relu=False, workspace=None, stream=None):
    """y (N,F,OH,OW) = conv(x, w) + b, ReLU'd when ``relu``; float32, C-contiguous."""
    n, f, oh, ow = y.shape
    conv_forward_kernel[_grid(f // groups, n * oh * ow, groups), (TILE, TILE),
                        stream_or_default(stream)](y, x, w, b, stride, pad, bool(relu))
# lab:end conv2d.forward_launcher


# lab:begin conv2d.backward_data_kernel
@cuda.jit
def conv_backward_data_kernel(dx, dy, w, stride, pad):
    """dx[n, g*Cg+c, h, w] = sum over k = (f, kh, kw) of w[g*Fg+f, c, kh, kw] *
    dy[n, g*Fg+f, oh, ow], where oh = (h+pad-kh)/stride and ow = (w+pad-kw)/stride divide
    exactly and lie inside dy (other k add nothing), summed in k order in float32.

    dx (N, C, H, W) written, dy (N, F, OH, OW), w (F, Cg, KH, KW), float32.  Grid
    (ceil(N*H*W/TILE), ceil(Cg/TILE), groups), TILE x TILE threads: the thread at
    cuda.grid(2) = (col, row) in block z computes input channel c = row of group g = z at
    the input pixel col = (n*H + h)*W + w; threads past Cg or N*H*W do nothing.
    """
    # lab:end conv2d.backward_data_kernel
    col, row = cuda.grid(2)
    g = cuda.blockIdx.z
    groups = cuda.gridDim.z
    batch, channels, hgt, wid = dx.shape
    filters, cg, khgt, kwid = w.shape
    ohgt, owid = dy.shape[2], dy.shape[3]
    fg = filters // groups
    if row < cg and col < batch * hgt * wid:
        n = col // (hgt * wid)
        h = col % (hgt * wid) // wid
        x_w = col % wid
        acc = float32(0.0)
        for k in range(fg * khgt * kwid):
            f = g * fg + k // (khgt * kwid)
            kh = k % (khgt * kwid) // kwid
            kw = k % kwid
            th = h + pad - kh
            tw = x_w + pad - kw
            if th >= 0 and tw >= 0 and th % stride == 0 and tw % stride == 0:
                oh = th // stride
                ow = tw // stride
                if oh < ohgt and ow < owid:
                    acc += w[f, row, kh, kw] * dy[n, f, oh, ow]
        dx[n, g * cg + row, h, x_w] = acc


# lab:begin conv2d.backward_data_launcher
BACKWARD_DATA_SIGNATURES = [
    (conv_backward_data_kernel, "void(float32[:, :, :, ::1], float32[:, :, :, ::1], "
     "float32[:, :, :, ::1], int64, int64)", True, TILE * TILE)]


def conv2d_backward_data(dx, dy, w, stride, pad, groups, workspace=None, stream=None):
    """dx (N,C,H,W) = gradient of the convolution w.r.t. x, given dy (N,F,OH,OW); overwritten."""
    n, c, h, wid = dx.shape
    conv_backward_data_kernel[_grid(c // groups, n * h * wid, groups), (TILE, TILE),
                              stream_or_default(stream)](dx, dy, w, stride, pad)
# lab:end conv2d.backward_data_launcher


# lab:begin conv2d.backward_weights_kernel
@cuda.jit
def conv_backward_weights_kernel(dw, db, dy, x, stride, pad):
    """dw[g*Fg+f, c, kh, kw] = sum over k = (n, oh, ow) of dy[n, g*Fg+f, oh, ow] *
    x[n, g*Cg+c, oh*stride-pad+kh, ow*stride-pad+kw] (0 outside x), and db[g*Fg+f] = the sum
    of dy[n, g*Fg+f, oh, ow] over the same k: both summed in k order in float32.

    dw (F, Cg, KH, KW) and db (F,) written, dy (N, F, OH, OW), x (N, C, H, W), float32.  Grid
    (ceil((Cg*KH*KW + 1)/TILE), ceil(Fg/TILE), groups), TILE x TILE threads: the thread at
    cuda.grid(2) = (col, row) in block z computes filter f = row of group g = z at the tap
    col = (c*KH + kh)*KW + kw, or db[f] for the extra column col = Cg*KH*KW (a column of
    ones in im2col(x)); threads past Fg or Cg*KH*KW + 1 do nothing.
    """
    # lab:end conv2d.backward_weights_kernel
    col, row = cuda.grid(2)
    g = cuda.blockIdx.z
    groups = cuda.gridDim.z
    batch, channels, hgt, wid = x.shape
    filters, cg, khgt, kwid = dw.shape
    ohgt, owid = dy.shape[2], dy.shape[3]
    fg = filters // groups
    taps = cg * khgt * kwid
    if row < fg and col <= taps:
        f = g * fg + row
        c = col // (khgt * kwid)
        kh = col % (khgt * kwid) // kwid
        kw = col % kwid
        acc = float32(0.0)
        for k in range(batch * ohgt * owid):
            n = k // (ohgt * owid)
            oh = k % (ohgt * owid) // owid
            ow = k % owid
            if col == taps:
                acc += dy[n, f, oh, ow]
            else:
                ih = oh * stride - pad + kh
                iw = ow * stride - pad + kw
                if 0 <= ih and ih < hgt and 0 <= iw and iw < wid:
                    acc += dy[n, f, oh, ow] * x[n, g * cg + c, ih, iw]
        if col == taps:
            db[f] = acc
        else:
            dw[f, c, kh, kw] = acc


# lab:begin conv2d.backward_weights_launcher
BACKWARD_WEIGHTS_SIGNATURES = [
    (conv_backward_weights_kernel, "void(float32[:, :, :, ::1], float32[::1], "
     "float32[:, :, :, ::1], float32[:, :, :, ::1], int64, int64)", True, TILE * TILE)]


def conv2d_backward_weights(dw, db, dy, x, stride, pad, groups, workspace=None, stream=None):
    """dw (F,C/G,KH,KW) and db (F,) = gradients w.r.t. w and b; both overwritten."""
    f, cg, kh, kw = dw.shape
    conv_backward_weights_kernel[_grid(f // groups, cg * kh * kw + 1, groups), (TILE, TILE),
                                 stream_or_default(stream)](dw, db, dy, x, stride, pad)
# lab:end conv2d.backward_weights_launcher
