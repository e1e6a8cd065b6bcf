"""Data adapters (--channels, --image-size, --augment, --train-subset) and where the sets are found:
an explicit folder, Debian's package, the cache ($EXPANDCTL_DATA), or a download that tests never make."""

import re
from pathlib import Path

import pytest
import torch
from test_data import _fake_cifar10, _fake_imagefolder, _fake_mnist

from expandctl import data as D
from expandctl.data.sources import fashion_mnist
from expandctl.errors import UsageError


def _all(ds):
    return ds[list(range(len(ds)))]


# --------------------------------------------------------------------------------------------------
# Adapters
# --------------------------------------------------------------------------------------------------
def test_gray_digits_to_rgb_32():
    s = D.load_data("digits", options=D.DataOptions(channels=3, image_size=32))
    assert s.input_shape == (3, 32, 32) and len(s.train) == 1437 and len(s.val) == 360
    x, _ = _all(s.val)
    assert x.shape == (360, 3, 32, 32)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])  # the gray channel, replicated
    assert abs(x.mean().item()) < 0.1 and 0.7 < x.std().item() < 1.1  # still normalised
    plain, _ = _all(D.load_data("digits").val)
    small = torch.nn.functional.interpolate(x[:, :1], size=(8, 8), mode="bilinear", antialias=True)
    assert torch.corrcoef(torch.stack([small.flatten(), plain.flatten()]))[0, 1] > 0.95  # the same images


def test_rgb_to_gray_by_luma():
    s = D.load_data("synthetic:3x8x8", options=D.DataOptions(channels=1))
    ref = D.load_data("synthetic:3x8x8")
    assert s.input_shape == (1, 8, 8)
    x, _ = s.val[[0, 1]]
    r, _ = ref.val[[0, 1]]
    assert torch.allclose(x[:, 0], 0.299 * r[:, 0] + 0.587 * r[:, 1] + 0.114 * r[:, 2], atol=1e-6)


def test_train_subset_is_stratified_and_fixed():
    s = D.load_data("digits", options=D.DataOptions(train_subset=200))
    again = D.load_data("digits", options=D.DataOptions(train_subset=200))
    assert len(s.train) == 200 and len(s.val) == 360  # validation stays whole
    assert torch.equal(s.train.labels, again.train.labels) and torch.equal(s.train.images, again.train.images)
    counts = torch.bincount(s.train.labels, minlength=10)
    assert counts.min() >= 19 and counts.max() <= 21
    with pytest.raises(UsageError, match="not smaller than the training split"):
        D.load_data("digits", options=D.DataOptions(train_subset=5000))


