"""Regenerate the paper's figures and claims on Fashion-MNIST, and try the method on torchvision models.

``make figures`` runs this script. Every experiment uses the reproduction's recipe unless it says
otherwise: Fashion-MNIST, the same 10,000 stratified training images as ``examples/reproduce.py``,
12 epochs of the paper's schedule (lr 0.01 / 0.001 / 0.0001 in thirds), SGD momentum 0.9, batch 128,
no weight decay, no augmentation, rate 4, fused training; accuracy is that of the *contracted* model
(checked in float64 against the expanded one) on all 10,000 test images, which also give the
per-epoch test curves.

Experiments (``--only`` picks some):

``behaviour``    7x7 compact / CL / CK and 3x3 compact / CL / CL+FC, 5 seeds: train and test curves,
                 minimum pairwise gradient cosine similarity after every epoch (100 pairs), and the
                 density of all 435 pairwise similarities of 30 batches after training (the paper's
                 Fig. 2, 5, 6).
``landscape``    9x9 compact / CL / CK, seed 0: filter-normalised 1D and 2D loss and error landscapes
                 of the contracted network on 2,000 / 1,000 training images (Fig. 3, 4).
``product-l2``   CK 7x7 with weight decay 5e-4 on the factors (normal L2) or on the composed kernel
                 (product L2), 3 seeds: overall loss, cross-entropy, train and test error (Fig. 7).
``distillation`` a teacher (SmallNet 3x3 with 64/128/256 channels, 1.5M parameters, trained 20 epochs
                 with crop + flip) and compact+KD / CK+KD 7x7 students, 5 seeds; the students without
                 KD are the ``behaviour`` runs (Fig. 1's claim).
``init``         CK 7x7 with 2 epochs of nonlinear warm-up (ReLUs between the factors), 5 seeds,
                 against the ``behaviour`` CK runs (the paper's "+Init").
``corrupted``    compact / CK 5x5 with 20% of the training labels replaced by another class (one
                 fixed draw), 5 seeds (the paper's generalisation experiment).
``real``         torchvision ShuffleNetV2 x0.5 and MobileNetV2 (width 0.5), compact / CL rate 4 on the
                 first conv and every depthwise 3x3 (the paper's ImageNet setting), 3 seeds (what
                 the 2-core budget allowed; ``REAL_SEEDS``); gray
                 images replicated to 3 channels and resized to 32x32.
``strategies``   every strategy on SmallNet 7x7 and 3x3, 5 seeds: acb, rep, dbb, orepa at their default
                 rates; compact, CL, CK, CL+FC are the ``behaviour`` runs, trained again here on 3 seeds
                 (compact: 5) only as the time and memory reference (docs/evidence.md).
``models``       the two torchvision networks on a recipe they converge under (``MODELS_SETTINGS``:
                 48x48 inputs, 15 epochs, cosine from lr 0.05): compact, CL on the paper's layers, CL on
                 every depthwise conv, and two branch kinds (``--model-strategies``), 3 seeds.

Every run file records seconds per epoch and peak memory (RSS above the RSS before the model was built).

Resumable: each finished run writes ``OUT/<experiment>/<name>.json`` (atomically) and is skipped next
time, so a clean clone with the committed run files rebuilds every figure and table in seconds; a
run killed mid-way continues from its ``last.pt``. Several processes may work on one OUT at once: each
claims a run with a lock file before training it (``make figures JOBS=2``). Every invocation ends by
rewriting ``OUT/results.md``, ``OUT/results.json`` and the figures from the run files present.

    python examples/figures.py --out results/figures [--only behaviour,landscape] [--report-only]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import expandctl
from expandctl import CheckFailed, ExpandctlError
from expandctl.analysis.confusion import grad_confusion_hook, gradient_confusion
from expandctl.analysis.landscape import loss_landscape
from expandctl.checkpoint import atomic_write, load_checkpoint, save
from expandctl.data import DataSplits, TensorImages, load_data, random_crop, random_flip, resize, to_channels
from expandctl.experiments.markdown import update_marked
from expandctl.experiments.runs import Lock, finish_run, read_runs, train_contracted
from expandctl.experiments.runs import claim as claim_lock
from expandctl.experiments.stats import mean_std, std_error_of_difference, welch_p
from expandctl.models import SmallNet
from expandctl.train import TrainConfig
from expandctl.train.losses import product_l2, split_decay_parameters

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce import Progress, subset_indices  # noqa: E402

#: The recipe every run shares unless its spec says otherwise (the reproduction's settings).
SETTINGS = {
    "data": "fashion-mnist", "train_subset": 10_000, "subset_seed": 0, "epochs": 12, "lr": 0.01,
    "schedule": "paper", "batch_size": 128, "momentum": 0.9, "rate": 4,
}  # fmt: skip
SEEDS = (0, 1, 2, 3, 4)
WEIGHT_DECAY = 5e-4
WARMUP_EPOCHS = 2
CORRUPT_FRACTION = 0.2
REAL_CURVE_IMAGES = 2000
#: Seeds of the torchvision runs: 3, not 5, is what this project's 2-core budget allowed (a
#: MobileNetV2 run costs about 6 CPU minutes, 6x a SmallNet run).
REAL_SEEDS = 3
FINAL_CONFUSION_PAIRS = 435  # all pairs of 30 batches
TEACHER = {
    "kwargs": {"kernel_size": 3, "channels": (64, 128, 256), "hidden": 512},
    "epochs": 20, "lr": 0.05, "schedule": "cosine", "weight_decay": 5e-4, "seed": 1000,
}  # fmt: skip
#: strategy, exclude for each SmallNet variant (FC never expands the logits, as in the paper's code)
SMALLNET = {"compact": (None, ()), "cl": ("cl", ()), "ck": ("ck", ()), "cl+fc": ("cl+fc", ("classifier.3",))}
#: The parallel-branch kinds (docs/strategies.md), each trained at its own default rate (``rate=None``).
BRANCH_KINDS = ("acb", "rep", "dbb", "orepa")
SMALLNET.update({k: (k, ()) for k in BRANCH_KINDS})
#: The ``strategies`` experiment's SmallNets: the new kinds, and the ``behaviour`` variants they are
#: compared with. Those variants' accuracies are the ``behaviour`` runs' (the same recipe, 5 seeds); they
#: are trained again here on the first ``COST_SEEDS`` seeds only as the time and memory reference: the
#: ``behaviour`` runs' seconds were taken on a differently loaded machine (their compact 7x7 epochs took
#: longer than CL's) and hold no memory figure. Compact is trained on every seed: the branch kinds are
#: also compared with it, trained by today's code at the same time (its seed-0 accuracy differs from the
#: ``behaviour`` run's).
STRATEGY_KERNELS = {7: ("compact", "cl", "ck"), 3: ("compact", "cl", "cl+fc")}
COST_SEEDS = 3
REAL_MODELS = {
    "shufflenet_v2_x0_5": {"num_classes": 10},
    "mobilenet_v2": {"num_classes": 10, "width_mult": 0.5},
}
#: The ``models`` experiment: the same two networks on a recipe they converge under, the same for every
#: variant. Input size and epochs chosen from the measured cost (docs/evidence.md); no weight decay, no
#: augmentation, as in the SmallNet protocol.
MODELS_SETTINGS = {**SETTINGS, "image_size": 48, "epochs": 15, "lr": 0.05, "schedule": "cosine"}
MODELS_SEEDS = 3
#: The contracted model a ``models`` run leaves in its work folder (``OUT/work/models/NAME/``).
CONTRACTED = "contracted.pt"
#: What the ``models`` recipe changes in a run's settings (``run_one``).
MODELS_RECIPE_KEYS = ("image_size", "epochs", "lr", "schedule")
#: variant -> (strategy, include globs) per model. The paper's ImageNet choice (CL, rate 4): MobileNetV2's
#: first conv and only its stride-2 depthwise convs; ShuffleNetV2's first conv and every depthwise conv,
#: which are all of its 3x3 convs, so there ``cl-paper`` is also "every depthwise conv" (no second run).
#: Pointwise convs and the classifier are never expanded (CL leaves 1x1s alone by default). The paper
#: moves ShuffleNetV2's first stride onto the chain's last 1x1; trained fused, the composed kernel and
#: its gradients do not depend on where the stride sits (tests/test_evidence.py), so nothing changes.
MODEL_VARIANTS = {
    "shufflenet_v2_x0_5": {"compact": (None, ()), "cl-paper": ("cl", ())},
    "mobilenet_v2": {
        "compact": (None, ()),
        "cl-paper": ("cl", ("features.0.0", "features.2.conv.1.0", "features.4.conv.1.0", "features.7.conv.1.0",
                            "features.14.conv.1.0")),
        "cl-all-dw": ("cl", ()),
    },
}  # fmt: skip
#: The two best strategies of the ``strategies`` experiment, applied to every 3x3 conv (the first conv
#: and every depthwise conv) of both networks; run after the CL variants. Chosen from the partial
#: SmallNet results (docs/evidence.md: 3-4 of 5 seeds, every branch kind within noise of compact; orepa
#: and dbb have the highest mean gain over both kernels); ``--model-strategies`` overrides.
MODEL_STRATEGIES = ("orepa", "dbb")
MODEL_TITLES = {"shufflenet_v2_x0_5": "ShuffleNetV2 x0.5", "mobilenet_v2": "MobileNetV2 0.5"}
TEACHER_SPEC_ARGS = ("distillation", "teacher", TEACHER["seed"])
EXPERIMENTS = ("behaviour", "landscape", "product-l2", "distillation", "init", "corrupted", "real", "strategies",
               "models")  # fmt: skip


@dataclass(frozen=True)
class Spec:
    """One training run: what is trained, how, and what is measured on it."""

    experiment: str
    variant: str  # the label in tables and legends
    seed: int
    arch: str = "smallnet"
    kernel: int = 7
    strategy: str | None = None
    exclude: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    weight_decay: float = 0.0
    decay_on: str = "factors"
    warmup: int = 0
    kd: bool = False
    corrupt: float = 0.0
    confusion: bool = False
    landscape: bool = False
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def name(self) -> str:
        prefix = f"k{self.kernel}" if self.arch == "smallnet" else self.arch
        return f"{prefix}-{self.variant}-s{self.seed}"


TEACHER_SPEC = Spec(*TEACHER_SPEC_ARGS, kernel=3)


def smallnet_spec(experiment: str, variant: str, seed: int, kernel: int, **kw) -> Spec:
    base = variant.split("-")[0].removesuffix("+kd").removesuffix("+init")
    strategy, exclude = SMALLNET[base]
    return Spec(experiment, variant, seed, kernel=kernel, strategy=strategy, exclude=exclude, **kw)


def model_variants(arch: str, strategies: Sequence[str] = MODEL_STRATEGIES) -> dict[str, tuple]:
    """variant -> (strategy, include) of the ``models`` experiment for ``arch``: compact, CL, then the
    branch strategies on every 3x3 conv."""
    return {**MODEL_VARIANTS[arch], **{k: (k, ()) for k in strategies}}


def plan(experiments: Sequence[str], seeds: Sequence[int], model_strategies: Sequence[str] = MODEL_STRATEGIES
         ) -> list[Spec]:  # fmt: skip
    """Every run of the chosen experiments, seeds outermost so that partial results cover all cells."""
    specs: list[Spec] = []
    if "distillation" in experiments:  # first, so that its students (last) find it trained
        specs.append(TEACHER_SPEC)
    for s in seeds:
        if "behaviour" in experiments:
            for k, variants in ((7, ("compact", "cl", "ck")), (3, ("compact", "cl", "cl+fc"))):
                specs += [smallnet_spec("behaviour", v, s, k, confusion=True) for v in variants]
        if "landscape" in experiments and s == seeds[0]:
            specs += [smallnet_spec("landscape", v, s, 9, landscape=True) for v in ("compact", "cl", "ck")]
        if "product-l2" in experiments and s in seeds[:3]:
            specs += [smallnet_spec("product-l2", f"ck-{mode}", s, 7, weight_decay=WEIGHT_DECAY, decay_on=mode)
                      for mode in ("factors", "product")]  # fmt: skip
        if "init" in experiments:
            specs.append(smallnet_spec("init", "ck+init", s, 7, warmup=WARMUP_EPOCHS))
        if "corrupted" in experiments:
            specs += [smallnet_spec("corrupted", v, s, 5, corrupt=CORRUPT_FRACTION) for v in ("compact", "ck")]
        if "strategies" in experiments:
            for k, refs in STRATEGY_KERNELS.items():
                variants = BRANCH_KINDS + (refs if s in seeds[:COST_SEEDS] else ("compact",))
                specs += [smallnet_spec("strategies", v, s, k) for v in variants]
    if "distillation" in experiments:
        specs += [smallnet_spec("distillation", v, s, 7, kd=True) for s in seeds for v in ("compact+kd", "ck+kd")]
    if "real" in experiments:  # the most expensive runs, last
        specs += [Spec("real", v, s, arch=arch, strategy=None if v == "compact" else "cl")
                  for s in seeds[:REAL_SEEDS] for arch in REAL_MODELS for v in ("compact", "cl")]  # fmt: skip
    if "models" in experiments:  # compact and CL first (they need no choice), then the branch strategies
        for group in (False, True):
            for s in seeds[:MODELS_SEEDS]:
                for arch in REAL_MODELS:
                    for v, (strategy, include) in model_variants(arch, model_strategies).items():
                        if (strategy in BRANCH_KINDS) == group:
                            specs.append(Spec("models", v, s, arch=arch, strategy=strategy, include=include))
    return specs


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------
@dataclass
class Data:
    """The data every run reads, loaded once per process."""

    full: DataSplits
    train: TensorImages  # the fixed 10,000-image subset
    test: TensorImages  # all 10,000 test images
    _cache: dict = field(default_factory=dict)

    def full_test(self, spec: Spec) -> TensorImages:
        """All 10,000 test images, as the run's model reads them."""
        if spec.arch == "smallnet":
            return self.test
        if spec.experiment == "models":
            return as_rgb(self.test, MODELS_SETTINGS["image_size"])
        if "rgb-test" not in self._cache:
            self._cache["rgb-test"] = as_rgb32(self.test)
        return self._cache["rgb-test"]

    def for_spec(self, spec: Spec) -> DataSplits:
        if spec.experiment == "models":
            size = MODELS_SETTINGS["image_size"]
            # The same 2,000 curve images as ``real``; the final accuracy is on all 10,000.
            curve = as_rgb(fixed_subset(self.test, REAL_CURVE_IMAGES), size)
            return DataSplits(as_rgb(self.train, size), curve, self.full.num_classes, (3, size, size))
        key = (spec.arch == "smallnet", spec.corrupt, spec.variant == "teacher")
        if key not in self._cache:
            train_set, test_set = self.train, self.test
            if spec.corrupt:
                train_set = corrupted(train_set, spec.corrupt, seed=0)
            if spec.arch != "smallnet":
                # Per-epoch curves on 2,000 test images (the final accuracy is on all 10,000): a
                # full test pass would add a third to these models' epoch.
                test_set = fixed_subset(test_set, REAL_CURVE_IMAGES)
                train_set, test_set = as_rgb32(train_set), as_rgb32(test_set)
            if spec.variant == "teacher":
                train_set = copy.copy(train_set)
                train_set.augment = (random_crop(2), random_flip)
            shape = tuple(train_set.images.shape[1:])
            self._cache[key] = DataSplits(train_set, test_set, self.full.num_classes, shape)
        return self._cache[key]


