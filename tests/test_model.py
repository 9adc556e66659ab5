"""The network on the reference backend: configs, shapes, gradients, towers, SGD, memory."""

from pathlib import Path

import numpy as np
import pytest

from nbalex.config import ConfigError, load_config
from nbalex.model import Net, describe

TINY = str(Path(__file__).parent / "configs" / "tiny.toml")


def batch(net, n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *net.input_shape)).astype(np.float32)
    return x, rng.integers(0, net.num_classes, size=n).astype(np.int32)


def max_rel(a, b):
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


# ---- configs -----------------------------------------------------------------------------------


def test_alexnet_has_the_papers_parameter_count_and_macs():
    d = describe("alexnet")
    assert d["params"] == 60_965_224
    assert abs(d["macs"] - 0.724e9) < 0.001e9
    assert (d["image_size"], d["input_size"], d["num_classes"]) == (256, 227, 1000)
    rows = {r["name"]: r for r in d["layers"]}
    assert rows["conv1"]["output_shape"] == [96, 55, 55]
    assert rows["pool5"]["output_shape"] == [256, 6, 6]
    assert rows["fc6"]["params"] == 4096 * 9216 + 4096
    assert sum(r["params"] for r in d["layers"]) == d["params"]


def test_mini_keeps_every_layer_type_at_cpu_size():
    d = describe("alexnet-mini")
    assert (d["image_size"], d["input_size"]) == (64, 56)
    assert 5e6 <= d["macs"] <= 20e6          # 10..40 MFLOP per image forward
    kinds = {r["type"] for r in d["layers"]}
    assert kinds == {"conv", "lrn", "maxpool", "dropout", "fc"}
    _, _, specs = load_config("alexnet-mini")
    assert any(s.type == "conv" and s["groups"] == 2 for s in specs)
    assert any(s.type == "maxpool" and s["size"] > s["stride"] for s in specs)


def test_describe_arena_bytes_is_what_the_net_allocates():
    d = describe(TINY, batch_size=3, backend="reference")
    net = Net(TINY, backend="reference", batch_size=3)
    assert d["arena_bytes"] == net.arena.capacity
    assert net.arena.used == net.arena.capacity
    assert d["param_bytes"] >= 3 * 4 * net.num_params()


def test_alexnet_training_step_fits_in_3_gb_on_one_tower():
    d = describe("alexnet", batch_size=128, backend="reference")
    assert d["arena_bytes"] < 3 * 2**30
    # on the GPU the arena adds the split-K workspace (tens of MB)
    cuda = describe("alexnet", batch_size=128, backend="cuda")
    assert d["arena_bytes"] < cuda["arena_bytes"] < d["arena_bytes"] + 64 * 2**20


def test_sizing_a_cuda_arena_needs_no_gpu(monkeypatch):
    from nbalex import backends
    monkeypatch.setattr(backends, "cuda_available", lambda: False)
    planned = describe("alexnet", batch_size=128, backend="cuda")
    assert planned["arena_bytes"] > describe("alexnet", batch_size=128, backend="reference")["arena_bytes"]
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
        Net(TINY, backend="cuda", batch_size=2)


BASE = """
name = "bad"
image_size = 16
input_size = 12
[[layers]]
name = "conv1"
type = "conv"
filters = 4
kernel = 3
{extra}
[[layers]]
name = "fc2"
type = "fc"
outputs = 3
"""


@pytest.mark.parametrize("extra, words", [
    ("groups = 3", ("conv1", "groups")),
    ("stride = 0", ("conv1", "stride")),
    ("kernel_size = 3", ("conv1", "kernel_size")),
    ("relu = 1", ("conv1", "relu")),
    ('[[layers]]\nname = "p"\ntype = "maxpool"\nsize = 40', ("'p'", "size")),
    ('[[layers]]\nname = "d"\ntype = "dropout"\np = 1.5', ("'d'", "'p'")),
    ('[[layers]]\nname = "x"\ntype = "softmax"', ("'x'", "type")),
    ('[[layers]]\nname = "n"\ntype = "lrn"\nsize = 4', ("'n'", "size")),
])
def test_bad_config_names_the_layer_and_the_field(extra, words):
    text = BASE.replace("kernel = 3\n{extra}", "kernel = 3\n" + extra) if "[[" not in extra \
        else BASE.replace("{extra}", extra)
    with pytest.raises(ConfigError) as err:
        Net(text, backend="reference", batch_size=1)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_unknown_model_and_missing_field():
    with pytest.raises(ConfigError, match="unknown model"):
        load_config("alexnet-huge")
    with pytest.raises(ConfigError, match="conv1.*filters"):
        load_config(BASE.replace("filters = 4", "").replace("{extra}", ""))
    assert isinstance(ConfigError("x"), ValueError)


