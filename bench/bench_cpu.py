"""nbalex's CPU backend (Numba + NumPy's BLAS) beside PyTorch on the same CPU, in the same run.

Two tables:

1. per layer of a network (default ``alexnet``, batch 32): forward and backward milliseconds of
   nbalex's CPU launchers and of PyTorch's equivalents (torch.nn.functional, grouped convs,
   LocalResponseNorm per group, autograd for the backward), the median of ``--repeats`` runs
   after a warm-up, and the ratio torch/nbalex (> 1: nbalex is faster);
2. end to end: training images/s (forward + backward + SGD step) and inference images/s for
   each ``--model``, nbalex's ``Net`` beside a PyTorch ``nn.Sequential`` + ``torch.optim.SGD``.

Usage::

    python bench/bench_cpu.py                      # alexnet per layer + alexnet, alexnet-mini end to end
    python bench/bench_cpu.py --repeats 9 --json out.json
    python bench/bench_cpu.py --skip-layers --models alexnet-mini

OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE, when set, can pin OpenBLAS to slower kernels; this script
re-executes itself once without them (for its own process only) and reports the BLAS it got.
"""

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import time

_BLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
_REEXEC_FLAG = "NBALEX_BENCH_REEXEC"

if any(v in os.environ for v in _BLAS_VARS) and _REEXEC_FLAG not in os.environ:
    env = {k: v for k, v in os.environ.items() if k not in _BLAS_VARS}
    env[_REEXEC_FLAG] = ",".join(f"{v}={os.environ[v]}" for v in _BLAS_VARS if v in os.environ)
    os.execve(sys.executable, [sys.executable, *sys.argv], env)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from nbalex.config import load_config  # noqa: E402
from nbalex.model import Net  # noqa: E402
from nbalex.cpu import (conv2d, dropout, linear, lrn, maxpool, relu, sgd,  # noqa: E402
                        softmax_xent)


# --------------------------------------------------------------------------- environment

def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def blas_info():
    """Which BLAS NumPy runs and which kernel (core type) it picked."""
    try:
        from threadpoolctl import threadpool_info
        infos = [i for i in threadpool_info() if i.get("user_api") == "blas"]
        if infos:
            i = infos[0]
            return f"{i.get('internal_api')} {i.get('version')} core={i.get('architecture')} " \
                   f"threads={i.get('num_threads')}"
    except ImportError:
        pass
    cfg = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    text = f"{cfg.get('name')} {cfg.get('version')}"
    with open("/proc/self/maps") as maps:
        libs = {line.split()[-1] for line in maps if "openblas" in line.lower() and ".so" in line}
    for path in libs:
        lib = ctypes.CDLL(path)
        for symbol in ("scipy_openblas_get_corename64_", "openblas_get_corename64_",
                       "openblas_get_corename"):
            fn = getattr(lib, symbol, None)
            if fn is not None:
                fn.restype = ctypes.c_char_p
                return f"{text} core={fn().decode()}"
    return text


# --------------------------------------------------------------------------- compile cache