def load(settings: dict) -> Data:
    full = load_data(settings["data"])
    idx = subset_indices(full.train.labels, settings["train_subset"], settings["subset_seed"])
    train_set = copy.copy(full.train)
    train_set.images, train_set.labels = full.train.images[idx], full.train.labels[idx]
    return Data(full, train_set, full.val)


def fixed_subset(ds: TensorImages, n: int) -> TensorImages:
    idx = subset_indices(ds.labels, n, 0)
    out = copy.copy(ds)
    out.images, out.labels = ds.images[idx], ds.labels[idx]
    return out


def corrupted(ds: TensorImages, fraction: float, seed: int) -> TensorImages:
    """A copy whose labels are wrong on exactly ``fraction`` of the images, each replaced by one of the
    other classes drawn uniformly, from a generator seeded with ``seed`` (the same draw every run)."""
    g = torch.Generator().manual_seed(seed)
    n = len(ds)
    pick = torch.randperm(n, generator=g)[: round(fraction * n)]
    classes = int(ds.labels.max()) + 1
    labels = ds.labels.clone()
    labels[pick] = (labels[pick] + torch.randint(1, classes, (len(pick),), generator=g)) % classes
    out = copy.copy(ds)
    out.labels = labels
    return out


def as_rgb(ds: TensorImages, size: int) -> TensorImages:
    """Gray 28x28 -> 3 x ``size`` x ``size``, converted batch by batch as the loop reads it (bilinear
    resize, then the gray channel replicated; the same normalisation on each): 10,000 images at 64x64
    in float would hold 0.5 GB."""
    mean, std = float(ds.mean.flatten()[0]), float(ds.std.flatten()[0])
    return TensorImages(ds.images, ds.labels, (mean,) * 3, (std,) * 3, ds.scale, ds.augment,
                        convert=(*ds.convert, resize(size), to_channels(3)), channels=3)  # fmt: skip


