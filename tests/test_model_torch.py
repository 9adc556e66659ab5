"""AlexNet against an independent PyTorch model of the same network (grouped, as the paper's).

Both get the same weights and the same dropout masks; the logits, the loss and every
parameter gradient must agree.  Runs on the CPU with the reference backend at batch 2.
"""

import numpy as np
import pytest

from nbalex.layers import layer_seed
from nbalex.model import Net
from nbalex.reference.dropout import keep_mask

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional


class TorchAlexNet(nn.Module):
    """The paper's network in PyTorch: groups=2 in conv2/4/5, LRN within each half."""

    def __init__(self, classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 96, 11, stride=4)
        self.conv2 = nn.Conv2d(96, 256, 5, padding=2, groups=2)
        self.conv3 = nn.Conv2d(256, 384, 3, padding=1)
        self.conv4 = nn.Conv2d(384, 384, 3, padding=1, groups=2)
        self.conv5 = nn.Conv2d(384, 256, 3, padding=1, groups=2)
        self.fc6 = nn.Linear(256 * 6 * 6, 4096)
        self.fc7 = nn.Linear(4096, 4096)
        self.fc8 = nn.Linear(4096, classes)
        # the paper's alpha (not divided by n) is PyTorch's alpha / size
        self.lrn = nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)

    def norm(self, x):
        return torch.cat([self.lrn(half) for half in x.chunk(2, dim=1)], dim=1)

    def forward(self, x, masks=None):
        pool = lambda t: F.max_pool2d(t, 3, 2)  # noqa: E731
        x = pool(self.norm(F.relu(self.conv1(x))))
        x = pool(self.norm(F.relu(self.conv2(x))))
        x = F.relu(self.conv3(x))
        x = F.relu(self.conv4(x))
        x = pool(F.relu(self.conv5(x))).flatten(1)
        x = F.relu(self.fc6(x))
        if masks:
            x = x * masks[0] / 0.5
        x = F.relu(self.fc7(x))
        if masks:
            x = x * masks[1] / 0.5
        return self.fc8(x)


def assert_close(got, want, what, tol):
    scale = float(np.max(np.abs(want))) + 1e-12
    err = float(np.max(np.abs(got - want)))
    assert err <= tol * scale, f"{what}: max error {err:.3g}, scale {scale:.3g}"


def test_alexnet_matches_pytorch():
    torch.manual_seed(0)
    net = Net("alexnet", backend="reference", batch_size=2, seed=0)
    model = TorchAlexNet()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in net.params().items()})

    rng = np.random.default_rng(0)
    x = (rng.normal(size=(2, 3, 227, 227)) * 50).astype(np.float32)   # mean-subtracted pixels
    labels = np.array([3, 977], dtype=np.int32)
    xt = torch.from_numpy(x)

    with torch.no_grad():
        expected_logits = model(xt).numpy()
    assert_close(net.forward(x), expected_logits, "logits", 1e-4)

    seed = 11
    drops = [i for i, layer in enumerate(net.layers) if layer.type == "dropout"]
    masks = [torch.from_numpy(keep_mask((2, 4096), 0.5, layer_seed(seed, i)).astype(np.float32))
             for i in drops]
    loss = net.forward_backward(x, labels, train=True, seed=seed)
    torch_loss = F.cross_entropy(model(xt, masks), torch.from_numpy(labels).long())
    torch_loss.backward()
    assert abs(loss - torch_loss.item()) < 1e-4 * max(1.0, abs(loss))
    grads = net.grads()
    for name, param in model.named_parameters():
        if name.startswith("lrn"):
            continue
        assert_close(grads[name], param.grad.numpy(), f"gradient {name}", 1e-3)
