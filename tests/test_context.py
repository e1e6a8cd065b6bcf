"""expandctl.expanded: train expanded in the user's own loop, the compact weights land in the model they hold."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import expandctl
from expandctl.errors import CheckFailed, UnsupportedError, UsageError


class Net(nn.Module):
    def __init__(self, bias: bool = True):
        super().__init__()
        self.c1 = nn.Conv2d(1, 6, 5, padding=2, bias=bias)  # ck
        self.bn = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 8, 3, padding=1)  # cl
        self.fc = nn.Linear(8 * 4 * 4, 10)  # fc

    def forward(self, x):
        x = F.relu(self.bn(self.c1(x)))
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        return self.fc(x.flatten(1))


def _batches(n=6):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(n)]


def _train(big, batches):
    opt = torch.optim.SGD(big.parameters(), lr=0.1, momentum=0.9)
    big.train()
    for x, y in batches:
        loss = F.cross_entropy(big(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, [id(p) for p in model.parameters()]


def _assert_untouched(model, snap):
    state, ids = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), k  # bitwise
    assert [id(p) for p in model.parameters()] == ids
    assert not list(expandctl.expanded_layers(model))


def test_trained_weights_land_in_the_same_model_object():
    model = Net()
    modules = dict(model.named_modules())
    params = list(model.parameters())
    before = _snapshot(model)
    with expandctl.expanded(model, strategy="ck+cl+fc", rate=2, seed=0) as big:
        assert big is not model
        assert {type(m).__name__ for _, m in expandctl.expanded_layers(big)} >= {"ExpandedConvCK", "ExpandedConvCL"}
        _train(big, _batches())
    # the same object, submodules and parameter objects: references held elsewhere stay valid
    assert dict(model.named_modules()) == modules
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert not list(expandctl.expanded_layers(model))
    assert not torch.equal(model.c1.weight, before[0]["c1.weight"])  # it did change
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), big.eval()(x), rtol=1e-4, atol=1e-5)
    # the running statistics came back too (the trained `big` updated them)
    torch.testing.assert_close(model.bn.running_mean, big.bn.running_mean)


def test_checks_in_float64_and_float32_on_the_first_forward_shape():
    model = Net()
    ctx = expandctl.expanded(model, strategy="ck+cl+fc", rate=2, seed=0)
    with ctx as big:
        _train(big, _batches(2))
    assert ctx.input_shape == (1, 8, 8)
    assert [r.dtype for r in ctx.reports] == ["float64", "float32"]
    assert all(r.passed for r in ctx.reports)


def test_input_shape_given_needs_no_forward():
    model = Net()
    before = _snapshot(model)
    ctx = expandctl.expanded(model, strategy="cl", input_shape=(1, 8, 8), init="preserve")
    with ctx as big:
        pass  # preserve: the expanded model computes the same function; nothing trained
    assert ctx.input_shape == (1, 8, 8) and all(r.passed for r in ctx.reports)
    original = Net()
    original.load_state_dict(before[0])
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():  # the same function back, through the chain and its contraction
        torch.testing.assert_close(model.eval()(x), original.eval()(x), rtol=1e-4, atol=1e-5)
    assert big.training  # the block's model is the caller's to keep


@pytest.mark.parametrize("exc", [RuntimeError("diverged"), KeyboardInterrupt()])
def test_an_exception_inside_the_block_leaves_the_model_untouched(exc):
    model = Net()
    snap = _snapshot(model)
    with pytest.raises(type(exc)):
        with expandctl.expanded(model, strategy="ck+cl+fc", rate=2) as big:
            _train(big, _batches(3))
            raise exc
    _assert_untouched(model, snap)


def test_a_failed_check_raises_and_leaves_the_model_untouched(monkeypatch):
    import expandctl.rewrite as rewrite_module
    from expandctl.rewrite import contract

    def wrong_contract(model, inplace=False):  # a contraction bug: one weight off by far more than rounding
        small = contract(model, inplace)
        with torch.no_grad():
            small.c2.weight.add_(1e-2)
        return small

    monkeypatch.setattr(rewrite_module, "contract", wrong_contract)  # the contraction the check compares against
    model = Net()
    snap = _snapshot(model)
    with pytest.raises(CheckFailed) as info:
        with expandctl.expanded(model, strategy="ck+cl+fc", rate=2) as big:
            _train(big, _batches(2))
    assert "not written back" in str(info.value)
    assert [r.passed for r in info.value.reports] == [True, False]  # float64 contracts its own copy
    _assert_untouched(model, snap)


def test_no_forward_and_no_input_shape_is_a_usage_error():
    model = Net()
    snap = _snapshot(model)
    with pytest.raises(UsageError, match="input_shape"):
        with expandctl.expanded(model, strategy="cl"):
            pass
    _assert_untouched(model, snap)


def test_a_contraction_that_changes_the_structure_is_refused_before_writing():
    # dbb's folded shifts give a bias-free conv a bias when no BatchNorm follows to absorb it
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2))
    snap = _snapshot(model)
    with pytest.raises(UnsupportedError, match="0.bias"):
        with expandctl.expanded(model, strategy="dbb") as big:
            _train(big, [(torch.randn(8, 1, 4, 4), torch.randint(0, 2, (8,)))])
    _assert_untouched(model, snap)


def test_bad_arguments_are_usage_errors():
    with pytest.raises(UsageError, match="inplace"):
        expandctl.expanded(Net(), strategy="cl", inplace=True)
    big = expandctl.expand(Net(), strategy="cl")
    with pytest.raises(UsageError, match="already"):
        expandctl.expanded(big, strategy="cl")
