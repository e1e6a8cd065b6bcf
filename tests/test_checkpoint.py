"""The checkpoint format, safe loading of foreign files, atomic writes and BatchNorm folding."""

import json
import os
import struct

import pytest
import torch
import torch.nn as nn
import torchvision
from helpers import CustomNet, Payload, randomize_batchnorm

import expandctl
from expandctl import checkpoint as C
from expandctl.algebra import fold_bn
from expandctl.errors import UnsafeInputError, UsageError
from expandctl.fold import fold_batchnorm
from expandctl.models import SmallNet
from expandctl.verify import compare_models

SMALL = {"kernel_size": 5, "image_size": 8}
SHAPE = (3, 8, 8)


def small_net(seed=0):
    torch.manual_seed(seed)
    return randomize_batchnorm(SmallNet(**SMALL), seed)


def expanded_small(seed=0):
    return expandctl.expand(small_net(seed), "ck+fc", rate=2, seed=seed)


def assert_same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


class TiedNet(nn.Module):
    """Importable as ``test_checkpoint:TiedNet``: two paths share one Linear (safetensors refuses shared storage)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = self.a
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.b(self.a(x)))


# --------------------------------------------------------------------------------------------------
# atomic_write
# --------------------------------------------------------------------------------------------------
def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with C.atomic_write(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]  # no temp file left behind
    with C.atomic_write(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["out.bin"]
    assert target.stat().st_mode & 0o044  # not mkstemp's 0600


def test_atomic_write_missing_directory(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        with C.atomic_write(tmp_path / "nope" / "x.pt"):
            pass


# --------------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------------
def test_round_trip_pt(tmp_path):
    model = expanded_small()
    plan = expandctl.plan(small_net(), "ck+fc", rate=2)
    extra = {"epoch": 3, "optimizer": {"state": {0: {"momentum": torch.ones(3)}}}, "rng": torch.get_rng_state()}
    path = C.save(
        model,
        tmp_path / "e.pt",
        arch="smallnet",
        arch_kwargs=SMALL,
        input_shape=SHAPE,
        plan=plan,
        parent_sha256="ab" * 32,
        command=["expandctl", "expand"],
        extra=extra,
    )
    raw = torch.load(path, weights_only=True)  # the format promise: no pickle globals needed
    assert raw["format"] == "expandctl" and raw["format_version"] == 1
    assert raw["arch"] == {"spec": "expandctl.models:SmallNet", "kwargs": SMALL}
    assert raw["input_shape"] == list(SHAPE)
    assert raw["layout"] == expandctl.layout(model)
    assert raw["plan"]["strategy"] == "ck+fc"
    prov = raw["provenance"]
    assert prov["parent_sha256"] == "ab" * 32 and prov["command"] == "expandctl expand"
    assert prov["expandctl_version"] == expandctl.__version__ and prov["torch_version"] and prov["time"]

    state = torch.get_rng_state()
    ck = C.load_checkpoint(path)
    assert torch.equal(torch.get_rng_state(), state)  # loading does not move the caller's RNG
    assert ck.format == "expandctl" and ck.arch == "expandctl.models:SmallNet"
    assert ck.input_shape == SHAPE and ck.layout == expandctl.layout(model)
    assert ck.extra["epoch"] == 3 and torch.equal(ck.extra["optimizer"]["state"][0]["momentum"], torch.ones(3))
    assert ck.sha256 == C.sha256_file(path)
    assert_same_state(model, ck.model)
    assert len(list(expandctl.expanded_layers(ck.model))) == 5
    assert compare_models(model, ck.model, SHAPE).passed
    assert_same_state(model, expandctl.load(path))


def test_round_trip_safetensors_with_tied_weights(tmp_path):
    model = expandctl.expand(TiedNet(), "fc", rate=2, seed=0)
    path = C.save(model, tmp_path / "t.safetensors", arch="test_checkpoint:TiedNet", input_shape=(4,), extra={"a": 1})
    ck = C.load_checkpoint(path)
    assert ck.format == "expandctl-safetensors" and ck.extra == {"a": 1} and ck.input_shape == (4,)
    assert_same_state(model, ck.model)
    assert ck.model.a is ck.model.b  # the architecture rebuilds the sharing


def test_safetensors_refuses_tensor_extra(tmp_path):
    with pytest.raises(UsageError, match=r"\.pt"):
        C.save(
            small_net(),
            tmp_path / "x.safetensors",
            arch="smallnet",
            arch_kwargs=SMALL,
            input_shape=SHAPE,
            extra={"t": torch.ones(1)},
        )


def test_save_refuses_non_weights_only_extra_and_wrong_arch(tmp_path):
    with pytest.raises(UsageError, match=r"extra\['opt'\]"):
        C.save(
            small_net(),
            tmp_path / "x.pt",
            arch="smallnet",
            arch_kwargs=SMALL,
            input_shape=SHAPE,
            extra={"opt": object()},
        )
    with pytest.raises(UsageError, match="does not rebuild"):
        C.save(small_net(), tmp_path / "x.pt", arch="smallnet", input_shape=SHAPE)  # default image_size 32
    with pytest.raises(UsageError, match=r"\.pt"):
        C.save(small_net(), tmp_path / "x.txt", arch="smallnet", arch_kwargs=SMALL, input_shape=SHAPE)
    assert not list(tmp_path.iterdir())


def test_plain_state_dict_needs_and_fits_arch(tmp_path):
    model = small_net()
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "sd.pt")
    with pytest.raises(C.NeedsArchError, match="--arch"):
        C.load_checkpoint(tmp_path / "sd.pt")
    ck = C.load_checkpoint(tmp_path / "sd.pt", arch="smallnet", arch_kwargs=SMALL)  # DDP prefix, nested key
    assert ck.format == "state_dict" and ck.input_shape == SHAPE
    assert_same_state(model, ck.model)
    with pytest.raises(UsageError, match=r"do not fit.*shape mismatches classifier\.1\.weight"):
        C.load_checkpoint(tmp_path / "sd.pt", arch="smallnet", arch_kwargs={"kernel_size": 5})  # image_size 32
    with pytest.raises(UsageError, match="missing keys"):
        C.load_checkpoint(tmp_path / "sd.pt", arch="resnet18")


def test_float64_weights_stay_float64(tmp_path):
    model = small_net().double()
    torch.save(model.state_dict(), tmp_path / "d.pt")
    ck = C.load_checkpoint(tmp_path / "d.pt", arch="smallnet", arch_kwargs=SMALL)
    assert next(ck.model.parameters()).dtype == torch.float64


def test_whole_torchvision_module_loads_without_trust(tmp_path):
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=7)
    torch.save(model, tmp_path / "whole.pt")
    ck = C.load_checkpoint(tmp_path / "whole.pt")
    assert ck.format == "pickled_module"
    assert (ck.arch, ck.arch_kwargs) == ("torchvision.models:shufflenet_v2_x0_5", {"num_classes": 7})
    assert ck.input_shape == (3, 224, 224)
    assert ck.provenance["pickled_class"] == "torchvision.models.shufflenetv2.ShuffleNetV2"
    assert_same_state(model, ck.model)


def test_whole_expanded_module_infers_compact_arch(tmp_path):
    model = expanded_small()
    torch.save(model, tmp_path / "whole.pt")
    ck = C.load_checkpoint(tmp_path / "whole.pt")
    assert ck.arch == "expandctl.models:SmallNet" and ck.input_shape == SHAPE
    assert ck.layout == expandctl.layout(model)
    out = C.save(ck.model, tmp_path / "e.pt", arch=ck.arch, arch_kwargs=ck.arch_kwargs, input_shape=SHAPE)
    assert_same_state(model, C.load(out))


def test_pickled_payload_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "MARKER"
    torch.save({"w": torch.zeros(1), "x": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeInputError, match=r"builtins\.exec.*--trust-pickle") as err:
        C.load_checkpoint(tmp_path / "evil.pt")
    assert err.value.exit_code == 3
    assert not marker.exists()


def test_custom_class_needs_trust(tmp_path):
    torch.save(CustomNet(), tmp_path / "custom.pt")
    with pytest.raises(UnsafeInputError, match=r"helpers\.CustomNet.*EXPANDCTL_TRUST_PICKLE"):
        C.load_checkpoint(tmp_path / "custom.pt")
    ck = C.load_checkpoint(tmp_path / "custom.pt", trust_pickle=True)
    assert isinstance(ck.model, CustomNet) and ck.arch == "helpers:CustomNet"


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty"),
        (b"hello, this is not a model at all", "unknown format"),
        (struct.pack("<Q", 40) + b'{"w": {"dtype": "F32", "shape": [9], "data', "truncated or corrupt"),
    ],
)
def test_bad_files(tmp_path, content, message):
    (tmp_path / "bad.pt").write_bytes(content)
    with pytest.raises(UsageError, match=message):
        C.load_checkpoint(tmp_path / "bad.pt")


def test_missing_and_truncated_and_flipped(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        C.load_checkpoint(tmp_path / "nope.pt")
    torch.save(small_net().state_dict(), tmp_path / "sd.pt")
    data = (tmp_path / "sd.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match="truncated or corrupt"):
        C.load_checkpoint(tmp_path / "cut.pt", arch="smallnet", arch_kwargs=SMALL)
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0xFF
    (tmp_path / "flip.pt").write_bytes(bytes(flipped))
    with pytest.raises(UsageError, match="corrupt"):
        C.load_checkpoint(tmp_path / "flip.pt", arch="smallnet", arch_kwargs=SMALL)


def test_not_a_model(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(UsageError, match="holds a list"):
        C.load_checkpoint(tmp_path / "list.pt")


def test_newer_format_version_is_refused(tmp_path):
    path = C.save(small_net(), tmp_path / "c.pt", arch="smallnet", arch_kwargs=SMALL, input_shape=SHAPE)
    raw = torch.load(path, weights_only=True)
    raw["format_version"] = 99
    torch.save(raw, path)
    with pytest.raises(UsageError, match="upgrade expandctl"):
        C.load_checkpoint(path)


def test_check_output_path(tmp_path):
    src = tmp_path / "a.pt"
    src.write_bytes(b"x")
    with pytest.raises(UsageError, match="is the input file"):
        C.check_output_path(tmp_path / "." / "a.pt", [src])
    with pytest.raises(UsageError, match="does not exist"):
        C.check_output_path(tmp_path / "missing" / "b.onnx", [src])
    with pytest.raises(UsageError, match="must end in"):
        C.check_output_path(tmp_path / "b.txt", [src], (".onnx",))


def test_infer_input_shape():
    assert C.infer_input_shape("resnet18", {}, None) == (3, 224, 224)
    assert C.infer_input_shape("vit_b_16", {"image_size": 64}, None) == (3, 64, 64)
    assert C.infer_input_shape("smallnet", {"in_channels": 1, "image_size": 28}, None) == (1, 28, 28)
    assert C.infer_input_shape("fcn_resnet50", {}, None) is None  # segmentation: no standard size
    assert C.infer_input_shape(None, None, CustomNet()) is None


# --------------------------------------------------------------------------------------------------
# BatchNorm folding
# --------------------------------------------------------------------------------------------------
def test_fold_bn_pure_function():
    conv = nn.Conv2d(4, 6, 3, groups=2, bias=False).double()
    bn = randomize_batchnorm(nn.BatchNorm2d(6).double()).eval()
    w, b = fold_bn(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    expected = bn(conv(x))
    got = torch.nn.functional.conv2d(x, w, b, groups=2)
    assert (got - expected).abs().max() < 1e-12


def test_fold_batchnorm_resnet_and_reload(tmp_path):
    model = randomize_batchnorm(torchvision.models.resnet18(num_classes=4)).eval()
    folded, pairs = fold_batchnorm(model)
    assert len(pairs) == 20  # every conv of resnet18, downsample convs included (found through torch.fx)
    assert {"conv": "conv1", "bn": "bn1"} in pairs
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the input is untouched
    assert compare_models(model, folded, (3, 16, 16), samples=1).passed
    path = C.save(
        folded,
        tmp_path / "f.pt",
        arch="resnet18",
        arch_kwargs={"num_classes": 4},
        input_shape=(3, 16, 16),
        folded_bn=pairs,
    )
    assert_same_state(folded, C.load(path))


def test_fold_batchnorm_sequential_and_shared():
    shared = nn.Conv2d(3, 3, 3, padding=1)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU(), shared, nn.BatchNorm2d(3), shared)
    randomize_batchnorm(model)
    folded, pairs = fold_batchnorm(model)
    assert pairs == [{"conv": "0", "bn": "1"}]  # the shared conv also feeds something else: left alone
    assert compare_models(model, folded, (3, 9, 9), samples=1).passed


def test_fold_refuses_expanded_model():
    with pytest.raises(UsageError, match="contract the model"):
        fold_batchnorm(expanded_small())


def test_describe_onnx_rejects_garbage(tmp_path):
    (tmp_path / "x.onnx").write_bytes(b"\x08\x07garbage")
    with pytest.raises(UsageError):
        C.describe_onnx(tmp_path / "x.onnx")


def test_header_is_json_ready(tmp_path):
    path = C.save(expanded_small(), tmp_path / "e.pt", arch="smallnet", arch_kwargs=SMALL, input_shape=SHAPE)
    json.dumps(C.load_checkpoint(path).header())


def test_checkpoint_is_split_by_concern_and_keeps_its_public_names():
    """One module per concern (format, safe unpickling, inference, descriptions); the package
    re-exports the same objects, so ``expandctl.checkpoint.X`` keeps working everywhere."""
    from expandctl.checkpoint import describe, files, format, infer, unpickle

    assert C.save is format.save and C.load_checkpoint is format.load_checkpoint
    assert C.Checkpoint is format.Checkpoint and C.NeedsArchError is format.NeedsArchError
    assert C.infer_arch is infer.infer_arch and C.infer_input_shape is infer.infer_input_shape
    assert C.describe_onnx is describe.describe_onnx and C.describe_state_dict is describe.describe_state_dict
    assert C.atomic_write is files.atomic_write and C.sniff_format is files.sniff_format
    assert callable(unpickle.torch_load) and callable(unpickle.find_state_dict)
