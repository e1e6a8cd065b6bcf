"""Re-parameterisable blocks written the way other codebases write them (our own code, their styles),
for ``contract_graph``: it must merge each without knowing the class, and leave alone what is not one layer.

Every block runs its branches on the activations, as those codebases do while training; none has a
method to merge itself. Importable as a module so that a pickled model of them loads in a subprocess.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv_bn(cin, cout, k, stride=1, padding=None, groups=1):
    """YOLOv6 / RepVGG style: a Sequential with ``conv`` and ``bn`` children."""
    padding = k // 2 if padding is None else padding
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False))
    seq.add_module("bn", nn.BatchNorm2d(cout))
    return seq


class RepVGGBlock(nn.Module):
    """YOLOv6's RepVGGBlock layout: dense 3x3 + 1x1 + identity BN, ``id_out = 0`` when there is none."""

    def __init__(self, cin, cout, stride=1, groups=1):
        super().__init__()
        self.nonlinearity = nn.ReLU()
        self.se = nn.Identity()
        self.rbr_identity = nn.BatchNorm2d(cin) if cout == cin and stride == 1 else None
        self.rbr_dense = conv_bn(cin, cout, 3, stride, 1, groups)
        self.rbr_1x1 = conv_bn(cin, cout, 1, stride, 0, groups)

    def forward(self, inputs):
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(inputs)
        return self.nonlinearity(self.se(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out))


class ACBlock(nn.Module):
    """ACNet: a square kxk, a 1xk and a kx1 conv, each with its BN, summed."""

    def __init__(self, cin, cout, k=3, stride=1):
        super().__init__()
        p = k // 2
        self.square_conv = nn.Conv2d(cin, cout, (k, k), stride, (p, p), bias=False)
        self.square_bn = nn.BatchNorm2d(cout)
        self.hor_conv = nn.Conv2d(cin, cout, (1, k), stride, (0, p), bias=False)
        self.hor_bn = nn.BatchNorm2d(cout)
        self.ver_conv = nn.Conv2d(cin, cout, (k, 1), stride, (p, 0), bias=False)
        self.ver_bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        square = self.square_bn(self.square_conv(x))
        vertical = self.ver_bn(self.ver_conv(x))
        horizontal = self.hor_bn(self.hor_conv(x))
        return square + vertical + horizontal


