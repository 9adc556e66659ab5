"""The per-layer table of ``bench/bench_cpu.py``: nbalex's CPU launchers one layer at a time
beside PyTorch's modules (NCHW, autograd for the backward), timed in alternating blocks.

:class:`Chain` runs a config's layers over the launchers with buffers allocated once (what
``nbalex.model.Net`` runs), each layer's forward and backward callable on its own.
"""

import numpy as np
import torch
import torch.nn.functional as F

from nbalex.config import load_config
from nbalex.cpu import conv2d, dropout, linear, lrn, maxpool, relu, sgd, softmax_xent


# --------------------------------------------------------------------------- nbalex, chained

class Chain:
    """The config's layers over nbalex's CPU launchers, buffers allocated once: what
    ``nbalex.model.Net`` runs, with each layer's forward and backward callable on its own
    for the per-layer table."""

    def __init__(self, specs, batch, rng):
        self.specs, self.n = specs, batch
        sizes = [p.size for s in specs for p in s.params]
        total = sum(sizes)
        self.w, self.dw, self.v = (np.zeros(total, np.float32) for _ in range(3))
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.decay_mults = np.array([p.decay_mult for s in specs for p in s.params])
        self.lr_mults = np.array([p.lr_mult for s in specs for p in s.params])
        self.param, self.grad = {}, {}
        i = 0
        for s in specs:
            for p in s.params:
                lo, hi = self.offsets[i], self.offsets[i + 1]
                self.param[p.name] = self.w[lo:hi].reshape(p.shape)
                self.grad[p.name] = self.dw[lo:hi].reshape(p.shape)
                if p.init_std > 0:
                    self.param[p.name][...] = rng.normal(0, p.init_std, p.shape)
                else:
                    self.param[p.name][...] = p.init_value
                i += 1
        ws = [conv2d.conv2d_workspace_size((batch, *s.in_shape), s.params[0].shape,
                                           s["stride"], s["pad"], s["groups"])
              for s in specs if s.type == "conv"]
        ws += [linear.linear_workspace_size((batch, int(np.prod(s.in_shape))), s.params[0].shape)
               for s in specs if s.type == "fc"]
        self.workspace = np.empty(max(ws + [0]), np.float32)
        self.acts = [np.zeros((batch, *s.out_shape), np.float32) for s in specs]
        self.grads_in = [np.zeros((batch, *s.in_shape), np.float32) for s in specs]
        self.aux = {}
        for i, s in enumerate(specs):
            if s.type == "lrn":
                self.aux[i] = np.zeros((batch, *s.out_shape), np.float32)
            elif s.type == "maxpool":
                self.aux[i] = np.zeros((batch, *s.out_shape), np.int32)
            elif s.type == "dropout":
                self.aux[i] = np.zeros((batch, *s.out_shape), np.uint8)
        classes = specs[-1].out_shape[0]
        self.losses = np.zeros(batch, np.float32)
        self.probs = np.zeros((batch, classes), np.float32)
        self.dlogits = np.zeros((batch, classes), np.float32)
        self.inputs = [None] * len(specs)

    def _lrn_view(self, a, i):
        s = self.specs[i]
        g = s["groups"]
        return a.reshape(self.n * g, s.in_shape[0] // g, -1)

    def layer_forward(self, i, x, train=True, seed=0):
        s, y = self.specs[i], self.acts[i]
        self.inputs[i] = x
        if s.type == "conv":
            conv2d.conv2d_forward(y, x, self.param[f"{s.name}.weight"], self.param[f"{s.name}.bias"],
                                  s["stride"], s["pad"], s["groups"], relu=s["relu"],
                                  workspace=self.workspace)
        elif s.type == "fc":
            linear.linear_forward(y, x.reshape(self.n, -1), self.param[f"{s.name}.weight"],
                                  self.param[f"{s.name}.bias"], relu=s["relu"],
                                  workspace=self.workspace)
        elif s.type == "lrn":
            lrn.lrn_forward(self._lrn_view(y, i), self._lrn_view(self.aux[i], i),
                            self._lrn_view(x, i), s["size"], s["alpha"], s["beta"], s["k"])
        elif s.type == "maxpool":
            maxpool.maxpool_forward(y, self.aux[i], x, s["size"], s["stride"])
        elif s.type == "dropout":
            if not train:
                return x
            dropout.dropout_forward(y, self.aux[i], x, s["p"], seed + i)
        return y

    def layer_backward(self, i, dy):
        """dL/d(input of layer i) from dy (dy may be overwritten); None for the first layer."""
        s, x, dx = self.specs[i], self.inputs[i], self.grads_in[i]
        need_dx = i > 0
        if s.type in ("conv", "fc") and s["relu"]:
            relu.relu_backward(dy, dy, self.acts[i])
        if s.type == "conv":
            args = (s["stride"], s["pad"], s["groups"])
            conv2d.conv2d_backward_weights(self.grad[f"{s.name}.weight"], self.grad[f"{s.name}.bias"],
                                           dy, x, *args, workspace=self.workspace)
            if need_dx:
                conv2d.conv2d_backward_data(dx, dy, self.param[f"{s.name}.weight"], *args,
                                            workspace=self.workspace)
        elif s.type == "fc":
            x2 = x.reshape(self.n, -1)
            linear.linear_backward_weights(self.grad[f"{s.name}.weight"], self.grad[f"{s.name}.bias"],
                                           dy, x2)
            linear.linear_backward_data(dx.reshape(self.n, -1), dy, self.param[f"{s.name}.weight"],
                                        workspace=self.workspace)
        elif s.type == "lrn":
            v = self._lrn_view
            lrn.lrn_backward(v(dx, i), v(dy, i), v(x, i), v(self.acts[i], i), v(self.aux[i], i),
                             s["size"], s["alpha"], s["beta"], s["k"])
        elif s.type == "maxpool":
            maxpool.maxpool_backward(dx, dy, self.aux[i], s["size"], s["stride"])
        elif s.type == "dropout":
            dropout.dropout_backward(dx, dy, self.aux[i], s["p"])
        return dx if need_dx else None

    def loss_forward(self, logits, labels):
        softmax_xent.softmax_xent_forward(self.losses, self.probs, logits, labels)
        return float(self.losses.mean())

    def loss_backward(self, labels):
        softmax_xent.softmax_xent_backward(self.dlogits, self.probs, labels)
        return self.dlogits

    def forward(self, x, train=False, seed=0):
        for i in range(len(self.specs)):
            x = self.layer_forward(i, x, train, seed)
        return x

    def forward_backward(self, x, labels, train=True, seed=0):
        loss = self.loss_forward(self.forward(x, train, seed), labels)
        dy = self.loss_backward(labels)
        for i in reversed(range(len(self.specs))):
            dy = self.layer_backward(i, dy)
        return loss

    def sgd_step(self, lr):
        sgd.sgd_update(self.w, self.dw, self.v, lr, 0.9, 5e-4, self.offsets, self.lr_mults,
                       self.decay_mults)


# --------------------------------------------------------------------------- PyTorch

class GroupedLRN(torch.nn.Module):
    """LocalResponseNorm within each of ``groups`` channel blocks (nbalex's ``groups``)."""

    def __init__(self, s):
        super().__init__()
        self.groups = s["groups"]
        self.norm = torch.nn.LocalResponseNorm(s["size"], alpha=s["alpha"] * s["size"],
                                               beta=s["beta"], k=s["k"])

    def forward(self, x):
        n, c, h, w = x.shape
        return self.norm(x.reshape(n * self.groups, c // self.groups, h, w)).reshape(n, c, h, w)


def torch_layers(specs, params):
    """One torch module per nbalex layer, with nbalex's initial ``params`` (name -> array) copied in."""
    mods = []
    for s in specs:
        if s.type == "conv":
            m = torch.nn.Conv2d(s.in_shape[0], s["filters"], s["kernel"], s["stride"], s["pad"],
                                groups=s["groups"])
        elif s.type == "fc":
            m = torch.nn.Linear(int(np.prod(s.in_shape)), s["outputs"])
        elif s.type == "lrn":
            m = GroupedLRN(s)
        elif s.type == "maxpool":
            m = torch.nn.MaxPool2d(s["size"], s["stride"])
        else:
            m = torch.nn.Dropout(s["p"])
        if s.type in ("conv", "fc"):
            with torch.no_grad():
                m.weight.copy_(torch.from_numpy(params[f"{s.name}.weight"]))
                m.bias.copy_(torch.from_numpy(params[f"{s.name}.bias"]))
            seq = [torch.nn.Flatten()] if s.type == "fc" and len(s.in_shape) > 1 else []
            seq.append(m)
            if s["relu"]:
                seq.append(torch.nn.ReLU(inplace=True))
            m = torch.nn.Sequential(*seq)
        mods.append(m)
    return mods


# --------------------------------------------------------------------------- the table

def layer_table(model, batch, rounds, block, gap, rng, alternate, summary):
    """Rows {layer, shape, fwd_nbalex, fwd_torch, bwd_nbalex, bwd_torch} (each a ``summary``
    of ``alternate`` block timings; bwd_* absent for sgd-step), then softmax-xent and
    sgd-step rows."""
    _, _, specs = load_config(model)
    chain = Chain(specs, batch, rng)
    mods = torch_layers(specs, chain.param)
    for m in mods:
        m.train()
    x = rng.standard_normal((batch, *specs[0].in_shape)).astype(np.float32)
    labels = rng.integers(0, specs[-1].out_shape[0], batch).astype(np.int32)
    timed = lambda ours, theirs: {k: summary(v) for k, v in alternate(  # noqa: E731
        {"nbalex": ours, "torch": theirs}, rounds, block, 1, gap, 0.1).items()}
    rows = []
    tx = torch.from_numpy(x)
    for i, (s, m) in enumerate(zip(specs, mods)):
        dy_np = rng.standard_normal((batch, *s.out_shape)).astype(np.float32)
        dy_work = np.empty_like(dy_np)
        tin = tx.detach().requires_grad_(i > 0)
        graph = {}

        def fwd_nb():
            chain.layer_forward(i, x, True, 0)

        def bwd_nb():
            np.copyto(dy_work, dy_np)          # the backward may overwrite dy (fused ReLU grad)
            chain.layer_backward(i, dy_work)

        def fwd_t():
            with torch.no_grad():
                m(tx)

        def bwd_t():
            inputs = list(m.parameters()) + ([tin] if i > 0 else [])
            torch.autograd.grad(graph["out"], inputs, graph["dy"], retain_graph=True)

        fwd_nb()
        with torch.enable_grad():
            graph["out"] = m(tin)
        graph["dy"] = torch.from_numpy(dy_np)
        f, b = timed(fwd_nb, fwd_t), timed(bwd_nb, bwd_t)
        rows.append(dict(layer=s.name, shape="x".join(map(str, s.out_shape)),
                         fwd_nbalex=f["nbalex"], fwd_torch=f["torch"],
                         bwd_nbalex=b["nbalex"], bwd_torch=b["torch"]))
        x = chain.acts[i]
        tx = torch.from_numpy(x)
    logits = x
    tl, tlab = torch.from_numpy(logits), torch.from_numpy(labels.astype(np.int64))
    f = timed(lambda: chain.loss_forward(logits, labels), lambda: F.cross_entropy(tl, tlab))
    tlg = tl.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(tlg, tlab)
    b = timed(lambda: chain.loss_backward(labels),
              lambda: torch.autograd.grad(loss, [tlg], retain_graph=True))
    rows.append(dict(layer="softmax-xent", shape=str(specs[-1].out_shape[0]), fwd_nbalex=f["nbalex"],
                     fwd_torch=f["torch"], bwd_nbalex=b["nbalex"], bwd_torch=b["torch"]))
    params = [p for m in mods for p in m.parameters()]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=5e-4, fused=True)
    s = timed(lambda: chain.sgd_step(1e-3), opt.step)
    rows.append(dict(layer="sgd-step", shape=str(chain.w.size), fwd_nbalex=s["nbalex"],
                     fwd_torch=s["torch"]))
    return rows
