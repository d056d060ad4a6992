"""Where a result came from: lctx's version and git revision, package versions, the device, the time.

Recorded in every run's manifest (and the version in every record), so a table can be traced to the code,
libraries and hardware that made it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch


def lctx_version() -> str:
    try:
        return importlib.metadata.version("lctx")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@functools.cache
def git_revision() -> dict[str, Any] | None:
    """The checkout's revision when first asked (a run's start): a long process keeps the code it imported even
    if the checkout moves on while it runs."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return {"revision": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "transformers", "tokenizers", "accelerate", "datasets", "numpy", "pandas",
                 "safetensors", "lm-eval"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_info(device: torch.device | None) -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "host": platform.node(),
                            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(type="cuda", name=props.name, total_memory_bytes=props.total_memory,
                    capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                    device_count=torch.cuda.device_count())
    else:
        name = platform.processor()
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        info.update(type="cpu", name=name)
    return info


def now() -> str:
    """UTC time with milliseconds: orders records (a --force rewrite is newer than what it replaces)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
