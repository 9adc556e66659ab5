"""The same command gives the same bits on the CPU backend, whatever Numba's cache holds.

One training step of the tiny network (every layer type: grouped conv, LRN, max-pool, fc,
dropout, softmax cross-entropy, the SGD kernel) runs in a fresh process twice: first with an
empty NUMBA_CACHE_DIR (every kernel compiled now, and cached), then with that cache warm
(every kernel loaded from it).  Loss, gradients and updated parameters must agree bit for
bit.  This covers every CPU kernel a step runs: im2col/col2im, tap_rows and its adjoint, the
bias/ReLU epilogues, bias_grad, the linear transposes and column sums, relu, lrn forward and
backward (which differed under fastmath: its 1/sqrt was approximated differently when the
kernel was compiled fresh and when it was loaded), maxpool, dropout, softmax_xent and sgd.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STEP = """
import sys
import numpy as np
from nbalex.model import Net
net = Net("tests/configs/tiny.toml", backend="cpu", batch_size=4, seed=0)
rng = np.random.default_rng(0)
x = rng.standard_normal((4, *net.input_shape)).astype(np.float32)
labels = rng.integers(0, net.num_classes, 4).astype(np.int32)
loss = net.forward_backward(x, labels, train=True, seed=1)
grads = {"grad." + k: v for k, v in net.grads().items()}
net.sgd_step(0.01)
params = {"param." + k: v for k, v in net.params().items()}
np.savez(sys.argv[1], loss=np.float64(loss), **grads, **params)
"""


def one_step(out, cache):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache))
    env.pop("NUMBA_DISABLE_JIT", None)
    subprocess.run([sys.executable, "-c", STEP, str(out)], cwd=ROOT, env=env, check=True,
                   timeout=600)
    with np.load(out) as f:
        return {k: f[k] for k in f.files}


def test_a_training_step_has_the_same_bits_compiled_fresh_and_from_the_cache(tmp_path):
    cache = tmp_path / "numba-cache"
    cache.mkdir()
    fresh = one_step(tmp_path / "fresh.npz", cache)
    assert any(cache.rglob("*.nbi")), "the first run should have filled the cache"
    warm = one_step(tmp_path / "warm.npz", cache)
    assert fresh.keys() == warm.keys()
    for name in fresh:
        a, b = np.atleast_1d(fresh[name]), np.atleast_1d(warm[name])
        differ = int(np.sum(a.view(np.uint8) != b.view(np.uint8)))
        assert differ == 0, f"{name}: {differ} bytes differ between a fresh and a cached compile"