FIRST_CALLS = r"""
import time
t0 = time.perf_counter()
import numpy as np
from nbalex.cpu import conv2d, dropout, linear, lrn, maxpool, relu, sgd, softmax_xent
t1 = time.perf_counter()
r = np.random.default_rng(0)
x = r.standard_normal((2, 4, 9, 9)).astype(np.float32)
w = r.standard_normal((6, 2, 3, 3)).astype(np.float32)
b = np.zeros(6, np.float32)
y = np.empty((2, 6, 9, 9), np.float32)
for chunks in (conv2d.COLS_BUDGET, 1):                 # several images per chunk, then one
    conv2d.COLS_BUDGET = chunks
    conv2d.conv2d_forward(y, x, w, b, 1, 1, 2, relu=True)
    conv2d.conv2d_backward_data(np.empty_like(x), y, w, 1, 1, 2)
    conv2d.conv2d_backward_weights(np.empty_like(w), np.empty_like(b), y, x, 1, 1, 2)
h, m = r.standard_normal((4, 10)).astype(np.float32), r.standard_normal((3, 10)).astype(np.float32)
o = np.empty((4, 3), np.float32)
linear.linear_forward(o, h, m, b[:3], relu=True)
linear.linear_backward_data(np.empty_like(h), o, m)
linear.linear_backward_weights(np.empty_like(m), np.empty(3, np.float32), o, h)
relu.relu_forward(y, y); relu.relu_backward(y, y, y)
s, z = np.empty_like(y), np.empty_like(y)
lrn.lrn_forward(z, s, y, 5, 1e-4, 0.75, 2.0); lrn.lrn_backward(np.empty_like(y), y, y, z, s, 5, 1e-4, 0.75, 2.0)
p, i = np.empty((2, 6, 4, 4), np.float32), np.empty((2, 6, 4, 4), np.int32)
maxpool.maxpool_forward(p, i, y, 3, 2); maxpool.maxpool_backward(np.empty_like(y), p, i, 3, 2)
k = np.empty(y.shape, np.uint8)
dropout.dropout_forward(z, k, y, 0.5, 1); dropout.dropout_backward(z, z, k, 0.5)
lab = np.array([0, 2, 1, 0], np.int32)
softmax_xent.softmax_xent_forward(np.empty(4, np.float32), o, o.copy(), lab)
softmax_xent.softmax_xent_backward(np.empty_like(o), o, lab)
v = np.zeros(20, np.float32)
sgd.sgd_update(v.copy(), v.copy(), v, 0.1, 0.9, 5e-4)
t2 = time.perf_counter()
print(f"{t1 - t0:.3f} {t2 - t1:.3f}")
"""


