"""Provenance and summary files of the bench/gpu scripts (called by bench/gpu/lib.sh).

    python bench/gpu/report.py provenance --out OUT --script check --budget 540 --dry-run 0
    python bench/gpu/report.py summary --out OUT --script check

``provenance`` writes ``OUT/provenance.json``: the GPU (from ``nvidia-smi.csv``, which lib.sh
writes), driver, torch / CUDA / transformers / Python versions, nvcc and compute-sanitizer
versions, core count, host, start time and the git sha the caller passed
(``TOKEN_PRUNE_GIT_SHA``). ``summary`` writes ``OUT/summary.json`` and ``OUT/summary.md``: the
provenance, the time plan against what each step took and how it ended (ok, failed, timeout,
skipped, or not reached), and the headline results of the script's steps from the files they
wrote (each section says when its file is missing, e.g. after a timeout). It is rerun after
every step, so a run cut short still leaves a summary. Nothing here imports torch except the
version query of ``provenance``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def _run(cmd: list[str], timeout: float) -> str | None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return (done.stdout or done.stderr).strip() or None


def _versions(timeout: float) -> dict:
    code = (
        "import json, torch\n"
        "d = dict(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())\n"
        "for name in ('transformers', 'triton', 'pytest', 'hypothesis'):\n"
        "    try:\n"
        "        d[name] = __import__(name).__version__\n"
        "    except Exception:\n"
        "        d[name] = None\n"
        "print(json.dumps(d))\n"
    )
    out = _run([sys.executable, "-c", code], timeout)
    try:
        return json.loads(out.splitlines()[-1]) if out else {}
    except (ValueError, IndexError):
        return {"error": out}


def provenance(out: Path, script: str, budget: int, dry_run: bool) -> dict:
    gpus = []
    smi = out / "nvidia-smi.csv"
    if smi.is_file():
        for row in csv.reader(smi.read_text().splitlines()):
            if len(row) >= 4:
                name, driver, memory, cap = (x.strip() for x in row[:4])
                gpus.append(dict(name=name, driver=driver, memory=memory, compute_capability=cap))
    sanitizer = shutil.which("compute-sanitizer") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"),
                                                                   "bin", "compute-sanitizer")
    nvcc = shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    nvcc_version = _run([nvcc, "--version"], 1.5)
    san_version = _run([sanitizer, "--version"], 1.5)
    info = dict(
        script=script,
        dry_run=dry_run,
        budget_s=budget,
        started_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        git_sha=os.environ.get("TOKEN_PRUNE_GIT_SHA", "unknown"),
        host=platform.node(),
        cpus=os.cpu_count(),
        python=platform.python_version(),
        platform=platform.platform(),
        gpus=gpus,
        nvcc=nvcc_version.splitlines()[-1] if nvcc_version else None,
        compute_sanitizer=next((ln for ln in (san_version or "").splitlines() if "Version" in ln), None),
        **_versions(6),
    )
    (out / "provenance.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


# ---------------------------------------------------------------------------
# results of the steps
# ---------------------------------------------------------------------------


def _load(path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _fmt(x, spec=".1f"):
    return "–" if x is None else format(x, spec)


def _bench_file(directory: Path, tag: str) -> Path | None:
    found = sorted(directory.glob(f"bench_*_{tag}.json"))
    return found[-1] if found else None


def pytest_section(out: Path) -> list[str]:
    path = out / "pytest-gpu.xml"
    if not path.is_file():
        return ["pytest: no junit XML (the step did not finish)."]
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    secs = sum(float(s.get("time", 0)) for s in suites)
    lines = [f"pytest -m gpu: {total['tests']} tests, {total['failures']} failed, {total['errors']} errors, "
             f"{total['skipped']} skipped in {secs:.0f}s."]
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            lines.append(f"  - FAILED {case.get('classname')}::{case.get('name')}")
    return lines


def sanitizer_section(out: Path) -> list[str]:
    lines = []
    for tool in ("memcheck", "racecheck", "synccheck"):
        log = out / "logs" / f"sanitizer-{tool}.log"
        if not log.is_file():
            lines.append(f"{tool}: no log.")
            continue
        text = log.read_text(errors="replace")
        summary = re.findall(r"ERROR SUMMARY: .*", text)
        checked = re.findall(r"sanitize_ops: .*", text)
        lines.append(f"{tool}: {summary[-1] if summary else 'no ERROR SUMMARY line'}"
                     + (f"; {checked[-1]}" if checked else ""))
    return lines


def kernels_section(out: Path) -> list[str]:
    found = sorted((out / "kernels").glob("kernels-*.json"))
    if not found:
        return ["bench/kernels.py: no results file."]
    data = _load(found[-1]) or {}
    rows = data.get("results", [])
    bad = [r for r in rows if not r.get("ok")]
    env = data.get("env", {})
    lines = [f"bench/kernels.py: {len(rows)} cases, {len(bad)} failed their correctness check; copy bandwidth "
             f"{env.get('copy_bandwidth_gbs')} GB/s; table in kernels/{found[-1].with_suffix('.md').name}."]
    lines += [f"  - FAILED {r['op']} {r.get('params')}: {r.get('check')}" for r in bad]
    return lines


def check_rows(data: dict | None) -> list[str]:
    if not data:
        return []
    return [f"{c.get('setting')}: {c.get('status')} (logit rel err {_fmt(c.get('logit_rel_err'), '.2e')})"
            for c in data.get("check", [])]


def e2e_section(out: Path) -> list[str]:
    on_path, off_path = _bench_file(out / "e2e", "kernels-on"), _bench_file(out / "e2e", "kernels-off")
    on, off = _load(on_path) if on_path else None, _load(off_path) if off_path else None
    if not on and not off:
        return ["end to end: no results file."]
    lines = []
    for name, data in (("kernels on", on), ("kernels off", off)):
        if data is None:
            lines.append(f"{name}: no results file.")
            continue
        env = data.get("env", {})
        lines.append(f"{name} (CUDA extension loaded: {env.get('extension_with_cuda')}): agreement check "
                     + ("; ".join(check_rows(data)) or "not run") + ".")
    off_rows = {r["setting"]: r for r in (off or {}).get("latency", [])}
    lines += ["", "| setting | LM prefill ms on / off | TTFT ms on / off | decode step ms on / off "
                  "| peak GiB on / off |", "|---|---|---|---|---|"]
    for r in (on or {}).get("latency", []):
        o = off_rows.get(r["setting"], {})

        def pair(key, sub="median"):  # timings are {median, min, max, runs}; memory {peak_gb, ...}
            a, b = (r.get(key) or {}).get(sub), (o.get(key) or {}).get(sub)
            return f"{_fmt(a, '.2f')} / {_fmt(b, '.2f')}"

        lines.append(f"| {r['setting']} | {pair('lm_prefill_ms')} | {pair('ttft_ms')} | {pair('decode_step_ms')} | "
                     f"{pair('memory', 'peak_gb')} |")
    return lines


def sweep_section(out: Path) -> list[str]:
    path = _bench_file(out / "sweep", "decode-sweep")
    data = _load(path) if path else None
    if not data:
        return ["decode sweep: no results file."]
    lines = ["agreement check: " + ("; ".join(check_rows(data)) or "not run") + ".",
             "largest batch within the memory cap: "
             + ", ".join(f"{k} {v}" for k, v in data.get("largest_batch", {}).items()) + ".", "",
             "| setting | batch | status | decode tok/s | step ms | peak GiB |", "|---|---:|---|---:|---:|---:|"]
    for r in data.get("sweep", []):
        lines.append(f"| {r.get('setting')} | {r.get('batch')} | {r.get('status')} | {_fmt(r.get('decode_tok_s'))} | "
                     f"{_fmt(r.get('decode_step_ms'), '.2f')} | {_fmt(r.get('peak_gb'), '.2f')} |")
    return lines


def accuracy_section(out: Path) -> list[str]:
    lines = []
    train = _load(out / "train" / "small_lvlm.json")
    if train:
        lines.append(f"train-small-lvlm: {train.get('steps')} steps in {train.get('train_seconds')} s, "
                     f"val accuracy {train.get('val_acc')}, final loss {train.get('final_loss')}.")
    else:
        lines.append("train-small-lvlm: no small_lvlm.json (the step did not finish).")
    stamps = sorted((out / "vip").glob("vip_K*/accuracy_vip.json"))
    for stamp in stamps:
        d = _load(stamp) or {}
        steps, secs = (d.get("args") or {}).get("steps"), d.get("seconds")
        per = secs / steps if steps and secs else None
        lines.append(f"VIP training {stamp.parent.name}: {steps} steps in {secs} s ({_fmt(per and per * 1e3)} ms/step "
                     f"incl. setup).")
    if not stamps:
        lines.append("VIP training: no accuracy_vip.json (the step did not finish).")
    found = sorted(out.glob("accuracy_*.json"))
    acc = _load(found[-1]) if found else None
    if acc:
        lines += ["", f"eval-accuracy: {acc.get('samples')} held-out samples in {acc.get('seconds')} s "
                      f"(GPU {acc.get('gpu')}); full table in {found[-1].with_suffix('.md').name}.", "",
                  "| row | accuracy | kept | retained |", "|---|---:|---:|---:|"]
        for r in acc.get("results", []):
            lines.append(f"| {r.get('key')} | {_fmt(r.get('accuracy'), '.3f')} | {_fmt(r.get('keep_ratio'), '.3f')} | "
                         f"{_fmt(r.get('retained'), '.3f')} |")
    else:
        lines.append("eval-accuracy: no accuracy_<preset>.json (the step did not finish).")
    return lines


SECTIONS = {
    "check": [("GPU tests", pytest_section), ("compute-sanitizer", sanitizer_section),
              ("Kernel benchmark", kernels_section), ("End to end, kernels on and off", e2e_section)],
    "decode_sweep": [("Decode throughput against batch size", sweep_section)],
    "accuracy": [("Accuracy retention", accuracy_section)],
}


# ---------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------


def _tsv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return list(csv.DictReader(path.read_text().splitlines(), delimiter="\t"))


def summary(out: Path, script: str) -> dict:
    prov = _load(out / "provenance.json") or {}
    plan = _tsv(out / "plan.tsv")
    steps = _tsv(out / "steps.tsv")
    dry = _load(out / "dryrun" / "report.json")
    slots = [p for p in plan if p["slot"] not in ("reserve", "total", "budget", "provenance")]
    extra = {p["slot"]: p["planned_s"] for p in plan if p["slot"] in ("provenance", "reserve", "total", "budget")}
    done_slots = {s["slot"] for s in steps}
    rows = list(steps) + [dict(slot=p["slot"], member=p["slot"], planned_s=p["planned_s"], timeout_s="", start_s="",
                               seconds="", rc="", status="dry run" if prov.get("dry_run") else "not reached")
                          for p in slots if p["slot"] not in done_slots]
    gpu = ", ".join(f"{g['name']} ({g['memory']}, driver {g['driver']}, sm {g['compute_capability']})"
                    for g in prov.get("gpus", [])) or "none found"
    if not prov:
        prov = dict(git_sha="unknown (no provenance.json)")
    md = [f"# bench/gpu/{script}.sh" + (" (dry run)" if prov.get("dry_run") else ""), "",
          f"git {prov.get('git_sha')}; GPU {gpu}; torch {prov.get('torch')} (CUDA {prov.get('cuda')}), "
          f"transformers {prov.get('transformers')}, Python {prov.get('python')}; {prov.get('cpus')} CPUs; "
          f"{prov.get('nvcc') or 'no nvcc'}; {prov.get('compute_sanitizer') or 'no compute-sanitizer'}; "
          f"started {prov.get('started_utc')}.", "",
          f"Time plan: {extra.get('total', '?')} s of a {extra.get('budget', '?')} s budget "
          f"(provenance {extra.get('provenance', '?')} s and a {extra.get('reserve', '?')} s reserve included).", "",
          "| step | slot | planned s | timeout s | started at s | took s | exit | status |",
          "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        md.append(f"| {r['member']} | {r['slot']} | {r['planned_s']} | {r['timeout_s']} | {r['start_s']} | "
                  f"{r['seconds']} | {r['rc']} | {r['status']} |")
    stopped = [r["member"] for r in rows if r["status"] in ("timeout", "no time")]
    if stopped:
        md += ["", "Stopped by the time limit: " + ", ".join(stopped) + "."]
    if dry:
        md += ["", f"Dry run: {len(dry['commands']) - dry['failed']} of {len(dry['commands'])} command lines pass "
                   "(details in dryrun/report.md)."]
    else:
        for title, section in SECTIONS.get(script, []):
            md += ["", f"## {title}", ""]
            try:
                md += section(out)
            except Exception as e:  # a partial or malformed file must not cost the summary
                md.append(f"could not read the results: {type(e).__name__}: {e}")
    result = dict(script=script, provenance=prov, plan=plan, steps=rows, stopped=stopped,
                  dry_run=dry)
    (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "summary.md").write_text("\n".join(md) + "\n")
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("provenance")
    p.add_argument("--out", required=True)
    p.add_argument("--script", required=True)
    p.add_argument("--budget", type=int, required=True)
    p.add_argument("--dry-run", type=int, default=0)
    s = sub.add_parser("summary")
    s.add_argument("--out", required=True)
    s.add_argument("--script", required=True)
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.what == "provenance":
        provenance(out, args.script, args.budget, bool(args.dry_run))
    else:
        summary(out, args.script)
    return 0


if __name__ == "__main__":
    sys.exit(main())
