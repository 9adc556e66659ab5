"""The peers our kernels are timed against: PyTorch (CPU or GPU) and plain NumPy.

Each peer function takes a layer spec (:class:`nbalex.benchmarks.kernels.LayerSpec`), the
pass name and a dict of input tensors, and returns a zero-argument callable that runs the
pass and returns its outputs as a dict named like the launcher's outputs (``y``, ``dx``,
``dw``, ``db``, ...), so a test can check a peer against the reference exactly as the
kernels are checked.

On a GPU the PyTorch peer uses cuDNN and cuBLAS with TF32 switched off (the comparison is
float32 against float32). The NumPy peer exists for conv (a plain im2col + one matmul per
group) and fc (one matmul) only.
"""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K = 5, 1e-4, 0.75, 2.0
POOL_SIZE, POOL_STRIDE = 3, 2
DROPOUT_P = 0.5
SGD_LR, SGD_MOMENTUM, SGD_DECAY = 0.01, 0.9, 5e-4


def torch_device(backend):
    """The torch device that matches our backend ('cuda' on a GPU), with TF32 off."""
    import torch

    if backend == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        return torch.device("cuda")
    return torch.device("cpu")


def to_torch(arrays, device):
    """NumPy dict -> torch dict on ``device`` (int32 labels become int64, as torch wants)."""
    import torch

    out = {}
    for name, a in arrays.items():
        t = torch.from_numpy(np.ascontiguousarray(a)).to(device)
        out[name] = t.long() if name == "labels" else t
    return out


def torch_pass(spec, pass_name, t):
    """A callable running ``pass_name`` of layer ``spec`` in PyTorch on tensors ``t``."""
    import torch
    import torch.nn.functional as F

    kind = spec.kind
    if kind == "conv":
        s, p, g = spec.stride, spec.pad, spec.groups
        if pass_name == "forward":
            return lambda: {"y": F.conv2d(t["x"], t["w"], t["b"], s, p, 1, g)}
        if pass_name == "backward-data":
            return lambda: {"dx": torch.nn.grad.conv2d_input(t["x"].shape, t["w"], t["dy"], s, p, 1, g)}
        return lambda: {"dw": torch.nn.grad.conv2d_weight(t["x"], t["w"].shape, t["dy"], s, p, 1, g),
                        "db": t["dy"].sum((0, 2, 3))}
    if kind == "fc":
        if pass_name == "forward":
            return lambda: {"y": F.linear(t["x"], t["w"], t["b"])}
        if pass_name == "backward-data":
            return lambda: {"dx": t["dy"] @ t["w"]}
        return lambda: {"dw": t["dy"].t() @ t["x"], "db": t["dy"].sum(0)}
    if kind == "relu":
        if pass_name == "forward":
            return lambda: {"y": torch.relu(t["x"])}
        y = torch.relu(t["x"])
        return lambda: {"dx": torch.ops.aten.threshold_backward(t["dy"], y, 0.0)}
    if kind == "lrn":
        def lrn(x):
            return F.local_response_norm(x, LRN_SIZE, alpha=LRN_ALPHA * LRN_SIZE, beta=LRN_BETA, k=LRN_K)
        if pass_name == "forward":
            return lambda: {"y": lrn(t["x"])}
        x = t["x"].clone().requires_grad_(True)
        y = lrn(x)
        return lambda: {"dx": torch.autograd.grad(y, x, t["dy"], retain_graph=True)[0]}
    if kind == "pool":
        if pass_name == "forward":
            def forward():
                y, idx = F.max_pool2d(t["x"], POOL_SIZE, POOL_STRIDE, return_indices=True)
                return {"y": y, "idx": idx}
            return forward
        _, idx = F.max_pool2d(t["x"], POOL_SIZE, POOL_STRIDE, return_indices=True)
        k, st = [POOL_SIZE] * 2, [POOL_STRIDE] * 2
        return lambda: {"dx": torch.ops.aten.max_pool2d_with_indices_backward(
            t["dy"], t["x"], k, st, [0, 0], [1, 1], False, idx)}
    if kind == "dropout":
        if pass_name == "forward":
            def forward():
                y, mask = torch.ops.aten.native_dropout(t["x"], DROPOUT_P, True)
                return {"y": y, "mask": mask}
            return forward
        _, mask = torch.ops.aten.native_dropout(t["x"], DROPOUT_P, True)
        scale = 1.0 / (1.0 - DROPOUT_P)
        return lambda: {"dx": torch.ops.aten.native_dropout_backward(t["dy"], mask, scale)}
    if kind == "softmax-xent":
        if pass_name == "forward":
            def forward():
                logp = torch.log_softmax(t["logits"], 1)
                return {"losses": F.nll_loss(logp, t["labels"], reduction="none"), "probs": logp.exp()}
            return forward
        logits = t["logits"].clone().requires_grad_(True)
        loss = F.cross_entropy(logits, t["labels"])
        return lambda: {"dlogits": torch.autograd.grad(loss, logits, retain_graph=True)[0]}
    if kind == "sgd":
        w = torch.nn.Parameter(t["w"].clone())
        w.grad = t["dw"].clone()
        opt = _torch_sgd(w)

        def step():
            opt.step()
            return {"w": w.detach()}
        return step
    raise ValueError(f"no PyTorch peer for layer kind {kind!r}")


def _torch_sgd(w):
    """PyTorch's SGD with the paper's momentum and decay; the fused kernel where it exists."""
    import torch

    kwargs = dict(lr=SGD_LR, momentum=SGD_MOMENTUM, weight_decay=SGD_DECAY)
    try:
        return torch.optim.SGD([w], fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.SGD([w], **kwargs)


# ---------------------------------------------------------------------------------------------
# NumPy: im2col + matmul for conv, matmul for fc.

def numpy_pass(spec, pass_name, a):
    """A callable running ``pass_name`` of a conv or fc layer in NumPy, or None (no peer)."""
    if spec.kind == "fc":
        if pass_name == "forward":
            return lambda: {"y": a["x"] @ a["w"].T + a["b"]}
        if pass_name == "backward-data":
            return lambda: {"dx": a["dy"] @ a["w"]}
        return lambda: {"dw": a["dy"].T @ a["x"], "db": a["dy"].sum(0)}
    if spec.kind == "conv":
        fn = {"forward": _conv_forward, "backward-data": _conv_backward_data,
              "backward-weights": _conv_backward_weights}[pass_name]
        return lambda: fn(spec, a)
    return None


def _columns(x, k, stride, pad, c0, c1):
    """im2col of channels [c0, c1): a (N*OH*OW, (c1-c0)*k*k) copy, rows in (n, i, j) order."""
    xp = np.pad(x[:, c0:c1], ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    win = sliding_window_view(xp, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
    n, c, oh, ow = win.shape[:4]
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, c * k * k)


def _conv_forward(spec, a):
    x, w, b = a["x"], a["w"], a["b"]
    g, k = spec.groups, spec.kernel
    n = x.shape[0]
    f, oh, ow = spec.out_shape
    cg, fg = x.shape[1] // g, f // g
    y = np.empty((n, f, oh, ow), dtype=x.dtype)
    for gi in range(g):
        cols = _columns(x, k, spec.stride, spec.pad, gi * cg, (gi + 1) * cg)
        out = cols @ w[gi * fg:(gi + 1) * fg].reshape(fg, -1).T          # (N*OH*OW, Fg)
        y[:, gi * fg:(gi + 1) * fg] = out.reshape(n, oh, ow, fg).transpose(0, 3, 1, 2)
    y += b[None, :, None, None]
    return {"y": y}


def _dy_rows(dy, f0, f1):
    """dy channels [f0, f1) as (N*OH*OW, f1-f0), rows in (n, i, j) order."""
    part = dy[:, f0:f1]
    return part.transpose(0, 2, 3, 1).reshape(-1, f1 - f0)


def _conv_backward_data(spec, a):
    dy, w = a["dy"], a["w"]
    g, k, s, p = spec.groups, spec.kernel, spec.stride, spec.pad
    n, f, oh, ow = dy.shape
    c, h, wd = spec.in_shape
    cg, fg = c // g, f // g
    dxp = np.zeros((n, c, h + 2 * p, wd + 2 * p), dtype=dy.dtype)
    for gi in range(g):
        dcols = _dy_rows(dy, gi * fg, (gi + 1) * fg) @ w[gi * fg:(gi + 1) * fg].reshape(fg, -1)
        dcols = dcols.reshape(n, oh, ow, cg, k, k)
        for i in range(k):          # col2im: scatter each filter tap back where it was read
            for j in range(k):
                dxp[:, gi * cg:(gi + 1) * cg, i:i + s * oh:s, j:j + s * ow:s] += \
                    dcols[:, :, :, :, i, j].transpose(0, 3, 1, 2)
    return {"dx": dxp[:, :, p:p + h, p:p + wd]}


def _conv_backward_weights(spec, a):
    dy, x = a["dy"], a["x"]
    g, k = spec.groups, spec.kernel
    f = dy.shape[1]
    cg, fg = x.shape[1] // g, f // g
    dw = np.empty((f, cg, k, k), dtype=x.dtype)
    for gi in range(g):
        cols = _columns(x, k, spec.stride, spec.pad, gi * cg, (gi + 1) * cg)
        dw[gi * fg:(gi + 1) * fg] = (_dy_rows(dy, gi * fg, (gi + 1) * fg).T @ cols).reshape(fg, cg, k, k)
    return {"dw": dw, "db": dy.sum((0, 2, 3))}
