"""What the report was measured on: the machine, the software versions, the commit."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine() -> dict:
    """The machine and software versions the report was measured on."""
    import torch
    import transformers
    import trl

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    except (ValueError, OSError):
        mem = float("nan")
    commit = git_commit(Path(__file__).resolve().parents[2])  # mirage_rl/results/machine.py -> the repository
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem, 1), "gpu": "none (CPU only)",
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl.__version__, "commit": commit}


def git_commit(repo: Path) -> str:
    """The checked-out commit (short), read from ``.git`` (no subprocess); empty outside a git clone."""
    try:
        head = (repo / ".git" / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            ref = head[5:]
            path = repo / ".git" / ref
            if path.exists():
                return path.read_text().strip()[:7]
            packed = (repo / ".git" / "packed-refs").read_text().splitlines()
            return next((line.split()[0][:7] for line in packed if line.endswith(" " + ref)), "")
        return head[:7]
    except OSError:
        return ""
