"""The fenced blocks of README.md and docs/*.md run as written (issue 28, point 7).

Every fenced block says what it is in its info string:

* ```` ```bash ````, ```` ```python ````: run, each in a fresh temporary folder (bash with ``set -e -o pipefail``
  and this environment's ``bin/`` first on PATH, so ``expandctl`` and ``python`` are the ones under test;
  python with this interpreter), and must exit 0. A ``# -> PATH`` comment after a command states a file
  it writes: the file must exist afterwards.
* ```` ```console ````: a transcript; the ``$`` lines are run as one bash script and every other line
  (the stated output) must appear in what they print.
* ```` ```bash no-run ```` (or ``python`` / ``console no-run``): not run here, and the line just before
  the fence says why: ``<!-- no-run: REASON -->`` (CIFAR, a GPU, hours of training, ...).
* ```` ```text ````: not code (a usage synopsis, a listing, a file's layout, printed output).

A block with no info string fails :func:`test_every_block_is_run_or_says_why`, so a new block is
either run or marked. Trainings are shortened by one variable, ``EXPANDCTL_DOCS_EPOCHS`` (documented in
README.md, "Tests"): every ``--epochs N`` / ``epochs=N`` in a block runs with at most that many epochs
(default 1); ``EXPANDCTL_DOCS_EPOCHS=all`` runs the blocks as written. The blocks share nothing: each
starts in its own empty folder with ``examples/`` of this checkout linked into it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN = {"bash", "python", "console"}
DISPLAY = {"text"}
EPOCHS_VAR = "EXPANDCTL_DOCS_EPOCHS"
FENCE = re.compile(r"^(?P<indent> *)(?P<ticks>```+)(?P<info>.*)$")
NO_RUN = re.compile(r"^\s*<!-- no-run: (?P<reason>\S.*?) -->\s*$")
STATED_FILE = re.compile(r"#\s*->\s*(?P<path>\S+)")
TIMEOUT = 600


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    info: str
    body: str
    reason: str | None  # the no-run comment's reason, if the line before the fence has one

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def lang(self) -> str:
        return self.info.split()[0] if self.info else ""

    @property
    def no_run(self) -> bool:
        return "no-run" in self.info.split()[1:]

    @property
    def runs(self) -> bool:
        return self.lang in RUN and not self.no_run


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of ``path`` (indented ones in list items dedented)."""
    lines = path.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, ticks, start = len(m["indent"]), m["ticks"], i
        i += 1
        body = []
        while i < len(lines) and lines[i].strip() != ticks:
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        before = NO_RUN.match(lines[start - 1]) if start else None
        found.append(Block(path, start + 1, m["info"].strip(), "\n".join(body) + "\n", before and before["reason"]))
        i += 1
    return found


ALL = [b for f in FILES for b in blocks(f)]


def shortened(text: str) -> str:
    """``text`` with every ``--epochs N`` / ``epochs=N`` capped at ``EXPANDCTL_DOCS_EPOCHS`` (default 1)."""
    cap = os.environ.get(EPOCHS_VAR, "1")
    if cap == "all":
        return text
    limit = int(cap)
    return re.sub(r"(--epochs[ =]|\bepochs=)(\d+)", lambda m: f"{m[1]}{min(int(m[2]), limit)}", text)


def transcript(body: str) -> tuple[str, list[str]]:
    """A console block's commands (``$`` lines and their ``\\`` continuations) and its stated output."""
    commands, output, going_on = [], [], False
    for line in body.splitlines():
        if line.startswith("$ ") or going_on:
            commands.append(line[2:] if line.startswith("$ ") and not going_on else line)
            going_on = line.rstrip().endswith("\\")
        elif line.strip():
            output.append(line.strip())
    return "\n".join(commands) + "\n", output


def run_block(block: Block, tmp: Path) -> None:
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(ROOT),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        NO_COLOR="1",
        COLUMNS="200",
    )
    env.setdefault(EPOCHS_VAR, "1")
    (tmp / "examples").symlink_to(ROOT / "examples")
    body, stated = shortened(block.body), []
    if block.lang == "python":
        (tmp / "block.py").write_text(body)
        cmd = [sys.executable, "block.py"]
    else:
        if block.lang == "console":
            body, stated = transcript(body)
        (tmp / "block.sh").write_text("set -e -o pipefail\n" + body)
        cmd = ["bash", "block.sh"]
    r = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    said = r.stdout + r.stderr
    assert r.returncode == 0, f"{block.id} exited {r.returncode}:\n{body}\n--- output ---\n{said[-4000:]}"
    flat = " ".join(said.split())
    missing = [line for line in stated if " ".join(line.split()) not in flat]
    assert not missing, f"{block.id}: stated output not printed: {missing}\n--- output ---\n{said[-4000:]}"
    if block.lang == "bash":
        for m in STATED_FILE.finditer(body):
            assert (tmp / m["path"]).exists(), f"{block.id}: states that it writes {m['path']}, which is not there"


@pytest.mark.parametrize("block", [b for b in ALL if b.runs], ids=lambda b: b.id)
def test_block_runs_as_written(block, tmp_path):
    run_block(block, tmp_path)


def test_every_block_is_run_or_says_why():
    problems = []
    for b in ALL:
        if b.lang not in RUN | DISPLAY:
            problems.append(f"{b.id}: info string {b.info!r}: say bash, python, console (run) or text (not code)")
        elif b.no_run and not b.reason:
            problems.append(f"{b.id}: marked no-run without <!-- no-run: REASON --> on the line before it")
        elif b.reason and not b.no_run:
            problems.append(f"{b.id}: has a no-run reason but its info string {b.info!r} does not say no-run")
        elif b.lang == "text" and any(line.startswith("$ ") for line in b.body.splitlines()):
            problems.append(f"{b.id}: a transcript ($ lines) marked text: mark it console (or console no-run)")
    assert not problems, "\n".join(problems)
    assert sum(b.runs for b in ALL) >= 10, "the runner found almost no runnable block: is the parser broken?"


def test_the_runner_reads_fences_reasons_and_transcripts(tmp_path, monkeypatch):
    doc = tmp_path / "x.md"
    doc.write_text(
        "a\n<!-- no-run: needs CIFAR -->\n```bash no-run\nexpandctl train --epochs 150\n```\n"
        "- item\n\n  ```console\n  $ echo a \\\n    b\n  a b\n  ```\n```\nbare\n```\n"
    )
    first, second, third = blocks(doc)
    assert (first.lang, first.no_run, first.reason, first.runs, first.line) == ("bash", True, "needs CIFAR", False, 3)
    assert second.runs and transcript(second.body) == ("echo a \\\n  b\n", ["a b"])
    assert third.lang == "" and not third.runs
    monkeypatch.delenv(EPOCHS_VAR, raising=False)
    assert shortened("--epochs 150 x epochs=5, --epochs=1") == "--epochs 1 x epochs=1, --epochs=1"
