"""Shared test helpers (import as `from helpers import ...`; pytest puts tests/ on sys.path)."""

from pathlib import Path

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


class PoolNet(torch.nn.Module):
    """A global-pool classifier (as torchvision's ResNets and MobileNets end): any image size."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(in_channels, 8, 3, padding=1, stride=2),
            torch.nn.BatchNorm2d(8),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, 16, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
        )
        self.fc = torch.nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


class SegNet(torch.nn.Module):
    """A fully convolutional segmentation model: a stride-2 encoder, logits upsampled to the input size."""

    def __init__(self, in_channels: int = 3, num_classes: int = 4):
        super().__init__()
        self.encoder = torch.nn.Sequential(
            torch.nn.Conv2d(in_channels, 8, 3, padding=1, stride=2),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, 8, 5, padding=2),
        )
        self.head = torch.nn.Conv2d(8, num_classes, 1)

    def forward(self, x):
        y = self.head(torch.relu(self.encoder(x)))
        return torch.nn.functional.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


class ProtoNet(torch.nn.Module):
    """A nearest-class-mean classifier over flattened images, set by :func:`fit_prototypes` (no training).

    ``outlier`` adds a hidden unit with a huge constant activation that the logits ignore: the float
    model is unchanged, but INT8's one per-tensor scale for that activation wipes out every other
    unit's signal, so the quantized model loses most of its accuracy (the gate's failing case)."""

    def __init__(self, features: int = 64, num_classes: int = 10, outlier: float = 0.0):
        super().__init__()
        self.hidden = torch.nn.Linear(features, num_classes + 1)
        self.logits = torch.nn.Linear(num_classes + 1, num_classes, bias=False)
        with torch.no_grad():
            self.logits.weight.copy_(torch.eye(num_classes, num_classes + 1))
            self.hidden.weight.zero_()
            self.hidden.bias.zero_()
            self.hidden.bias[-1] = outlier

    def forward(self, x):
        return self.logits(self.hidden(torch.flatten(x, 1)))


def fit_prototypes(model: ProtoNet, images: torch.Tensor, labels: torch.Tensor) -> ProtoNet:
    """Logit c = <x, mean_c> - |mean_c|^2 / 2 (the nearest class mean, in the model's hidden layer)."""
    x = torch.flatten(images, 1).float()
    means = torch.stack([x[labels == c].mean(0) for c in range(int(labels.max()) + 1)])
    with torch.no_grad():
        model.hidden.weight[: len(means)] = means
        model.hidden.bias[: len(means)] = -(means**2).sum(1) / 2
    return model


def digit_folder(root: Path, classes: int = 3, per_class: int = 10, size: int = 16) -> Path:
    """Real digits (scikit-learn's 8x8 set) as ``size`` x ``size`` PNGs in ``root/CLASS/``."""
    import numpy as np  # lazy: only the image-folder tests need PIL and scikit-learn
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for c in range(classes):
        (root / str(c)).mkdir(parents=True)
        for j in np.nonzero(d.target == c)[0][:per_class]:
            img = Image.fromarray((d.images[j] * 255 / 16).astype(np.uint8)).resize((size, size))
            img.save(root / str(c) / f"{j}.png")
    return root