def test_augment_none_and_crop_flip(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    _fake_cifar10(tmp_path)
    idx = list(range(20))
    plain = D.load_data(f"cifar10:{tmp_path}", options=D.DataOptions(augment="none"))
    assert torch.equal(plain.train[idx][0], plain.train[idx][0])  # crop + flip switched off
    digits = D.load_data("digits", options=D.DataOptions(augment="crop-flip"))
    torch.manual_seed(0)
    a, b = digits.train[idx][0], digits.train[idx][0]
    assert not torch.equal(a, b) and a.shape == (20, 1, 8, 8)
    assert torch.equal(digits.val[idx][0], digits.val[idx][0])  # never on validation


def test_imagefolder_channels_and_size(tmp_path):
    _fake_imagefolder(tmp_path)
    s = D.load_data(f"imagefolder:{tmp_path}", options=D.DataOptions(channels=1, image_size=12, augment="none"))
    assert s.input_shape == (1, 12, 12) and s.train[0][0].shape == (1, 12, 12) and s.val[0][0].shape == (1, 12, 12)


@pytest.mark.parametrize(
    "options, message",
    [
        (D.DataOptions(channels=2), "--channels must be 1 or 3"),
        (D.DataOptions(image_size=0), "--image-size"),
        (D.DataOptions(augment="mixup"), "--augment must be one of none, crop-flip"),
        (D.DataOptions(train_subset=0), "--train-subset"),
    ],
)
def test_bad_options(options, message):
    """The library names the option (``option=``, its field); the CLI words it as the flag the user reads."""
    with pytest.raises(UsageError) as e:
        D.load_data("digits", options=options)
    option = e.value.option
    assert option and str(e.value).startswith(option)
    assert re.match(message, e.value.worded({option: "--" + option.replace("_", "-")}))


# --------------------------------------------------------------------------------------------------
# Where the sets are: the cache, Debian's package first for fashion-mnist, downloads
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("EXPANDCTL_DATA", str(root))
    monkeypatch.setattr(fashion_mnist, "fashion_mnist_default_dir", lambda: tmp_path / "no-debian-package")
    return root


def test_cache_folder_default(monkeypatch, tmp_path):
    monkeypatch.delenv("EXPANDCTL_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert D.data_home() == tmp_path / "expandctl" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert D.data_home() == Path.home() / ".cache" / "expandctl" / "data"


@pytest.mark.parametrize("name, layout", [("mnist", "MNIST/raw"), ("fashion-mnist", "FashionMNIST/raw")])
def test_idx_sets_found_in_the_cache(cache, name, layout):
    _fake_mnist(cache / name / layout, gz=True)  # torchvision's own layout, as --download leaves it
    s = D.load_data(name)
    assert (len(s.train), len(s.val), s.input_shape) == (20, 10, (1, 28, 28))


def test_fashion_mnist_prefers_the_debian_package(cache, tmp_path, monkeypatch):
    _fake_mnist(tmp_path / "debian", gz=False, n_train=30)
    _fake_mnist(cache / "fashion-mnist", gz=False, n_train=20)
    monkeypatch.setattr(fashion_mnist, "fashion_mnist_default_dir", lambda: tmp_path / "debian")
    assert len(D.load_data("fashion-mnist").train) == 30


def test_cifar_found_in_the_cache(cache, monkeypatch):
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    _fake_cifar10(cache / "cifar10")
    assert D.load_data("cifar10").input_shape == (3, 32, 32)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10", "cifar100"])
def test_missing_set_names_where_it_looked_and_what_to_do(cache, name):
    with pytest.raises(UsageError) as e:
        D.load_data(name)
    assert e.value.option == "download"
    msg = e.value.worded({"download": "--download"})  # as the CLI words it
    assert "\n" not in msg and str(cache / name) in msg and "--download" in msg and "make data" in msg
    if name == "fashion-mnist":
        assert "no-debian-package" in msg and "dataset-fashion-mnist" in msg


@pytest.fixture
def offline(monkeypatch):
    """Every torchvision download raises, as it does without a network: no test ever fetches."""
    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.mnist as mnist

    calls = []

    def refuse(url, *args, **kwargs):
        calls.append(url)
        raise OSError("network is unreachable (test)")

    monkeypatch.setattr(mnist, "download_and_extract_archive", refuse)
    monkeypatch.setattr(cifar, "download_and_extract_archive", refuse)
    return calls


@pytest.mark.parametrize("name", ["fashion-mnist", "cifar10"])
def test_failed_download_is_one_line_saying_what_to_do(cache, offline, name):
    with pytest.raises(UsageError) as e:
        D.load_data(name, options=D.DataOptions(download=True))
    msg = str(e.value)
    assert offline, "the download was attempted through torchvision"
    assert "\n" not in msg and f"downloading {name} into {cache / name} failed" in msg
    assert "network is unreachable" in msg and "EXPANDCTL_DATA" in msg
    if name == "fashion-mnist":
        assert "dataset-fashion-mnist" in msg


def test_download_goes_through_torchvision_into_the_cache(cache, monkeypatch):
    """A download that "succeeds" (files written by a stand-in for torchvision's fetch) is then read."""
    import torchvision.datasets.mnist as mnist

    fetched = []

    def fetch(url, download_root, filename=None, md5=None, **kwargs):
        fetched.append(filename)
        _fake_mnist(Path(download_root), gz=False)  # the four IDX files, extracted

    monkeypatch.setattr(mnist, "download_and_extract_archive", fetch)
    s = D.load_data("mnist", options=D.DataOptions(download=True))
    assert fetched and all(name.endswith(".gz") for name in fetched)
    assert len(s.train) == 20 and (cache / "mnist" / "MNIST" / "raw").is_dir()


# --------------------------------------------------------------------------------------------------
# The commands take the options
# --------------------------------------------------------------------------------------------------
def test_train_evaluate_and_analyze_take_the_adapters(tmp_path):
    from test_newuser import cli, cli_json

    import expandctl
    from expandctl.models import SmallNet

    kwargs = {"kernel_size": 3, "image_size": 16}
    expandctl.save(SmallNet(**kwargs), tmp_path / "rgb16.pt", arch="smallnet", arch_kwargs=kwargs,
                   input_shape=(3, 16, 16))  # fmt: skip
    adapt = ["--channels", "3", "--image-size", "16"]
    out = tmp_path / "run"
    summary = cli_json("train", tmp_path / "rgb16.pt", "--data", "digits", *adapt, "--train-subset", "100",
                       "--augment", "none", "--epochs", "1", "--batch-size", "50", "--out", out)  # fmt: skip
    assert summary["final"]["val_acc"] is not None
    metrics = [line for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert len(metrics) == 1
    saved = torch.load(out / "last.pt", weights_only=True)["extra"]["train"]["config"]
    assert (saved["channels"], saved["image_size"], saved["train_subset"], saved["augment"]) == (3, 16, 100, "none")
    assert cli_json("evaluate", out / "best.pt", "--data", "digits", *adapt)["samples"] == 360
    r = cli("analyze", "grad-confusion", out / "best.pt", "--data", "digits", *adapt, "--pairs", "2",
            "--batch-size", "8", "--train-subset", "50", "-o", tmp_path / "gc.png", "--device", "cpu")  # fmt: skip
    assert r.exit_code == 0, r.output
    bad = cli_json("train", tmp_path / "rgb16.pt", "--data", "digits", "--epochs", "1", "--out", tmp_path / "r2",
                   code=2)  # fmt: skip
    assert "1x8x8" in bad["error"] and "--channels 3" in bad["error"]
