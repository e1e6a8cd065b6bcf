"""The branch sweep's inexact models through ``expandctl contract`` (docs/zoo.md).

Each model the branch sweep recorded as ``inexact`` (``benchmarks/results/zoo_sweep_<kind>.jsonl``) is built
as the sweep builds it (``zoo_sweep.prepare``, ``expand`` with seed 0, ``randomize_expanded``), saved once
as an expanded float64 checkpoint under ``WORK/ckpt``, and contracted by the command line of the expandctl
found at ``CODE`` (its PYTHONPATH), fastest models first. One JSON line per model goes to
``WORK/LABEL.jsonl``: the exit code and the CLI's ``--json`` object. Resumable. Run it with the old code
and with the new one, then compare the exit codes:

    python benchmarks/zoo_cli_rerun.py /path/to/old/checkout before
    python benchmarks/zoo_cli_rerun.py . after
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def inexact_models() -> list[tuple[float, str, str, float]]:
    """``(sweep seconds, model id, strategy, sweep error)`` of every inexact branch-sweep record, fastest first."""
    todo = []
    for path in sorted((HERE / "results").glob("zoo_sweep_*.jsonl")):
        for line in path.open():
            r = json.loads(line)
            if r.get("status") == "inexact":
                todo.append((r["seconds"], r["model"], r["strategy"], r["max_rel"]))
    return sorted(todo)


def checkpoint(model_id: str, strategy: str, folder: Path) -> Path:
    """The expanded model as the sweep checks it, saved once."""
    sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
    import zoo_sweep

    import expandctl
    from expandctl.checkpoint import save

    path = folder / f"{model_id.replace(':', '_')}-{strategy}.pt"
    if not path.is_file():
        model, rec = zoo_sweep.prepare(model_id, 40e6)
        source, name = model_id.split(":", 1)
        arch, kwargs = ("timm:create_model", {"model_name": name, **rec["kwargs"]}) if source == "timm" else (
            name, rec["kwargs"])  # fmt: skip
        big = expandctl.expand(model, strategy=strategy, rate=None, seed=0)
        zoo_sweep.randomize_expanded(big)
        save(big, path, arch=arch, arch_kwargs=kwargs, input_shape=tuple(rec["input"]))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("code", help="folder whose expandctl package runs the CLI (put first on PYTHONPATH)")
    ap.add_argument("label", help="results go to WORK/LABEL.jsonl")
    ap.add_argument("--work", type=Path, default=Path("/tmp/zoo"))
    args = ap.parse_args()
    out = args.work / f"{args.label}.jsonl"
    done = {(r["model"], r["strategy"]) for r in map(json.loads, out.open())} if out.is_file() else set()
    env = {**os.environ, "PYTHONPATH": args.code, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    target = args.work / f"c-{args.label}.pt"
    for _, model_id, strategy, sweep_rel in inexact_models():
        if (model_id, strategy) in done:
            continue
        t0 = time.time()
        src = checkpoint(model_id, strategy, args.work / "ckpt")
        cmd = [sys.executable, "-m", "expandctl", "contract", str(src), "-o", str(target), "--json"]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        try:
            result = json.loads(p.stdout)
        except ValueError:
            result = {"raw": p.stdout[-500:], "stderr": p.stderr[-500:]}
        rec = {"model": model_id, "strategy": strategy, "sweep_max_rel": sweep_rel, "rc": p.returncode,
               "seconds": round(time.time() - t0, 1), "json": result}  # fmt: skip
        with out.open("a") as fh:
            fh.write(json.dumps(rec) + "\n")
        print(model_id, strategy, p.returncode, rec["seconds"], flush=True)
        target.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