def compile_cache_timing():
    """Seconds to import nbalex.cpu and make the first call of every launcher, in fresh
    processes sharing a new, empty NUMBA_CACHE_DIR: first cold (compiles), then warm (loads)."""
    import tempfile
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache, PYTHONPATH=root)
        for label in ("cold", "warm"):
            res = subprocess.run([sys.executable, "-c", FIRST_CALLS], env=env, cwd=root,
                                 capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(res.stderr[-2000:])
            imp, calls = map(float, res.stdout.split())
            out[label] = dict(import_s=imp, first_calls_s=calls)
    return out


# --------------------------------------------------------------------------- timing

def interleaved_ms(fns, repeats, warmup=1):
    """Median ms of each fn, run in turns so machine noise hits all of them alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return [1e3 * statistics.median(ts) for ts in times]


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


# --------------------------------------------------------------------------- benchmarks

def layer_table(model, batch, repeats, rng):
    _, _, specs = load_config(model)
    chain = Chain(specs, batch, rng)
    mods = torch_layers(specs, chain.param)
    for m in mods:
        m.train()
    x = rng.standard_normal((batch, *specs[0].in_shape)).astype(np.float32)
    labels = rng.integers(0, specs[-1].out_shape[0], batch).astype(np.int32)
    rows = []
    tx = torch.from_numpy(x)
    for i, (s, m) in enumerate(zip(specs, mods)):
        dy_np = rng.standard_normal((batch, *s.out_shape)).astype(np.float32)
        dy_work = np.empty_like(dy_np)
        fwd_nb = lambda: chain.layer_forward(i, x, True, 0)  # noqa: E731

        def bwd_nb():
            np.copyto(dy_work, dy_np)          # the backward may overwrite dy (fused ReLU grad)
            chain.layer_backward(i, dy_work)

        tin = tx.detach().requires_grad_(i > 0)

        def fwd_t():
            with torch.no_grad():
                m(tx)

        graph = {}

        def bwd_t():
            out = graph["out"]
            inputs = [p for p in m.parameters()] + ([tin] if i > 0 else [])
            torch.autograd.grad(out, inputs, graph["dy"], retain_graph=True)

        fwd_nb()
        with torch.enable_grad():
            graph["out"] = m(tin)
        graph["dy"] = torch.from_numpy(dy_np)
        f_nb, f_t = interleaved_ms([fwd_nb, fwd_t], repeats)
        b_nb, b_t = interleaved_ms([bwd_nb, bwd_t], repeats)
        rows.append(dict(layer=s.name, shape="x".join(map(str, s.out_shape)), fwd_nbalex=f_nb,
                         fwd_torch=f_t, bwd_nbalex=b_nb, bwd_torch=b_t))
        x = chain.acts[i]
        tx = torch.from_numpy(x)
    logits = x
    tl, tlab = torch.from_numpy(logits), torch.from_numpy(labels.astype(np.int64))
    f_nb, f_t = interleaved_ms([lambda: chain.loss_forward(logits, labels),
                                lambda: F.cross_entropy(tl, tlab)], repeats)
    tlg = tl.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(tlg, tlab)
    b_nb, b_t = interleaved_ms([lambda: chain.loss_backward(labels),
                                lambda: torch.autograd.grad(loss, [tlg], retain_graph=True)], repeats)
    rows.append(dict(layer="softmax-xent", shape=str(specs[-1].out_shape[0]), fwd_nbalex=f_nb,
                     fwd_torch=f_t, bwd_nbalex=b_nb, bwd_torch=b_t))
    sgd_nb = lambda: chain.sgd_step(1e-3)  # noqa: E731
    params = [p for m in mods for p in m.parameters()]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=5e-4)
    s_nb, s_t = interleaved_ms([sgd_nb, opt.step], repeats)
    rows.append(dict(layer="sgd-step", shape=str(chain.w.size), fwd_nbalex=s_nb, fwd_torch=s_t,
                     bwd_nbalex=0.0, bwd_torch=0.0))
    return rows


def end_to_end(model, batch, repeats, rng):
    _, _, specs = load_config(model)
    net = Net(model, backend="cpu", batch_size=batch)
    mods = torch_layers(specs, net.params())
    tmodel = torch.nn.Sequential(*mods)
    opt = torch.optim.SGD(tmodel.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    x = rng.standard_normal((batch, *specs[0].in_shape)).astype(np.float32)
    labels = rng.integers(0, specs[-1].out_shape[0], batch).astype(np.int32)
    tx, tlab = torch.from_numpy(x), torch.from_numpy(labels.astype(np.int64))
    step = [0]

    def train_nb():
        step[0] += 1
        net.forward_backward(x, labels, train=True, seed=step[0])
        net.sgd_step(1e-3)

    def train_t():
        tmodel.train()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(tmodel(tx), tlab).backward()
        opt.step()

    def infer_nb():
        net.forward(x, train=False)

    def infer_t():
        tmodel.eval()
        with torch.inference_mode():
            tmodel(tx)

    t_nb, t_t = interleaved_ms([train_nb, train_t], repeats, warmup=2)
    i_nb, i_t = interleaved_ms([infer_nb, infer_t], repeats, warmup=2)
    return dict(model=model, batch=batch,
                train_nbalex=1e3 * batch / t_nb, train_torch=1e3 * batch / t_t,
                infer_nbalex=1e3 * batch / i_nb, infer_torch=1e3 * batch / i_t)


def print_layers(rows, model, batch):
    print(f"\nPer layer, {model}, batch {batch}: median ms (ratio = torch / nbalex, > 1: nbalex faster)")
    head = f"{'layer':<13}{'output':>12}{'fwd nbalex':>11}{'fwd torch':>10}{'ratio':>7}" \
           f"{'bwd nbalex':>11}{'bwd torch':>10}{'ratio':>7}"
    print(head)
    print("-" * len(head))
    tot = dict(fwd_nbalex=0.0, fwd_torch=0.0, bwd_nbalex=0.0, bwd_torch=0.0)
    for r in rows:
        for key in tot:
            tot[key] += r[key]
        bwd = (f"{r['bwd_nbalex']:>11.1f}{r['bwd_torch']:>10.1f}{r['bwd_torch'] / r['bwd_nbalex']:>7.2f}"
               if r["bwd_nbalex"] else f"{'':>28}")
        print(f"{r['layer']:<13}{r['shape']:>12}{r['fwd_nbalex']:>11.1f}{r['fwd_torch']:>10.1f}"
              f"{r['fwd_torch'] / r['fwd_nbalex']:>7.2f}{bwd}")
    print("-" * len(head))
    print(f"{'sum':<13}{'':>12}{tot['fwd_nbalex']:>11.1f}{tot['fwd_torch']:>10.1f}"
          f"{tot['fwd_torch'] / tot['fwd_nbalex']:>7.2f}{tot['bwd_nbalex']:>11.1f}"
          f"{tot['bwd_torch']:>10.1f}{tot['bwd_torch'] / tot['bwd_nbalex']:>7.2f}")
    print("(sgd-step is listed under fwd; conv/fc rows include their fused ReLU and its gradient;"
          " the first layer computes no input gradient)")


def print_end_to_end(results):
    print("\nEnd to end: images/s (ratio = nbalex / torch, > 1: nbalex faster)")
    head = f"{'model':<14}{'batch':>6}{'train nbalex':>13}{'train torch':>12}{'ratio':>7}" \
           f"{'infer nbalex':>13}{'infer torch':>12}{'ratio':>7}"
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r['model']:<14}{r['batch']:>6}{r['train_nbalex']:>13.1f}{r['train_torch']:>12.1f}"
              f"{r['train_nbalex'] / r['train_torch']:>7.2f}{r['infer_nbalex']:>13.1f}"
              f"{r['infer_torch']:>12.1f}{r['infer_nbalex'] / r['infer_torch']:>7.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers-model", default="alexnet", help="network of the per-layer table")
    ap.add_argument("--models", nargs="+", default=["alexnet", "alexnet-mini"],
                    help="networks of the end-to-end table")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    ap.add_argument("--skip-layers", action="store_true")
    ap.add_argument("--skip-end-to-end", action="store_true")
    ap.add_argument("--skip-cache", action="store_true", help="skip the cold/warm compile timing")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args()

    threads = os.cpu_count()
    torch.set_num_threads(threads)
    import numba
    rng = np.random.default_rng(0)
    info = dict(cpu=cpu_model(), cores=threads, numpy=np.__version__, blas=blas_info(),
                numba=numba.__version__, torch=torch.__version__, torch_threads=torch.get_num_threads(),
                unset_env=os.environ.get(_REEXEC_FLAG, ""), date=time.strftime("%Y-%m-%d %H:%M UTC",
                                                                               time.gmtime()))
    print(f"CPU: {info['cpu']}, {threads} cores | numpy {info['numpy']} BLAS: {info['blas']}")
    print(f"numba {info['numba']} | torch {info['torch']} ({info['torch_threads']} threads, "
          f"mkldnn={torch.backends.mkldnn.is_available()}) | {info['date']}")
    if info["unset_env"]:
        print(f"(re-executed without {info['unset_env']} for this benchmark process)")
    result = dict(info=info)
    if not args.skip_cache:
        cache = compile_cache_timing()
        print("\nFirst use of every CPU launcher in a fresh process (import + first calls, seconds):")
        for label, t in cache.items():
            print(f"  {label:<5} numba cache: import {t['import_s']:.2f} s, first calls {t['first_calls_s']:.2f} s")
        result["compile_cache"] = cache
    if not args.skip_layers:
        rows = layer_table(args.layers_model, args.batch, args.repeats, rng)
        print(f"numba threading layer: {numba.threading_layer()}")
        print_layers(rows, args.layers_model, args.batch)
        result["layers"] = rows
    if not args.skip_end_to_end:
        e2e = [end_to_end(m, args.batch, args.repeats, rng) for m in args.models]
        print_end_to_end(e2e)
        result["end_to_end"] = e2e
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
