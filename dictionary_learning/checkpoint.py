"""Exact-resume checkpoints: atomic folder writes, a trainer's full state, the global RNGs, and the
position of the training data stream.

checkpoints/latest/ of a run (written by save_checkpoint, read by read_checkpoint):
  trainer.safetensors   trainer.state_dict()["tensors"] (model, optimizer, dead-latent counters, ...)
  data_state.json       DataStream.state_dict(): the data object's state_dict() (+ batches to skip) or a
                        count of consumed batches (plain iterators are fast-forwarded)
  meta.json             {"trainer": trainer meta, "loop": step, tokens, norm factor, log accumulators,
                        RNGs, ...}; written last
The folder is written beside and swapped in (utils.write_dir_atomic), so a kill leaves `latest` or
`latest.old` complete; read_checkpoint checks every file and key, and falls back to `.old` or stops.
Also here: the final save (beside, then moved in) and what a resume tidies in a run folder (the log
past the checkpoint, the temporaries of a killed run).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import shutil
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .dictionary import WEIGHTS_FILE
from .utils import DataExhausted, NoSpaceError, atomic_path, disk_full, read_json, write_dir_atomic

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- folders, trainer state, RNGs


def save_checkpoint(path: Path, trainer, loop: dict, data_state: dict) -> None:
    """Full state of one trainer at `loop['step']` completed steps into folder `path` (atomic)."""
    state = trainer.state_dict()
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state["tensors"].items()}
    meta = state["meta"]

    def write(tmp: Path) -> None:
        save_file(tensors, tmp / "trainer.safetensors")
        (tmp / "data_state.json").write_text(json.dumps(data_state))
        (tmp / "meta.json").write_text(json.dumps({"trainer": meta, "loop": loop}, indent=1))  # last

    write_dir_atomic(path, write)


def save_final(run_dir: Path, trainer, cfg: dict) -> None:
    """The final SAE (trainer.save with config `cfg`) into run_dir: written into `.final.tmp-PID` beside
    the other files, then moved in. On an error the temporary folder is removed (a full disk:
    NoSpaceError naming the weights file)."""
    tmp = run_dir / f".final.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        trainer.save(tmp, extra_cfg=cfg)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise (NoSpaceError(run_dir / WEIGHTS_FILE) if disk_full(e) else e) from e
    for f in tmp.iterdir():
        os.replace(f, run_dir / f.name)
    tmp.rmdir()


class CheckpointError(ValueError):
    """A checkpoint folder is damaged (missing file, truncated tensors, missing key) and no complete
    `.old` is there to fall back to; str() is one line naming the file."""


# keys trainSAE reads back: the trainer's (JumpReluTrainer.load_state_dict) and the loop's
TRAINER_META_KEYS = ("format", "config", "step", "tokens_seen")
LOOP_KEYS = ("step", "tokens", "norm_factor", "acc", "last", "rng", "wandb_id")
TRAINER_TENSORS = ("tokens_since_fired", "rng.generator")


def _load_checkpoint_dir(p: Path) -> tuple[dict, dict, dict, dict]:
    """One checkpoint folder, fully checked; CheckpointError (naming the file) when it is not complete."""
    if not p.is_dir():
        raise CheckpointError(f"{p}: not a folder")
    try:
        meta, data_state = read_json(p / "meta.json"), read_json(p / "data_state.json")
    except (OSError, ValueError) as e:
        raise CheckpointError(str(e)) from None
    for part, keys in (("trainer", TRAINER_META_KEYS), ("loop", LOOP_KEYS)):
        if not isinstance(meta, dict) or not isinstance(meta.get(part), dict):
            raise CheckpointError(f"{p / 'meta.json'}: missing key {part!r}")
        missing = [f"{part}.{k}" for k in keys if k not in meta[part]]
        if missing:
            raise CheckpointError(f"{p / 'meta.json'}: missing key {missing[0]!r}")
    if not isinstance(data_state, dict) or "kind" not in data_state:
        raise CheckpointError(f"{p / 'data_state.json'}: missing key 'kind'")
    try:
        tensors = load_file(p / "trainer.safetensors")
    except Exception as e:  # noqa: BLE001 - missing, truncated, not safetensors: one line naming the file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{p / 'trainer.safetensors'}: unreadable ({first})") from None
    missing = [k for k in TRAINER_TENSORS if k not in tensors]
    if missing:
        raise CheckpointError(f"{p / 'trainer.safetensors'}: missing tensor {missing[0]!r}")
    return tensors, meta["trainer"], meta["loop"], data_state


def read_checkpoint(path: Path) -> tuple[dict, dict, dict, dict] | None:
    """(trainer tensors, trainer meta, loop state, data state) from `path`, else from `path.old`; None
    when neither folder exists (no checkpoint yet).

    A damaged `path` (a file missing, truncated tensors, a key missing) is never read as "no checkpoint":
    with a complete `path.old` beside it, it is moved to `path.damaged` (so that the next
    write_dir_atomic cannot delete the good `.old` first) and `.old` is returned; without one,
    CheckpointError. Nothing is overwritten or deleted."""
    path = Path(path)
    old = path.with_name(path.name + ".old")
    if not path.exists() and not old.is_dir():
        return None
    try:
        return _load_checkpoint_dir(path) if path.exists() else _load_checkpoint_dir(old)
    except CheckpointError as e:
        damaged = e
    if not path.exists():  # only .old, and it is damaged
        raise CheckpointError(f"{damaged}; cannot resume: start again with overwrite=True")
    try:
        ck = _load_checkpoint_dir(old) if old.is_dir() else None
    except CheckpointError:
        ck = None
    if ck is None:
        raise CheckpointError(
            f"{damaged}; cannot resume, and there is no complete {old.name} to fall back to: "
            "start again with overwrite=True (the checkpoint is left as it is)"
        )
    aside = path.with_name(path.name + ".damaged")
    shutil.rmtree(aside, ignore_errors=True)
    os.rename(path, aside)
    log.warning("%s; resuming from %s (step %s); the damaged folder is kept as %s", damaged, old,
                ck[2]["step"], aside.name)  # fmt: skip
    return ck


def truncate_log(path: Path, step: int) -> None:
    """Drop the lines of a training_log.jsonl past `step` (written after the checkpoint we resume from)."""
    if not path.exists():
        return
    keep = []
    for ln in path.read_text().splitlines():
        try:
            if json.loads(ln)["step"] <= step:
                keep.append(ln)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut by a kill: always written after the checkpoint
    with atomic_path(path) as tmp:
        tmp.write_text("".join(ln + "\n" for ln in keep))


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Remove the `*.tmp-PID` files and folders in run_dir and run_dir/checkpoints (a killed run's
    `.final.tmp-PID`, `latest.tmp-PID`, `step_*.tmp-PID`) whose process is gone, or is this one (which
    has written nothing there yet). Call it holding the run folder's lock. Returns what was removed."""
    removed = []
    for p in sorted([*run_dir.glob("*.tmp-*"), *run_dir.glob("checkpoints/*.tmp-*")]):
        pid = p.name.rpartition(".tmp-")[2]
        if not pid.isdigit() or (int(pid) != os.getpid() and _running(int(pid))):
            continue
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        removed.append(p)
    if removed:
        log.info("%s: removed temporaries left by a killed run: %s", run_dir,
                 ", ".join(str(p.relative_to(run_dir)) for p in removed))  # fmt: skip
    return removed


