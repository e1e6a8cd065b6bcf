"""torch.compile (inductor, CPU) of every strategy's fused forward: one graph, and eager's numbers.

Compilation takes tens of seconds per model on a 2-core machine: marked slow (``pytest -m slow``).
"""

import copy
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import expandctl
from expandctl.verify import check_contraction

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (shutil.which("g++") or shutil.which("cc")), reason="inductor needs a C++ compiler"),
]


class Net(nn.Module):
    """Every kind finds a layer: a 5x5 conv (ck), 3x3 convs with in == out (cl, acb, rep's identity,
    dbb, orepa), BatchNorms after them (the branch kinds' folded shifts) and a Linear (fc)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 5, padding=2, bias=False)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.max_pool2d(F.relu(self.b2(self.c2(x))), 2)
        return self.fc(x.flatten(1))


# Together every kind: fc, ck, cl, acb, rep, dbb, orepa.
STRATEGIES = ["ck+fc", "cl", "acb", "rep", "dbb", "orepa"]


def _step(model, opt, x, y):
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.detach()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_compiled_fused_training_matches_eager(strategy):
    torch._dynamo.reset()
    big = expandctl.expand(Net(), strategy=strategy, rate=2 if strategy in ("ck+fc", "cl") else None, seed=0)
    assert list(expandctl.expanded_layers(big))
    twin = copy.deepcopy(big)
    compiled = torch.compile(twin, fullgraph=True)  # fullgraph: a graph break is an error
    opt_e = torch.optim.SGD(big.parameters(), lr=0.05, momentum=0.9)
    opt_c = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
        torch.testing.assert_close(_step(compiled, opt_c, x, y), _step(big, opt_e, x, y), rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(big.named_parameters(), twin.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    for (name, a), b in zip(big.named_buffers(), twin.buffers()):  # BatchNorm statistics
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    # eval mode (the merged kernel, cached between changes of the weights) compiles too
    big.eval(), twin.eval()
    x = torch.randn(4, 1, 8, 8, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), big(x), rtol=1e-4, atol=1e-5)
    # and the contraction of the compiled-trained model is exact as ever
    reports = check_contraction(twin, expandctl.contract(twin), (1, 8, 8))
    assert all(r.passed for r in reports), [r.summary() for r in reports]


def test_expanded_context_with_a_compiled_model_writes_back():
    torch._dynamo.reset()
    model = Net()
    g = torch.Generator().manual_seed(0)
    with expandctl.expanded(model, strategy="ck+cl+fc", rate=2, seed=0) as big:
        compiled = torch.compile(big, fullgraph=True)  # the shape hook on `big` sees the first forward, no break
        opt = torch.optim.SGD(big.parameters(), lr=0.05, momentum=0.9)
        for _ in range(3):
            _step(compiled, opt, torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g))
    x = torch.randn(4, 1, 8, 8, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), big.eval()(x), rtol=1e-4, atol=1e-5)
