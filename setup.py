"""Builds token_prune's compiled operators, ``token_prune._C``.

Metadata lives in pyproject.toml; this file only describes the extension,
because that needs the installed torch (its headers, its CUDA version). Build
with the torch you will run against:

    pip install --no-build-isolation .        # or -e . for development

Build isolation would install some other torch into a throwaway environment
and compile against that. Environment switches:

    TOKEN_PRUNE_BUILD=auto|cuda|cpu   auto (default): CUDA if torch is a CUDA
                                      build and nvcc is found, else CPU only
    TOKEN_PRUNE_PTXAS_VERBOSE=1       print ptxas register/spill usage
    TORCH_CUDA_ARCH_LIST              defaults to "8.0;9.0" without a GPU
    CUDA_HOME                         found from nvcc on PATH when unset
    MAX_JOBS                          parallel compile jobs (ninja)
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCH_LIST = "8.0;9.0"

try:
    import torch
except ImportError:
    sys.exit(
        "token_prune: building needs PyTorch installed in this environment. "
        "Install torch first, then `pip install --no-build-isolation .` "
        "(an isolated build would compile against a different torch)."
    )


def _is_cuda_home(path: Path) -> bool:
    return (path / "bin" / "nvcc").is_file() and (
        path / "include" / "cuda_runtime.h"
    ).is_file()


def _nvcc_reported_home(nvcc: str) -> Path | None:
    # `nvcc` on PATH may be a wrapper script rather than a symlink; nvcc's dry
    # run names the directory the real binary lives in.
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "--version"],
            capture_output=True, text=True, timeout=60, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ _HERE_=(.+)$", out.stdout + out.stderr, re.M)
    return Path(match.group(1).strip()).parent if match else None


def find_cuda_home() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates: list[Path] = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(os.path.realpath(nvcc)).parent.parent)
        candidates.append(Path(nvcc).parent.parent)
        reported = _nvcc_reported_home(nvcc)
        if reported is not None:
            candidates.append(reported)
    candidates.append(Path("/usr/local/cuda"))
    for cand in candidates:
        if _is_cuda_home(cand):
            return str(cand.resolve())
    return None


def torch_cxx_standard() -> str:
    """The C++ standard torch's own headers are built for (c++17 at least)."""
    config = Path(torch.__file__).parent / "share/cmake/Torch/TorchConfig.cmake"
    try:
        match = re.search(r"CXX_STANDARD\s+(\d+)", config.read_text())
    except OSError:
        match = None
    return f"c++{max(17, int(match.group(1))) if match else 17}"


def site_dirs() -> list[Path]:
    dirs = [Path(torch.__file__).resolve().parent.parent]
    for key in ("purelib", "platlib"):
        dirs.append(Path(sysconfig.get_paths()[key]))
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def cuda_wheel_includes() -> list[str]:
    # CUDA torch wheels depend on nvidia-* wheels that hold the headers ATen's
    # CUDA headers include (cuBLAS, cuSPARSE, ...), which a bare toolkit may
    # lack.
    major = (torch.version.cuda or "").split(".")[0]
    found = []
    for d in site_dirs():
        inc = d / "nvidia" / f"cu{major}" / "include"
        if major and inc.is_dir() and str(inc) not in found:
            found.append(str(inc))
    return found


def cutlass_include() -> str | None:
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        inc = Path(loc) / "source" / "include"
        if (inc / "cutlass").is_dir():
            return str(inc)
    return None


def choose_mode() -> tuple[bool, str | None, str]:
    """(build CUDA kernels?, CUDA_HOME, why)."""
    mode = os.environ.get("TOKEN_PRUNE_BUILD", "auto").strip().lower() or "auto"
    if mode not in ("auto", "cuda", "cpu"):
        sys.exit(f"token_prune: TOKEN_PRUNE_BUILD must be auto, cuda or cpu, got {mode!r}")
    if mode == "cpu":
        return False, None, "TOKEN_PRUNE_BUILD=cpu"
    cuda_home = find_cuda_home() if torch.version.cuda else None
    if mode == "cuda":
        if not torch.version.cuda:
            sys.exit(
                f"token_prune: TOKEN_PRUNE_BUILD=cuda, but the installed torch "
                f"{torch.__version__} is a CPU-only build; a CUDA extension must "
                f"link against a CUDA build of torch."
            )
        if cuda_home is None:
            sys.exit(
                "token_prune: TOKEN_PRUNE_BUILD=cuda, but no CUDA toolkit was "
                "found (no nvcc on PATH, no /usr/local/cuda); set CUDA_HOME."
            )
    if not torch.version.cuda:
        return False, None, "torch is a CPU-only build"
    if cuda_home is None:
        return False, None, "torch is a CUDA build but no CUDA toolkit (nvcc) was found"
    return True, cuda_home, f"TOKEN_PRUNE_BUILD={mode}"


def build_extensions() -> tuple[list, dict]:
    with_cuda, cuda_home, why = choose_mode()
    if with_cuda:
        # torch.utils.cpp_extension reads CUDA_HOME once, at import.
        os.environ["CUDA_HOME"] = cuda_home
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # Without a visible GPU torch cannot infer the arch and fails.
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST

    from torch.utils import cpp_extension

    if with_cuda:
        cpp_extension.CUDA_HOME = cuda_home

    # Sources are given relative to the project root, as setuptools requires.
    os.chdir(ROOT)
    std = f"-std={torch_cxx_standard()}"
    sources = sorted(glob.glob("csrc/*.cpp"))
    cxx_flags = ["-O3", std]
    macros = [("TOKEN_PRUNE_WITH_CUDA", "1" if with_cuda else "0")]
    depends = sorted(glob.glob("csrc/*.h")) + sorted(glob.glob("csrc/*.cuh"))

    if not with_cuda:
        print(
            f"token_prune: building the CPU-only extension token_prune._C "
            f"({why}; torch {torch.__version__}, {std})",
            flush=True,
        )
        ext = cpp_extension.CppExtension(
            "token_prune._C",
            sources,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags},
            depends=depends,
        )
        return [ext], {"build_ext": cpp_extension.BuildExtension}

    sources += sorted(glob.glob("csrc/*.cu"))
    include_dirs = cuda_wheel_includes()
    cutlass = cutlass_include()
    if cutlass:
        include_dirs.append(cutlass)
    nvcc_flags = ["-O3", std, "--expt-relaxed-constexpr", "-lineinfo"]
    if os.environ.get("TOKEN_PRUNE_PTXAS_VERBOSE") == "1":
        nvcc_flags.append("-Xptxas=-v")
    print(
        f"token_prune: building the CUDA extension token_prune._C "
        f"(torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"CUDA_HOME={cuda_home}, "
        f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '<torch default>')}, "
        f"{std}, CUTLASS {'at ' + cutlass if cutlass else 'not installed'})",
        flush=True,
    )
    ext = cpp_extension.CUDAExtension(
        "token_prune._C",
        sources,
        include_dirs=include_dirs,
        define_macros=macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        depends=depends,
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = build_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
