"""The GPU session's scripts (bench/gpu/*.sh) on a machine without a GPU.

* Each script's dry run checks every command line it would run (bench/gpu/dryrun.py: entry points
  and options by their own parsers, the benchmark's presets and settings by a --cost-only run,
  pytest by collecting, files named) and its time plan against its budget.
* The checker fails on a wrong command line, one case per kind of check.
* bench/gpu/lib.sh in a real run: a hanging step is stopped when its slot's time is up, the next
  step still runs, the script ends within its budget and the summary names the step that stopped.
* accuracy.sh runs end to end on the CPU with the tiny test preset.
* bench/gpu/sanitize_ops.py passes on the CPU kernels; on a GPU it launches every kernel it names.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
GPU_DIR = REPO / "bench" / "gpu"
PY = sys.executable

# script -> (budget in seconds, the steps in order)
SCRIPTS = {
    "check": (540, ["build", "pytest", "sanitizer-memcheck", "sanitizer-racecheck", "sanitizer-synccheck", "kernels",
                    "e2e_kernels_on", "e2e_kernels_off"]),
    "decode_sweep": (330, ["build", "sweep"]),
    "accuracy": (540, ["build", "train-small-lvlm", "vip", "eval"]),
}


def _module(name):
    spec = importlib.util.spec_from_file_location(f"gpu_{name}", GPU_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(path, out, *args, env=None, timeout=900):
    env = {**os.environ, "PYTHON": PY, **(env or {})}
    env.pop("TOKEN_PRUNE_GIT_SHA", None)
    return subprocess.run(["bash", str(path), *args, str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def read_tsv(path):
    return list(csv.DictReader(path.read_text().splitlines(), delimiter="\t"))


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_dry_run_checks_every_command_line_and_the_plan(name, tmp_path):
    budget, members = SCRIPTS[name]
    done = run_script(GPU_DIR / f"{name}.sh", tmp_path, "--dry-run", "--sha", "0123abc")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads((tmp_path / "dryrun" / "report.json").read_text())
    assert report["failed"] == 0
    assert [c["member"] for c in report["commands"]] == members
    assert all(c["status"] == "ok" for c in report["commands"])
    plan = {row["slot"]: int(row["planned_s"]) for row in read_tsv(tmp_path / "plan.tsv")}
    assert plan["budget"] == budget
    assert plan["total"] == sum(v for k, v in plan.items() if k not in ("total", "budget")) <= budget
    prov = json.loads((tmp_path / "provenance.json").read_text())
    assert prov["git_sha"] == "0123abc" and prov["dry_run"] is True and prov["script"] == name
    summary = (tmp_path / "summary.md").read_text()
    assert "(dry run)" in summary and f"{len(members)} of {len(members)} command lines pass" in summary


def test_a_plan_over_the_budget_fails_the_dry_run(tmp_path):
    script = tmp_path / "over.sh"
    script.write_text(f'source "{GPU_DIR}/lib.sh"\ngpu_init over 100 "$@"\nplan_slot a 50\nplan_slot b 40\n'
                      'plan_done\nrun_step a -- true\nrun_step b -- true\ngpu_finish\n')
    done = run_script(script, tmp_path / "out", "--dry-run")
    assert done.returncode == 1
    assert "exceeds the budget" in done.stderr


BAD_COMMANDS = [
    # (what, command, message)
    ("bench option", [PY, "-m", "token_prune.bench", "--preset", "qwen2_5_vl_7b_4k", "--no-such-option"],
     "do not parse"),
    ("bench preset", [PY, "-m", "token_prune.bench", "--preset", "no_such_preset"], "do not parse"),
    ("bench setting", [PY, "-m", "token_prune.bench", "--preset", "qwen2_5_vl_7b_4k", "--only", "check,latency",
                       "--setting", "glimpse:layr=18,keep_ratio=0.074"], "takes no option layr"),
    ("cli option", [PY, "-m", "token_prune", "eval-accuracy", "ckpt", "--no-such-option", "4"], "do not parse"),
    ("cli choice", [PY, "-m", "token_prune", "train-small-lvlm", "--preset", "h200"], "do not parse"),
    ("script option", [PY, "bench/kernels.py", "--iterations", "3"], "do not parse"),
    ("missing script", [PY, "bench/gpu/no_such_script.py"], "no such file"),
    ("missing test file", [PY, "-m", "pytest", "tests/test_no_such_file.py"], "no such file"),
    ("pytest selects nothing", [PY, "-m", "pytest", "tests/test_cli.py", "-m", "no_such_marker"], "0 tests"),
    ("sanitizer tool", ["compute-sanitizer", "--tool", "leakcheck", PY, "bench/gpu/sanitize_ops.py"], "bad value"),
    ("sanitizer option", ["compute-sanitizer", "--kernel-filter", "kns=x", PY, "bench/gpu/sanitize_ops.py"],
     "unknown option"),
    ("sanitizer filter", ["compute-sanitizer", "--kernel-name", "token_prune", PY, "bench/gpu/sanitize_ops.py"],
     "bad value"),
    ("setup option", [PY, "setup.py", "build_ext", "--inplce"], "build_ext"),
    ("program", ["no-such-program", "--version"], "no such program"),
]


@pytest.mark.parametrize("what, command, message", BAD_COMMANDS, ids=[c[0] for c in BAD_COMMANDS])
def test_the_checker_rejects_a_wrong_command_line(what, command, message, tmp_path):
    dryrun = _module("dryrun")
    cwd = os.getcwd()
    try:
        os.chdir(REPO)
        with pytest.raises(dryrun.CommandError, match=message):
            dryrun.check_command(command, REPO, tmp_path, PY)
    finally:
        os.chdir(cwd)


def test_a_hanging_step_is_stopped_and_the_script_ends_in_time(tmp_path):
    # provenance 15 s + slots 4 + 4 + end reserve 5 = 28 s of a 30 s budget: the hanging step
    # gets its 4 s plus what provenance left unused, the next step still runs.
    script = tmp_path / "hang.sh"
    script.write_text(
        f'source "{GPU_DIR}/lib.sh"\ngpu_init hang 30 "$@"\nplan_slot hang 4\nplan_slot after 4\nplan_done\n'
        'run_step hang -- sleep 120\n'
        'spawn_step after first -- bash -c "echo first"\nspawn_step after second -- bash -c "exit 3"\n'
        'join_slot after\ngpu_finish\n')
    t0 = time.monotonic()
    done = run_script(script, tmp_path / "out", "--sha", "feed")
    elapsed = time.monotonic() - t0
    assert elapsed < 30, elapsed
    assert done.returncode == 1
    steps = {row["member"]: row for row in read_tsv(tmp_path / "out" / "steps.tsv")}
    assert steps["hang"]["status"] == "timeout" and steps["hang"]["rc"] in ("124", "137")
    assert steps["first"]["status"] == "ok" and steps["second"]["status"] == "failed"
    assert steps["second"]["rc"] == "3"
    assert (tmp_path / "out" / "logs" / "first.log").read_text().strip().endswith("first")
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "Stopped by the time limit: hang." in summary and "git feed" in summary


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_accuracy_script_runs_end_to_end_on_the_cpu(tmp_path):
    env = {"ACCURACY_PRESET": "test", "ACCURACY_SAMPLES": "4", "ACCURACY_CHECKPOINT": str(tmp_path / "ckpt"),
           "TOKEN_PRUNE_GPU_SKIP_BUILD": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    done = run_script(GPU_DIR / "accuracy.sh", out, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    steps = {row["member"]: row["status"] for row in read_tsv(out / "steps.tsv")}
    assert steps == {"build": "skipped", "train-small-lvlm": "ok", "vip": "ok", "eval": "ok"}
    assert (out / "train" / "small_lvlm.json").is_file()
    stamps = list((out / "vip").glob("vip_K*/accuracy_vip.json"))
    assert stamps and not list((out / "vip").glob("vip_K*/*.pt"))  # the stamps, not the weights
    report = json.loads((out / "accuracy_test.json").read_text())
    assert report["samples"] == 4
    summary = (out / "summary.md").read_text()
    assert "VIP training vip_K" in summary and "| unpatched |" in summary


def test_summary_reads_the_benchmark_files(tmp_path):
    # One tiny benchmark run (CPU) stands in for the end-to-end and sweep steps' result files, so
    # the summary is read from the very JSON the benchmark writes, whatever shape it has then.
    out = tmp_path / "out"
    bench = [PY, "-m", "token_prune.bench", "--tiny", "--setting", "fastv:layer=1,keep_ratio=0.5",
             "--only", "check,latency,sweep", "--sweep", "--sweep-batches", "1", "--warmup", "0", "--repeats", "1",
             "--decode-warmup", "0", "--decode-repeats", "1", "--decode-tokens", "2", "--sweep-decode-tokens", "2",
             "--sweep-warm-steps", "0", "--check-tokens", "2", "--no-plot", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for directory, tag in (("e2e", "kernels-on"), ("e2e", "kernels-off"), ("sweep", "decode-sweep")):
        done = subprocess.run([*bench, "--out-dir", str(out / directory), "--tag", tag], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    report = _module("report")
    for script in ("check", "decode_sweep"):
        report.summary(out, script)
        summary = (out / "summary.md").read_text()
        assert "could not read" not in summary, summary
        if script == "check":
            assert "kernels off (CUDA extension loaded:" in summary
            row = next(line for line in summary.splitlines() if line.startswith("| fastv K=1 f=0.5 |"))
            assert "–" not in row.split("|")[2]  # LM prefill on / off: two numbers
            assert "no junit XML" in summary and "bench/kernels.py: no results file." in summary
        else:
            assert "largest batch within the memory cap: unpatched 1, fastv K=1 f=0.5 1." in summary


def test_sanitizer_subset_passes_on_the_cpu_kernels():
    module = _module("sanitize_ops")
    checker = module.run(torch.device("cpu"))
    assert checker.failures == [] and checker.calls >= 25


@pytest.mark.gpu
def test_sanitizer_subset_launches_every_kernel_it_names():
    from torch.profiler import ProfilerActivity, profile

    module = _module("sanitize_ops")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        checker = module.run(torch.device("cuda"))
    assert checker.failures == []
    launched = {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}
    missing = [k for k in module.KERNELS if not any(k in name for name in launched)]
    assert not missing, (missing, sorted(n for n in launched if "token_prune" in n))
