"""The README's custom training loop (examples/custom_loop.py) runs: expand, train, contract, check, save, export."""

import sys
from pathlib import Path

import onnxruntime as ort
import pytest
import torch
from helpers import load_script

import expandctl


@pytest.mark.parametrize("strategy", ["dbb", "ck+cl"])
def test_custom_loop_example_trains_contracts_and_exports(strategy, tmp_path, monkeypatch):
    example = load_script("custom_loop")
    # the saved checkpoint names its architecture "custom_loop:SegNet", found from the examples folder
    monkeypatch.syspath_prepend(str(Path(example.__file__).parent))
    sys.modules.setdefault("custom_loop", example)
    reports = example.main(tmp_path, strategy=strategy, steps=3)
    assert [r.passed for r in reports] == [True, True]
    small = expandctl.load(tmp_path / "seg.pt")
    assert not list(expandctl.expanded_layers(small))
    session = ort.InferenceSession(str(tmp_path / "seg.onnx"), providers=["CPUExecutionProvider"])
    for size in (32, 48):  # a symbolic image size: another size runs too
        x = torch.randn(1, 3, size, size)
        (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(out), small.eval()(x), rtol=1e-4, atol=1e-4)