# ---- parameters and initialisation ------------------------------------------------------------


def test_paper_init_is_seeded_and_follows_the_config():
    a = Net("alexnet-mini", backend="reference", batch_size=1, seed=3).params()
    b = Net("alexnet-mini", backend="reference", batch_size=1, seed=3).params()
    c = Net("alexnet-mini", backend="reference", batch_size=1, seed=4).params()
    assert list(a)[:2] == ["conv1.weight", "conv1.bias"] and list(a)[-1] == "fc8.bias"
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["conv2.weight"], c["conv2.weight"])
    _, _, specs = load_config("alexnet-mini")
    for p in (p for s in specs for p in s.params):
        if p.init_std:
            assert abs(a[p.name].std() - p.init_std) < 0.1 * p.init_std
            assert abs(a[p.name].mean()) < 0.1 * p.init_std
        else:
            assert np.all(a[p.name] == p.init_value)
    assert np.all(a["conv1.bias"] == 0) and np.all(a["fc8.bias"] == 0)


def test_alexnet_config_states_the_papers_initialisation():
    _, _, specs = load_config("alexnet")
    params = {p.name: p for s in specs for p in s.params}
    ones = {"conv2.bias", "conv4.bias", "conv5.bias", "fc6.bias", "fc7.bias"}
    for name, p in params.items():
        if name.endswith(".weight"):
            assert p.init_std == 0.01, name
        else:
            assert not p.init_std and p.init_value == (1.0 if name in ones else 0.0), name


def test_load_params_rejects_another_models_parameters():
    net = Net(TINY, backend="reference", batch_size=1)
    other = net.params()
    other["conv1.weight"] = np.zeros((5, 3, 3, 3), np.float32)
    with pytest.raises(ValueError, match=r"conv1.weight has shape \(5, 3, 3, 3\).*\(6, 3, 3, 3\)"):
        net.load_params(other)
    del other["fc7.bias"]
    with pytest.raises(ValueError, match="missing fc7.bias"):
        net.load_params(other)


# ---- forward and backward ---------------------------------------------------------------------


def test_whole_network_gradient_check_float64():
    net = Net(TINY, backend="reference", batch_size=2, dtype=np.float64, seed=1)
    x, labels = batch(net, 2)
    x = x.astype(np.float64)
    net.forward_backward(x, labels, train=True, seed=5)
    grads = net.grads()
    params = net.params()
    rng = np.random.default_rng(0)
    eps = 1e-6
    for name, w in params.items():
        for flat_index in rng.choice(w.size, size=min(6, w.size), replace=False):
            idx = np.unravel_index(flat_index, w.shape)
            losses = []
            for sign in (1, -1):
                shifted = {k: v.copy() for k, v in params.items()}
                shifted[name][idx] += sign * eps
                net.load_params(shifted)
                losses.append(net.forward_backward(x, labels, train=True, seed=5))
            numeric = (losses[0] - losses[1]) / (2 * eps)
            assert abs(numeric - grads[name][idx]) <= 1e-6 + 1e-5 * abs(numeric), (name, idx)
        net.load_params(params)


def test_gradients_are_overwritten_not_accumulated():
    net = Net(TINY, backend="reference", batch_size=2)
    x, labels = batch(net, 2)
    net.forward_backward(x, labels, seed=1)
    first = net.grads()
    net.forward_backward(x, labels, seed=1)
    assert all(np.array_equal(first[k], v) for k, v in net.grads().items())


