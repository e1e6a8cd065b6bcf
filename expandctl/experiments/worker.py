"""One run of an ``expandctl compare`` study, in a process of its own: ``python -m
expandctl.experiments.worker OUT STRATEGY SEED [--threads N]``.

Reads the recipe from ``OUT/study.json``, builds the architecture from ``SEED``, expands it with
``STRATEGY`` (``compact``: as it is), trains it in ``OUT/work/<name>`` (resuming its ``last.pt``),
contracts, checks and scores it (:func:`expandctl.experiments.runs.train_contracted`), and writes
``OUT/runs/<name>.json``. The compare process starts it holding the run's lock and reads its exit
code: 0, or an :class:`expandctl.ExpandctlError`'s code with ``error: <sentence>`` as the last line
of its output (``OUT/work/<name>/log.txt``), 130 when interrupted, 70 for a bug.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shlex
import sys
import time
import traceback
from pathlib import Path

import torch

from .._version import __version__
from ..checkpoint import save
from ..data import load_data
from ..errors import ExpandctlError
from ..models import build_arch
from ..rewrite import expand, expanded_layers
from ..train import Callbacks, TrainConfig
from .compare import COMPACT, Study, run_name, run_path, work_dir
from .runs import finish_run, train_contracted


class _Log(Callbacks):
    """One line per epoch in the run's log (the compare process prints one line per run)."""

    def on_epoch_end(self, metrics: dict, is_best: bool) -> None:
        print(f"epoch {metrics['epoch']}: train acc {metrics['train_acc']:.4f}, val acc {metrics['val_acc']:.4f}, "
              f"{metrics['seconds']:.2f} s", flush=True)  # fmt: skip


def _peak_memory(device: str) -> tuple[float, str]:
    """``(MiB, kind)``: the peak GPU memory allocated by torch, or this process's peak resident set."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20, "cuda"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return (rss / 2**20 if sys.platform == "darwin" else rss / 2**10), "rss"


def run(out: Path, strategy: str, seed: int) -> dict:
    """Train, contract, check and score one run of the study in ``out``; write and return its record."""
    study = Study.load(out)
    name = run_name(strategy, seed)
    config = TrainConfig.from_dict(study.train, src="", data=study.data, seed=seed, command=shlex.join(sys.argv))
    data = load_data(study.data, input_shape=study.input_shape, options=config.data_options)
    plan: list[str] = []

    def build():
        torch.manual_seed(seed)  # the same initial compact weights for every strategy of this seed
        model = build_arch(study.arch, study.arch_kwargs)
        if strategy != COMPACT:
            model = expand(model, strategy, study.rate, include=study.include, exclude=study.exclude,
                           pointwise=study.pointwise, seed=seed)  # fmt: skip
        return model, study.arch, study.arch_kwargs, study.input_shape

    t = train_contracted(work_dir(out, strategy, seed), build, config, data, callbacks=_Log(), name=name)
    if t is None:  # a rank > 0 of a data-parallel run: rank 0 writes the record
        return {}
    plan = [path for path, _ in expanded_layers(t.expanded)]
    device = t.summary["device"]
    memory, kind = _peak_memory(device)
    save(t.compact, work_dir(out, strategy, seed) / "contracted.pt", arch=study.arch, arch_kwargs=study.arch_kwargs,
         input_shape=study.input_shape)  # fmt: skip
    history = [{k: m[k] for k in ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds",
                                  "precise_bn_batches") if k in m}
               for m in t.history]  # fmt: skip
    result = {
        "name": name, "strategy": strategy, "seed": seed,
        "final_acc": t.final["accuracy"], "final_loss": t.final["loss"], "val_size": len(data.val),
        "train_size": len(data.train),
        "last_epoch_val_acc": history[-1]["val_acc"],  # the expanded model, as the loop measured it
        "params_trained": t.params_trained, "params_compact": t.params_compact, "expanded_layers": plan,
        "contraction_max_rel_float64": t.contraction_max_rel,
        "seconds_per_epoch": sum(h["seconds"] for h in history) / len(history),
        "peak_memory_mib": round(memory, 1), "memory_kind": kind,
        "resumed": t.resumed, "cpu_seconds": t.cpu_seconds, "wall_seconds": t.wall_seconds,
        "history": history,
        "torch": str(torch.__version__), "expandctl": __version__, "threads": torch.get_num_threads(),
        "processes": int(os.environ.get("WORLD_SIZE", "1")),  # > 1: data-parallel under torchrun
        "device": device, "machine": platform.machine(), "host": platform.node(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }  # fmt: skip
    finish_run(work_dir(out, strategy, seed), run_path(out, strategy, seed), result)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("strategy")
    ap.add_argument("seed", type=int)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        run(args.out, args.strategy, args.seed)
    except ExpandctlError as e:
        print(f"error: {e}", flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; the run resumes from its last.pt next time", flush=True)
        return 130
    except Exception as e:  # a bug: the traceback goes to the run's log
        traceback.print_exc(file=sys.stdout)
        print(f"error: internal error ({type(e).__name__}: {e})", flush=True)
        return 70
    return 0


if __name__ == "__main__":
    sys.exit(main())