def as_rgb32(ds: TensorImages) -> TensorImages:
    """Gray 28x28 -> the 3 x 32 x 32 input the torchvision models get: bilinear resize, gray copied to
    the three channels (the same normalisation on each)."""
    x = ds.images.float()
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    x = x.expand(-1, 3, -1, -1).contiguous()
    mean, std = float(ds.mean.flatten()[0]), float(ds.std.flatten()[0])
    return TensorImages(x, ds.labels, (mean,) * 3, (std,) * 3, ds.scale, ds.augment)


class CachedTeacher(nn.Module):
    """A distillation teacher whose logits for the (unaugmented) training images are computed once.

    The students' training images are not augmented, so each image always gets the same teacher
    logits; looking them up by the image's bytes makes KD cost what plain training costs. An image not
    in the table (never the case in these runs) goes through the teacher itself.
    """

    def __init__(self, teacher: nn.Module, dataset: TensorImages, batch_size: int = 500):
        super().__init__()
        self.teacher = teacher.eval()
        self.table: dict[bytes, torch.Tensor] = {}
        self.misses = 0  # batches that went through the teacher itself
        with torch.no_grad():
            for i in range(0, len(dataset), batch_size):
                x, _ = dataset[list(range(i, min(i + batch_size, len(dataset))))]
                for xi, li in zip(x, self.teacher(x)):
                    self.table[xi.numpy().tobytes()] = li.clone()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = [self.table.get(xi.cpu().numpy().tobytes()) for xi in x]
        if any(r is None for r in rows):
            self.misses += 1
            return self.teacher(x)
        return torch.stack(rows).to(x.device)


# --------------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------------
def build(spec: Spec, shape: tuple[int, ...], settings: dict) -> tuple[nn.Module, str, dict]:
    """``(model, arch spec, arch kwargs)`` for a run, initialised from ``spec.seed``."""
    torch.manual_seed(spec.seed)
    if spec.arch == "smallnet":
        kwargs = {"kernel_size": spec.kernel, "in_channels": shape[0], "num_classes": 10, "image_size": shape[1]}
        if spec.variant == "teacher":
            kwargs.update(TEACHER["kwargs"])
        model, arch = SmallNet(**kwargs), "smallnet"
    else:
        import torchvision

        kwargs = dict(REAL_MODELS[spec.arch])
        model, arch = torchvision.models.get_model(spec.arch, **kwargs), spec.arch
    if spec.strategy:
        rate = None if spec.strategy in BRANCH_KINDS else settings["rate"]  # a branch kind's own default
        model = expandctl.expand(model, spec.strategy, rate, include=spec.include, exclude=spec.exclude,
                                 seed=spec.seed)  # fmt: skip
    return model, arch, kwargs


def regulariser_hook(spec: Spec):
    """After each epoch, the weight-decay term the run optimises, at the epoch's end weights: product
    L2 on the composed kernels plus optimizer decay on the rest, or optimizer decay on everything."""

    def hook(ctx) -> dict:
        with torch.no_grad():
            if spec.decay_on == "product":
                _, others = split_decay_parameters(ctx.model)
                term = float(product_l2(ctx.model, spec.weight_decay) or 0.0)
            else:
                others, term = list(ctx.model.parameters()), 0.0
            term += 0.5 * spec.weight_decay * sum(float(p.double().pow(2).sum()) for p in others)
        return {"regulariser": term}

    return hook


