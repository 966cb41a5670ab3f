"""Provenance of a result: git sha and state, versions of everything, the device.

Benchmarks, the accuracy harness and the training benchmark record it beside their numbers.
"""

from __future__ import annotations

import os
import platform
import subprocess

import torch

from . import nvtx


def git_info() -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sha, dirty = os.environ.get("TOKEN_PRUNE_GIT_SHA"), None
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            sha = out.stdout.strip()
            st = subprocess.run(
                ["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            dirty = bool(st.stdout.strip()) if st.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"git_sha": sha or "unknown", "git_dirty": dirty}


def environment(device: torch.device | None) -> dict:
    import transformers

    from . import __version__, _ops

    env = {
        "device": device.type if device is not None else "none",
        "gpu": "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "token_prune": __version__,
        "extension_loaded": _ops.EXTENSION_LOADED,
        "extension_with_cuda": _ops.EXTENSION_WITH_CUDA,
        "nvtx": nvtx.enabled(),
        "cpu_threads": torch.get_num_threads(),
        **git_info(),
    }
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=torch.cuda.get_device_name(device),
            gpu_memory_gb=props.total_memory / (1 << 30),
            gpu_capability=f"{props.major}.{props.minor}",
            gpu_count=torch.cuda.device_count(),
        )
    return env
