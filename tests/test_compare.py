"""`expandctl compare` end to end on a tiny SmallNet and tiny synthetic data: the report and its
numbers, a skipped strategy, two jobs sharing the folder, kill and resume, two shards merged, --json
and exit codes; and the engine under it (locks, Welch's test, strategy names from the registry)."""

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from expandctl.checkpoint import save
from expandctl.cli import app
from expandctl.experiments import claim, compare, stats
from expandctl.layers import EXPANSIONS
from expandctl.models import SmallNet

# Kernel 3: CK selects no layer (it needs k > 3), so `ck` is reported as skipped; CL expands all three convs.
TINY = {"in_channels": 1, "image_size": 8, "kernel_size": 3, "channels": [4, 8, 8], "hidden": 16}
RECIPE = ["--data", "synthetic:1x8x8", "--strategies", "compact,cl,ck", "--seeds", "2", "--epochs", "3",
          "--batch-size", "32", "--lr", "0.002"]  # fmt: skip
TIMING = (
    "seconds_per_epoch",
    "seconds_ratio",
    "peak_memory_mib",
    "memory_ratio",
    "seconds_ratio_range",
    "memory_ratio_range",
)
runner = CliRunner()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("compare") / "tiny.pt"
    save(SmallNet(**TINY), path, arch="smallnet", arch_kwargs=TINY, input_shape=(1, 8, 8))
    return path


def options(model: Path, out: Path, *extra) -> list[str]:
    return ["compare", str(model), *RECIPE, "--out", str(out), *extra]


def command(model: Path, out: Path, *extra) -> list[str]:
    """The command line of a separate compare process."""
    return [sys.executable, "-m", "expandctl", *options(model, out, *extra)]


def run_json(args: list[str]) -> dict:
    """Compare in this process (its runs still train in processes of their own); its --json object."""
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout  # --json: one object on stdout, nothing else
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def one_process(model, tmp_path_factory) -> tuple[Path, dict]:
    """The study in one compare process, two runs at a time."""
    out = tmp_path_factory.mktemp("one") / "study"
    return out, run_json(options(model, out, "--jobs", "2"))


def untimed(report: dict) -> dict:
    """The report without what depends on the machine's speed and load."""
    rows = [{k: v for k, v in r.items() if k not in TIMING} for r in report["strategies"]]
    return {**report, "strategies": rows}


def test_end_to_end_report_follows_from_the_run_files(one_process):
    out, result = one_process
    assert result["ok"] and result["command"] == "compare"
    assert sorted(result["ran"]) == ["cl-s0", "cl-s1", "compact-s0", "compact-s1"] and result["reused"] == []
    report = result["report"]
    assert json.loads((out / "report.json").read_text()) == report
    assert [r["strategy"] for r in report["strategies"]] == ["compact", "cl", "ck"]
    skipped = report["strategies"][2]
    assert skipped["status"] == "skipped" and "selects no layer" in skipped["reason"]
    assert report["runs"] == {"planned": 4, "finished": 4, "missing": []}

    runs = {n: json.loads((out / "runs" / f"{n}.json").read_text()) for n in result["ran"]}
    for r in runs.values():
        # the contracted model was scored on its own; it computes what the trained one did
        assert abs(r["final_acc"] - r["last_epoch_val_acc"]) <= 1 / r["val_size"]
        assert len(r["history"]) == 3 and r["peak_memory_mib"] > 0 and r["seconds_per_epoch"] > 0
    assert runs["cl-s0"]["contraction_max_rel_float64"] < 1e-12
    assert runs["cl-s0"]["params_trained"] > runs["compact-s0"]["params_trained"] == runs["cl-s0"]["params_compact"]
    assert runs["cl-s0"]["expanded_layers"] == ["features.0", "features.4", "features.8"]

    acc = {s: [100 * runs[f"{s}-s{i}"]["final_acc"] for i in (0, 1)] for s in ("compact", "cl")}
    compact, cl = report["strategies"][:2]
    mean = {s: statistics.fmean(a) for s, a in acc.items()}
    assert cl["accuracy"]["values"] == acc["cl"] and cl["accuracy"]["mean"] == pytest.approx(mean["cl"])
    assert cl["vs_compact"]["difference"] == pytest.approx(mean["cl"] - mean["compact"])
    assert cl["vs_compact"]["p"] == stats.welch_p(acc["cl"], acc["compact"])
    # paired over the seeds (both strategies' runs of a seed), Holm over the one strategy compared
    paired = stats.paired_p(acc["cl"], acc["compact"])
    assert cl["vs_compact"]["p_paired"] == paired and cl["vs_compact"]["paired_seeds"] == 2
    assert cl["vs_compact"]["p_adjusted"] == paired  # one strategy tested: Holm leaves it alone
    t = stats.paired_t(acc["cl"], acc["compact"])
    if t is not None:
        assert cl["vs_compact"]["detectable"] == stats.detectable_difference(t[2], t[1])
    sec = statistics.fmean(runs[f"cl-s{i}"]["seconds_per_epoch"] for i in (0, 1))
    assert cl["seconds_ratio"] == pytest.approx(sec / compact["seconds_per_epoch"])
    assert compact["vs_compact"] is None and compact["seconds_ratio"] == 1

    # the verdict follows from the numbers
    p, d = cl["vs_compact"]["p_adjusted"], cl["vs_compact"]["difference"]
    assert report["better"] == (["cl"] if p is not None and p < 0.05 and d > 0 else [])
    if not report["better"] and p is not None:
        assert report["verdict"].startswith(
            "No strategy beat compact at p < 0.05, paired t-test over seeds, Holm-Bonferroni adjusted over 1 strategy"
        )
    table = (out / "report.md").read_text()
    assert f"| cl | 2 | {cl['accuracy']['mean']:.2f} +- {cl['accuracy']['std']:.2f} | {d:+.2f} |" in table
    assert "ck: skipped, strategy 'ck' selects no layer" in table and report["verdict"] in table
    for png in ("curves.png", "gain.png"):
        assert (out / png).stat().st_size > 10_000


