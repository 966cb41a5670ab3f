"""Checks the command lines of a bench/gpu script without running them (its --dry-run mode).

    python bench/gpu/dryrun.py --repo . --out OUT/dryrun OUT/dryrun/commands

``bench/gpu/lib.sh`` writes one file per command (NUL-separated: slot, member, argv) and calls
this once. For each command:

* wrappers (``env VAR=...``, ``nice``) are peeled off and ``compute-sanitizer``'s options are
  checked against the ones it documents (tool names, ``--kernel-name kns=...``, integers);
* ``python -m token_prune.bench ...`` is parsed by its own argparse parser and then run with
  ``--cost-only`` (on the CPU, no model is built), which resolves the preset, every
  ``--setting`` and every option the way the real run does; the option names of every setting
  (the preset's too) must be parameters of the method's constructor;
* ``python -m token_prune <command> ...`` and Python scripts (``bench/kernels.py``, ...) are
  parsed by their own argparse parsers: the entry point runs until it calls ``parse_args``,
  which stops it after a successful parse, so an unknown option, a bad choice or a bad value
  fails here;
* ``python -m pytest ...`` is run with ``--collect-only`` and must collect at least one test;
* ``python setup.py build_ext --inplace`` must name the project's setup.py and only options
  it takes;
* every argument that names a file of the repository (``tests/...``, ``bench/...``) must exist;
* other programs must be on PATH, except the GPU machine's own tools (``nvidia-smi``,
  ``compute-sanitizer``), which are only reported when missing here.

Writes ``report.json`` and ``report.md`` into ``--out``; exits 1 if any command fails.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

GPU_MACHINE_TOOLS = {"nvidia-smi", "compute-sanitizer", "ncu", "nsys"}
SANITIZER_OPTIONS = {
    "--tool": {"memcheck", "racecheck", "synccheck", "initcheck"},
    "--kernel-name": re.compile(r"^(kns|kne|regex)=.+$"),
    "--kernel-name-exclude": re.compile(r"^(kns|kne|regex)=.+$"),
    "--error-exitcode": re.compile(r"^\d+$"),
    "--print-limit": re.compile(r"^\d+$"),
    "--launch-timeout": re.compile(r"^\d+$"),
    "--racecheck-report": {"hazard", "analysis", "all"},
    "--leak-check": {"full", "no"},
    "--check-api-memory-access": {"yes", "no"},
    "--target-processes": {"all", "application-only"},
    "--show-backtrace": {"yes", "no", "host", "device"},
    "--log-file": re.compile(r"^.+$"),
}
SETUP_BUILD_OPTIONS = {"build_ext", "--inplace", "-i", "--force", "-f"}
REPO_PATH = re.compile(r"^(tests|bench|token_prune|csrc|scripts|\.ci)/[\w./-]*$")


class CommandError(Exception):
    pass


# ---------------------------------------------------------------------------
# argparse without running the entry point
# ---------------------------------------------------------------------------


class _Parsed(Exception):
    def __init__(self, namespace):
        super().__init__("parsed")
        self.namespace = namespace


@contextlib.contextmanager
def _stop_after_parsing():
    original = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    argparse.ArgumentParser.parse_args = parse_args
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = original


def _run_entry(kind: str, target: str, args: list[str], parse_only: bool) -> tuple[object, str]:
    """Runs ``python -m target args`` (kind "module") or ``python target args`` (kind "path") in
    this process; with ``parse_only`` it stops at the first successful ``parse_args``.
    Returns (namespace or exit code, captured output)."""
    saved_argv = sys.argv
    sys.argv = [target, *args]
    out = io.StringIO()
    try:
        with contextlib.ExitStack() as stack:
            if parse_only:
                stack.enter_context(_stop_after_parsing())
            stack.enter_context(contextlib.redirect_stdout(out))
            stack.enter_context(contextlib.redirect_stderr(out))
            stack.enter_context(warnings.catch_warnings())
            warnings.simplefilter("ignore")
            if kind == "module":
                runpy.run_module(target, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(target, run_name="__main__")
    except _Parsed as parsed:
        return parsed.namespace, out.getvalue()
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        return code, out.getvalue()
    finally:
        sys.argv = saved_argv
    return 0, out.getvalue()


def check_argparse(kind: str, target: str, args: list[str]) -> str:
    result, output = _run_entry(kind, target, args, parse_only=True)
    if isinstance(result, argparse.Namespace):
        return f"argparse accepts the options ({len(vars(result))} fields)"
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    raise CommandError(f"{target}: the arguments do not parse (exit {result}): "
                       + (lines[-1] if lines else "no message"))


# ---------------------------------------------------------------------------
# per program
# ---------------------------------------------------------------------------


def check_bench(args: list[str], scratch: Path) -> list[str]:
    notes = [check_argparse("module", "token_prune.bench", args)]
    cost_dir = scratch / "bench-cost-only"
    result, output = _run_entry("module", "token_prune.bench", [*args, "--cost-only", "--out-dir", str(cost_dir)],
                                parse_only=False)
    written = sorted(cost_dir.glob("*.json"))
    if result != 0 or not written:
        lines = [ln for ln in output.strip().splitlines() if ln.strip()]
        raise CommandError(f"token_prune.bench --cost-only with these options fails (exit {result}): "
                           + (lines[-1] if lines else "no message"))
    data = json.loads(written[-1].read_text())
    phases = data["settings"].get("phases")
    labels = [row["setting"] for row in data.get("latency", [])]
    notes.append(f"--cost-only resolves phases {phases}, settings {labels}")
    specs = list(data["settings"].get("settings") or []) + list(data["settings"].get("sweep_settings") or [])
    notes.append(check_setting_options(specs))
    if "sweep" in (phases or []):
        notes.append(f"sweep settings {data['settings'].get('sweep_settings')}, batches "
                     f"{data['settings'].get('sweep_batches')}, memory cap {data['settings'].get('mem_cap_gb')} GB")
    return notes


def check_setting_options(specs: list[str]) -> str:
    """The option names of ``method:key=value,...`` settings against the method's constructor (the
    benchmark passes them to ``token_prune.patch`` only on the GPU, where a typo would cost the run)."""
    import inspect

    from token_prune.methods import method_class

    for spec in specs:
        method, _, rest = spec.partition(":")
        if method.strip() in ("none", "unpatched"):
            continue
        params = inspect.signature(method_class(method.strip()).__init__).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            continue
        known = set(params) - {"self", "adapter"}
        unknown = [item.split("=")[0].strip() for item in rest.split(",")
                   if item.strip() and item.split("=")[0].strip() not in known]
        if unknown:
            raise CommandError(f"setting {spec!r}: {method} takes no option {', '.join(unknown)} "
                               f"(it takes {', '.join(sorted(known))})")
    return f"the options of {len(specs)} settings are the methods' own"


def check_pytest(args: list[str], repo: Path, scratch: Path, env: dict) -> list[str]:
    cmd = [sys.executable, "-m", "pytest"]
    for a in args:
        if a.startswith("--junitxml="):
            a = f"--junitxml={scratch / 'junit-collect.xml'}"
        cmd.append(a)
    cmd += ["--collect-only", "-p", "no:cacheprovider"]
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    tail = (done.stdout + done.stderr).strip().splitlines()
    # "-q" prints "N/M tests collected (K deselected)", "-qq" one "path: N" line per file.
    match = re.search(r"(\d+)(?:/\d+)? tests? collected", done.stdout)
    count = int(match.group(1)) if match else sum(int(n) for n in re.findall(r"^\S+\.py: (\d+)$", done.stdout, re.M))
    if done.returncode != 0 or count == 0:
        raise CommandError(f"pytest --collect-only exits {done.returncode} with {count} tests: "
                           + (tail[-1] if tail else ""))
    return [f"pytest collects {count} tests with these options"]


def check_setup(args: list[str], repo: Path) -> list[str]:
    if not args or Path(args[0]).name != "setup.py" or not (repo / args[0]).is_file():
        raise CommandError(f"expected the project's setup.py, got {args[:1]}")
    unknown = [a for a in args[1:] if a not in SETUP_BUILD_OPTIONS]
    if unknown or "build_ext" not in args[1:]:
        raise CommandError(f"setup.py: expected build_ext [--inplace], got {args[1:]}")
    return ["setup.py build_ext: known command and options"]


def check_python(argv: list[str], repo: Path, scratch: Path, env: dict) -> list[str]:
    args = argv[1:]
    while args and args[0] in ("-u", "-B", "-O"):
        args = args[1:]
    if not args:
        raise CommandError("python without a module or script")
    if args[0] == "-m":
        if len(args) < 2:
            raise CommandError("python -m without a module")
        module, rest = args[1], args[2:]
        if module == "token_prune.bench":
            return check_bench(rest, scratch)
        if module == "pytest":
            return check_pytest(rest, repo, scratch, env)
        if module.split(".")[0] == "token_prune":
            return [check_argparse("module", module, rest)]
        raise CommandError(f"python -m {module}: no check for this module")
    script, rest = args[0], args[1:]
    if script.startswith("-"):
        raise CommandError(f"python {script}: only -m MODULE or a script file are used")
    if not (repo / script).is_file():
        raise CommandError(f"python {script}: no such file in the repository")
    if Path(script).name == "setup.py":
        return check_setup(args, repo)
    return [check_argparse("path", str(repo / script), rest)]


def check_sanitizer(argv: list[str]) -> tuple[list[str], list[str]]:
    """Checks compute-sanitizer's options; returns (notes, the program it runs)."""
    notes = []
    i = 1
    while i < len(argv) and argv[i].startswith("-"):
        name, value = argv[i], None
        if "=" in name:
            name, value = name.split("=", 1)
        allowed = SANITIZER_OPTIONS.get(name)
        if allowed is None:
            raise CommandError(f"compute-sanitizer: unknown option {name}")
        if value is None:
            if i + 1 >= len(argv):
                raise CommandError(f"compute-sanitizer: {name} needs a value")
            value = argv[i + 1]
            i += 1
        ok = value in allowed if isinstance(allowed, set) else bool(allowed.match(value))
        if not ok:
            raise CommandError(f"compute-sanitizer: bad value {value!r} for {name}")
        notes.append(f"{name} {value}")
        i += 1
    if shutil.which(argv[0]) is None and not Path(argv[0]).is_file():
        notes.append(f"({argv[0]} is not installed here; it is on the GPU machine)")
    return ["compute-sanitizer " + " ".join(notes)], argv[i:]


