"""Issue 16's study (examples/figures.py ``strategies`` and ``models``): where ShuffleNetV2's stride may sit
in a CL chain, which layers the paper's CL choice expands, the run order, and the report's table and figure."""

import copy
import json
import sys

import pytest
import torch
import torchvision
from helpers import load_script
from test_figures import settings, tiny_data

import expandctl
from expandctl.rewrite import expanded_layers


@pytest.fixture(scope="module")
def figures():
    return load_script("figures")


def outputs_and_grads(layer, x):
    layer.zero_grad()
    y = layer(x)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    return y.detach(), [p.grad.clone() for p in layer.parameters()]


@pytest.mark.parametrize("groups", [1, 8], ids=["conv", "depthwise"])
def test_cl_stride_on_the_last_1x1_trains_as_the_stride_on_the_kxk(groups):
    """The paper moves ShuffleNetV2's first stride onto the CL chain's last 1x1; expandctl keeps it on
    the kxk factor. A 1x1 conv commutes with subsampling, so both chains are the same function of the
    same factors (borders included, the input padded once), with the same gradients; and fused training
    (one composed kernel with the layer's stride) computes that function too. Checked in float64."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=groups).double()
    layer = expandctl.expand(torch.nn.Sequential(conv), "cl", 4, seed=0)[0]
    assert layer.factors[1].stride == (2, 2) and layer.factors[2].stride == (1, 1)
    moved = copy.deepcopy(layer)
    moved.factors[1].stride, moved.factors[2].stride = (1, 1), (2, 2)
    x = torch.randn(2, 8, 11, 10, dtype=torch.float64)
    fused = outputs_and_grads(layer, x)
    for chain in (layer, moved):
        chain.set_forward("explicit")
        y, grads = outputs_and_grads(chain, x)
        assert y.shape == fused[0].shape == (2, 8, 6, 5)
        torch.testing.assert_close(y, fused[0], rtol=1e-12, atol=1e-12)
        for g, f in zip(grads, fused[1]):
            torch.testing.assert_close(g, f, rtol=1e-10, atol=1e-12)


def expanded_paths(figures, arch, variant):
    strategy, include = figures.model_variants(arch, figures.BRANCH_KINDS)[variant]
    model = torchvision.models.get_model(arch, **figures.REAL_MODELS[arch])
    rate = None if strategy in figures.BRANCH_KINDS else 4
    return model, {p for p, _ in expanded_layers(expandctl.expand(model, strategy, rate, include=include, seed=0))}


def test_the_papers_cl_layers_first_conv_and_stride_2_depthwise_on_mobilenet_every_depthwise_on_shufflenet(figures):
    model, paths = expanded_paths(figures, "mobilenet_v2", "cl-paper")
    convs = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    stride2_dw = {n for n, m in convs.items() if m.groups == m.in_channels > 1 and m.stride == (2, 2)}
    assert paths == {"features.0.0"} | stride2_dw and len(stride2_dw) == 4
    _, every = expanded_paths(figures, "mobilenet_v2", "cl-all-dw")
    assert every == {n for n, m in convs.items() if m.kernel_size == (3, 3)}  # first conv + every depthwise
    for arch in figures.REAL_MODELS:
        model, paths = expanded_paths(figures, arch, "cl-paper")
        convs = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
        assert all(convs[p].kernel_size == (3, 3) for p in paths)  # never a pointwise conv or the classifier
        for kind in figures.BRANCH_KINDS:
            assert expanded_paths(figures, arch, kind)[1] == {n for n, m in convs.items() if m.kernel_size == (3, 3)}
    _, shuffle = expanded_paths(figures, "shufflenet_v2_x0_5", "cl-paper")
    assert "conv1.0" in shuffle and len(shuffle) == 20  # the first conv and all 19 depthwise convs


def test_plan_is_seed_major_and_trains_the_models_cl_variants_before_the_branch_kinds(figures):
    specs = figures.plan(["strategies", "models"], figures.SEEDS, ("rep", "orepa"))
    st = [s for s in specs if s.experiment == "strategies"]
    assert len(st) == 2 * 4 * 5 + 6 * figures.COST_SEEDS + 2 * (5 - figures.COST_SEEDS)
    first_seed3 = min(i for i, s in enumerate(st) if s.seed == 3)
    assert {(s.kernel, s.variant) for s in st[:first_seed3] if s.seed == 2} == {
        (k, v) for k, refs in figures.STRATEGY_KERNELS.items() for v in refs + figures.BRANCH_KINDS
    }
    # the cost references: compact on every seed, CL/CK/CL+FC on the first COST_SEEDS only
    assert {s.variant for s in st[first_seed3:]} == {"compact", *figures.BRANCH_KINDS}
    models = [s for s in specs if s.experiment == "models"]
    assert specs[-len(models) :] == models and len(models) == figures.MODELS_SEEDS * (2 + 3 + 2 * 2)
    first_branch = min(i for i, s in enumerate(models) if s.strategy in figures.BRANCH_KINDS)
    assert {s.variant for s in models[first_branch:]} == {"rep", "orepa"}
    assert all(s.strategy in (None, "cl") for s in models[:first_branch])


def test_strategy_and_model_runs_record_cost_and_the_report_compares_them(figures, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(figures.MODELS_SETTINGS, "epochs", 1)
    monkeypatch.setitem(figures.MODELS_SETTINGS, "image_size", 36)
    monkeypatch.setattr(figures, "REAL_CURVE_IMAGES", 40)
    monkeypatch.setattr(figures, "FINAL_CONFUSION_PAIRS", 10)
    data, cfg = tiny_data(figures), settings(figures, epochs=2)
    specs = [figures.smallnet_spec("behaviour", v, s, 3, confusion=True) for v in ("compact", "cl") for s in (0, 1)]
    specs += [figures.smallnet_spec("strategies", v, s, 3) for v in ("compact", "dbb") for s in (0, 1)]
    specs += [figures.Spec("models", "compact", 0, arch="shufflenet_v2_x0_5"),
              figures.Spec("models", "acb", 0, arch="shufflenet_v2_x0_5", strategy="acb")]  # fmt: skip
    results = {(s.experiment, s.name): figures.run_one(s, tmp_path, data, cfg, False) for s in specs}

    dbb = results[("strategies", "k3-dbb-s0")]
    assert dbb["contraction_max_rel_float64"] < 1e-12 and dbb["params_trained"] > dbb["params_compact"]
    assert dbb["peak_memory_mib"] > 0 and dbb["seconds_per_epoch"] > 0
    acb = results[("models", "shufflenet_v2_x0_5-acb-s0")]
    assert acb["settings"]["image_size"] == 36 and acb["settings"]["schedule"] == "cosine"
    assert len(acb["history"]) == 1 and acb["curve_test_size"] == 40 and acb["contraction_max_rel_float64"] < 1e-12

    summary = figures.report(tmp_path)["evidence"]
    k3 = summary["smallnet_3x3"]
    acc = [100 * results[("strategies", f"k3-dbb-s{s}")]["final_acc"] for s in (0, 1)]
    base = [100 * results[("behaviour", f"k3-compact-s{s}")]["final_acc"] for s in (0, 1)]
    assert k3["dbb"]["gain"] == pytest.approx(sum(acc) / 2 - sum(base) / 2)
    assert k3["compact"]["mean"] == pytest.approx(sum(base) / 2)  # the behaviour runs' accuracy is reused
    secs = [results[("strategies", f"k3-{v}-s{s}")]["seconds_per_epoch"] for v in ("dbb", "compact") for s in (0, 1)]
    assert k3["dbb"]["time_ratio"] == pytest.approx((secs[0] / secs[2] + secs[1] / secs[3]) / 2)  # seed by seed
    assert "memory_mib" not in k3["cl"] and k3["cl"]["n"] == 2  # cl: reused, no cost reference yet
    assert summary["shufflenet_v2_x0_5"]["acb"]["n"] == 1
    table = (tmp_path / "results.md").read_text()
    assert "| SmallNet 3x3 | dbb |" in table and "(2 of 5)" in table and "| ShuffleNetV2 x0.5 | acb |" in table
    assert (tmp_path / "evidence.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "results.json").read_text())["evidence"]["smallnet_3x3"]["dbb"]["n"] == 2

    # The README's table is the same summary, written between its markers.
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- evidence:table -->\nold\n<!-- /evidence:table -->\nend\n")
    figures.update_marked(readme, "evidence:table", figures.evidence_readme_table(summary))
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro\n<!-- evidence:table -->\n| gain") and text.endswith("end\n")
    (row,) = [line for line in text.splitlines() if line.startswith("| SmallNet 3x3")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == f"SmallNet 3x3 ({k3['compact']['mean']:.2f}%, 2)" and cells[3] == "-"  # CK: 7x7 only
    assert cells[7].strip("*").startswith(f"{k3['dbb']['gain']:+.2f}") and cells[7].endswith(
        f"(2), {k3['dbb']['time_ratio']:.1f}x"
    )
    figures.update_marked(readme, "evidence:table", figures.evidence_readme_table(summary))
    assert readme.read_text() == text  # rewriting is idempotent
    _, _, blocks = figures.report_evidence(tmp_path, figures.collect(tmp_path))  # docs/evidence.md's tables
    assert blocks["smallnet"].startswith(figures.EVIDENCE_HEADER[0]) and "| SmallNet 3x3 | dbb |" in blocks["smallnet"]
    assert (
        "| ShuffleNetV2 x0.5 | acb |" in blocks["models"]
        and "| models | ShuffleNetV2 x0.5 | acb | 1 |" in blocks["compute"]
    )
    assert f"In all: {len(specs) - 4} runs" in blocks["compute"]  # strategies and models runs, not behaviour
    line = figures.evidence_compute_line(figures.collect(tmp_path))
    assert line.startswith(f"Compute: {len(specs) - 4} runs,") and "ShuffleNetV2 x0.5" in line and "(2 runs)" in line

    # Issue 17's INT8 drop of these runs: each models run keeps its contracted model for it.
    int8 = load_script("int8_drop", "benchmarks")
    monkeypatch.setitem(sys.modules, "figures", figures)  # int8_drop imports it by name
    monkeypatch.setattr(figures, "load", lambda settings: data)
    (tmp_path / "work" / "models" / "shufflenet_v2_x0_5-acb-s0" / "contracted.pt").rename(tmp_path / "moved.pt")
    argv = ["--models", "--figures", str(tmp_path), "--work", str(tmp_path / "q"), "--out", str(tmp_path / "out"),
            "--calib-size", "16", "--latency-rounds", "2"]  # fmt: skip
    summary = int8.main(argv)
    assert "no contracted model for 1 run(s) (trained elsewhere?): shufflenet_v2_x0_5-acb-s0" in capsys.readouterr().out
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "q" / "int8-models-minmax").glob("*.json")]
    compact = results[("models", "shufflenet_v2_x0_5-compact-s0")]
    assert record["arch"] == "shufflenet_v2_x0_5" and record["variant"] == "compact"
    assert record["float_eval"]["samples"] == 80 and record["calibration"]["size"] == 16  # all test images
    assert abs(record["float_eval"]["accuracy"] - compact["final_acc"]) <= 1 / 80  # the ONNX file is the run's model
    assert summary["shufflenet_v2_x0_5-compact"]["drop_points"] == [record["drop_points"]]
    (tmp_path / "moved.pt").rename(tmp_path / "work" / "models" / "shufflenet_v2_x0_5-acb-s0" / "contracted.pt")
    summary = int8.main(argv)  # the other run now; the first is not redone
    assert set(summary) == {"shufflenet_v2_x0_5-compact", "shufflenet_v2_x0_5-acb"}
    table = (tmp_path / "out" / "int8_drop_models.md").read_text()
    assert "| shufflenet_v2_x0_5 | compact | 1 |" in table and "| shufflenet_v2_x0_5 | acb | 1 |" in table
    assert "at 36x36" in table


def test_model_strategies_must_be_branch_kinds(figures, capsys):
    assert figures.parse_args(["--model-strategies", "orepa, rep"]).model_strategies == ("orepa", "rep")
    with pytest.raises(SystemExit):
        figures.parse_args(["--model-strategies", "acb,cl"])
    assert "choose from acb, rep, dbb, orepa" in capsys.readouterr().err
