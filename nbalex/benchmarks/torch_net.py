"""PyTorch's version of a config's network: the peer of ``nbalex bench train`` and ``bench/bench_cpu.py``.

Built from the same checked layer specs (:func:`nbalex.config.load_config`): grouped
convolutions, LRN with the paper's alpha (PyTorch divides alpha by the window, so it gets
``alpha * size``) applied per tower when the config's LRN has groups, overlapping max-pool,
inverted dropout, and SGD with momentum and the paper's weight decay on the weights only.

:func:`torch_form` gives the same network in one of PyTorch's CPU execution forms
(:data:`FORMS`), so a benchmark can time each and run the fastest as the peer.
"""

import math

FORMS = ("contiguous", "channels-last", "compiled")


def torch_network(layer_specs, in_channels=3):
    """An ``nn.Sequential`` computing the logits of the config's network."""
    import torch
    from torch import nn

    class GroupedLRN(nn.Module):
        """LRN within each of ``groups`` channel blocks (the window never crosses a tower).

        A contiguous NCHW input is viewed as (N*groups, C/groups, H, W), no copy; any other
        layout (channels-last) is split into chunks and concatenated back."""

        def __init__(self, size, alpha, beta, k, groups):
            super().__init__()
            self.lrn = nn.LocalResponseNorm(size, alpha=alpha * size, beta=beta, k=k)
            self.groups = groups

        def forward(self, x):
            if self.groups == 1:
                return self.lrn(x)
            n, c, h, w = x.shape
            if x.is_contiguous():
                return self.lrn(x.view(n * self.groups, c // self.groups, h, w)).view(n, c, h, w)
            return torch.cat([self.lrn(part) for part in x.chunk(self.groups, dim=1)], dim=1)

    modules, flat = [], False
    for spec in layer_specs:
        f = spec.fields
        if spec.type == "conv":
            modules.append(nn.Conv2d(spec.in_shape[0], f["filters"], f["kernel"], f["stride"],
                                     f["pad"], groups=f["groups"]))
        elif spec.type == "fc":
            if not flat:
                modules.append(nn.Flatten())
                flat = True
            modules.append(nn.Linear(math.prod(spec.in_shape), f["outputs"]))
        elif spec.type == "lrn":
            modules.append(GroupedLRN(f["size"], f["alpha"], f["beta"], f["k"], f["groups"]))
        elif spec.type == "maxpool":
            modules.append(nn.MaxPool2d(f["size"], f["stride"]))
        elif spec.type == "dropout":
            modules.append(nn.Dropout(f["p"]))
        else:
            raise ValueError(f"no PyTorch layer for type {spec.type!r}")
        if f.get("relu"):
            modules.append(nn.ReLU(inplace=True))
    return nn.Sequential(*modules)


def load_params(net, layer_specs, params):
    """Copy nbalex parameters (``{"conv1.weight": ndarray, ...}``) into ``torch_network``'s
    modules, conv and fc layers paired in order.  Raises ValueError on a shape mismatch."""
    import torch
    from torch import nn

    layers = [m for m in net if isinstance(m, (nn.Conv2d, nn.Linear))]
    specs = [s for s in layer_specs if s.type in ("conv", "fc")]
    if len(layers) != len(specs):
        raise ValueError(f"{len(specs)} conv/fc layers in the config, {len(layers)} in the network")
    with torch.no_grad():
        for spec, m in zip(specs, layers):
            for attr in ("weight", "bias"):
                value = torch.from_numpy(params[f"{spec.name}.{attr}"])
                target = getattr(m, attr)
                if tuple(value.shape) != tuple(target.shape):
                    raise ValueError(f"{spec.name}.{attr}: shape {tuple(value.shape)}, "
                                     f"network wants {tuple(target.shape)}")
                target.copy_(value)
    return net


def torch_form(net, form):
    """(module, to_input) running ``net`` in PyTorch CPU form ``form`` (one of :data:`FORMS`).

    ``contiguous``: NCHW as built.  ``channels-last``: weights and inputs in NHWC memory
    format (oneDNN's preferred layout).  ``compiled``: ``torch.compile`` of the NCHW module
    (needs a C++ compiler; compiles on first call).  ``to_input(tensor)`` puts a batch in the
    form's layout; the module shares its parameters with ``net`` (it is ``net`` itself, or
    wraps it)."""
    import torch

    if form == "contiguous":
        return net, lambda t: t
    if form == "channels-last":
        net.to(memory_format=torch.channels_last)
        return net, lambda t: t.contiguous(memory_format=torch.channels_last)
    if form == "compiled":
        return torch.compile(net), lambda t: t
    raise ValueError(f"unknown PyTorch form {form!r} (choose from {', '.join(FORMS)})")


def torch_sgd(net, lr, momentum=0.9, weight_decay=5e-4):
    """SGD with momentum; weight decay on weights, none on biases (the config's default).

    PyTorch's fused CPU kernel where this torch has one, else its multi-tensor (foreach) form."""
    import torch

    weights = [p for name, p in net.named_parameters() if name.endswith("weight")]
    biases = [p for name, p in net.named_parameters() if not name.endswith("weight")]
    groups = [{"params": weights, "weight_decay": weight_decay},
              {"params": biases, "weight_decay": 0.0}]
    for kwargs in (dict(fused=True), dict(foreach=True), {}):
        try:
            return torch.optim.SGD(groups, lr=lr, momentum=momentum, **kwargs)
        except (RuntimeError, TypeError, ValueError):
            continue
    raise RuntimeError("torch.optim.SGD refused every form")
