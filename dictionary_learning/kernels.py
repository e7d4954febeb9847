"""Fused CPU kernels for the sparse training step (kernels.cpp), compiled once per machine with the
system C++ compiler through torch.utils.cpp_extension (~10 s; kept under TORCH_EXTENSIONS_DIR,
default ~/.cache/torch_extensions, and loaded from there afterwards). grads.py has the same math in
torch ops and uses it wherever these are not available: on GPUs, without a compiler or ninja, or
with SAE_KERNELS=0. They are compiled for this CPU (-march=native; SAE_KERNELS_MARCH=x86-64-v3, say,
for another target).

    ops = kernels.cpu_ops()        # torch.ops.sae_kernels, or None (a warning says why, once)
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels.cpp")
_state: dict = {}  # "ops": the loaded namespace or None, once tried


def _cpu_tag() -> str:
    """What -march=native compiles for: the CPU's feature flags (a shared cache must not hand one
    machine's build to another)."""
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line for line in fh if line.startswith(("flags", "Features"))), platform.processor())
    except OSError:
        return platform.machine() + platform.processor()


def _ninja_on_path() -> bool:
    """torch's extension builder runs `ninja`; use the pip package's binary when none is on PATH."""
    if shutil.which("ninja"):
        return True
    try:
        import ninja  # the PyPI wheel (requirements.txt)

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        return False
    return shutil.which("ninja") is not None


def _build():
    """Load the library built for this source, CPU and torch; build it first if there is none."""
    march = os.environ.get("SAE_KERNELS_MARCH", "native")  # e.g. x86-64-v3 for a mixed cluster
    tag = f"{_cpu_tag()} {march} {torch.__version__}"
    key = hashlib.sha256(SOURCE.read_bytes() + tag.encode()).hexdigest()
    name = f"sae_kernels_{key[:12]}"
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    build_dir = Path(root) / name
    try:  # built before: skip importing the builder (and setuptools) altogether
        torch.ops.load_library(str(build_dir / f"{name}.so"))
        return torch.ops.sae_kernels
    except OSError:
        pass
    from torch.utils.cpp_extension import load

    if not _ninja_on_path():
        raise RuntimeError("ninja not found (pip install ninja)")
    # Built in a folder of this process's own, then renamed into place: processes that start at once
    # (torchrun) each build, and none ever loads a half-written library.
    tmp = Path(root) / f"{name}.build-{os.getpid()}"
    flags = ["-O3", f"-march={march}", "-fopenmp"]  # OpenMP: the kernels run on torch's threads
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        load(name, sources=[str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"], build_directory=str(tmp),
             is_python_module=False, verbose=False)  # fmt: skip
        build_dir.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / f"{name}.so", build_dir / f"{name}.so")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return torch.ops.sae_kernels


def cpu_ops():
    """torch.ops.sae_kernels (candidates, decode_grad, by_latent), built on first call; None when disabled
    (SAE_KERNELS=0) or the build fails, with a one-line warning naming the reason."""
    if "ops" not in _state:
        _state["ops"] = None
        if os.environ.get("SAE_KERNELS", "1") == "0":
            return None
        try:
            _state["ops"] = _build()
        except Exception as e:  # no compiler, no ninja, unsupported platform: torch ops instead
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            warnings.warn(f"sae kernels: not built ({reason[:200]}); using torch ops (slower sparse step)",
                          RuntimeWarning, stacklevel=2)  # fmt: skip
    return _state["ops"]


def ops_for(*tensors: torch.Tensor):
    """The kernels if every tensor is a contiguous fp32 CPU tensor, else None (use torch ops)."""
    if all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors):
        return cpu_ops()
    return None
