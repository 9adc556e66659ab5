"""The network on the CUDA backend (the simulator without a GPU): equal to the reference
network, two towers equal to one, and a training step that allocates and copies nothing
beyond the batch in and the loss out."""

from pathlib import Path

import numpy as np
import pytest
from conftest import requires_gpu

from nbalex.model import Net

cuda = pytest.importorskip("numba.cuda")
if not cuda.is_available():
    pytest.skip("no CUDA GPU and no simulator", allow_module_level=True)

MICRO = str(Path(__file__).parent / "configs" / "micro.toml")
BATCH = 2


def batch(seed, n=BATCH):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 3, 8, 8)).astype(np.float32),
            rng.integers(0, 4, size=n).astype(np.int32))


def assert_close(got, want, what, tol=2e-4):
    scale = float(np.max(np.abs(want))) + 1e-6
    err = float(np.max(np.abs(np.asarray(got) - want)))
    assert err <= tol * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


def compare_step(a, b, sgd_steps):
    """One forward_backward on ``a`` and ``b``, then ``sgd_steps`` updates from those gradients;
    the loss, every gradient, and the parameters and momentum after the updates must agree.

    Each kernel launch costs seconds under the simulator, so the SGD steps reuse one set of
    gradients: the update rule and the momentum it carries are what they test.
    """
    x, labels = batch(0)
    loss_a = a.forward_backward(x, labels, seed=7)
    loss_b = b.forward_backward(x, labels, seed=7)
    assert abs(loss_a - loss_b) <= 1e-4 * max(1.0, abs(loss_a)), (loss_a, loss_b)
    grads_a, grads_b = a.grads(), b.grads()
    for name in grads_a:
        assert_close(grads_b[name], grads_a[name], f"gradient {name}")
    for _ in range(sgd_steps):
        a.sgd_step(0.05, momentum=0.9, weight_decay=5e-4)
        b.sgd_step(0.05, momentum=0.9, weight_decay=5e-4)
    for what, got, want in (("parameter", b.params(), a.params()), ("momentum", b.momentum(), a.momentum())):
        for name in want:
            assert_close(got[name], want[name], f"{what} {name} after {sgd_steps} SGD steps")


@pytest.fixture(scope="module")
def one_tower():
    """A one-tower CUDA network shared by the tests below (its kernels compile once)."""
    return {"net": Net(MICRO, backend="cuda", batch_size=BATCH, seed=3), "trained": False}


def test_cuda_network_equals_reference_network(one_tower):
    ref = Net(MICRO, backend="reference", batch_size=BATCH, seed=3)
    net = one_tower["net"]
    assert len(net.towers) == 1 and net.backend_name == "cuda"
    # a batch already on the device is used in place: only the logits come back
    x, _ = batch(1)
    x_device = cuda.to_device(x)
    before = net.transfers.counts()
    assert_close(net.forward(x_device), ref.forward(x), "logits")
    h2d, d2h, _, _ = np.subtract(net.transfers.counts(), before)
    assert (h2d, d2h) == (0, 1)
    compare_step(ref, net, sgd_steps=3)
    one_tower["trained"] = True


def test_two_towers_equal_one_tower():
    # one CUDA tower equals the reference network (above), so compare two towers with it
    one = Net(MICRO, backend="reference", batch_size=BATCH, seed=4)
    two = Net(MICRO, backend="cuda", batch_size=BATCH, seed=4, gpus=(0, 0))
    assert [t.index for t in two.towers] == [0, 1]
    tower = two.towers[1]
    assert tower.compute_stream is not tower.copy_stream
    assert two.param_names() == one.param_names()
    assert {k: v.shape for k, v in two.params().items()} == {k: v.shape for k, v in one.params().items()}
    compare_step(one, two, sgd_steps=1)     # the images reach tower 1 device to device


class AllocationSpy:
    """Counts calls of numba.cuda's allocating functions while installed."""

    NAMES = ("device_array", "device_array_like", "to_device", "pinned_array", "mapped_array",
             "managed_array", "pinned_array_like")

    def __init__(self, monkeypatch):
        self.calls = []
        for name in self.NAMES:
            original = getattr(cuda, name, None)
            if original is not None:
                monkeypatch.setattr(cuda, name, self._wrap(name, original))

    def _wrap(self, name, original):
        def spy(*args, **kwargs):
            self.calls.append(name)
            return original(*args, **kwargs)
        return spy


def test_a_training_step_allocates_nothing_and_copies_only_batch_and_loss(one_tower, monkeypatch):
    net = one_tower["net"]
    x, labels = batch(0)
    if not one_tower["trained"]:                # measure a step after the first one
        net.forward_backward(x, labels)
        net.sgd_step(0.01)
    allocations, used = net.arena.allocations, net.arena.used
    spy = AllocationSpy(monkeypatch)
    before = net.transfers.counts()
    loss = net.forward_backward(x, labels, seed=1)
    net.sgd_step(0.01)
    h2d, d2h, h2d_bytes, d2h_bytes = np.subtract(net.transfers.counts(), before)
    assert (h2d, h2d_bytes) == (2, x.nbytes + labels.nbytes)     # in: images and labels
    assert (d2h, d2h_bytes) == (2, 4 * BATCH + 4)   # out: the per-example losses, the SGD flag
    assert np.isfinite(loss)
    assert spy.calls == []
    assert (net.arena.allocations, net.arena.used) == (allocations, used)


def repeat_and_resume(config, batch_size, steps=3):
    """(params after ``steps`` steps twice from scratch, and after 1 step then a resume into
    a differently initialised net given the saved parameters and momentum)."""
    probe = Net(config, backend="cuda", batch_size=batch_size, seed=0)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(batch_size, *probe.input_shape)).astype(np.float32)
    labels = rng.integers(0, probe.num_classes, size=batch_size).astype(np.int32)

    def run(net, seeds):
        for seed in seeds:
            net.forward_backward(x, labels, seed=seed)
            net.sgd_step(0.01)
        return net

    first, second = (run(Net(config, backend="cuda", batch_size=batch_size, seed=0), range(steps))
                     for _ in range(2))
    saved = run(probe, range(1))
    resumed = Net(config, backend="cuda", batch_size=batch_size, seed=9)
    resumed.load_params(saved.params())
    resumed.load_momentum(saved.momentum())
    run(resumed, range(1, steps))
    return first.params(), second.params(), resumed.params()


@requires_gpu
def test_cuda_training_repeats_and_resumes_bit_for_bit():
    """Split-K slices are summed in order (no atomics), so alexnet-mini trained twice gives
    the same bits, and a run resumed from saved parameters and momentum continues exactly."""
    first, second, resumed = repeat_and_resume("alexnet-mini", 16)
    for name, want in first.items():
        assert np.array_equal(second[name], want), name
        assert np.array_equal(resumed[name], want), name
