"""Exact-resume checkpoints: atomic folder writes, a trainer's full state, the global RNGs, and the
position of the training data stream.

checkpoints/latest/ of a run (written by save_checkpoint, read by read_checkpoint):
  trainer.safetensors   trainer.state_dict()["tensors"] (model, optimizer, dead-latent counters, ...)
  data_state.json       DataStream.state_dict(): the data object's state_dict() (+ batches to skip) or a
                        count of consumed batches (plain iterators are fast-forwarded)
  meta.json             {"trainer": trainer meta, "loop": step, tokens, norm factor, log accumulators,
                        RNGs, ...}; written last, so a folder with meta.json is complete
"""

from __future__ import annotations

import copy
import json
import logging
import random
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .utils import DataExhausted, read_json, write_dir_atomic

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


def read_checkpoint(path: Path) -> tuple[dict, dict, dict, dict] | None:
    """(trainer tensors, trainer meta, loop state, data state) from `path` or `path.old`, else None."""
    for p in (Path(path), Path(path).with_name(Path(path).name + ".old")):
        if (p / "meta.json").exists():
            meta = read_json(p / "meta.json")
            tensors = load_file(p / "trainer.safetensors")
            return tensors, meta["trainer"], meta["loop"], read_json(p / "data_state.json")
    return None


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