class MobileOneBlock(nn.Module):
    """MobileOne: several kxk conv-BN branches, a 1x1 "scale" branch and an identity BN, summed with ``+=``."""

    def __init__(self, cin, cout, k=3, stride=1, groups=1, branches=3, act=True):
        super().__init__()
        self.rbr_skip = nn.BatchNorm2d(cin) if cout == cin and stride == 1 else None
        self.rbr_conv = nn.ModuleList([conv_bn(cin, cout, k, stride, k // 2, groups) for _ in range(branches)])
        self.rbr_scale = conv_bn(cin, cout, 1, stride, 0, groups) if k > 1 else None
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x):
        scale_out = 0
        if self.rbr_scale is not None:
            scale_out = self.rbr_scale(x)
        identity_out = 0
        if self.rbr_skip is not None:
            identity_out = self.rbr_skip(x)
        out = scale_out + identity_out
        for conv in self.rbr_conv:
            out += conv(x)
        return self.act(out)


class BNAndPad(nn.Module):
    """A BatchNorm whose output is padded with the BatchNorm's own image of zero (DBB), written as
    ``pad(y - t) + t``: then a padding-free kxk after it is one conv with the 1x1 before it."""

    def __init__(self, channels, pad):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.pad = pad

    def forward(self, x):
        y = self.bn(x)
        t = self.bn.bias - self.bn.running_mean * self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)
        t = t.view(1, -1, 1, 1)
        return F.pad(y - t, [self.pad] * 4) + t


class DiverseBranchBlock(nn.Module):
    """DBB: kxk-BN, 1x1-BN, 1x1 -> avg pool (padding counted) -> BN, and 1x1 -> BNAndPad -> kxk -> BN."""

    def __init__(self, cin, cout, k=3, stride=1):
        super().__init__()
        p = k // 2
        self.dbb_origin = conv_bn(cin, cout, k, stride, p)
        self.dbb_1x1 = conv_bn(cin, cout, 1, stride, 0)
        self.dbb_avg = nn.Sequential()
        self.dbb_avg.add_module("conv", nn.Conv2d(cin, cout, 1, bias=False))
        self.dbb_avg.add_module("avg", nn.AvgPool2d(k, stride, p))
        self.dbb_avg.add_module("avgbn", nn.BatchNorm2d(cout))
        self.dbb_1x1_kxk = nn.Sequential()
        self.dbb_1x1_kxk.add_module("idconv1", nn.Conv2d(cin, cin, 1, bias=False))
        self.dbb_1x1_kxk.add_module("bn1", BNAndPad(cin, p))
        self.dbb_1x1_kxk.add_module("conv2", nn.Conv2d(cin, cout, k, stride, 0, bias=False))
        self.dbb_1x1_kxk.add_module("bn2", nn.BatchNorm2d(cout))
        self.nonlinear = nn.ReLU()

    def forward(self, inputs):
        out = self.dbb_origin(inputs)
        out += self.dbb_1x1(inputs)
        out += self.dbb_avg(inputs)
        out += self.dbb_1x1_kxk(inputs)
        return self.nonlinear(out)


class OREPABlock(nn.Module):
    """OREPA: branch kernels composed in weight space with per-channel scales, one conv, one BN after."""

    def __init__(self, cin, cout, k=3, stride=1):
        super().__init__()
        self.stride, self.padding = stride, k // 2
        self.weight_origin = nn.Parameter(torch.randn(cout, cin, k, k) * 0.1)
        self.weight_1x1 = nn.Parameter(torch.randn(cout, cin, 1, 1) * 0.1)
        self.weight_avg = nn.Parameter(torch.randn(cout, cin, 1, 1) * 0.1)
        self.vector = nn.Parameter(torch.rand(3, cout) + 0.5)
        self.register_buffer("avg_kernel", torch.ones(k, k) / (k * k))
        self.bn = nn.BatchNorm2d(cout)

    def weight_gen(self):
        k = self.weight_origin.shape[-1]
        w_1x1 = F.pad(self.weight_1x1, [k // 2] * 4)
        w_avg = self.weight_avg * self.avg_kernel
        parts = torch.stack([self.weight_origin, w_1x1, w_avg])
        return torch.einsum("bo,boihw->oihw", self.vector, parts)

    def forward(self, x):
        return F.relu(self.bn(F.conv2d(x, self.weight_gen(), None, self.stride, self.padding)))


class RepMixer(nn.Module):
    """FastViT's RepMixer: ``x + gamma * (mixer(x) - norm(x))`` with a depthwise conv-BN mixer."""

    def __init__(self, dim, k=3):
        super().__init__()
        self.norm = nn.BatchNorm2d(dim)
        self.mixer = conv_bn(dim, dim, k, 1, k // 2, groups=dim)
        self.layer_scale = nn.Parameter(1e-1 * torch.ones(dim, 1, 1))

    def forward(self, x):
        return x + self.layer_scale * (self.mixer(x) - self.norm(x))


class ExpandNetsChain(nn.Module):
    """A hand-written CK chain (ExpandNets): pad once, three valid 3x3 convs with biases, then BN."""

    def __init__(self, cin, cout, rate=2):
        super().__init__()
        self.c1 = nn.Conv2d(cin, rate * cin, 3)
        self.c2 = nn.Conv2d(rate * cin, rate * cout, 3)
        self.c3 = nn.Conv2d(rate * cout, cout, 3)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.c3(self.c2(self.c1(F.pad(x, [3, 3, 3, 3]))))))


class FCChain(nn.Module):
    """ExpandNets' FC expansion by hand: Linear -> Linear -> Linear, then BatchNorm1d."""

    def __init__(self, cin, cout, rate=4):
        super().__init__()
        widths = [cin, rate * cin, rate * cout, cout]
        self.fc = nn.Sequential(*(nn.Linear(a, b) for a, b in zip(widths, widths[1:])))
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x):
        return self.bn(self.fc(x))


class BlocksNet(nn.Module):
    """One model made of every block above; every conv / linear in it sits in a mergeable region."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = RepVGGBlock(3, 16, stride=2)
        self.rep = RepVGGBlock(16, 16)
        self.acb = ACBlock(16, 16)
        self.mob = MobileOneBlock(16, 16, groups=16)
        self.dbb = DiverseBranchBlock(16, 24, stride=2)
        self.orepa = OREPABlock(24, 24)
        self.mixer = RepMixer(24)
        self.chain = ExpandNetsChain(24, 32)
        self.head = FCChain(32, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = self.rep(x)
        x = F.relu(self.acb(x))
        x = self.mob(x)
        x = self.dbb(x)
        x = self.orepa(x)
        x = self.mixer(x)
        x = self.chain(x)
        return self.head(x.mean((2, 3)))


# ------------------------------------------------------------------------------- must not merge
class BiasThenPadded(nn.Module):
    """A 1x1 with a bias, then a zero-padded 3x3: at the border the 3x3 reads 0, not the bias."""

    def __init__(self, c=4):
        super().__init__()
        self.pw = nn.Conv2d(c, c, 1, bias=True)
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x):
        return self.conv(self.pw(x))


class PaddedThenPadded(nn.Module):
    """Two zero-padded 3x3 convs: not one 5x5 conv at the border."""

    def __init__(self, c=4):
        super().__init__()
        self.a = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b = nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x):
        return self.b(self.a(x))


class AvgExcludingPad(nn.Module):
    """A 1x1 then average pooling that does not count the padding (border divisor varies)."""

    def __init__(self, c=4):
        super().__init__()
        self.pw = nn.Conv2d(c, c, 1, bias=False)
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)

    def forward(self, x):
        return self.pool(self.pw(x))


class ReadOutside(nn.Module):
    """conv -> BN where the conv's output is also read by the residual add: folding BN would change it."""

    def __init__(self, c=4):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        y = self.conv(x)
        return torch.relu(self.bn(y)) + y


class NonLinearBetween(nn.Module):
    """conv -> ReLU -> conv: the nonlinearity stops the region."""

    def __init__(self, c=4):
        super().__init__()
        self.a = nn.Conv2d(c, c, 1)
        self.b = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class Untraceable(nn.Module):
    """Data-dependent control flow inside a submodule: that submodule stays an opaque leaf."""

    def __init__(self, c=4):
        super().__init__()
        self.branchy = _Branchy(c)
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn(self.conv(self.branchy(x)))


class _Branchy(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.lin = nn.Conv2d(c, c, 1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: fx cannot trace it
            return self.lin(x)
        return -self.lin(x)


def settle(model: nn.Module, shape=(3, 32, 32), steps: int = 3, seed: int = 0) -> nn.Module:
    """A few train-mode SGD steps on random data so weights and BatchNorm statistics move; eval mode."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    for _ in range(steps):
        x = torch.randn(8, *shape, generator=g)
        out = model(x)
        loss = out.float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


class TimmStyle(nn.Module):
    """conv -> timm's BatchNormAct2d (a BatchNorm subclass with its activation inside, traced through)."""

    def __init__(self, c=8):
        super().__init__()
        from timm.layers import BatchNormAct2d

        self.conv = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn = BatchNormAct2d(c, act_layer=nn.ReLU)
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).mean((2, 3)))


class WithOwnMerge(nn.Module):
    """A block that merges itself (``switch_to_deploy``), as RepVGG / MobileOne codebases write them."""

    def __init__(self, c=4):
        super().__init__()
        self.a = nn.Conv2d(c, c, 3, padding=1)
        self.b = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return self.a(x) + self.b(x)

    def switch_to_deploy(self):
        raise NotImplementedError


class HasBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = WithOwnMerge(4)

    def forward(self, x):
        return self.block(torch.relu(self.stem(x)))
