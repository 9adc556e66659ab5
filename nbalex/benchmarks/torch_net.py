"""PyTorch's version of a config's network: the peer of ``nbalex bench train``.

Built from the same checked layer specs (:func:`nbalex.config.load_config`): grouped
convolutions, LRN with the paper's alpha (PyTorch divides alpha by the window, so it gets
``alpha * size``) applied per tower when the config's LRN has groups, overlapping max-pool,
inverted dropout, and SGD with momentum and the paper's weight decay on the weights only.
"""

import math

def torch_network(layer_specs, in_channels=3):
    """An ``nn.Sequential`` computing the logits of the config's network."""
    import torch
    from torch import nn

    class GroupedLRN(nn.Module):
        """LRN within each of ``groups`` channel blocks (the window never crosses a tower)."""

        def __init__(self, size, alpha, beta, k, groups):
            super().__init__()
            self.lrn = nn.LocalResponseNorm(size, alpha=alpha * size, beta=beta, k=k)
            self.groups = groups

        def forward(self, x):
            if self.groups == 1:
                return self.lrn(x)
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


def torch_sgd(net, lr, momentum=0.9, weight_decay=5e-4):
    """SGD with momentum; weight decay on weights, none on biases (the config's default)."""
    import torch

    weights = [p for name, p in net.named_parameters() if name.endswith("weight")]
    biases = [p for name, p in net.named_parameters() if not name.endswith("weight")]
    groups = [{"params": weights, "weight_decay": weight_decay},
              {"params": biases, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)