def test_smaller_batch_and_eval_mode():
    net = Net(TINY, backend="reference", batch_size=4)
    x, _ = batch(net, 4)
    full = net.forward(x)
    assert full.shape == (4, 4) and full.dtype == np.float32
    np.testing.assert_allclose(net.forward(x[:3]), full[:3], rtol=1e-6, atol=1e-6)
    # eval mode ignores dropout; train mode applies it (different logits, seeded)
    train_a = net.forward(x, train=True, seed=1)
    assert not np.allclose(train_a, full)
    np.testing.assert_array_equal(net.forward(x, train=True, seed=1), train_a)
    with pytest.raises(ValueError, match="1..4"):
        net.forward(np.zeros((5, 3, 12, 12), np.float32))


def test_sgd_step_is_the_papers_rule_with_per_tensor_multipliers():
    net = Net(TINY, backend="reference", batch_size=2)
    x, labels = batch(net, 2)
    rng = np.random.default_rng(7)
    net.load_momentum({k: rng.normal(size=v.shape).astype(np.float32) for k, v in net.params().items()})
    net.forward_backward(x, labels, seed=2)
    w, g, v = net.params(), net.grads(), net.momentum()
    lr, mom, wd = 0.1, 0.9, 0.01
    net.sgd_step(lr, momentum=mom, weight_decay=wd)
    lr_mult = {"fc6.weight": 0.5, "fc7.bias": 2.0}
    decay_mult = {"fc6.weight": 2.0}
    w2, v2 = net.params(), net.momentum()
    for name in w:
        dm = decay_mult.get(name, 0.0 if name.endswith(".bias") else 1.0)
        expected_v = mom * v[name] - lr * lr_mult.get(name, 1.0) * (wd * dm * w[name] + g[name])
        np.testing.assert_allclose(v2[name], expected_v, rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(w2[name], w[name] + expected_v, rtol=1e-5, atol=1e-6, err_msg=name)


def test_two_towers_equal_one_tower_in_host_memory():
    one = Net(TINY, backend="reference", batch_size=3, seed=2)
    two = Net(TINY, backend="reference", batch_size=3, seed=2, gpus=(0, 0))
    assert two.towers == [] and len(two.arenas) == 2
    assert all(np.array_equal(v, two.params()[k]) for k, v in one.params().items())
    for step in range(3):
        x, labels = batch(one, 3, seed=step)
        np.testing.assert_allclose(two.forward(x), one.forward(x), rtol=1e-5, atol=1e-6)
        loss1 = one.forward_backward(x, labels, seed=step)
        loss2 = two.forward_backward(x, labels, seed=step)
        assert abs(loss1 - loss2) < 1e-5
        g1, g2 = one.grads(), two.grads()
        for k in g1:
            assert max_rel(g2[k], g1[k]) < 1e-5, k
        one.sgd_step(0.05)
        two.sgd_step(0.05)
    p1, p2 = one.params(), two.params()
    for k in p1:
        assert max_rel(p2[k], p1[k]) < 1e-5, k


def test_a_training_step_allocates_nothing():
    net = Net(TINY, backend="reference", batch_size=2, gpus=(0, 0))
    x, labels = batch(net, 2)
    net.forward_backward(x, labels)
    net.sgd_step(0.01)
    counts = [a.allocations for a in net.arenas]
    used = [a.used for a in net.arenas]
    for step in range(2):
        net.forward_backward(x, labels, seed=step)
        net.sgd_step(0.01)
        net.forward(x)
    assert [a.allocations for a in net.arenas] == counts
    assert [a.used for a in net.arenas] == used


def test_training_lowers_the_loss():
    net = Net(TINY, backend="reference", batch_size=8, seed=0)
    x, labels = batch(net, 8)
    first = net.forward_backward(x, labels, train=False)
    for _ in range(40):
        net.forward_backward(x, labels, train=False)
        net.sgd_step(0.02)
    assert net.forward_backward(x, labels, train=False) < 0.5 * first


def test_cpu_conv_and_linear_launchers_work_in_the_towers_workspace(monkeypatch):
    """Inside a step every conv and linear launcher gets the arena's workspace, never None."""
    import nbalex.cpu.conv2d as cpu_conv
    import nbalex.cpu.conv_rows as cpu_rows
    import nbalex.cpu.linear as cpu_linear
    import nbalex.cpu.winograd as cpu_winograd
    seen = []

    def spy(module, name, kind):
        real = getattr(module, name)

        def carve(workspace, *args):
            seen.append((kind, workspace is None))
            return real(workspace, *args)
        monkeypatch.setattr(module, name, carve)

    spy(cpu_linear, "transposed", "fc")
    spy(cpu_conv, "_buffers", "conv")
    spy(cpu_rows, "_buffers", "conv")
    spy(cpu_winograd, "workspace_view", "conv")
    net = Net(TINY, backend="cpu", batch_size=2, gpus=(0, 0))
    x, labels = batch(net, 2)
    net.forward_backward(x, labels)
    assert {kind for kind, _ in seen} == {"conv", "fc"}
    assert not any(missing for _, missing in seen), seen


def _dropout_masks(net, n):
    """{layer: copy of its tower-0 dropout mask for the first n examples}."""
    out = {}
    for stage in net._stages:
        ex = getattr(stage, "executors", [None])[0]
        if ex is not None and ex.spec.type == "dropout":
            out[ex.spec.name] = np.array(ex.mask[:n])
    assert out, "the config has no dropout layer"
    return out


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_two_half_batches_with_offsets_draw_the_full_batchs_dropout(backend):
    """Data parallelism: rank r's slice, given batch_offset, gets the masks of one process."""
    net = Net(TINY, backend=backend, batch_size=4, seed=1)
    x, labels = batch(net, 4)
    net.forward_backward(x, labels, seed=7)
    full = _dropout_masks(net, 4)
    halves = []
    for r in range(2):
        net.forward_backward(x[2 * r:2 * r + 2], labels[2 * r:2 * r + 2], seed=7, batch_offset=2 * r)
        halves.append(_dropout_masks(net, 2))
    for name in full:
        np.testing.assert_array_equal(np.concatenate([h[name] for h in halves]), full[name])
    net.forward_backward(x[2:], labels[2:], seed=7)           # without the offset: other masks
    assert any((_dropout_masks(net, 2)[name] != full[name][2:]).any() for name in full)
    with pytest.raises(ValueError, match="Net: batch_offset must be >= 0, got -1"):
        net.forward_backward(x, labels, batch_offset=-1)


def test_the_plan_is_checked_once_at_build_and_steps_take_the_fast_path(monkeypatch):
    from nbalex import checks
    net = Net(TINY, backend="cpu", batch_size=2)
    x, labels = batch(net, 2)
    seen = []
    for name in ("conv2d_forward", "maxpool_forward", "dropout_forward", "sgd_update"):
        monkeypatch.setattr(checks, name, lambda *a, _n=name, **k: seen.append(_n))
    net.forward_backward(x, labels)
    net.sgd_step(0.01)
    net.forward(x)
    assert seen == []
    Net(TINY, backend="cpu", batch_size=2)
    assert {"conv2d_forward", "maxpool_forward", "dropout_forward", "sgd_update"} <= set(seen)


def test_a_bad_plan_is_refused_when_the_net_is_built(monkeypatch):
    from nbalex import layers
    real = layers.MaxPool.check

    def shrunk(self, backend):                 # a pool whose argmax buffer is one row short
        self.idx = self.idx[:, :, :-1]
        real(self, backend)
    monkeypatch.setattr(layers.MaxPool, "check", shrunk)
    with pytest.raises(ValueError, match="maxpool_forward: idx"):
        Net(TINY, backend="reference", batch_size=2)


def test_inference_saves_nothing_for_backward():
    net = Net(TINY, backend="cpu", batch_size=2, seed=3)
    x, labels = batch(net, 2)
    net.forward_backward(x, labels, train=False)
    pools = [s.executors[0] for s in net._stages
             if getattr(s, "executors", None) and s.executors[0].spec.type in ("maxpool", "lrn")]
    saved = [np.array(p.idx if p.spec.type == "maxpool" else p.scale) for p in pools]
    logits = net.forward(x[::-1].copy())        # other inputs: a saving pass would overwrite
    for p, before in zip(pools, saved):
        np.testing.assert_array_equal(p.idx if p.spec.type == "maxpool" else p.scale, before)
    np.testing.assert_allclose(logits[::-1], net.forward(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="sgd_step: lr must be finite"):
        net.sgd_step(float("nan"))
