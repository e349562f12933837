"""Where a result came from: every benchmark's JSON records the commit, the command line, the card and the
library versions, written by `write_result`, so a figure in the README can be traced to the run behind it."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata

_VERSIONED = ("torch", "triton", "transformers", "ray", "xgrammar", "vllm")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def commit() -> str:
    """ZIPSERVE_COMMIT when set (a tree copied to the GPU machine may carry another .git), else git's HEAD."""
    if os.environ.get("ZIPSERVE_COMMIT"):
        return os.environ["ZIPSERVE_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=_ROOT).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head = ""
    return head or "unknown"


def command(argv: list[str] | None = None) -> str:
    """The command line as a user would type it: `python -m benchmarks.x ...` for a module run with -m."""
    argv = list(sys.argv if argv is None else argv)
    prog = argv[0] if argv else ""
    if prog.endswith(".py") and os.path.abspath(prog).startswith(_ROOT + os.sep):
        rel = os.path.relpath(os.path.abspath(prog), _ROOT).removesuffix(".py")
        prog = "python -m " + rel.replace(os.sep, ".")
    return " ".join([prog, *argv[1:]])


def card() -> str:
    """The accelerator the run used, or the CPU when there is none."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return "cpu: " + (platform.processor() or platform.machine())


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def provenance(argv: list[str] | None = None) -> dict:
    return {"commit": commit(), "command": command(argv), "card": card(), "versions": versions(),
            "written": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def write_result(path: str, res: dict, indent: int = 1) -> None:
    """Write a result JSON with its provenance; keys the benchmark set itself (e.g. a merge's command) win."""
    with open(path, "w") as f:
        json.dump({**provenance(), **res}, f, indent=indent)
