"""PyTorch's equivalent of each lab launcher, for the GPU leg's third timing column.

``prepare(launcher, t, params)`` takes the case's arrays as torch tensors (``t``: name ->
tensor, on any device) and the shape's ``params`` (:mod:`nbalex.labs.alexnet_shapes`), does
what is set up once (an autograd graph, an optimizer, indices in PyTorch's format), and
returns a callable that runs PyTorch's op once and returns {name: tensor} of what it
computed under the package's names (sgd: {"w": the updated tensors, in order}).  The ops are PyTorch's own (cuDNN and cuBLAS on a GPU):

relu: ``F.relu`` and ``aten.threshold_backward``; dropout: ``F.dropout`` and
``aten.native_dropout_backward`` (PyTorch's own random numbers); maxpool:
``aten.max_pool2d_with_indices`` and its backward (on the case's argmax); lrn: ``F.local_response_norm`` (alpha
times the window size: PyTorch divides alpha by it, the paper does not) and its autograd
backward; softmax_xent: ``softmax`` with ``cross_entropy(reduction="none")`` and the
autograd backward of the mean loss; sgd: ``torch.optim.SGD`` (momentum, weight decay per
tensor group) over the tensors; sgemm: ``torch.mm``; conv2d: ``F.conv2d`` (then ``relu_``)
and ``aten.convolution_backward``.  Dropout's and SGD's values differ from the package's by
design (other random numbers; PyTorch's momentum is the package's divided by -lr), so only
their cost is comparable.
"""


def _torch():
    import torch
    import torch.nn.functional as F
    return torch, F


def relu_forward(t, params):
    torch, F = _torch()
    return lambda: {"y": F.relu(t["x"])}


def relu_backward(t, params):
    torch, _ = _torch()
    return lambda: {"dx": torch.ops.aten.threshold_backward(t["dy"], t["y"], 0)}


def dropout_forward(t, params):
    _, F = _torch()
    return lambda: {"y": F.dropout(t["x"], params["p"], training=True)}


def dropout_backward(t, params):
    torch, _ = _torch()
    keep = t["mask"].bool()
    scale = 1.0 / (1.0 - params["p"])
    return lambda: {"dx": torch.ops.aten.native_dropout_backward(t["dy"], keep, scale)}


def _pool_args(params):
    return [params["size"]] * 2, [params["stride"]] * 2, [0, 0], [1, 1], False


def maxpool_forward(t, params):
    torch, _ = _torch()

    def run():
        y, idx = torch.ops.aten.max_pool2d_with_indices(t["x"], *_pool_args(params))
        return {"y": y, "idx": idx}
    return run


def maxpool_backward(t, params):
    torch, _ = _torch()
    x = torch.empty(t["dx"].shape, device=t["dx"].device)      # only its shape is read
    idx = t["idx"].long()                # the same flat positions in each plane, in int64
    return lambda: {"dx": torch.ops.aten.max_pool2d_with_indices_backward(
        t["dy"], x, *_pool_args(params), idx)}


def _lrn(x, params):
    _, F = _torch()
    return F.local_response_norm(x, params["size"], alpha=params["alpha"] * params["size"],
                                 beta=params["beta"], k=params["k"])


def lrn_forward(t, params):
    return lambda: {"y": _lrn(t["x"], params)}


def lrn_backward(t, params):
    torch, _ = _torch()
    x = t["x"].detach().clone().requires_grad_(True)
    y = _lrn(x, params)
    return lambda: {"dx": torch.autograd.grad(y, x, t["dy"], retain_graph=True)[0]}


def softmax_xent_forward(t, params):
    torch, F = _torch()
    labels = t["labels"].long()
    return lambda: {"probs": torch.softmax(t["logits"], dim=1),
                    "losses": F.cross_entropy(t["logits"], labels, reduction="none")}


def softmax_xent_backward(t, params):
    torch, F = _torch()
    logits = torch.log(t["probs"]).detach().requires_grad_(True)
    loss = F.cross_entropy(logits, t["labels"].long())
    return lambda: {"dlogits": torch.autograd.grad(loss, logits, retain_graph=True)[0]}


def sgd_update(t, params):
    torch, _ = _torch()
    lr, momentum, decay = params["hyper"]
    bounds = list(zip(params["offsets"], params["offsets"][1:]))
    groups, ps = {}, []
    for (a, b), lr_mult, decay_mult in zip(bounds, params["lr_mults"], params["decay_mults"]):
        p = torch.nn.Parameter(t["w"][a:b].clone())
        p.grad = t["dw"][a:b].clone()
        groups.setdefault((lr_mult, decay_mult), []).append(p)
        ps.append(p)
    opt = torch.optim.SGD([{"params": ps, "lr": lr * lm, "weight_decay": decay * dm}
                           for (lm, dm), ps in groups.items()], lr=lr, momentum=momentum)

    def run():
        opt.step()
        return {"w": ps}
    return run


def sgemm(t, params):
    torch, _ = _torch()
    return lambda: {"c": torch.mm(t["a"], t["b"])}


def conv2d_forward(t, params):
    _, F = _torch()

    def run():
        y = F.conv2d(t["x"], t["w"], t["b"], params["stride"], params["pad"], 1,
                     params["groups"])
        return {"y": y.relu_() if params["relu"] else y}
    return run


def _conv_backward(t, params, x, w, mask):
    torch, _ = _torch()
    s, p = params["stride"], params["pad"]
    return torch.ops.aten.convolution_backward(t["dy"], x, w, [w.shape[0]], [s, s], [p, p],
                                               [1, 1], False, [0, 0], params["groups"], mask)


def conv2d_backward_data(t, params):
    torch, _ = _torch()
    x = torch.empty(t["dx"].shape, device=t["dx"].device)
    return lambda: {"dx": _conv_backward(t, params, x, t["w"], [True, False, False])[0]}


def conv2d_backward_weights(t, params):
    def run():
        _, dw, db = _conv_backward(t, params, t["x"], t["dw"], [False, True, True])
        return {"dw": dw, "db": db}
    return run


def prepare(launcher, t, params):
    """PyTorch's op for ``launcher`` on tensors ``t`` (see the module docstring)."""
    return globals()[launcher](t, params)


def unavailable():
    """None when PyTorch can run on a CUDA GPU here, else why not (one line)."""
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed"
    if not torch.cuda.is_available():
        return f"PyTorch {torch.__version__} sees no CUDA GPU"
    return None
