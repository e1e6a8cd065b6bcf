"""Real processes: kill -9 mid-epoch then --resume, and a 2-process torchrun (DDP, gloo) run on CPU."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_train import make_src, metrics, same_weights, state_of

from expandctl.checkpoint import load_checkpoint
from expandctl.train import TrainConfig, train

# One thread in every child too: bitwise equality needs the same kernels and reduction order.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
COMMAND = [sys.executable, "-m", "expandctl.commands.train"]


def _no_timing(rows):
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in rows]


def test_kill_9_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path):
    src = make_src(tmp_path)
    opts = {"data": "digits", "epochs": 3, "batch_size": 8, "lr": 0.01, "schedule": "cosine", "seed": 3}
    args = [str(src), "--data", "digits", "--epochs", "3", "--batch-size", "8", "--lr", "0.01"]
    args += ["--schedule", "cosine", "--seed", "3", "--quiet"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"

    train(TrainConfig(src=str(src), out=str(ref), **opts))  # uninterrupted, in this process (1 thread)

    proc = subprocess.Popen([*COMMAND, *args, "--out", str(killed)], env=ENV, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / "last.pt").exists():  # the first epoch's checkpoint: now we are in epoch 2
        assert proc.poll() is None, "the training process ended before writing last.pt"
        assert time.monotonic() < deadline, "no last.pt after 120 s"
        time.sleep(0.005)
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    stopped_at = load_checkpoint(killed / "last.pt").extra["train"]["epoch"]
    assert stopped_at < 3, "the run finished before the kill; the test needs a slower epoch"

    done = subprocess.run(
        [*COMMAND, *args, "--out", str(killed), "--resume"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert same_weights(state_of(ref / "last.pt"), state_of(killed / "last.pt"), atol=1e-6)
    a, b = (load_checkpoint(p / "last.pt").extra["train"] for p in (ref, killed))
    for key, buf in a["optimizer"]["state"].items():
        assert torch.allclose(buf["momentum_buffer"], b["optimizer"]["state"][key]["momentum_buffer"], atol=1e-6)
    assert _no_timing(metrics(ref)) == _no_timing(metrics(killed))
    assert metrics(ref)[-1]["val_acc"] > 0.5  # a real, learning trajectory (chance is 0.1)
    assert not list(killed.glob(".*.tmp"))  # a half-written checkpoint from the kill was cleaned up
    assert load_checkpoint(killed / "best.pt").extra["train"]["epoch"] == a["best_epoch"]


def test_torchrun_two_processes_on_cpu(tmp_path):
    pytest.importorskip("torch.distributed.run")
    if not torch.distributed.is_gloo_available():
        pytest.skip("torch was built without gloo")
    src = make_src(tmp_path)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "expandctl.commands.train", str(src), "--data", "synthetic", "--epochs", "1"]
    cmd += ["--batch-size", "32", "--lr", "0.1", "--json"]
    done = subprocess.run([*cmd, "--out", str(out)], env=ENV, capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and "terminate called without an active exception" in done.stderr:
        # On a loaded machine, torch's gloo teardown now and then aborts one rank as the processes exit
        # (about 1 run in 10 here, none when run alone); that flake, and only it, gets one more run.
        out = tmp_path / "again"
        done = subprocess.run([*cmd, "--out", str(out)], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads(done.stdout)  # rank 0 alone prints its one JSON object
    assert payload["ok"] and payload["world_size"] == 2 and payload["epochs_run"] == 1
    (row,) = metrics(out)
    # Validation is sharded without padding and summed exactly: a whole number of the 128 images.
    assert abs(row["val_acc"] * 128 - round(row["val_acc"] * 128)) < 1e-9
    last = load_checkpoint(out / "last.pt")
    assert last.extra["train"]["world_size"] == 2 and (out / "best.pt").exists() and (out / "curves.png").exists()