def check_files(argv: list[str], repo: Path) -> None:
    for a in argv:
        value = a.split("=", 1)[1] if a.startswith("--") and "=" in a else a
        if REPO_PATH.match(value) and not (repo / value).exists():
            raise CommandError(f"{value}: no such file or directory in the repository")


@contextlib.contextmanager
def _environment(extra: dict):
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield dict(os.environ)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_command(argv: list[str], repo: Path, scratch: Path, python: str) -> list[str]:
    if not argv:
        raise CommandError("empty command")
    check_files(argv, repo)
    notes, extra_env = [], {}
    while argv:
        prog = Path(argv[0]).name
        if prog == "env":
            argv = argv[1:]
            while argv and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0]):
                name, value = argv[0].split("=", 1)
                extra_env[name] = value
                notes.append(f"env {argv[0]}")
                argv = argv[1:]
        elif prog == "nice":
            argv = argv[3:] if len(argv) > 2 and argv[1] == "-n" else argv[1:]
        elif prog == "compute-sanitizer":
            more, argv = check_sanitizer(argv)
            notes += more
        else:
            break
    if not argv:
        raise CommandError("a wrapper without a command")
    prog = Path(argv[0]).name
    if argv[0] == python or re.match(r"^python[\d.]*$", prog):
        scratch.mkdir(parents=True, exist_ok=True)
        with _environment(extra_env) as env:  # the command's own environment, for what it imports
            return notes + check_python(argv, repo, scratch, env)
    if prog == "bash":
        if len(argv) < 2 or not (repo / argv[1]).is_file():
            raise CommandError(f"bash {argv[1:2]}: no such script in the repository")
        return notes + [f"bash {argv[1]}: script exists"]
    if shutil.which(argv[0]) is None:
        if prog in GPU_MACHINE_TOOLS:
            return notes + [f"{prog} is not installed here; it is on the GPU machine"]
        raise CommandError(f"{argv[0]}: no such program")
    return notes + [f"{prog}: on PATH"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("commands", help="directory of command files written by bench/gpu/lib.sh")
    ap.add_argument("--repo", default=".", help="repository root")
    ap.add_argument("--out", required=True, help="where report.json / report.md and scratch files go")
    ap.add_argument("--python", default=os.environ.get("PYTHON", "python"), help="the scripts' interpreter")
    args = ap.parse_args(argv)
    repo, out = Path(args.repo).resolve(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(repo)
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    rows, failed = [], 0
    for path in sorted(Path(args.commands).iterdir()):
        slot, member, *command = path.read_bytes().decode().split("\0")[:-1]
        t0 = time.perf_counter()
        try:
            notes = check_command(command, repo, out / "scratch" / member, args.python)
            status = "ok"
        except CommandError as e:
            notes, status = [str(e)], "FAILED"
            failed += 1
        except Exception as e:  # a check that crashes is a failed check, not a crashed dry run
            notes, status = [f"{type(e).__name__}: {e}"], "FAILED"
            failed += 1
        rows.append(dict(slot=slot, member=member, command=command, status=status, notes=notes,
                         seconds=round(time.perf_counter() - t0, 1)))
        print(f"[dry run] {status:<6} {member}: {' '.join(command)}", flush=True)
        for note in notes:
            print(f"           {note}", flush=True)
    (out / "report.json").write_text(json.dumps(dict(commands=rows, failed=failed), indent=2) + "\n")
    lines = ["# Dry run of the command lines", "", "| step | status | command | checked |", "|---|---|---|---|"]
    for r in rows:
        cmd = " ".join(r["command"]).replace("|", "\\|")
        lines.append(f"| {r['member']} | {r['status']} | `{cmd}` | {'; '.join(r['notes']).replace('|', '/')} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print(f"[dry run] {len(rows) - failed} of {len(rows)} command lines pass")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