class PeakMemory:
    """Peak resident memory of this process while one run trains, above the resident memory just before
    its model is built (the data already loaded): parameters, gradients, optimizer state, activations,
    composition buffers. Linux: the peak (``VmHWM``) is reset through ``/proc/self/clear_refs`` and
    read after every epoch, so that one process can measure many runs in turn; ``None`` elsewhere.
    Freed heap is returned to the system first (``malloc_trim``), so that a run does not hide in memory
    a previous run left mapped."""

    def __init__(self):
        import ctypes
        import gc

        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")
            self.base: float | None = self._read("VmRSS")
        except (OSError, AttributeError):
            self.base = None
        self.peak = self.base

    @staticmethod
    def _read(field: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB -> MiB
        raise OSError(f"no {field} in /proc/self/status")

    def hook(self, ctx) -> None:
        if self.base is not None:
            self.peak = max(self.peak, self._read("VmHWM"))

    @property
    def mib(self) -> float | None:
        return None if self.base is None else round(self.peak - self.base, 1)


def warm_up(data: Data) -> None:
    """A throwaway one-epoch SmallNet run in a temporary folder: torch's one-time allocations (kernels,
    thread pools, allocator caches, the training loop's data copies) happen here, not inside the
    first real run's memory peak (measured: about 170 MiB more than the same run in second place)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        run_one(Spec("warm-up", "compact", 0, kernel=3), Path(tmp), data, dict(SETTINGS, epochs=1), False)


def teacher_module(out: Path, data: Data, settings: dict, verbose: bool) -> nn.Module:
    """The trained teacher, from its checkpoint: trained here first if this machine has none (a clean
    clone has its run file but not its weights), or waited for if another process is training it."""
    path = out / "work" / "teacher.pt"
    while not path.is_file():
        lock = claim(out, TEACHER_SPEC)
        if lock is None:
            time.sleep(20)
            continue
        with lock:
            if not path.is_file():
                print("training the distillation teacher first", flush=True)
                run_one(TEACHER_SPEC, out, data, settings, verbose)
    return load_checkpoint(path).model


def run_one(spec: Spec, out: Path, data: Data, settings: dict, verbose: bool) -> dict:
    """Train, contract, check and evaluate one run; write its JSON."""
    if spec.experiment == "models":
        settings = {**settings, **{k: MODELS_SETTINGS[k] for k in MODELS_RECIPE_KEYS}}
    splits = data.for_spec(spec)
    shape = tuple(splits.input_shape)
    work = out / "work" / spec.experiment / spec.name
    teacher = CachedTeacher(teacher_module(out, data, settings, verbose), splits.train) if spec.kd else None
    hooks = []
    if spec.confusion:
        hooks.append(grad_confusion_hook(100, settings["batch_size"], spec.seed))
    if spec.weight_decay:
        hooks.append(regulariser_hook(spec))
    memory = PeakMemory()
    hooks.insert(0, memory.hook)  # first: the other hooks' own memory is not training's
    is_teacher = spec.variant == "teacher"
    config = TrainConfig(
        src="", data=settings["data"],
        epochs=TEACHER["epochs"] if is_teacher else settings["epochs"],
        batch_size=settings["batch_size"], lr=TEACHER["lr"] if is_teacher else settings["lr"],
        momentum=settings["momentum"], schedule=TEACHER["schedule"] if is_teacher else settings["schedule"],
        weight_decay=TEACHER["weight_decay"] if is_teacher else spec.weight_decay, decay_on=spec.decay_on,
        teacher="cached-teacher" if spec.kd else None, nonlinear_warmup=spec.warmup, forward="fused",
        device="cpu", seed=spec.seed, command=shlex.join(sys.argv),
    )  # fmt: skip
    try:
        t = train_contracted(work, lambda: (*build(spec, shape, settings), shape), config, splits,
                             score_on=data.full_test(spec), callbacks=Progress(spec.name, verbose), hooks=hooks,
                             teacher=teacher, name=spec.name)  # fmt: skip
    except CheckFailed as e:
        raise SystemExit(str(e)) from None
    summary, expanded, ckpt = t.summary, t.expanded, t.checkpoint
    result = {
        "name": spec.name, "spec": {k: v for k, v in asdict(spec).items() if k != "extra"},
        "settings": settings, "final_acc": t.final["accuracy"], "final_loss": t.final["loss"],
        "params_trained": t.params_trained, "params_compact": t.params_compact,
        "contraction_max_rel_float64": t.contraction_max_rel, "train_size": len(splits.train),
        "curve_test_size": len(splits.val), "history": summary["history"], "resumed": t.resumed,
    }  # fmt: skip
    if teacher is not None:
        result["teacher_lookups_missed"] = teacher.misses
    if spec.confusion:  # the distribution at the end of training (the paper's density plots)
        gc = gradient_confusion(expanded, splits.train, pairs=FINAL_CONFUSION_PAIRS,
                                batch_size=settings["batch_size"], seed=10_000 + spec.seed)  # fmt: skip
        result["final_confusion"] = {k: gc[k] for k in ("min", "mean", "std", "pairs", "batches", "similarities")}
    if spec.landscape:
        probe = copy.copy(splits.train)
        result["landscape_1d"] = loss_landscape(expanded, probe, dims=1, steps=41, span=1.0, seed=0,
                                                batch_size=250, max_batches=8)  # fmt: skip
        result["landscape_2d"] = loss_landscape(expanded, probe, dims=2, steps=17, span=1.0, seed=0,
                                                batch_size=250, max_batches=4)  # fmt: skip
    if is_teacher:
        save(t.compact, out / "work" / "teacher.pt", arch=ckpt.arch, arch_kwargs=ckpt.arch_kwargs, input_shape=shape)
    if spec.experiment == "models":  # kept (not committed) for the INT8 drop (benchmarks/int8_drop.py --models)
        save(t.compact, work / CONTRACTED, arch=ckpt.arch, arch_kwargs=ckpt.arch_kwargs, input_shape=shape)
    result.update({
        # CPU seconds of this process for the whole run (build, train, contract, check, evaluate): what a
        # run costs on an idle core; wall seconds also count waiting for one. (The measurements after
        # training are not counted.)
        "cpu_seconds": t.cpu_seconds, "wall_seconds": t.wall_seconds,
        "train_seconds": round(sum(m["seconds"] for m in summary["history"]), 2),
        "seconds_per_epoch": round(statistics.fmean(m["seconds"] for m in summary["history"]), 3),
        "peak_memory_mib": memory.mib, "memory_kind": "peak RSS above the RSS before the model was built",
        "torch": str(torch.__version__), "expandctl": expandctl.__version__, "threads": torch.get_num_threads(),
        "machine": platform.machine(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    })  # fmt: skip
    finish_run(work, result_path(out, spec), result)
    return result


def result_path(out: Path, spec: Spec) -> Path:
    return out / spec.experiment / f"{spec.name}.json"


# --------------------------------------------------------------------------------------------------
# Claims: several processes share one OUT
# --------------------------------------------------------------------------------------------------
def claim(out: Path, spec: Spec) -> Lock | None:
    """The lock of ``spec`` (:func:`expandctl.experiments.claim`), or ``None`` if a live process holds it."""
    return claim_lock(out / "work" / "locks" / f"{spec.experiment}-{spec.name}.lock")


# --------------------------------------------------------------------------------------------------
# Report: tables and figures from whatever run files exist
# --------------------------------------------------------------------------------------------------
def collect(out: Path) -> dict[str, list[dict]]:
    return {e: read_runs(out / e) for e in EXPERIMENTS}


def select(runs: list[dict], **where) -> list[dict]:
    return [r for r in runs if all(r["spec"][k] == v for k, v in where.items())]


def pct(runs: list[dict], key: str = "final_acc") -> str:
    if not runs:
        return "-"
    m, s = mean_std([100 * r[key] for r in runs])
    return f"{m:.2f} +- {s:.2f} ({len(runs)})"


def versus(a: list[dict], b: list[dict], key: str = "final_acc") -> str:
    """``mean(a) - mean(b)`` in points and Welch's p."""
    if not a or not b:
        return "-"
    d = 100 * (statistics.fmean(r[key] for r in a) - statistics.fmean(r[key] for r in b))
    p = welch_p([r[key] for r in a], [r[key] for r in b])
    return f"{d:+.2f}" + (f" (p={p:.2g})" if p is not None else "")


def symmetric_mean(one: dict, t: float) -> float:
    """Mean 1D loss at the grid steps nearest to ``-t`` and ``+t``."""
    a = one["alphas"]
    return statistics.fmean(one["loss"][min(range(len(a)), key=lambda i: abs(a[i] - x))] for x in (-t, t))


def report(out: Path) -> dict:
    runs = collect(out)
    lines = ["# ExpandNets' figures and claims on Fashion-MNIST", "",
             "Generated by `examples/figures.py` (`make figures`) from the run files in this folder; do not edit.",
             f"Recipe: `{json.dumps(SETTINGS)}`; contracted-model accuracy on the 10,000 test images, "
             "mean +- std over seeds (n); differences in points with Welch's t-test p.", ""]  # fmt: skip
    summary: dict = {"runs": {e: len(r) for e, r in runs.items()}}
    b = runs["behaviour"]
    if b:
        lines += ["## Training behaviour (Fig. 2, 5, 6)", "",
                  "| kernel | variant | test acc. | vs compact | final training error (%) "
                  "| min grad. cosine after the first lr drop (epochs 5-12; vs compact) | mean, last epoch "
                  f"| final min ({FINAL_CONFUSION_PAIRS} pairs) | final mean | final std |",
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for k, variants in ((7, ("compact", "cl", "ck")), (3, ("compact", "cl", "cl+fc"))):
            base = select(b, kernel=k, variant="compact")
            for v in variants:
                rs = select(b, kernel=k, variant=v)
                if not rs:
                    continue
                last = [r["history"][-1] for r in rs]
                fc = [r["final_confusion"] for r in rs]
                for r in rs + base:
                    late_epochs = r["history"][len(r["history"]) // 3 :]  # after the first lr drop
                    r["min_cosine_late"] = statistics.fmean(h["grad_confusion_min"] for h in late_epochs)
                late = f"{statistics.fmean(r['min_cosine_late'] for r in rs):.3f}"
                if v != "compact":
                    p = welch_p([r["min_cosine_late"] for r in rs], [r["min_cosine_late"] for r in base])
                    late += f" (p={p:.2g})" if p is not None else ""
                cells = [
                    pct(rs), versus(rs, base) if v != "compact" else "-",
                    f"{100 * (1 - statistics.fmean(h['train_acc'] for h in last)):.2f}", late,
                    f"{statistics.fmean(h['grad_confusion_mean'] for h in last):.3f}",
                    f"{statistics.fmean(f['min'] for f in fc):.3f}", f"{statistics.fmean(f['mean'] for f in fc):.3f}",
                    f"{statistics.fmean(f['std'] for f in fc):.3f}",
                ]  # fmt: skip
                lines.append(f"| {k}x{k} | {v} | " + " | ".join(cells) + " |")
            if select(b, kernel=k):
                plot_behaviour(out, b, k, variants)
        lines.append("")
    ls = runs["landscape"]
    if ls:
        lines += ["## Loss landscapes, 9x9 (Fig. 3, 4)", "",
                  "Filter-normalised random directions in the contracted network's weights (biases and BatchNorm "
                  "not perturbed), the same seed for every network; 1D on 2,000 and 2D on 1,000 training images.",
                  "", "| variant | test acc. | loss at 0 | 1D loss at +-0.5 (mean) | 1D loss at +-1 (mean) | "
                  "2D loss, mean over the grid | 2D error (%), mean over the grid |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for v in ("compact", "cl", "ck"):
            for r in select(ls, variant=v):
                one, two = r["landscape_1d"], r["landscape_2d"]
                flat2 = [x for row in two["loss"] for x in row]
                err2 = [100 * x for row in two["error"] for x in row]
                lines.append(f"| {v} | {100 * r['final_acc']:.2f} | {one['loss_at_0']:.3f} | "
                             f"{symmetric_mean(one, 0.5):.3f} | {symmetric_mean(one, 1.0):.3f} | "
                             f"{statistics.fmean(flat2):.3f} | {statistics.fmean(err2):.2f} |")  # fmt: skip
        lines.append("")
        plot_landscapes(out, ls)
    p = runs["product-l2"]
    if p:
        lines += [f"## Product L2 vs normal L2, CK 7x7, weight decay {WEIGHT_DECAY:g} (Fig. 7)", "",
                  "| decay on | test acc. | last-epoch CE | regulariser | train error (%) | test error (%) |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for mode in ("factors", "product"):
            rs = select(p, decay_on=mode)
            if rs:
                h = [r["history"][-1] for r in rs]
                lines.append(f"| {mode} | {pct(rs)} | {statistics.fmean(x['train_loss'] for x in h):.4f} | "
                             f"{statistics.fmean(x['regulariser'] for x in h):.4f} | "
                             f"{100 * (1 - statistics.fmean(x['train_acc'] for x in h)):.2f} | "
                             f"{100 * (1 - statistics.fmean(r['final_acc'] for r in rs)):.2f} |")  # fmt: skip
        lines += ["", "product vs factors: " + versus(select(p, decay_on="product"), select(p, decay_on="factors")), ""]
        plot_product_l2(out, p)
    d = runs["distillation"]
    if d:
        teacher = select(d, variant="teacher")
        groups = {"compact": select(b, kernel=7, variant="compact"), "ck": select(b, kernel=7, variant="ck"),
                  "compact+kd": select(d, variant="compact+kd"), "ck+kd": select(d, variant="ck+kd")}  # fmt: skip
        lines += ["## Distillation, 7x7 (Fig. 1's claim)", "",
                  (f"Teacher: {pct(teacher)}: SmallNet 3x3 with 64/128/256 channels and a 512-wide hidden layer, "
                   f"{teacher[0]['params_compact']:,} parameters, trained on the same 10,000 images for "
                   f"{TEACHER['epochs']} epochs (crop + flip, cosine lr {TEACHER['lr']}, weight decay "
                   f"{TEACHER['weight_decay']}). Students: Hinton KD, alpha 0.9, T 4 (the reproduction's settings)."
                   if teacher else "Teacher: not trained yet."),
                  "", "| student | test acc. | vs compact | vs compact+KD |", "|---|---|---|---|"]  # fmt: skip
        for name, rs in groups.items():
            lines.append(f"| {name} | {pct(rs)} | {versus(rs, groups['compact']) if name != 'compact' else '-'} | "
                         f"{versus(rs, groups['compact+kd']) if name != 'compact+kd' else '-'} |")  # fmt: skip
        lines.append("")
        plot_bars(
            out / "distillation.png",
            groups,
            "Distillation, SmallNet 7x7: top-1 (%) of the contracted student",
            hline=(100 * statistics.fmean(r["final_acc"] for r in teacher), "teacher") if teacher else None,
        )
    i = runs["init"]
    if i:
        groups = {"ck": select(b, kernel=7, variant="ck"), "ck+init": i}
        lines += [f"## Nonlinear initialisation (+Init), CK 7x7, {WARMUP_EPOCHS} warm-up epochs", "",
                  "| variant | test acc. | vs ck |", "|---|---|---|", f"| ck | {pct(groups['ck'])} | - |",
                  f"| ck+init | {pct(i)} | {versus(i, groups['ck'])} |", ""]  # fmt: skip
    c = runs["corrupted"]
    if c:
        base = select(c, variant="compact")
        lines += [f"## {int(100 * CORRUPT_FRACTION)}% corrupted training labels, 5x5", "",
                  "| variant | test error (%) | test acc. | vs compact |", "|---|---|---|---|"]  # fmt: skip
        for v in ("compact", "ck"):
            rs = select(c, variant=v)
            if rs:
                err = mean_std([100 * (1 - r["final_acc"]) for r in rs])
                lines.append(f"| {v} | {err[0]:.2f} +- {err[1]:.2f} | {pct(rs)} | "
                             f"{versus(rs, base) if v != 'compact' else '-'} |")  # fmt: skip
        lines.append("")
        plot_curves(
            out / "corrupted.png",
            {v: select(c, variant=v) for v in ("compact", "ck")},
            f"SmallNet 5x5, {int(100 * CORRUPT_FRACTION)}% corrupted labels: test error per epoch",
        )
    rm = runs["real"]
    if rm:
        lines += ["## torchvision models (CL, rate 4, first conv + depthwise 3x3s; 3x32x32 input)", "",
                  "| model | variant | params trained | test acc. | vs compact | s / epoch | x compact |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for arch in REAL_MODELS:
            base = select(rm, arch=arch, variant="compact")
            base_s = [statistics.fmean(h["seconds"] for h in r["history"]) for r in base]
            for v in ("compact", "cl"):
                rs = select(rm, arch=arch, variant=v)
                if not rs:
                    continue
                sec = statistics.fmean(statistics.fmean(h["seconds"] for h in r["history"]) for r in rs)
                ratio = f"{sec / statistics.fmean(base_s):.2f}" if base_s else "-"
                lines.append(f"| {arch} | {v} | {rs[0]['params_trained']:,} | {pct(rs)} | "
                             f"{versus(rs, base) if v != 'compact' else '-'} | {sec:.1f} | {ratio} |")  # fmt: skip
        lines.append("")
        plot_real(out, rm)
    if runs["strategies"] or runs["models"]:
        more, summary["evidence"], blocks = report_evidence(out, runs)
        lines += more
        if Path(out).resolve() == (ROOT / "results" / "figures").resolve():  # the committed results: README too
            table = evidence_readme_table(summary["evidence"])
            update_marked(ROOT / "README.md", "evidence:table", f"{table}\n\n{evidence_compute_line(runs)}")
            for name, text in blocks.items():
                update_marked(ROOT / "docs" / "evidence.md", f"evidence:{name}", text)
    every = [r for rs in runs.values() for r in rs]
    if every:
        cpu = sum(r["cpu_seconds"] for r in every)
        lines += ["## Compute", "",
                  f"{len(every)} runs, {cpu / 3600:.2f} CPU hours in all (one thread each; about "
                  f"{cpu / 3600 / 2:.2f} hours on 2 cores). Per experiment, CPU seconds per run (mean):",
                  ""]  # fmt: skip
        for e, rs in runs.items():
            if rs:
                lines.append(f"- {e}: {len(rs)} runs, {statistics.fmean(r['cpu_seconds'] for r in rs):.0f} s per run")
        lines.append("")
        summary["cpu_hours"] = cpu / 3600
    with atomic_write(out / "results.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    with atomic_write(out / "results.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def seconds_per_epoch(r: dict) -> float:
    return r.get("seconds_per_epoch") or statistics.fmean(h["seconds"] for h in r["history"])


def evidence_row(runs: list[dict], base: list[dict], cost: list[dict], base_cost: list[dict],
                 rerun: list[dict] | None = None) -> dict:  # fmt: skip
    """One strategy against compact: accuracy of ``runs`` vs ``base`` (points, Welch's p, the standard
    error of the difference) and, given ``rerun``, vs those runs too; seconds per epoch and peak memory
    of ``cost`` vs ``base_cost``."""
    acc, ref = [100 * r["final_acc"] for r in runs], [100 * r["final_acc"] for r in base]
    row: dict = {"n": len(runs)}
    if acc and rerun:
        again = [100 * r["final_acc"] for r in rerun]
        row["gain_rerun"] = statistics.fmean(acc) - statistics.fmean(again)
        row["p_rerun"] = welch_p(acc, again)
    if acc:
        row["mean"], row["std"] = mean_std(acc)
        row["params_trained"] = runs[0]["params_trained"]
    if acc and ref and runs is not base:
        row["gain"] = statistics.fmean(acc) - statistics.fmean(ref)
        row["p"] = welch_p(acc, ref)
        row["se"] = std_error_of_difference(acc, ref)
    if cost:
        row["seconds"] = statistics.fmean(seconds_per_epoch(r) for r in cost)
        # Per seed, against the compact run of the same seed (trained minutes apart by the same process,
        # so under about the same machine load), then averaged over the seeds both have.
        ref = {r["spec"]["seed"]: seconds_per_epoch(r) for r in base_cost}
        ratios = [seconds_per_epoch(r) / ref[r["spec"]["seed"]] for r in cost if r["spec"]["seed"] in ref]
        if ratios:
            row["time_ratio"] = statistics.fmean(ratios)
        mem = [r["peak_memory_mib"] for r in cost if r.get("peak_memory_mib") is not None]
        ref_mem = [r["peak_memory_mib"] for r in base_cost if r.get("peak_memory_mib") is not None]
        if mem:
            row["memory_mib"] = statistics.fmean(mem)
            if ref_mem:
                row["memory_ratio"] = row["memory_mib"] / statistics.fmean(ref_mem)
    return row


def evidence_cells(row: dict, of: int) -> str:
    def num(key, fmt):
        return format(row[key], fmt) if row.get(key) is not None else "-"

    acc = f"{row['mean']:.2f} +- {row['std']:.2f} ({row['n']} of {of})" if "mean" in row else f"- (0 of {of})"
    versus_ = "-" if "gain" not in row else f"{row['gain']:+.2f}" + (f" (p={row['p']:.2g})" if row["p"] else "")
    again = "-"
    if "gain_rerun" in row:
        again = f"{row['gain_rerun']:+.2f}" + (f" (p={row['p_rerun']:.2g})" if row["p_rerun"] else "")
    return " | ".join([num("params_trained", ","), acc, versus_, again, num("seconds", ".1f"), num("time_ratio", ".2f"),
                       num("memory_mib", ".0f"), num("memory_ratio", ".2f")])  # fmt: skip


#: Columns of the README's table: (title, variant per model group; a group missing is not run).
README_COLUMNS = (
    ("CL", {"smallnet": "cl", "shufflenet_v2_x0_5": "cl-paper", "mobilenet_v2": "cl-paper"}),
    ("CL, every dw", {"mobilenet_v2": "cl-all-dw", "shufflenet_v2_x0_5": "= CL"}),
    ("CK", {"smallnet": "ck"}),
    ("CL+FC", {"smallnet": "cl+fc"}),
    *((k, {}) for k in BRANCH_KINDS),
)


def evidence_readme_table(evidence: dict) -> str:
    """The README's summary of :func:`report_evidence`: gain over compact (points; bold: Welch's p <
    0.05), seeds, and training time per epoch relative to compact, per model and strategy."""
    titles = {"smallnet_7x7": "SmallNet 7x7", "smallnet_3x3": "SmallNet 3x3", **MODEL_TITLES}
    lines = ["| gain (points, seeds), x time | " + " | ".join(t for t, _ in README_COLUMNS) + " |",
             "|---" * (len(README_COLUMNS) + 1) + "|"]  # fmt: skip
    for key, rows in evidence.items():
        family = "smallnet" if key.startswith("smallnet") else key
        base = rows.get("compact", {})
        head = f"{titles[key]} ({base['mean']:.2f}%, {base['n']})" if "mean" in base else titles[key]
        cells = []
        for title, variants in README_COLUMNS:
            v = title if title in BRANCH_KINDS else variants.get(family)
            row = rows.get(v) if v else None
            if v and v.startswith("= "):  # the same layers as another column (ShuffleNetV2: every 3x3 is depthwise)
                cells.append(v)
                continue
            if row is None or "gain" not in row:
                cells.append("-")
                continue
            gain = f"{row['gain']:+.2f}"
            gain = f"**{gain}**" if row.get("p") is not None and row["p"] < 0.05 else gain
            ratio = f", {row['time_ratio']:.1f}x" if "time_ratio" in row else ""
            cells.append(f"{gain} ({row['n']}){ratio}")
        lines.append(f"| {head} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


EVIDENCE_HEADER = ["| model | strategy | params trained | test acc. (seeds done) | vs compact (Welch p) "
                   "| vs compact re-run (p) | s / epoch | x compact | peak MiB | x compact |",
                   "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip


def report_evidence(out: Path, runs: dict[str, list[dict]]) -> tuple[list[str], dict, dict[str, str]]:
    """Issue 16's tables: every strategy on SmallNet, and the torchvision models on their own recipe.
    Also returns the tables alone (``smallnet``, ``models``, ``compute``), for docs/evidence.md."""
    lines, summary, groups, blocks = [], {}, {}, {}
    st, b = runs["strategies"], runs["behaviour"]
    if st:
        lines += ["## Every strategy on SmallNet (7x7, 3x3)", "", " ".join([
            f"Accuracy of compact, CL, CK and CL+FC: the `behaviour` runs (the same recipe, {len(SEEDS)} seeds);",
            "of acb, rep, dbb, orepa (each at its own default rate): this experiment's runs. Compact is also",
            "re-run here on every seed (today's code, alongside the branch kinds): *vs compact re-run*; in the",
            "compact row, the `behaviour` runs minus the re-runs. Seconds per epoch (training plus the",
            "10,000-image test pass, one thread, on a machine shared with other jobs) and peak memory (RSS above",
            "the RSS before the model was built) are this experiment's: the reused CL, CK and CL+FC were trained",
            f"again on seeds 0-{COST_SEEDS - 1} for them. Partial while a cell shows fewer than {len(SEEDS)} seeds.",
        ]), "", *EVIDENCE_HEADER]  # fmt: skip
        for k, refs in STRATEGY_KERNELS.items():
            base, base_cost = select(b, kernel=k, variant="compact"), select(st, kernel=k, variant="compact")
            rows = {}
            for v in refs + BRANCH_KINDS:
                acc_runs = select(b, kernel=k, variant=v) if v in refs else select(st, kernel=k, variant=v)
                rerun = base_cost if v in BRANCH_KINDS + ("compact",) else None
                rows[v] = evidence_row(acc_runs if v != "compact" else base, base, select(st, kernel=k, variant=v),
                                       base_cost, rerun)  # fmt: skip
                lines.append(f"| SmallNet {k}x{k} | {v} | {evidence_cells(rows[v], len(SEEDS))} |")
            summary[f"smallnet_{k}x{k}"] = groups[f"SmallNet {k}x{k}"] = rows
        blocks["smallnet"] = "\n".join(lines[lines.index(EVIDENCE_HEADER[0]) :])
        lines.append("")
    m = runs["models"]
    if m:
        lines += [f"## torchvision models on Fashion-MNIST at {MODELS_SETTINGS['image_size']}x"
                  f"{MODELS_SETTINGS['image_size']} (last feature map 2x2)", "",
                  f"Recipe: `{json.dumps({k: MODELS_SETTINGS[k] for k in MODELS_RECIPE_KEYS})}`, otherwise as "
                  f"SmallNet's; gray replicated to 3 channels; contracted-model accuracy on the 10,000 test images, "
                  f"per-epoch curves on {REAL_CURVE_IMAGES:,}. CL rate 4: `cl-paper` the paper's layers, `cl-all-dw` "
                  f"the first conv and every depthwise conv; branch kinds on every 3x3 conv. Partial while a cell "
                  f"shows fewer than {MODELS_SEEDS} seeds.", "", *EVIDENCE_HEADER]  # fmt: skip
        first = len(lines) - len(EVIDENCE_HEADER)
        for arch in REAL_MODELS:
            base = select(m, arch=arch, variant="compact")
            present = {r["spec"]["variant"] for r in select(m, arch=arch)}
            order = [v for v in MODEL_VARIANTS[arch]] + [k for k in BRANCH_KINDS if k in present]
            rows = {}
            for v in order:
                rs = select(m, arch=arch, variant=v)
                rows[v] = evidence_row(rs if v != "compact" else base, base, rs, base)
                lines.append(f"| {MODEL_TITLES[arch]} | {v} | {evidence_cells(rows[v], MODELS_SEEDS)} |")
            summary[arch] = groups[MODEL_TITLES[arch]] = rows
        blocks["models"] = "\n".join(lines[first:])
        lines.append("")
    plot_evidence(out / "evidence.png", groups, sum(len(runs[e]) for e in ("strategies", "models")))
    lines += ["![gain over compact and training cost per strategy and model](evidence.png)", ""]
    blocks["compute"] = evidence_compute(runs)
    return lines, summary, blocks


def evidence_compute(runs: dict[str, list[dict]]) -> str:
    """CPU and wall seconds per run of the study's two experiments, per model and strategy, and in all."""
    lines = ["| experiment | model | strategy | runs | CPU s / run (mean) | wall s / run (mean) | resumed runs |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    cpu = wall = 0.0
    n = 0
    for e in ("strategies", "models"):
        cells: dict[tuple[str, str], list[dict]] = {}
        for r in runs[e]:
            sp = r["spec"]
            model = f"SmallNet {sp['kernel']}x{sp['kernel']}" if sp["arch"] == "smallnet" else MODEL_TITLES[sp["arch"]]
            cells.setdefault((model, sp["variant"]), []).append(r)
        for (model, v), rs in sorted(cells.items()):
            cpu_s = statistics.fmean(r["cpu_seconds"] for r in rs)
            wall_s = statistics.fmean(r["wall_seconds"] for r in rs)
            resumed = sum(bool(r["resumed"]) for r in rs)
            lines.append(f"| {e} | {model} | {v} | {len(rs)} | {cpu_s:.0f} | {wall_s:.0f} | {resumed} |")
            cpu += sum(r["cpu_seconds"] for r in rs)
            wall += sum(r["wall_seconds"] for r in rs)
            n += len(rs)
    lines += ["", f"In all: {n} runs, {cpu / 3600:.2f} CPU hours, {wall / 3600:.2f} wall hours of single-threaded "
              "processes (two at a time on this 2-core machine; a resumed run counts its last process "
              "only)."]  # fmt: skip
    return "\n".join(lines)


def evidence_compute_line(runs: dict[str, list[dict]]) -> str:
    """One sentence for the README: what the study's runs cost, per model family."""
    parts = []
    for title, rs in (("SmallNet", runs["strategies"]), *((MODEL_TITLES[a], select(runs["models"], arch=a))
                                                          for a in REAL_MODELS)):  # fmt: skip
        if rs:
            parts.append(f"{title} {statistics.fmean(r['cpu_seconds'] for r in rs):.0f} s per run ({len(rs)} runs)")
    every = runs["strategies"] + runs["models"]
    cpu = sum(r["cpu_seconds"] for r in every) / 3600
    return (f"Compute: {len(every)} runs, {cpu:.2f} CPU hours of one thread each: " + ", ".join(parts)
            + " (CPU seconds per run, mean; per strategy in docs/evidence.md).")  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------
COLORS = {"compact": "#444444", "cl": "#1f77b4", "ck": "#d62728", "cl+fc": "#2ca02c", "compact+kd": "#7f7f7f",
          "ck+kd": "#ff7f0e", "ck+init": "#9467bd", "ck-factors": "#1f77b4", "ck-product": "#d62728"}  # fmt: skip
LABELS = {"compact": "compact", "cl": "CL", "ck": "CK", "cl+fc": "CL+FC", "compact+kd": "compact + KD",
          "ck+kd": "CK + KD", "ck+init": "CK + Init", "ck-factors": "normal L2 (factors)",
          "ck-product": "product L2 (composed kernel)"}  # fmt: skip


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "legend.fontsize": 9})
    return plt


def _save(fig, path: Path) -> None:
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    _plt().close(fig)


def _log_percent(ax) -> None:
    """Log y axis with plain numbers as tick labels (2, 5, 10 rather than 2x10^0)."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())


def _band(ax, runs: list[dict], series, label: str, color: str, log: bool = False) -> None:
    """Mean over runs, with a band from the lowest to the highest run."""
    n = min(len(r["history"]) for r in runs)
    ys = [[series(r["history"][e]) for e in range(n)] for r in runs]
    epochs = list(range(1, n + 1))
    mean = [statistics.fmean(col) for col in zip(*ys)]
    ax.plot(epochs, mean, color=color, label=f"{label} (n={len(runs)})", lw=1.8)
    ax.fill_between(epochs, [min(col) for col in zip(*ys)], [max(col) for col in zip(*ys)], color=color, alpha=0.18)
    if log:
        _log_percent(ax)


def plot_behaviour(out: Path, runs: list[dict], kernel: int, variants: Sequence[str]) -> None:
    from expandctl.analysis.plots import gaussian_kde

    plt = _plt()
    fig, grid = plt.subplots(2, 2, figsize=(11, 8.0))
    axes = grid.flatten()
    for v in variants:
        rs = select(runs, kernel=kernel, variant=v)
        if not rs:
            continue
        c, lab = COLORS[v], LABELS[v]
        _band(axes[0], rs, lambda h: 100 * (1 - h["train_acc"]), lab, c)
        _band(axes[1], rs, lambda h: 100 * (1 - h["val_acc"]), lab, c)
        _band(axes[2], rs, lambda h: h["grad_confusion_min"], lab, c)
        sims = [s for r in rs for s in r["final_confusion"]["similarities"]]
        xs = [i / 200 * 2 - 1 for i in range(201)]
        axes[3].plot(xs, gaussian_kde(sims, xs), color=c, lw=1.8, label=f"{lab} ({len(sims)} pairs)")
    titles = ["training error (running, per epoch)", "test error (10,000 images)",
              "min. pairwise gradient cosine (100 pairs)", "pairwise gradient cosine after training"]  # fmt: skip
    ylabels = ["error (%)", "error (%)", "cosine similarity", "density"]
    for ax, t, yl in zip(axes, titles, ylabels):
        ax.set_title(t)
        ax.set_ylabel(yl)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    _log_percent(axes[0])
    axes[1].set_ylim(top=min(axes[1].get_ylim()[1], 25))
    axes[3].set_xlabel("cosine similarity of two mini-batch gradients")
    axes[3].set_xlim(-0.4, 1.0)
    fig.suptitle(f"SmallNet {kernel}x{kernel} on Fashion-MNIST (10k training images): compact vs expanded\n"
                 "mean over seeds, band = min..max over seeds", fontsize=12)  # fmt: skip
    fig.tight_layout()
    _save(fig, out / f"behaviour_{kernel}x{kernel}.png")


def plot_landscapes(out: Path, runs: list[dict]) -> None:
    plt = _plt()
    order = [v for v in ("compact", "cl", "ck") if select(runs, variant=v)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.0))
    for v in order:
        one = select(runs, variant=v)[0]["landscape_1d"]
        axes[0].plot(one["alphas"], one["loss"], color=COLORS[v], lw=1.8, label=LABELS[v])
        axes[1].plot(one["alphas"], [100 * e for e in one["error"]], color=COLORS[v], lw=1.8, label=LABELS[v])
    axes[0].set(title="training loss", xlabel="step along the direction (filter-normalised units)",
                ylabel="cross-entropy (log scale)")  # fmt: skip
    _log_percent(axes[0])
    axes[1].set(title="training top-1 error", xlabel="step along the direction (filter-normalised units)",
                ylabel="error (%)")  # fmt: skip
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("SmallNet 9x9: 1D loss landscape around the trained (contracted) weights", fontsize=12)
    fig.tight_layout()
    _save(fig, out / "landscape_1d.png")

    import numpy as np

    fig, axes = plt.subplots(2, len(order), figsize=(4.2 * len(order) + 1.2, 8.0), squeeze=False,
                             layout="constrained")  # fmt: skip
    for row, (key, label, scale) in enumerate((("loss", "training loss (log10 CE)", None),
                                                ("error", "training error (%)", 100))):  # fmt: skip
        grids = [np.array(select(runs, variant=v)[0]["landscape_2d"][key], dtype=float) for v in order]
        # rounded: a last-bit difference in log10 between machines must not move a contour pixel
        grids = [np.round(np.log10(g) if scale is None else scale * g, 9) for g in grids]
        lo, hi = min(g.min() for g in grids), max(g.max() for g in grids)
        hi = max(hi, lo + 1e-6)  # a flat grid still needs increasing levels
        levels = np.linspace(lo, hi, 15)
        for col, (v, g) in enumerate(zip(order, grids)):
            two = select(runs, variant=v)[0]["landscape_2d"]
            ax = axes[row][col]
            cs = ax.contourf(two["alphas"], two["betas"], g.T, levels=levels, cmap="viridis")
            ax.contour(two["alphas"], two["betas"], g.T, levels=levels, colors="white", linewidths=0.4)
            ax.plot(0, 0, "r+", ms=10)
            ax.set(title=f"{LABELS[v]}: {label}", xlabel="direction 1", aspect="equal")
            if col == 0:
                ax.set_ylabel("direction 2")
        fig.colorbar(cs, ax=list(axes[row]), label=label, shrink=0.9)
    fig.suptitle("SmallNet 9x9: 2D loss landscapes (same scale per row, + = trained weights)", fontsize=12)
    _save(fig, out / "landscape_2d.png")


def plot_product_l2(out: Path, runs: list[dict]) -> None:
    plt = _plt()
    fig, grid = plt.subplots(2, 2, figsize=(11, 8.0))
    axes = grid.flatten()
    for mode in ("factors", "product"):
        rs = select(runs, decay_on=mode)
        if not rs:
            continue
        v = f"ck-{mode}"
        c, lab = COLORS[v], LABELS[v]
        _band(axes[0], rs, lambda h: h["train_loss"] + h["regulariser"], lab, c, log=True)
        _band(axes[1], rs, lambda h: h["train_loss"], lab, c, log=True)
        _band(axes[2], rs, lambda h: 100 * (1 - h["train_acc"]), lab, c, log=True)
        _band(axes[3], rs, lambda h: 100 * (1 - h["val_acc"]), lab, c, log=True)
    titles = ("overall loss (CE + weight decay term)", "cross-entropy (training)", "training error", "test error")
    for ax, t, yl in zip(axes, titles, ("loss", "loss", "error (%)", "error (%)")):
        ax.set(title=t, xlabel="epoch", ylabel=f"{yl}, log scale")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.suptitle(f"SmallNet 7x7 CK, weight decay {WEIGHT_DECAY:g}: product L2 vs normal L2\n"
                 "mean over seeds, band = min..max over seeds", fontsize=12)  # fmt: skip
    fig.tight_layout()
    _save(fig, out / "product_l2.png")


def plot_curves(path: Path, groups: dict[str, list[dict]], title: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.0))
    for v, rs in groups.items():
        if rs:
            _band(axes[0], rs, lambda h: 100 * (1 - h["train_acc"]), LABELS[v], COLORS[v])
            _band(axes[1], rs, lambda h: 100 * (1 - h["val_acc"]), LABELS[v], COLORS[v])
    axes[0].set(title="training error (corrupted labels)", xlabel="epoch", ylabel="error (%)")
    axes[1].set(title="test error (clean labels)", xlabel="epoch", ylabel="error (%)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title + " (mean over seeds, band = min..max)", fontsize=12)
    fig.tight_layout()
    _save(fig, path)


def plot_bars(path: Path, groups: dict[str, list[dict]], title: str, hline=None) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    names = [n for n, rs in groups.items() if rs]
    for i, n in enumerate(names):
        accs = [100 * r["final_acc"] for r in groups[n]]
        m, s = mean_std(accs)
        label = f"{LABELS[n]}: {m:.2f} +- {s:.2f} (n={len(accs)})"
        ax.bar(i, m, yerr=s, color=COLORS[n], alpha=0.8, capsize=4, label=label)
        ax.scatter([i] * len(accs), accs, color="black", s=10, zorder=3)
    if hline:
        ax.axhline(hline[0], color="black", ls="--", lw=1, label=f"{hline[1]}: {hline[0]:.2f}")
    lo = min(100 * r["final_acc"] for n in names for r in groups[n])
    top = max([100 * r["final_acc"] for n in names for r in groups[n]] + ([hline[0]] if hline else []))
    ax.set_ylim(lo - 1.0, top + 1.6)  # room above the bars for the legend
    ax.set_xticks(range(len(names)), [LABELS[n] for n in names])
    ax.set(ylabel="top-1 accuracy (%), 10,000 test images", title=title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="upper left", ncol=2, fontsize=8)
    fig.tight_layout()
    _save(fig, path)


#: Gains (points) beyond this are drawn clipped, with their value written on the bar.
OFF_SCALE = 3.0
EVIDENCE_STYLE = {  # strategy -> (label, colour, hatch)
    "cl": ("CL", "#1f77b4", ""), "cl-paper": ("CL, the paper's layers", "#1f77b4", "//"),
    "cl-all-dw": ("CL, every depthwise conv", "#aec7e8", ""), "ck": ("CK", "#d62728", ""),
    "cl+fc": ("CL+FC", "#2ca02c", ""), "acb": ("acb (ACNet)", "#ff7f0e", ""), "rep": ("rep (RepVGG)", "#9467bd", ""),
    "dbb": ("dbb (DBB)", "#8c564b", ""), "orepa": ("orepa (OREPA)", "#e377c2", ""),
}  # fmt: skip


def plot_evidence(path: Path, groups: dict[str, dict[str, dict]], n_runs: int) -> None:
    """Gain over compact (points, error bar: standard error of the difference over seeds) and training
    time per epoch relative to compact, per model (group) and strategy (bar)."""
    plt = _plt()
    fig, axes = plt.subplots(2, 1, figsize=(14, 8.6), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    seen: dict[str, object] = {}
    ticks, names = [], []
    x = 0.0
    # A gain beyond +-OFF_SCALE points (a run that collapsed) would flatten every other bar: the axis
    # stops at the largest of the others, and such a bar is drawn to its edge with its value written.
    ends = [abs(r["gain"]) + (r.get("se") or 0) for rows in groups.values() for v, r in rows.items()
            if v != "compact" and "gain" in r and abs(r["gain"]) <= OFF_SCALE]  # fmt: skip
    limit = 1.25 * max(ends, default=1.0)
    for gname, rows in groups.items():
        strategies = [v for v in rows if v != "compact" and "mean" in rows[v]]
        if not strategies:
            continue
        start = x
        for v in strategies:
            r = rows[v]
            label, color, hatch = EVIDENCE_STYLE[v]
            if "gain" in r:
                off = abs(r["gain"]) > limit
                shown = math.copysign(limit, r["gain"]) if off else r["gain"]
                bar = axes[0].bar(x, shown, 0.8, yerr=None if off else r.get("se"), color=color, hatch=hatch,
                                  edgecolor="black", linewidth=0.5, capsize=3, label=label)  # fmt: skip
                seen.setdefault(label, bar)
                star = "*" if r.get("p") is not None and r["p"] < 0.05 else ""
                if off:
                    axes[0].annotate(f"{r['gain']:+.2f}\noff\nscale\nn={r['n']}", (x, shown * 0.97), ha="center",
                                     va="bottom" if shown < 0 else "top", fontsize=7,
                                     bbox={"boxstyle": "round", "fc": "white", "lw": 0.5})  # fmt: skip
                else:
                    top = r["gain"] + (r.get("se") or 0) if r["gain"] >= 0 else r["gain"] - (r.get("se") or 0)
                    axes[0].annotate(f"{star}\nn={r['n']}" if star else f"n={r['n']}", (x, top), ha="center",
                                     va="bottom" if r["gain"] >= 0 else "top", fontsize=7)  # fmt: skip
            if "time_ratio" in r:
                axes[1].bar(x, r["time_ratio"], 0.8, color=color, hatch=hatch, edgecolor="black", linewidth=0.5)
            x += 1
        ticks.append((start + x - 1) / 2)
        n = max(rows["compact"]["n"], 0)
        names.append(f"{gname}\ncompact {rows['compact']['mean']:.2f}% (n={n})" if "mean" in rows["compact"]
                     else gname)  # fmt: skip
        x += 0.8
    axes[0].axhline(0, color="black", lw=0.8)
    axes[0].set(
        ylabel="test accuracy minus compact's (points)",
        title="Gain over compact (mean over seeds; bar: std. error of the difference; * Welch p < 0.05)",
    )
    axes[1].axhline(1, color="black", lw=0.8, ls="--")
    axes[1].set_ylim(bottom=0)
    axes[1].set(ylabel="training seconds per epoch / compact's (x)", title="Training cost (one CPU thread)")
    for ax in axes:
        ax.set_xlim(-0.8, max(x - 0.2, 1))
        ax.margins(y=0.12)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylim(-limit * 1.1, limit * 1.1)
    axes[1].set_xticks(ticks, names, fontsize=9)
    axes[1].set_xlabel("model (compact's accuracy, seeds)")
    axes[0].legend(list(seen.values()), list(seen), loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9,
                   title="strategy")  # fmt: skip
    fig.suptitle(f"Which expansion helps which model: Fashion-MNIST, contracted-model accuracy on 10,000 test images "
                 f"({n_runs} runs)", fontsize=12)  # fmt: skip
    fig.tight_layout()
    _save(fig, path)


def plot_real(out: Path, runs: list[dict]) -> None:
    plt = _plt()
    archs = [a for a in REAL_MODELS if select(runs, arch=a)]
    fig, axes = plt.subplots(1, len(archs), figsize=(6 * len(archs), 4.0), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        for v in ("compact", "cl"):
            rs = select(runs, arch=arch, variant=v)
            if rs:
                _band(ax, rs, lambda h: 100 * (1 - h["val_acc"]), LABELS[v], COLORS[v])
        ax.set(title=arch, xlabel="epoch", ylabel=f"test error (%), {REAL_CURVE_IMAGES:,} test images")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("torchvision models on Fashion-MNIST (3x32x32): compact vs CL rate 4 "
                 "(mean over seeds, band = min..max)", fontsize=12)  # fmt: skip
    fig.tight_layout()
    _save(fig, out / "real_models.png")


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="results/figures")
    ap.add_argument("--only", default=",".join(EXPERIMENTS), help=f"comma list of {', '.join(EXPERIMENTS)}")
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    ap.add_argument(
        "--model-strategies",
        default=",".join(MODEL_STRATEGIES),
        help=f"branch kinds the models experiment trains after CL (default {','.join(MODEL_STRATEGIES)})",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--report-only", action="store_true", help="only regenerate the tables and figures")
    ap.add_argument("--no-report", action="store_true", help="train only (parallel workers; one reports last)")
    ap.add_argument("--verbose", action="store_true", help="one line per epoch")
    args = ap.parse_args(argv)
    args.only = [e.strip() for e in args.only.split(",") if e.strip()]
    unknown = [e for e in args.only if e not in EXPERIMENTS]
    if unknown:
        ap.error(f"unknown experiments {unknown}; choose from {', '.join(EXPERIMENTS)}")
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.model_strategies = tuple(k.strip() for k in args.model_strategies.split(",") if k.strip())
    if any(k not in BRANCH_KINDS for k in args.model_strategies):
        ap.error(f"--model-strategies: choose from {', '.join(BRANCH_KINDS)}")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ran = 0
    if not args.report_only:
        todo = [s for s in plan(args.only, args.seeds, args.model_strategies) if not result_path(out, s).is_file()]
        print(f"{len(todo)} runs to do in {out}", flush=True)
        try:
            data = load(SETTINGS) if todo else None
        except ExpandctlError as e:
            raise SystemExit(f"figures: {e} (run `make data` first)") from None
        if data is not None:
            warm_up(data)
        for spec in todo:
            if result_path(out, spec).is_file():
                continue  # another process finished it meanwhile
            lock = claim(out, spec)
            if lock is None:
                continue
            with lock:
                if result_path(out, spec).is_file():
                    continue  # finished by another process between our check and our claim
                t0 = time.perf_counter()
                r = run_one(spec, out, data, SETTINGS, args.verbose)
                ran += 1
                print(f"{spec.experiment}/{spec.name}: {100 * r['final_acc']:.2f}% "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
    if args.no_report:
        print(f"ran {ran}", flush=True)
        return {"ran": ran}
    summary = report(out)
    print(f"ran {ran}; {summary['runs']} run files; {out / 'results.md'} and "
          f"{len(list(out.glob('*.png')))} figures written", flush=True)  # fmt: skip
    return summary


if __name__ == "__main__":
    main()
