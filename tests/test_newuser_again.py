"""What a new user hit, second round (issue 18): trusted pickles of a user's class, verify against another
model's ONNX file, expanding an expanded file, the CK fit residual, and the small points. In-process
through CliRunner; point 1 (transposed convolutions saved and reloaded) is tests/test_roundtrip.py."""

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from helpers import digit_folder
from typer.testing import CliRunner

from expandctl import checkpoint as C
from expandctl.cli import app
from expandctl.data import DataOptions

runner = CliRunner()
GRAY = {"kernel_size": 5, "in_channels": 1, "image_size": 8}  # 1x8x8, the digits shape


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def cli_json(*args, code=0):
    result = cli(*args, "--json")
    assert result.exit_code == code, (result.stdout, result.stderr)
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["ok"] is (code == 0)
    return data


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A CK-expanded 1x8x8 SmallNet, and a 3x32x32 one contracted to ONNX (another model)."""
    d = tmp_path_factory.mktemp("again")
    r = cli("expand", "--arch", "smallnet", "--arch-kwargs", json.dumps(GRAY), "--seed", "0",
            "--strategy", "ck+fc", "--rate", "2", "-o", d / "gray.pt", "-q")  # fmt: skip
    assert r.exit_code == 0, r.output
    r = cli("expand", "--arch", "smallnet", "--arch-kwargs", '{"kernel_size": 5}', "--seed", "0",
            "--rate", "2", "-o", d / "rgb.pt", "-q")  # fmt: skip
    assert r.exit_code == 0, r.output
    r = cli("contract", d / "rgb.pt", "-o", d / "rgb.onnx", "-q")
    assert r.exit_code == 0, r.output
    return d


# --------------------------------------------------------------------------------------------------
# 2. A trusted pickle of a user's class finds the class's module in the current folder, as --arch does
# --------------------------------------------------------------------------------------------------
USER_MODULE = """
import torch.nn as nn


class MyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 5, padding=2)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))
"""


@pytest.fixture
def pickled_user_model(tmp_path, monkeypatch):
    """``x.pt``: a whole MyNet pickled from the user's ``mynet_<n>.py``, in the current folder; the
    module is then forgotten (and the folder off sys.path), as in a new process."""
    import importlib

    name = f"mynet_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(name)
    torch.save(module.MyNet(), tmp_path / "x.pt")
    sys.modules.pop(name, None)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    yield tmp_path, name
    sys.modules.pop(name, None)


def test_trusted_pickle_finds_its_class_in_the_current_folder(pickled_user_model):
    _, name = pickled_user_model
    data = cli_json("inspect", "x.pt", "--trust-pickle")
    assert data["format"] == "pickled_module" and data["provenance"]["pickled_class"] == f"{name}.MyNet"


def test_trusted_pickle_whose_module_is_nowhere_says_so(pickled_user_model):
    folder, name = pickled_user_model
    (folder / f"{name}.py").unlink()
    data = cli_json("inspect", "x.pt", "--trust-pickle", code=2)
    assert f"No module named '{name}'" in data["error"] and f"{name}.py" in data["error"]
    assert "corrupt" not in data["error"] and "PYTHONPATH" in data["error"]


def test_untrusted_pickle_of_a_user_class_is_still_refused(pickled_user_model):
    assert "--trust-pickle" in cli_json("inspect", "x.pt", code=3)["error"]


# --------------------------------------------------------------------------------------------------
# 3. verify CKPT ONNX where the ONNX file takes another input shape: two different models
# --------------------------------------------------------------------------------------------------
def test_verify_against_the_onnx_file_of_another_model_says_so(files):
    data = cli_json("verify", files / "gray.pt", files / "rgb.onnx", code=2)
    assert "two different models" in data["error"] and "3x32x32" in data["error"] and "1x8x8" in data["error"]
    assert "check --input-shape" not in data["error"]


# --------------------------------------------------------------------------------------------------
# 4. expand on an already expanded file: "already expanded", not "strategy selects no layer"
# --------------------------------------------------------------------------------------------------
def test_expand_an_expanded_file_says_already_expanded(files, tmp_path):
    out = tmp_path / "twice.pt"
    dry = cli_json("expand", files / "gray.pt", "--strategy", "ck+fc", "--dry-run", code=4)
    data = cli_json("expand", files / "gray.pt", "--strategy", "ck+fc", "-o", out, code=4)
    for d in (dry, data):
        assert "already expanded" in d["error"] and "selects no layer" not in d["error"]
        assert d["error_type"] == "AlreadyExpandedError"
    assert not out.exists()


# --------------------------------------------------------------------------------------------------
# 6. The CK fit residual of --init preserve: plan table, inspect, --json
# --------------------------------------------------------------------------------------------------
def test_preserve_fit_residual_is_shown_and_recorded(tmp_path):
    out = tmp_path / "p.pt"
    args = ["expand", "--arch", "smallnet", "--arch-kwargs", json.dumps(GRAY), "--seed", "0", "--init", "preserve",
            "--strategy", "ck", "-o", out]  # fmt: skip
    data = cli_json(*args)
    fitted = {e["path"]: e["fit_residual"] for e in data["plan"]["layers"] if e["kind"]}
    assert set(fitted) == {"features.0", "features.4", "features.8"}
    assert all(0 <= r < 1e-4 for r in fitted.values())  # 5x5 at rate 4 fits exactly (float32)
    assert C.load_checkpoint(out).plan["layers"][0]["fit_residual"] == fitted["features.0"]
    table = cli(*args[:-1], tmp_path / "p2.pt").stdout
    assert "fit residual" in table
    shown = {r["path"]: r["fit_residual"] for r in cli_json("inspect", out)["expanded_layers"]}
    assert shown == fitted
    assert "fit residual" in cli("inspect", out).stdout


def test_scratch_init_shows_no_residual_column(tmp_path):
    args = ["expand", "--arch", "smallnet", "--arch-kwargs", json.dumps(GRAY), "--strategy", "ck"]
    assert "fit residual" not in cli(*args, "-o", tmp_path / "s.pt").stdout
    assert all(e["fit_residual"] is None for e in cli_json(*args, "-o", tmp_path / "s2.pt")["plan"]["layers"])


# --------------------------------------------------------------------------------------------------
# 7. Small points
# --------------------------------------------------------------------------------------------------
def test_quiet_prints_only_the_final_line(files, tmp_path):
    r = cli("contract", files / "gray.pt", "-o", tmp_path / "c.pt", "-q")
    assert r.exit_code == 0 and r.stdout.strip() == f"wrote {tmp_path / 'c.pt'}"
    r = cli("verify", files / "gray.pt", "-q")
    assert r.exit_code == 0 and r.stdout.strip() == "passed"
    r = cli("expand", "--arch", "smallnet", "--arch-kwargs", json.dumps(GRAY), "-o", tmp_path / "e.pt", "-q")
    assert r.exit_code == 0 and r.stdout.strip() == f"wrote {tmp_path / 'e.pt'}"
    r = cli("export", tmp_path / "c.pt", "-o", tmp_path / "c.onnx", "-q")
    expected = f"wrote {tmp_path / 'c.onnx'} (dynamic batch, static input size)"
    assert r.exit_code == 0 and r.stdout.strip().splitlines() == [expected]


def test_quiet_failed_check_prints_the_error_line_only(files, tmp_path):
    r = cli("verify", files / "gray.pt", "--atol", "0", "--rtol", "0", "--dtype", "float32", "-q")
    assert r.exit_code == 1 and r.stdout == "" and r.stderr.startswith("error: outputs differ")


def test_plot_help_names_its_argument_once():
    r = cli("plot", "--help")
    assert "RUN_DIR..." in r.stdout and "RUN_DIR...." not in r.stdout


def test_preserve_rate_too_small_speaks_cli(tmp_path):
    data = cli_json("expand", "--arch", "smallnet", "--init", "preserve", "--strategy", "ck", "--rate", "1",
                    "-o", tmp_path / "r.pt", code=4)  # fmt: skip
    assert "--init scratch" in data["error"] and "--rate" in data["error"] and "init='" not in data["error"]


@pytest.mark.parametrize("spec", ["cifar10", "cifar100", "mnist", "fashion-mnist", "imagefolder"])
def test_a_missing_data_folder_says_no_such_folder(spec, tmp_path):
    from expandctl.data import load_data
    from expandctl.errors import UsageError

    with pytest.raises(UsageError) as e:
        load_data(f"{spec}:{tmp_path / 'nowhere'}")
    assert e.value.option == "data"
    cli = e.value.worded({"data": "--data"})  # as the CLI words it
    assert re.match(rf"--data {spec}:\S*nowhere: no such folder", cli)


def test_an_empty_cifar_folder_says_what_it_must_hold(tmp_path):
    from expandctl.data import load_data
    from expandctl.errors import UsageError

    with pytest.raises(UsageError, match="must hold data_batch_1..5"):
        load_data(f"cifar10:{tmp_path}")


@pytest.mark.parametrize("cache_exists", [False, True])
def test_a_failed_download_leaves_no_folders_behind(tmp_path, monkeypatch, cache_exists):
    from torchvision import datasets

    from expandctl.data import load_data
    from expandctl.errors import UsageError

    cache = tmp_path / "cache"
    if cache_exists:
        (cache / "mine").mkdir(parents=True)
    monkeypatch.setenv("EXPANDCTL_DATA", str(cache))

    class Offline(datasets.MNIST):
        def __init__(self, root, train=True, download=False):
            (Path(root) / "MNIST" / "raw").mkdir(parents=True, exist_ok=True)  # as torchvision does first
            raise OSError("network is unreachable")

    monkeypatch.setattr(datasets, "MNIST", Offline)
    with pytest.raises(UsageError, match="downloading mnist .* failed"):
        load_data("mnist", options=DataOptions(download=True))
    if cache_exists:
        assert sorted(p.name for p in cache.iterdir()) == ["mine"]
    else:
        assert not cache.exists()


# --------------------------------------------------------------------------------------------------
# 5. Image folders: class folders directly under DIR, a seeded per-class split, augmentation that keeps
#    the image, and advice when the batch size leaves a few steps per epoch
# --------------------------------------------------------------------------------------------------


def _labels(ds):
    return sorted(int(ds[i][1]) for i in range(len(ds)))


def test_class_folders_directly_under_dir_are_split_per_class_with_a_seed(tmp_path):
    from expandctl.data import load_data

    root = digit_folder(tmp_path / "digits")
    s = load_data(f"imagefolder:{root}", input_shape=(3, 16, 16))
    assert (s.num_classes, s.input_shape, len(s.train), len(s.val)) == (3, (3, 16, 16), 24, 6)
    assert _labels(s.val) == [0, 0, 1, 1, 2, 2] and _labels(s.train) == [0] * 8 + [1] * 8 + [2] * 8
    again = load_data(f"imagefolder:{root}", input_shape=(3, 16, 16))
    assert again.val.indices == s.val.indices and not set(s.val.indices) & set(s.train.indices)
    half = load_data(f"imagefolder:{root}", input_shape=(3, 16, 16), options=DataOptions(val_fraction=0.5))
    assert len(half.val) == 15 and len(half.train) == 15
    sub = load_data(f"imagefolder:{root}", (3, 16, 16), options=DataOptions(train_subset=12))
    assert _labels(sub.train) == [0] * 4 + [1] * 4 + [2] * 4  # --train-subset stays stratified


def test_val_fraction_where_it_does_not_apply_is_refused(tmp_path):
    from expandctl.data import load_data
    from expandctl.errors import UsageError

    (tmp_path / "split").mkdir()
    for split in ("train", "val"):
        digit_folder(tmp_path / "split" / split, classes=2, per_class=2)
    with pytest.raises(UsageError, match="has its own train/ and val/ split"):
        load_data(f"imagefolder:{tmp_path / 'split'}", options=DataOptions(val_fraction=0.3))
    for options, message in [(DataOptions(val_fraction=0.3), "--val-fraction applies to imagefolder"),
                             (DataOptions(val_fraction=1.5), "--val-fraction must be between 0 and 1")]:  # fmt: skip
        with pytest.raises(UsageError) as e:
            load_data("digits", options=options)
        assert e.value.option == "val_fraction"
        assert re.match(message, e.value.worded({"val_fraction": "--val-fraction"}))


def test_a_folder_with_train_but_no_val_names_both_layouts(tmp_path):
    from expandctl.data import load_data
    from expandctl.errors import UsageError

    digit_folder(tmp_path / "train", classes=2, per_class=2)
    with pytest.raises(UsageError, match="lacks val/.*or class folders directly under it"):
        load_data(f"imagefolder:{tmp_path}")


def test_imagefolder_crop_flip_keeps_the_whole_image(tmp_path):
    """Resize and centre-crop, then CIFAR's pad-crop by 1/8 and flip; validation reads the images as
    training does without augmentation (no random-resized crop, no 8/7 zoom)."""
    from expandctl.data import load_data

    s = load_data(f"imagefolder:{digit_folder(tmp_path / 'd')}", input_shape=(3, 16, 16))
    steps = s.train.dataset.transform.transforms
    assert [type(t).__name__ for t in steps[:4]] == ["Resize", "CenterCrop", "RandomCrop", "RandomHorizontalFlip"]
    assert steps[2].padding == 2
    val = s.val.dataset.transform.transforms
    assert [type(t).__name__ for t in val[:2]] == ["Resize", "CenterCrop"] and val[0].size == 16


def test_train_on_a_small_folder_says_which_batch_size_learns(tmp_path):
    root = digit_folder(tmp_path / "d")
    src = tmp_path / "m.pt"
    kw = {"kernel_size": 3, "num_classes": 3, "image_size": 16}
    assert cli("expand", "--arch", "smallnet", "--arch-kwargs", json.dumps(kw), "-o", src, "-q").exit_code == 0
    r = cli("train", src, "--data", f"imagefolder:{root}", "--epochs", "1", "--out", tmp_path / "run", "-q")
    assert r.exit_code == 0, r.output
    assert "24 training images make 1 step per epoch at --batch-size 128" in r.stderr
    assert "pass --batch-size 8 (3 steps per epoch)" in r.stderr
    r = cli("evaluate", tmp_path / "run" / "last.pt", "--data", f"imagefolder:{root}", "--json")
    assert json.loads(r.stdout)["samples"] == 6  # the same held-out split as train's
