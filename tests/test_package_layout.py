"""What a reviewer checks about the package's shape: no import circle, no module over about 800
lines, family knowledge only in ``token_prune/models/``, and ``import token_prune`` stays light."""

from __future__ import annotations

import ast
import io
import pathlib
import subprocess
import sys
import tokenize

from token_prune.methods import METHODS
from token_prune.models import ADAPTERS

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "token_prune"
MAX_LINES = 800


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _top_level_imports(path: pathlib.Path, name: str, known: set[str]) -> set[str]:
    """token_prune modules imported when ``name`` is imported (module level, not under
    ``if TYPE_CHECKING``; imports inside functions run later and cannot form a circle at import)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()

    def resolve(base: str, names: list[str]):
        subs = [n for n in names if f"{base}.{n}" in known]
        out.update(f"{base}.{n}" for n in subs)
        # `from pkg import submodule` only needs pkg to exist (it is initialising already when
        # pkg is an ancestor); importing any other name needs pkg's __init__ to have run.
        if base in known and (len(subs) < len(names) or not names):
            out.add(base)

    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("token_prune"):
                    resolve(a.name, [])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = f"{base}.{node.module}" if node.module else base
            elif (node.module or "").startswith("token_prune"):
                base = node.module
            else:
                continue
            resolve(base, [a.name for a in node.names])
    out.discard(name)
    return out


def test_no_import_circle():
    mods = _modules()
    graph = {m: _top_level_imports(p, m, set(mods)) for m, p in mods.items()}
    # A package importing its own submodules (re-exports) is how packages work; the circle that
    # breaks imports is a submodule importing back into a module that is still initialising.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_circle_check_can_fail(tmp_path, monkeypatch):
    pkg = tmp_path / "token_prune"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("from .a import x\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PKG", pkg)
    try:
        test_no_import_circle()
    except AssertionError as e:
        assert "token_prune.a -> token_prune.b -> token_prune.a" in str(e)
    else:
        raise AssertionError("the circle a -> b -> a was not found")


def test_no_module_is_too_long():
    long = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def _code_strings(path: pathlib.Path) -> list[tuple[int, str]]:
    out = []
    for t in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if t.type == tokenize.STRING and not t.string.startswith(('"""', "'''", 'r"""', 'f"""')):
            try:
                out.append((t.start[0], ast.literal_eval(t.string)))
            except (ValueError, SyntaxError):  # f-strings
                pass
    return out


def test_family_knowledge_lives_in_the_adapters():
    """No module outside models/ names a family (by its model_type or HF class) in code."""
    names = set(ADAPTERS) | {cls.hf_model_class for cls in ADAPTERS.values()}
    offenders = []
    for m, p in _modules().items():
        if m.startswith("token_prune.models"):
            continue
        for line, s in _code_strings(p):
            if s in names:
                offenders.append(f"{p.relative_to(ROOT)}:{line} {s!r}")
    assert not offenders, "family names outside token_prune/models/:\n" + "\n".join(offenders)


def test_every_method_is_registered_once_and_named_by_its_class():
    assert all(cls.name == name for name, cls in METHODS.items())


def test_importing_the_package_stays_light():
    code = ("import sys, token_prune; heavy = sorted(m for m in sys.modules if m.startswith("
            "('token_prune.train', 'token_prune.bench', 'token_prune.eval', 'token_prune.alvts_calibration', "
            "'token_prune.data', 'matplotlib'))); print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout
