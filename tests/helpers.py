"""Shared test helpers (import as `from helpers import ...`; pytest puts tests/ on sys.path)."""

import torch


def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BN statistics and affine parameters, so eval-mode comparisons mean something."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


class CustomNet(torch.nn.Module):
    """A user's class: pickled whole, it is outside expandctl's allowlist."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x)


class Payload:
    """Unpickling runs ``exec``: proof that nothing from a refused file executes is the marker's absence."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def load_script(name: str, folder: str = "examples"):
    """A script (FOLDER/NAME.py, FOLDER one of examples, benchmarks) imported as a module."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_{folder}_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class AllLayers(torch.nn.Module):
    """Every layer type an expansion kind takes, on 1x8x8 images (``synthetic:1x8x8``, 10 classes):
    Conv1d/2d/3d, ConvTranspose1d/2d/3d (the 2d one upsamples: stride 2, even kernel) and Linear.
    Rebuilt from its spec ``helpers:AllLayers``, as a user's ``--arch mymodels:Net`` would be."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        nn = torch.nn
        self.c2 = nn.Conv2d(1, 4, 5, padding=2)
        self.bn = nn.BatchNorm2d(4)
        self.c3 = nn.Conv3d(1, 2, (3, 5, 5), padding=(1, 2, 2))
        self.t3 = nn.ConvTranspose3d(2, 2, (3, 5, 5), padding=(1, 2, 2))
        self.t2 = nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1)
        self.c1 = nn.Conv1d(32, 8, 5, padding=2)
        self.t1 = nn.ConvTranspose1d(8, 8, 5, padding=2)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        relu = torch.relu
        x = relu(self.bn(self.c2(x)))  # B, 4, 8, 8
        x = relu(self.t3(self.c3(x.unsqueeze(1))))  # B, 2, 4, 8, 8
        x = relu(self.t2(x.flatten(1, 2)))  # B, 4, 16, 16
        x = torch.nn.functional.avg_pool2d(x, 2).flatten(1, 2)  # B, 32, 8
        x = relu(self.t1(self.c1(x)))  # B, 8, 8
        return self.fc(x.flatten(1))
