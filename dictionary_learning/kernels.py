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
import tempfile
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels.cpp")
_state: dict = {}  # "ops": the loaded namespace or None, once tried
_lock = threading.Lock()


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


FLAGS = ["-O3", "-fopenmp"]  # OpenMP: the kernels run on torch's threads (its libgomp)


def _build():
    """Load the library built for this source, CPU, flags and torch; build it first if there is none."""
    try:  # already in this process (a second TORCH_LIBRARY for the namespace would abort it)
        torch.ops.sae_kernels.candidates  # noqa: B018
        return torch.ops.sae_kernels
    except (AttributeError, RuntimeError):
        pass
    march = os.environ.get("SAE_KERNELS_MARCH", "native")  # e.g. x86-64-v3 for a mixed cluster
    flags = [*FLAGS, f"-march={march}"]
    tag = f"{_cpu_tag()} {' '.join(flags)} {torch.__version__}"
    key = hashlib.sha256(SOURCE.read_bytes() + tag.encode()).hexdigest()
    name = f"sae_kernels_{key[:12]}"
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    lib = root / name / f"{name}.so"
    _state["build"] = f"{name} (-march={march})"
    try:  # built before: no need to import the builder (and setuptools)
        torch.ops.load_library(str(lib))
        return torch.ops.sae_kernels
    except OSError:  # none yet (or unreadable): build it
        pass
    from torch.utils.cpp_extension import load

    if not _ninja_on_path():
        raise RuntimeError("ninja not found (pip install ninja)")
    # Built in a fresh folder of its own, then renamed into place: processes that start at once
    # (torchrun) each build, none ever loads a half-written library, and a build killed half-way
    # leaves nothing that a later one would wait on.
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{name}.build-", dir=root))
    try:
        load(name, sources=[str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"], build_directory=str(tmp),
             is_python_module=False, verbose=False)  # fmt: skip
        lib.parent.mkdir(exist_ok=True)
        os.replace(tmp / lib.name, lib)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return torch.ops.sae_kernels


def _reason(e: Exception) -> str:
    """The line of a build failure that says what went wrong (the compiler's first error)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line.lower()]
    other = [line for line in lines if not line.startswith("ninja:")]
    return (errors[0] if errors else other[-1] if other else type(e).__name__)[:200]


def cpu_ops():
    """torch.ops.sae_kernels (candidates, decode_grad, bags, by_latent, remove_parallel,
    normalize_rows), built on first call; None when switched off (SAE_KERNELS=0) or when the build
    fails, with a one-line warning naming the reason."""
    with _lock:
        if "ops" not in _state:
            _state["ops"] = None
            if os.environ.get("SAE_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
                return None
            try:
                _state["ops"] = _build()
            except Exception as e:  # no compiler, no ninja, unsupported platform: torch ops instead
                warnings.warn(f"sae kernels: not built ({_reason(e)}); using torch ops (slower sparse step)",
                              RuntimeWarning, stacklevel=2)  # fmt: skip
        return _state["ops"]


def describe(device) -> str:
    """For a run's config.json: which path a training step on `device` takes (the bits depend on it)."""
    if torch.device(device).type != "cpu":
        return "not used (not a CPU run)"
    if cpu_ops() is None:
        return "off: torch ops (SAE_KERNELS=0, or the build failed)"
    return _state.get("build", "loaded")


def agree_across_ranks(all_gather) -> bool:
    """Data-parallel replicas must take the same path to stay bit-identical: the kernels only if every
    rank has them, else the torch ops on all. all_gather(value) -> every rank's value."""
    if all(all_gather(cpu_ops() is not None)):
        return True
    with _lock:
        _state["ops"] = None
    return False


def ops_for(*tensors: torch.Tensor):
    """The kernels if every tensor is a contiguous fp32 CPU tensor, else None (use torch ops)."""
    if all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors):
        return cpu_ops()
    return None
