"""The training loop (expandctl.train.loop) in-process, on `synthetic` and `digits`, tiny models."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import expandctl
from expandctl.checkpoint import load_checkpoint, save
from expandctl.data import DataOptions
from expandctl.errors import UsageError
from expandctl.models import SmallNet
from expandctl.train import Callbacks, TrainConfig, TrainingDiverged, kd_loss, learning_rate, train
from expandctl.train.losses import product_l2, split_decay_parameters
from expandctl.train.warmup import NonlinearWarmup

TINY = {"in_channels": 1, "image_size": 8, "kernel_size": 5, "channels": [4, 8], "hidden": 16}


def make_src(folder: Path, expanded: bool = True, name: str = "src.pt", **kwargs) -> Path:
    """A small SmallNet checkpoint (CK+FC-expanded at rate 2 unless ``expanded=False``)."""
    kw = {**TINY, **kwargs}
    torch.manual_seed(0)
    model = SmallNet(**kw)
    if expanded:
        model = expandctl.expand(model, "ck+fc", rate=2, seed=0)
    folder.mkdir(parents=True, exist_ok=True)
    shape = (kw["in_channels"], kw["image_size"], kw["image_size"])
    return save(model, folder / name, arch="smallnet", arch_kwargs=kw, input_shape=shape)


def config(src, out, **kw) -> TrainConfig:
    base = {"data": "synthetic", "epochs": 2, "batch_size": 64, "lr": 0.1, "schedule": "cosine"}
    return TrainConfig(src=str(src), out=str(out), **{**base, **kw})


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def state_of(path) -> dict:
    return load_checkpoint(path).model.state_dict()


def same_weights(a: dict, b: dict, atol=0.0) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), rtol=0, atol=atol) for k in a)


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return make_src(tmp_path_factory.mktemp("src"))


# --------------------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------------------
def test_paper_schedule_thirds():
    lrs = [learning_rate("paper", 0.01, e, 150) for e in range(150)]
    assert lrs[0] == lrs[49] == 0.01 and lrs[50] == lrs[99] == 0.001 and lrs[100] == lrs[149] == 0.0001


def test_step_and_cosine_schedules():
    assert [learning_rate("step", 1.0, e, 8) for e in range(8)] == [1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01]
    cos = [learning_rate("cosine", 1.0, e, 4) for e in range(4)]
    assert cos[0] == 1 and math.isclose(cos[2], 0.5) and cos == sorted(cos, reverse=True)


def flags(error: UsageError) -> dict[str, str]:
    """What the CLI calls the options an error names (``--`` and dashes, as Typer names the flags)."""
    return {name: "--" + name.replace("_", "-") for name in error.options}


@pytest.mark.parametrize(
    "field, value, option, message",
    [
        ("optimizer", "rmsprop", "optimizer", "--optimizer must be one of sgd, adamw"),
        ("schedule", "linear", "schedule", "--schedule"),
        ("decay_on", "both", "decay_on", "--decay-on"),
        ("forward", "fast", "forward", "--forward"),
        ("device", "tpu", "device", "--device"),
        ("epochs", 0, "epochs", "--epochs"),
        ("lr", -1.0, "lr", "--lr"),
        ("kd_alpha", 1.5, "kd_alpha", "--kd-alpha"),
        ("kd_temperature", 0.0, "kd_temperature", "--kd-temperature"),
        ("nonlinear_warmup", 2, "nonlinear_warmup", r"--nonlinear-warmup \(2\) must be smaller than --epochs \(2\)"),
        ("weight_decay", -0.1, "weight_decay", "--weight-decay"),
        ("nesterov", True, "nesterov", "--nesterov needs a non-zero --momentum"),
    ],
)
def test_config_validation(field, value, option, message):
    """The library names the option by its field (``option=``); the CLI words it as the flag."""
    kw = {field: value}
    if field == "nesterov":
        kw["momentum"] = 0.0
    with pytest.raises(UsageError) as e:
        config("x.pt", "out", **kw).validate()
    assert e.value.options[0] == option and option in str(e.value) and "--" not in str(e.value)
    assert re.search(message, e.value.worded(flags(e.value)))


def test_config_composes_the_data_options_and_records_them_flat():
    """``TrainConfig.data_options`` holds the adapters; checkpoints and recipes keep one flat dict."""
    c = TrainConfig("x.pt", "digits", data_options=DataOptions(channels=3, train_subset=100), precise_bn=2)
    flat = c.to_dict()
    assert "data_options" not in flat and (flat["channels"], flat["train_subset"], flat["precise_bn"]) == (3, 100, 2)
    keys = list(flat)
    assert keys[keys.index("grad_confusion_pairs") + 1 : keys.index("precise_bn")] == [
        "channels", "image_size", "augment", "train_subset", "download", "val_fraction",
    ]  # fmt: skip
    assert TrainConfig.from_dict(flat) == c
    assert TrainConfig.from_dict({"data": "digits", "augment": "none"}, src="y.pt").data_options.augment == "none"
    with pytest.raises(UsageError, match="channels"):
        TrainConfig("x.pt", "digits", data_options=DataOptions(channels=2)).validate()


def test_kd_loss_matches_definition():
    torch.manual_seed(0)
    s, t, y = torch.randn(6, 5), torch.randn(6, 5), torch.randint(0, 5, (6,))
    ce = nn.functional.cross_entropy(s, y)
    assert torch.allclose(kd_loss(s, t, y, alpha=0.0, temperature=4), ce)
    assert kd_loss(s, s, y, alpha=1.0, temperature=3).abs() < 1e-6
    p, logq = torch.softmax(t / 2, 1), torch.log_softmax(s / 2, 1)
    kl = (p * (p.log() - logq)).sum(1).mean()
    assert torch.allclose(kd_loss(s, t, y, alpha=0.7, temperature=2), 0.7 * 4 * kl + 0.3 * ce, atol=1e-6)


def test_product_l2_is_l2_of_contracted_layers():
    model = expandctl.expand(SmallNet(**TINY), "ck+fc", rate=2, seed=0)
    penalty = product_l2(model, 0.1)
    compact = expandctl.contract(model)
    expected = 0
    for path, _ in expandctl.expanded_layers(model):
        layer = compact.get_submodule(path)
        expected += layer.weight.pow(2).sum() + layer.bias.pow(2).sum()
    assert torch.allclose(penalty, 0.05 * expected, rtol=1e-5)
    penalty.backward()
    factors, others = split_decay_parameters(model)
    assert all(p.grad is not None for p in factors) and all(p.grad is None for p in others)
    assert len(factors) + len(others) == len(list(model.parameters()))
    assert product_l2(SmallNet(**TINY), 0.1) is None


def test_nonlinear_warmup_hooks_are_temporary():
    model = expandctl.expand(SmallNet(**TINY), "ck+fc", rate=2, seed=0).eval()
    x = torch.randn(4, 1, 8, 8)
    linear = model(x)
    warm = NonlinearWarmup(model)
    warm.attach()
    assert all(layer.forward_mode == "explicit" for _, layer in expandctl.expanded_layers(model))
    assert not torch.allclose(model(x), linear, atol=1e-4)
    warm.detach("fused")
    assert all(layer.forward_mode == "fused" for _, layer in expandctl.expanded_layers(model))
    assert torch.equal(model(x), linear)
    assert not any(f._forward_hooks for _, layer in expandctl.expanded_layers(model) for f in layer.factors)


# --------------------------------------------------------------------------------------------------
# Whole runs
# --------------------------------------------------------------------------------------------------
class Recorder(Callbacks):
    def __init__(self):
        self.events = []

    def on_start(self, info):
        self.events.append(("start", info))

    def on_epoch_start(self, epoch, epochs, steps):
        self.events.append(("epoch_start", epoch, steps))

    def on_step(self, step, steps, loss):
        self.events.append(("step", step))

    def on_epoch_end(self, metrics, is_best):
        self.events.append(("epoch_end", metrics["epoch"], is_best))

    def on_end(self, summary):
        self.events.append(("end", summary))


def test_run_writes_all_outputs(src, tmp_path):
    rec = Recorder()
    summary = train(config(src, tmp_path / "run", epochs=3), rec)
    out = tmp_path / "run"
    rows = metrics(out)
    keys = {"epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds", "images_per_s"}
    assert [r["epoch"] for r in rows] == [1, 2, 3] and all(keys <= r.keys() for r in rows)
    assert [r["lr"] for r in rows] == [learning_rate("cosine", 0.1, e, 3) for e in range(3)]
    assert rows[-1]["val_acc"] > 0.3  # chance is 0.1: the run learns
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["best_val_acc"] == max(r["val_acc"] for r in rows)
    assert summary["best_epoch"] == max(rows, key=lambda r: r["val_acc"])["epoch"]

    last = load_checkpoint(out / "last.pt")
    st = last.extra["train"]
    assert st["epoch"] == 3 and len(st["history"]) == 3 and st["config"]["data"] == "synthetic"
    assert last.provenance["parent_sha256"] == load_checkpoint(src).sha256
    assert last.layout and last.arch == "expandctl.models:SmallNet" and tuple(last.input_shape) == (1, 8, 8)
    best = load_checkpoint(out / "best.pt")
    assert best.extra["train"]["epoch"] == summary["best_epoch"]
    # The trained checkpoint is still exactly contractible.
    model = last.model.eval()
    x = torch.randn(8, 1, 8, 8)
    assert torch.allclose(expandctl.contract(model)(x), model(x), atol=1e-5)

    kinds = [e[0] for e in rec.events]
    assert kinds[0] == "start" and kinds[-1] == "end" and kinds.count("epoch_end") == 3
    assert ("epoch_start", 1, 8) in rec.events and kinds.count("step") == 3 * 8
    assert not list(out.glob(".*.tmp"))


def test_fused_and_explicit_forward_agree(src, tmp_path):
    train(config(src, tmp_path / "f", epochs=1, forward="fused"))
    train(config(src, tmp_path / "e", epochs=1, forward="explicit"))
    assert same_weights(state_of(tmp_path / "f/last.pt"), state_of(tmp_path / "e/last.pt"), atol=1e-5)
    assert math.isclose(
        metrics(tmp_path / "f")[0]["train_loss"], metrics(tmp_path / "e")[0]["train_loss"], rel_tol=1e-5
    )


@pytest.mark.parametrize(
    "options, check",
    [
        (
            {"optimizer": "adamw", "lr": 0.003},
            lambda g, s: "betas" in g[0] and "exp_avg" in next(iter(s.values())),
        ),
        ({"nesterov": True}, lambda g, s: g[0]["nesterov"] and g[0]["momentum"] == 0.9),
        ({"momentum": 0.5}, lambda g, s: g[0]["momentum"] == 0.5),
        ({"weight_decay": 1e-3}, lambda g, s: len(g) == 1 and g[0]["weight_decay"] == 1e-3),
        (
            {"weight_decay": 1e-3, "decay_on": "product"},
            lambda g, s: [x["weight_decay"] for x in g] == [1e-3, 0.0],
        ),
    ],
)
def test_optimizer_options_reach_the_optimizer(src, tmp_path, options, check):
    train(config(src, tmp_path / "run", epochs=1, **options))
    opt = load_checkpoint(tmp_path / "run/last.pt").extra["train"]["optimizer"]
    assert check(opt["param_groups"], opt["state"])


def test_product_decay_differs_from_factor_decay(src, tmp_path):
    train(config(src, tmp_path / "f", epochs=1, weight_decay=0.05, decay_on="factors"))
    train(config(src, tmp_path / "p", epochs=1, weight_decay=0.05, decay_on="product"))
    train(config(src, tmp_path / "n", epochs=1))
    f, p, n = (state_of(tmp_path / f"{k}/last.pt") for k in "fpn")
    assert not same_weights(f, p, atol=1e-6) and not same_weights(p, n, atol=1e-6)
    # On a compact model (no expanded layer) product decay is plain decay.
    compact = make_src(tmp_path / "c", expanded=False)
    train(config(compact, tmp_path / "cf", epochs=1, weight_decay=0.05))
    train(config(compact, tmp_path / "cp", epochs=1, weight_decay=0.05, decay_on="product"))
    assert same_weights(state_of(tmp_path / "cf/last.pt"), state_of(tmp_path / "cp/last.pt"))


def test_schedule_paper_in_metrics(src, tmp_path):
    train(config(src, tmp_path / "run", epochs=3, schedule="paper", lr=0.05))
    assert [r["lr"] for r in metrics(tmp_path / "run")] == [0.05, 0.005, 0.0005]


def test_distillation_from_expanded_compact_and_torchvision_teachers(src, tmp_path):
    plain = train(config(src, tmp_path / "plain", epochs=1))["final"]["train_loss"]
    teacher = make_src(tmp_path / "t", expanded=False, name="teacher.pt")
    for name, t in (("compact", teacher), ("expanded", src)):
        kd = train(config(src, tmp_path / name, epochs=1, teacher=str(t), kd_alpha=0.5, kd_temperature=2))
        assert kd["final"]["train_loss"] != plain
    # A pickled torchvision model: loads without --trust-pickle (torchvision classes are allowlisted).
    import torchvision

    tv_path = tmp_path / "tv.pt"
    torch.save(torchvision.models.squeezenet1_1(num_classes=10).eval(), tv_path)
    src3 = make_src(tmp_path / "s3", in_channels=3, image_size=32)
    summary = train(config(src3, tmp_path / "tv", epochs=1, data="synthetic:3x32x32", teacher=str(tv_path)))
    assert summary["epochs_run"] == 1


def test_teacher_errors(src, tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        train(config(src, tmp_path / "run", teacher=str(tmp_path / "nope.pt")))


def test_nonlinear_warmup_then_linear(src, tmp_path):
    rec = Recorder()
    train(config(src, tmp_path / "run", epochs=3, nonlinear_warmup=2), rec)
    rows = metrics(tmp_path / "run")
    assert [r.get("nonlinear", False) for r in rows] == [True, True, False]
    assert load_checkpoint(tmp_path / "run/best.pt").extra["train"]["epoch"] == 3  # warmup epochs never "best"
    assert [e[2] for e in rec.events if e[0] == "epoch_end"] == [False, False, True]
    model = load_checkpoint(tmp_path / "run/last.pt").model.eval()
    x = torch.randn(4, 1, 8, 8)
    assert torch.allclose(expandctl.contract(model)(x), model(x), atol=1e-5)


def test_nonlinear_warmup_changes_training(src, tmp_path):
    train(config(src, tmp_path / "lin", epochs=2))
    train(config(src, tmp_path / "nl", epochs=2, nonlinear_warmup=1))
    assert not same_weights(state_of(tmp_path / "lin/last.pt"), state_of(tmp_path / "nl/last.pt"), atol=1e-4)
    with pytest.raises(UsageError, match="needs expanded layers"):
        train(config(make_src(tmp_path / "c", expanded=False), tmp_path / "c_run", nonlinear_warmup=1))


def test_epoch_hooks_add_metrics_and_see_the_model(src, tmp_path):
    seen = []

    def hook(ctx):
        seen.append((ctx.epoch, ctx.rank, ctx.world_size, type(ctx.model).__name__, len(ctx.train_data)))
        x, y = next(iter(ctx.make_loader(ctx.train_data, batch_size=16)))
        return {"probe_loss": ctx.loss_fn(ctx.model(x.to(ctx.device)), y.to(ctx.device)).item()}

    train(config(src, tmp_path / "run"), epoch_hooks=[hook])
    assert seen == [(1, 0, 1, "SmallNet", 512), (2, 0, 1, "SmallNet", 512)]
    assert all("probe_loss" in r for r in metrics(tmp_path / "run"))


# --------------------------------------------------------------------------------------------------
# Failures and resume
# --------------------------------------------------------------------------------------------------
def test_nan_loss_stops_and_keeps_last_good_checkpoint(src, tmp_path):
    def poison_after_first_epoch(ctx):
        if ctx.epoch == 1:  # the forward of epoch 2 returns NaN; the saved weights stay finite
            ctx.model.register_forward_hook(lambda m, args, out: out * float("nan"))

    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"loss became nan at epoch 2, step 1 of 8.*still holds epoch 1"):
        train(config(src, out, epochs=3), epoch_hooks=[poison_after_first_epoch])
    last = load_checkpoint(out / "last.pt")
    assert last.extra["train"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in last.model.state_dict().values() if v.is_floating_point())
    assert len(metrics(out)) == 1 and (out / "curves.png").exists()
    assert TrainingDiverged.exit_code == 1


def test_divergence_in_first_epoch(src, tmp_path):
    with pytest.raises(TrainingDiverged, match="no checkpoint was written"):
        train(config(src, tmp_path / "run", lr=1e6, schedule="paper"))
    assert not (tmp_path / "run/last.pt").exists()


class StopAfter(Callbacks):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, metrics, is_best):
        if metrics["epoch"] == self.epoch:
            raise KeyboardInterrupt


def test_resume_in_process_is_exact(src, tmp_path):
    """Interrupt after epoch 1's checkpoint, resume: same weights, optimizer state and metrics as one go.
    (The kill -9 mid-epoch version runs in a subprocess: test_train_resume.py.)"""
    train(config(src, tmp_path / "once", epochs=3, nonlinear_warmup=1))
    with pytest.raises(KeyboardInterrupt):
        train(config(src, tmp_path / "twice", epochs=3, nonlinear_warmup=1), StopAfter(1))
    # A torn metrics line from the crash is dropped on resume (history lives in last.pt).
    with open(tmp_path / "twice/metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "trunc')
    summary = train(config(src, tmp_path / "twice", epochs=3, nonlinear_warmup=1, resume=True))
    assert summary["start_epoch"] == 1 and summary["epochs_run"] == 2
    assert same_weights(state_of(tmp_path / "once/last.pt"), state_of(tmp_path / "twice/last.pt"))
    a, b = (load_checkpoint(tmp_path / f"{k}/last.pt").extra["train"] for k in ("once", "twice"))
    assert a["best_epoch"] == b["best_epoch"] and a["best_val_acc"] == b["best_val_acc"]
    strip = [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in metrics(tmp_path / "once")]
    again = [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in metrics(tmp_path / "twice")]
    assert strip == again


def test_resume_guards(src, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(UsageError, match="does not exist; start the run without resume$") as e:
        train(config(src, out, resume=True))
    assert e.value.worded(flags(e.value)).endswith("does not exist; start the run without --resume")
    train(config(src, out, epochs=1))
    with pytest.raises(UsageError, match="already holds a run.*resume") as e:
        train(config(src, out, epochs=1))
    assert "continue it with --resume" in e.value.worded(flags(e.value))
    with pytest.raises(UsageError, match=r"these differ: lr 0\.5 \(the run has 0\.1\)") as e:
        train(config(src, out, epochs=1, lr=0.5, resume=True))
    assert e.value.options == ("resume", "lr")
    worded = e.value.worded(flags(e.value))
    assert re.search(r"^--resume continues .*these differ: --lr 0\.5 \(the run has 0\.1\)$", worded)
    # Finished runs resume to a no-op; a compact checkpoint without training state is refused.
    assert train(config(src, out, epochs=1, resume=True))["epochs_run"] == 0
    (tmp_path / "other").mkdir()
    (tmp_path / "other/last.pt").write_bytes(src.read_bytes())
    with pytest.raises(UsageError, match="holds no training state"):
        train(config(src, tmp_path / "other", resume=True))


def test_model_data_mismatch_is_one_line(tmp_path):
    src = make_src(tmp_path)  # 1x8x8, 10 classes
    with pytest.raises(UsageError, match=r"takes 1x8x8 inputs but --data synthetic:3x8x8 gives 3x8x8 images") as e:
        train(config(src, tmp_path / "a", data="synthetic:3x8x8"))
    assert "\n" not in str(e.value) and str(e.value).endswith("adapt the data with --channels 1")
    few = make_src(tmp_path / "few", num_classes=4)
    with pytest.raises(UsageError, match="4 outputs but synthetic has 10 classes"):
        train(config(few, tmp_path / "b"))
    assert not (tmp_path / "a").exists() or not (tmp_path / "a/last.pt").exists()


def test_missing_src(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        train(config(tmp_path / "nope.pt", tmp_path / "run"))


def test_cuda_request_without_gpu(src, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(UsageError, match="no CUDA GPU"):
        train(config(src, tmp_path / "run", device="cuda"))


# --------------------------------------------------------------------------------------------------
# digits, the demo set, with the paper's SmallNet CK+FC
# --------------------------------------------------------------------------------------------------
def test_smallnet_ck_fc_learns_digits(tmp_path):
    kw = {"in_channels": 1, "image_size": 8}
    torch.manual_seed(0)
    model = expandctl.expand(SmallNet(**kw), "ck+fc", seed=0)
    src = save(model, tmp_path / "expanded.pt", arch="smallnet", arch_kwargs=kw, input_shape=(1, 8, 8))
    summary = train(TrainConfig(str(src), "digits", out=str(tmp_path / "run"), epochs=3, lr=0.05, schedule="cosine"))
    assert summary["best_val_acc"] > 0.5
    assert len(metrics(tmp_path / "run")) == 3


def test_workers_do_not_change_the_trajectory(src, tmp_path):
    """Shuffling is drawn in the main process from the saved generator, so worker processes only read."""
    train(config(src, tmp_path / "w0", epochs=1))
    train(config(src, tmp_path / "w1", epochs=1, workers=1))
    assert same_weights(state_of(tmp_path / "w0/last.pt"), state_of(tmp_path / "w1/last.pt"))
