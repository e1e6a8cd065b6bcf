"""examples/figures.py on tiny synthetic data: each experiment's run file, the report and its figures,
label corruption, the cached distillation teacher and the claim locks that let processes share OUT."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import load_script

from expandctl.data import DataSplits, TensorImages

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def figures():
    return load_script("figures")


def tiny_data(figures, n_train=160, n_test=80):
    """Fashion-MNIST-shaped (1 x 28 x 28, 10 classes) images whose class is in their brightness."""
    g = torch.Generator().manual_seed(0)

    def split(n):
        y = torch.arange(n) % 10
        x = torch.rand(n, 1, 28, 28, generator=g) * 0.5 + y.view(-1, 1, 1, 1) / 20
        return TensorImages(x, y)

    train, test = split(n_train), split(n_test)
    return figures.Data(DataSplits(train, test, 10, (1, 28, 28)), train, test)


def settings(figures, **kw):
    return {**figures.SETTINGS, "epochs": 3, "batch_size": 32, "train_subset": 160, **kw}


def test_corrupted_labels_are_wrong_on_exactly_the_fraction_and_fixed(figures):
    data = tiny_data(figures, n_train=500)
    a = figures.corrupted(data.train, 0.2, seed=0)
    b = figures.corrupted(data.train, 0.2, seed=0)
    wrong = a.labels != data.train.labels
    assert int(wrong.sum()) == 100  # exactly 20%, each changed to another class
    assert torch.equal(a.labels, b.labels)
    assert a.labels.min() >= 0 and a.labels.max() <= 9
    assert torch.equal(data.train.labels, torch.arange(500) % 10)  # the original is untouched


def test_rgb32_input_copies_gray_to_three_channels(figures):
    data = tiny_data(figures)
    rgb = figures.as_rgb32(data.test)
    x, y = rgb[list(range(4))]
    assert x.shape == (4, 3, 32, 32) and torch.equal(y, data.test.labels[:4])
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])


def test_cached_teacher_gives_the_teachers_logits(figures):
    data = tiny_data(figures)
    teacher = figures.SmallNet(kernel_size=3, in_channels=1, image_size=28).eval()
    cached = figures.CachedTeacher(teacher, data.train, batch_size=64)
    x, _ = data.train[[5, 17, 150]]
    with torch.no_grad():
        expected = teacher(x)
    assert torch.allclose(cached(x), expected, atol=1e-6)
    assert cached.misses == 0
    unseen = torch.randn(2, 1, 28, 28)
    assert torch.allclose(cached(unseen), teacher(unseen), atol=1e-6) and cached.misses == 1


def test_claims_exclude_live_processes_and_take_over_dead_ones(figures, tmp_path):
    spec = figures.Spec("behaviour", "ck", 0)
    lock = figures.claim(tmp_path, spec)
    assert lock is not None and lock.path.read_text().split()[1] == str(os.getpid())
    assert figures.claim(tmp_path, spec) is None  # held by this (live) process
    lock.release()
    # a process that dies holding the lock releases it (the kernel closes its descriptor)
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'examples')!r}); from pathlib import Path; "
            f"import figures; l = figures.claim(Path({str(tmp_path)!r}), figures.Spec('behaviour', 'ck', 0)); "
            "assert l is not None; import os; os._exit(9)")  # fmt: skip
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    again = figures.claim(tmp_path, spec)
    assert again is not None and again.path == lock.path
    again.release()


def test_plan_covers_every_experiment_teacher_first_students_after(figures):
    specs = figures.plan(figures.EXPERIMENTS, figures.SEEDS)
    names = [s.name for s in specs]
    assert len(names) == len(set((s.experiment, s.name) for s in specs))
    assert specs[0].variant == "teacher"
    count = lambda e: sum(s.experiment == e for s in specs)  # noqa: E731
    assert (count("behaviour"), count("landscape"), count("product-l2"), count("distillation")) == (30, 3, 6, 11)
    assert (count("init"), count("corrupted"), count("real")) == (5, 10, 4 * figures.REAL_SEEDS)
    first_student = min(i for i, s in enumerate(specs) if s.kd)
    assert all(s.experiment in ("distillation", "real", "models") for s in specs[first_student:])
    models = sum(s.experiment == "models" for s in specs)
    assert all(s.experiment == "real" for s in specs[-4 * figures.REAL_SEEDS - models : -models])


def test_runs_write_measurements_and_the_report_draws_them(figures, tmp_path, monkeypatch):
    monkeypatch.setitem(figures.TEACHER, "epochs", 1)
    monkeypatch.setattr(figures, "FINAL_CONFUSION_PAIRS", 10)
    landscape = figures.loss_landscape
    monkeypatch.setattr(figures, "loss_landscape", lambda *a, **k: landscape(*a, **{**k, "steps": 3}))
    data, cfg = tiny_data(figures), settings(figures)
    specs = [
        figures.smallnet_spec("behaviour", "compact", 0, 7, confusion=True),
        figures.smallnet_spec("behaviour", "ck", 0, 7, confusion=True),
        figures.smallnet_spec("landscape", "ck", 0, 9, landscape=True),
        figures.smallnet_spec("product-l2", "ck-product", 0, 7, weight_decay=5e-4, decay_on="product"),
        figures.smallnet_spec("product-l2", "ck-factors", 0, 7, weight_decay=5e-4, decay_on="factors"),
        figures.smallnet_spec("distillation", "ck+kd", 0, 7, kd=True),
        figures.smallnet_spec("corrupted", "ck", 0, 5, corrupt=0.2),
    ]
    results = {(s.experiment, s.name): figures.run_one(s, tmp_path, data, cfg, False) for s in specs}

    ck = results[("behaviour", "k7-ck-s0")]
    assert ck["contraction_max_rel_float64"] < 1e-12 and ck["params_trained"] > ck["params_compact"]
    assert len(ck["history"]) == 3 and all(-1 <= h["grad_confusion_min"] <= 1 for h in ck["history"])
    assert len(ck["final_confusion"]["similarities"]) == 10
    assert abs(ck["final_acc"] - ck["history"][-1]["val_acc"]) <= 1 / 80  # the contracted model was scored
    land = results[("landscape", "k9-ck-s0")]
    assert land["landscape_1d"]["alphas"] == [-1.0, 0.0, 1.0] and len(land["landscape_2d"]["loss"]) == 3
    product, normal = results[("product-l2", "k7-ck-product-s0")], results[("product-l2", "k7-ck-factors-s0")]
    assert all(h["regulariser"] > 0 for h in product["history"] + normal["history"])
    assert product["history"][0]["regulariser"] != normal["history"][0]["regulariser"]
    kd = results[("distillation", "k7-ck+kd-s0")]
    assert kd["teacher_lookups_missed"] == 0
    assert (tmp_path / "distillation" / "k3-teacher-s1000.json").is_file()  # trained on demand
    assert results[("corrupted", "k5-ck-s0")]["history"][0]["train_acc"] < 1

    # The report reads the run files: tables with their numbers, one figure per view.
    summary = figures.report(tmp_path)
    assert summary["runs"]["behaviour"] == 2 and summary["runs"]["distillation"] == 2
    table = (tmp_path / "results.md").read_text()
    assert f"| 7x7 | ck | {100 * ck['final_acc']:.2f} +- 0.00 (1) |" in table
    assert "## Product L2 vs normal L2" in table and "## Distillation" in table and "Teacher: " in table
    for png in ("behaviour_7x7.png", "landscape_1d.png", "landscape_2d.png", "product_l2.png", "distillation.png",
                "corrupted.png"):  # fmt: skip
        assert (tmp_path / png).stat().st_size > 10_000, png
    # finished runs are skipped: main() with every run file present trains nothing
    assert json.loads((tmp_path / "behaviour" / "k7-ck-s0.json").read_text())["name"] == "k7-ck-s0"