def _running(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there: keep the temporaries
        return True
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def rng_state() -> dict:
    """The global torch (CPU, and CUDA once initialised) and Python RNG states, JSON-able."""
    st = {"torch": torch.get_rng_state().tolist(), "python": list(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return st


def set_rng_state(st: dict) -> None:
    """Restore the RNG states rng_state() returned."""
    torch.set_rng_state(torch.tensor(st["torch"], dtype=torch.uint8))
    v, inner, gauss = st["python"]
    random.setstate((v, tuple(inner), gauss))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in st["cuda"]])


# ---------------------------------------------------------------------------- data stream


class DataStream:
    """The data iterator plus a look-ahead queue (the norm-estimate batches), counting the batches
    handed out so that its position can be saved and restored exactly."""

    def __init__(self, data):
        self.data = data
        self.stateful = all(callable(getattr(data, a, None)) for a in ("state_dict", "load_state_dict"))
        self._it: Iterator | None = None
        self.queue: deque = deque()
        self.consumed = 0  # batches handed to the training loop
        self.anchor: tuple[dict, int] | None = None  # data state before the queued batches were pulled

    def _pull(self):
        if self._it is None:
            self._it = iter(self.data)
        return next(self._it)

    def prefetch(self, n: int) -> list[torch.Tensor]:
        if self.stateful and not self.queue:
            self.anchor = (copy.deepcopy(self.data.state_dict()), self.consumed)
        while len(self.queue) < n:
            self.queue.append(self._pull())
        return list(self.queue)

    def __next__(self) -> torch.Tensor:
        x = self.queue.popleft() if self.queue else self._pull()
        self.consumed += 1
        return x

    def state_dict(self) -> dict:
        if not self.stateful:
            return {"kind": "skip", "consumed": self.consumed}
        # with batches queued, the data object is ahead of us: save the anchor plus a skip count
        state, at = self.anchor if self.queue else (self.data.state_dict(), self.consumed)
        return {"kind": "state_dict", "state": state, "skip": self.consumed - at, "consumed": self.consumed}

    def load_state_dict(self, st: dict) -> None:
        if st["kind"] == "state_dict":
            if not self.stateful:
                raise ValueError("checkpoint data_state.json needs a data object with load_state_dict()")
            self.data.load_state_dict(st["state"])
            skip = st["skip"]
        else:
            skip = st["consumed"]
            log.info("data has no state_dict(): fast-forwarding %d consumed batches", skip)
        for i in range(skip):
            try:
                self._pull()
            except (StopIteration, DataExhausted):
                raise DataExhausted(
                    message=f"resume: data ran out while skipping batch {i} of {skip}"
                ) from None
        self.consumed = st["consumed"]