def test_two_shards_merge_into_the_one_process_report(model, one_process, tmp_path):
    out, result = one_process
    shared = tmp_path / "shared"
    shards = [subprocess.Popen(command(model, shared, "--shard", f"{i}/2", "--json"), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for i in (1, 2)]  # fmt: skip
    outputs = [p.communicate(timeout=600) for p in shards]
    assert [p.returncode for p in shards] == [0, 0], outputs
    ran = [json.loads(o)["ran"] for o, _ in outputs]
    assert sorted(ran[0] + ran[1]) == sorted(result["ran"]) and not set(ran[0]) & set(ran[1])
    merged = run_json(options(model, shared, "--report-only"))
    assert merged["ran"] == []
    assert untimed(merged["report"])["strategies"] == untimed(result["report"])["strategies"]
    assert merged["report"]["verdict"] == result["report"]["verdict"]
    for name in result["ran"]:  # same numbers run by run: same initialisation and data order per seed
        a, b = (json.loads((d / "runs" / f"{name}.json").read_text()) for d in (out, shared))
        assert a["final_acc"] == b["final_acc"] and [h["val_acc"] for h in a["history"]] == [
            h["val_acc"] for h in b["history"]
        ]


def test_killed_compare_resumes_and_reuses_finished_runs(model, tmp_path):
    out = tmp_path / "killed"
    # long enough runs (small batches, more epochs) to be killed in the middle of one
    extra = ["--jobs", "1", "--seeds", "1", "--epochs", "20", "--batch-size", "8"]
    proc = subprocess.Popen(command(model, out, *extra), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first, second = out / "runs" / "compact-s0.json", out / "work" / "cl-s0" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (first.is_file() and second.is_file() and second.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, "compare ended before it could be killed"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)  # mid-way through cl-s0, after an epoch was saved
    proc.wait()
    assert not (out / "runs" / "cl-s0.json").is_file()
    mtime = first.stat().st_mtime_ns
    lock = out / "work" / "locks" / "cl-s0.lock"
    for _ in range(500):  # the run's process dies with its parent, which frees its lock
        held = claim(lock)
        if held is not None:
            held.release()
            break
        time.sleep(0.02)
    else:
        pytest.fail("the killed compare's run still holds its lock")

    again = run_json(options(model, out, *extra))
    assert again["reused"] == ["compact-s0"] and again["ran"] == ["cl-s0"]
    assert first.stat().st_mtime_ns == mtime
    resumed = json.loads((out / "runs" / "cl-s0.json").read_text())
    # it continued from its last.pt (which replays a killed epoch exactly: tests/test_train_process.py)
    assert resumed["resumed"] is True and len(resumed["history"]) == 20
    assert again["report"]["runs"] == {"planned": 2, "finished": 2, "missing": []}
    assert again["report"]["verdict"].startswith("Too few seeds for a test")


# --------------------------------------------------------------------------------------------------
# Errors and exit codes (in-process, nothing trained)
# --------------------------------------------------------------------------------------------------
def cli_error(*args, code: int) -> dict:
    result = runner.invoke(app, [str(a) for a in args] + ["--json"])
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    data = json.loads(lines[0])
    assert data["ok"] is False and data["exit_code"] == code and data["command"] == "compare"
    return data


def test_errors_have_their_exit_codes_and_write_nothing(model, tmp_path):
    out = tmp_path / "o"
    base = ["compare", model, "--data", "synthetic:1x8x8", "--out", out]
    assert "unknown strategy" in cli_error(*base, "--strategies", "compact,nope", code=2)["error"]
    assert "--shard" in cli_error(*base, "--shard", "3/2", code=2)["error"]
    assert "--data is required" in cli_error("compare", model, "--out", out, code=2)["error"]
    assert "--epochs must be at least 1" in cli_error(*base, "--epochs", "0", code=2)["error"]
    assert "holds no study" in cli_error(*base, "--report-only", code=2)["error"]
    # kernel 3: CK selects nothing, so there is nothing to compare compact with (exit 4)
    assert "no strategy selects a layer" in cli_error(*base, "--strategies", "compact,ck", code=4)["error"]
    assert not out.exists()


def test_a_folder_keeps_its_recipe(model, one_process):
    out, _ = one_process
    before = sorted(p.name for p in (out / "runs").iterdir())
    error = cli_error("compare", model, *RECIPE[:-2], "--lr", "0.5", "--out", out, code=2)["error"]
    assert "other settings" in error and "lr" in error
    error = cli_error("compare", model, *RECIPE[:-2], "--lr", "0.5", "--out", out, "--report-only", code=2)["error"]
    assert "other settings" in error
    # --report-only with nothing but the folder reads its recipe: the same report
    args = ["compare", "--out", str(out), "--report-only", "--seeds", "2", "--strategies", "compact,cl,ck", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    again = json.loads(result.stdout)
    assert again["ran"] == [] and again["report"] == json.loads((out / "report.json").read_text())
    assert [r["strategy"] for r in again["report"]["strategies"]] == ["compact", "cl", "ck"]
    assert sorted(p.name for p in (out / "runs").iterdir()) == before


# --------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------
def test_strategy_names_come_from_the_registry():
    kinds = sorted(EXPANSIONS)
    assert compare.parse_strategies(",".join(kinds)) == ["compact", *kinds]  # compact always, first
    assert compare.parse_strategies("ck+fc, compact, CK+FC") == ["compact", "ck+fc"]
    with pytest.raises(Exception, match="unknown strategy"):
        compare.parse_strategies("compact,bogus")


def test_shards_partition_the_runs():
    names, seeds = ["compact", "ck", "cl"], range(5)
    whole = compare.schedule(names, seeds)
    slices = [compare.schedule(names, seeds, (i, 4)) for i in (1, 2, 3, 4)]
    assert sorted(sum(slices, [])) == sorted(whole) and sum(map(len, slices)) == len(whole) == 15
    assert whole[:3] == [("compact", 0), ("ck", 0), ("cl", 0)]  # seeds outermost


def test_welch_p_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    import random

    rng = random.Random(0)
    for _ in range(200):
        a = [rng.gauss(0, rng.choice([0.01, 1, 5])) for _ in range(rng.randint(2, 7))]
        b = [rng.gauss(rng.choice([0, 1, 4]), rng.choice([0.01, 1, 5])) for _ in range(rng.randint(2, 7))]
        expected = float(scipy_stats.ttest_ind(a, b, equal_var=False).pvalue)
        assert stats.welch_p(a, b) == pytest.approx(expected, rel=1e-10, abs=1e-300)
    assert stats.welch_p([1.0], [2.0, 3.0]) is None and stats.welch_p([1.0, 1.0], [1.0, 1.0]) is None
    assert stats.welch_p([1.0, 1.0], [2.0, 2.0]) == 0.0  # constant and different, as SciPy


def test_paired_p_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    import random

    rng = random.Random(1)
    for _ in range(300):
        n = rng.randint(2, 10)
        a = [rng.gauss(0, rng.choice([0.01, 1, 5])) for _ in range(n)]
        b = [x + rng.gauss(rng.choice([0, 0.5, 3]), rng.choice([0.01, 1, 5])) for x in a]
        expected = float(scipy_stats.ttest_rel(a, b).pvalue)
        assert stats.paired_p(a, b) == pytest.approx(expected, rel=1e-10, abs=1e-300)
    assert stats.paired_p([1.0], [2.0]) is None and stats.paired_p([1.0, 2.0], [1.0, 2.0]) is None
    assert stats.paired_p([1.0, 2.0, 3.0], [0.0, 1.0, 2.0]) == 0.0  # equal non-zero differences, as SciPy


def test_holm_matches_the_step_down_procedure():
    """An adjusted p is below alpha exactly when Holm's procedure (the i-th smallest of m p-values
    against alpha / (m - i + 1), stopping at the first that is not) rejects that hypothesis."""
    import random

    def rejected(ps, alpha):
        out = set()
        for rank, (p, i) in enumerate(sorted((p, i) for i, p in enumerate(ps))):
            if p >= alpha / (len(ps) - rank):
                break
            out.add(i)
        return out

    rng = random.Random(2)
    for _ in range(300):
        ps = [rng.choice([rng.random(), rng.random() / 100, 0.0125]) for _ in range(rng.randint(1, 6))]
        adjusted = stats.holm(ps)
        assert all(a >= p for a, p in zip(adjusted, ps)) and max(adjusted) <= 1
        for alpha in (0.01, 0.05, 0.1):
            assert {i for i, a in enumerate(adjusted) if a < alpha} == rejected(ps, alpha)
    assert stats.holm([0.01, None, 0.04]) == [0.02, None, 0.04]
    assert stats.holm([]) == []


def test_power_and_detectable_difference_match_scipy():
    """The noncentral t power, the t quantiles, and the detectable difference (SciPy's nct gives
    power 0.8 at it) on a few hundred cases, Welch's non-integer degrees of freedom included."""
    scipy_stats = pytest.importorskip("scipy.stats")
    import random

    rng, compared = random.Random(3), 0
    for _ in range(300):
        df = rng.choice([1, 2, 3, 4, 6, 9, 19, 49, 200]) + (rng.random() if rng.random() < 0.4 else 0)
        alpha, shift = rng.choice([0.01, 0.05, 0.1]), rng.uniform(0, 8)
        c = scipy_stats.t.ppf(1 - alpha / 2, df)
        assert stats.t_quantile(1 - alpha / 2, df) == pytest.approx(c, rel=1e-10)
        assert stats.t_quantile(alpha / 2, df) == pytest.approx(-c, rel=1e-10)
        expected = scipy_stats.nct.sf(c, df, shift) + scipy_stats.nct.cdf(-c, df, shift)
        if expected == expected:  # SciPy's nct returns NaN for a few far-tail cases
            assert stats.t_power(shift, df, alpha) == pytest.approx(expected, abs=1e-8)
            compared += 1
    assert compared > 250
    for _ in range(40):
        df, se = rng.choice([2, 3, 4.5, 9, 30]), rng.uniform(0.1, 3)
        d = stats.detectable_difference(se, df)
        c = scipy_stats.t.ppf(0.975, df)
        power = scipy_stats.nct.sf(c, df, d / se) + scipy_stats.nct.cdf(-c, df, d / se)
        assert power == pytest.approx(0.8, abs=1e-6)
    # the textbook case: 3 paired seeds (df 2) need a true shift of about 5.65 standard errors
    assert stats.detectable_difference(1.0, 2) == pytest.approx(5.65, abs=0.01)
    assert stats.detectable_difference(0.0, 2) == 0.0


def test_seeds_to_detect_is_the_smallest_sufficient_count():
    for std, diff in ((0.5, 0.3), (1.0, 2.0), (0.73, 0.65), (2.0, 0.5)):
        n = stats.seeds_to_detect(std, diff)
        assert stats.detectable_difference(std / n**0.5, n - 1) <= diff
        if n > 2:
            assert stats.detectable_difference(std / (n - 1) ** 0.5, n - 2) > diff
    assert stats.seeds_to_detect(1.0, 0.0) is None and stats.seeds_to_detect(0.0, 1.0) == 2


def test_a_lock_passed_to_a_child_is_held_until_the_child_exits(tmp_path):
    path = tmp_path / "run.lock"
    lock = claim(path)
    assert lock is not None and claim(path) is None
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], pass_fds=(lock.fd,))
    lock.release()  # the child's copy of the descriptor keeps the lock
    assert claim(path) is None
    child.kill()
    child.wait()
    again = claim(path)
    assert again is not None
    again.release()


def test_a_failing_run_stops_the_study_with_its_exit_code(model, tmp_path):
    out = tmp_path / "diverges"
    args = ["compare", model, "--data", "synthetic:1x8x8", "--strategies", "compact,cl", "--seeds", "1",
            "--epochs", "2", "--lr", "1e12", "--out", out]  # fmt: skip
    error = cli_error(*args, code=1)["error"]  # the run's own exit code: training diverged
    assert error.startswith("run compact-s0 failed: the loss became") and "log.txt" in error
    assert not (out / "runs" / "compact-s0.json").exists() and not (out / "report.json").exists()


def test_a_run_another_process_holds_is_waited_for_and_taken_over_when_it_dies(tmp_path):
    out = tmp_path / "study"
    train = {k: None for k in compare.RECIPE_FIELDS} | {
        "epochs": 1, "batch_size": 64, "accumulate": 1, "lr": 0.01, "optimizer": "sgd", "momentum": 0.9,
        "nesterov": False, "schedule": "paper", "weight_decay": 0.0, "decay_on": "factors", "kd_alpha": 0.9,
        "kd_temperature": 4.0, "nonlinear_warmup": 0, "forward": "fused", "device": "cpu", "workers": 0,
        "download": False, "trust_pickle": False, "precise_bn": 0,
    }  # fmt: skip
    compare.Study("smallnet", TINY, [1, 8, 8], "synthetic:1x8x8", train).save(out)
    lock = claim(compare.lock_path(out, "compact", 0))
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(2)"], pass_fds=(lock.fd,))
    lock.release()  # now only the holder has it: a live process that never writes the run
    events = []
    result = compare.execute(out, [("compact", 0)], on_event=lambda kind, *a: events.append(kind))
    assert holder.wait() == 0
    assert result == {"ran": ["compact-s0"], "reused": [], "waited": []} and events == ["start", "done"]
    assert json.loads(compare.run_path(out, "compact", 0).read_text())["seed"] == 0


@pytest.mark.slow  # two torchrun launches of two processes each: ~1-2 minutes on two busy cores
def test_each_run_can_be_data_parallel_under_torchrun(model, tmp_path):
    """--nproc-per-run 2: every run trains as `torchrun --nproc_per_node 2`; rank 0 alone writes it."""
    out = tmp_path / "ddp"
    args = ["compare", str(model), "--data", "synthetic:1x8x8", "--strategies", "compact,cl", "--seeds", "1",
            "--epochs", "1", "--batch-size", "32", "--lr", "0.002", "--out", str(out),
            "--nproc-per-run", "2"]  # fmt: skip
    report = run_json(args)["report"]
    assert [r["strategy"] for r in report["strategies"]] == ["compact", "cl"]
    for name in ("compact-s0", "cl-s0"):
        record = json.loads((out / "runs" / f"{name}.json").read_text())
        assert record["processes"] == 2 and 0.0 <= record["final_acc"] <= 1.0


# --------------------------------------------------------------------------------------------------
# The library verb behind the command (issue 28)
# --------------------------------------------------------------------------------------------------
def test_the_compare_verb_returns_the_commands_json_object(model, tmp_path):
    from expandctl.workflows.compare import CompareOptions
    from expandctl.workflows.compare import compare as run_compare

    out = tmp_path / "study"
    cli = run_json(options(model, out, "--dry-run"))
    recipe = {"epochs": 3, "batch_size": 32, "lr": 0.002}
    lib = run_compare(CompareOptions(model=str(model), data="synthetic:1x8x8", strategies="compact,cl,ck", seeds=2,
                                     out=out, dry_run=True, train=recipe))  # fmt: skip
    assert {"ok": True, "command": "compare", **json.loads(json.dumps(lib.to_dict()))} == cli
    assert not out.exists()  # a dry run writes nothing


@pytest.mark.parametrize("option, flag", [("seeds", "--seeds"), ("nproc_per_run", "--nproc-per-run")])
def test_compare_errors_name_the_parameter_and_the_cli_its_flag(model, tmp_path, option, flag):
    from expandctl.errors import UsageError
    from expandctl.workflows.compare import CompareOptions

    with pytest.raises(UsageError) as e:
        CompareOptions(data="synthetic:1x8x8", **{option: 0})
    assert e.value.option == option and str(e.value) == f"{option} must be at least 1"
    error = cli_error("compare", model, "--data", "synthetic:1x8x8", "--out", tmp_path, flag, "0", code=2)["error"]
    assert error == f"{flag} must be at least 1"
