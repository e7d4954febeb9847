"""Multi-process training under torchrun: process group, rank helpers, data sharding and the few
collectives training.trainSAE needs.

    torchrun --nproc_per_node 4 dictionary_learning/demo.py ...                        # data parallel
    torchrun --nproc_per_node 4 dictionary_learning/demo.py --distributed-mode sweep   # split the sweep

Modes (the global SAE batch is the concatenation of the ranks' batches in both):
  data   each rank harvests a disjoint shard of the texts; every step of every SAE uses the gradient of
         the loss on the global batch (the trainer's reduce_sum: one all_reduce of the gradients and
         statistics per trainer and step, plus one scalar for the global L0), so all ranks hold
         identical SAEs; rank 0 alone writes folders, logs, wandb and checkpoints.
  sweep  each rank harvests a disjoint shard; the ranks' batches are all-gathered into the global batch
         and each rank trains its round-robin share of the sweep on it, writing those trainers' folders.
Checkpoints hold every rank's data-stream state and RNGs, so resume (same world size) is exact.
A rank that dies or hangs makes the others raise DistributedError within the process-group timeout
($SAE_DIST_TIMEOUT seconds, default 1800) instead of waiting forever.
Without torchrun (no WORLD_SIZE, or WORLD_SIZE=1) every helper here is a no-op on one process.
"""

from __future__ import annotations

import builtins
import datetime
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .trainer import JumpReluTrainer
from .utils import DataExhausted

MODES = ("data", "sweep")
TIMEOUT_ENV = "SAE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0


class DistributedError(RuntimeError):
    """A collective failed: another rank died, raised, or did not answer within the timeout."""


# ---------------------------------------------------------------------------- process group


@dataclass
class Context:
    """Where this process stands: mode ('single', 'data', 'sweep'), rank, world size."""

    mode: str = "single"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def writes_files(self) -> bool:
        """Whether this rank writes its trainers' folders (data mode: rank 0 only)."""
        return self.mode != "data" or self.rank == 0

    @property
    def device(self) -> torch.device:
        """Where collective buffers live: this rank's GPU for nccl, else the CPU."""
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def pin_device(self, device: str) -> str:
        """'cuda' / 'cuda:k' -> this rank's GPU 'cuda:{local_rank}' when distributed; others unchanged."""
        return f"cuda:{self.local_rank}" if self.distributed and str(device).startswith("cuda") else device

    def local_batch_size(self, batch_size: int) -> int:
        """This rank's share of the global batch_size."""
        if batch_size % self.world_size:
            raise ValueError(f"batch size {batch_size} is not divisible by the world size {self.world_size}")
        return batch_size // self.world_size

    # ------------------------------------------------------------------ collectives

    def _call(self, what: str, fn: Callable, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - gloo/nccl raise RuntimeError subclasses with long texts
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise DistributedError(
                f"rank {self.rank} of {self.world_size}: {what} failed ({type(e).__name__}: {first}); another "
                f"rank died, raised or hung (timeout {self.timeout_s:g} s). Resume from the last checkpoint "
                "with the same world size (demo.py --resume)"
            ) from None

    def all_reduce_sum(self, t: torch.Tensor) -> None:
        """In-place sum of t over the ranks (t on any device; moved to self.device and back)."""
        if not self.distributed:
            return
        buf = t if t.device == self.device else t.to(self.device)
        self._call("all_reduce", dist.all_reduce, buf)
        if buf is not t:
            t.copy_(buf)

    def all_gather_object(self, obj) -> list:
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        self._call("all_gather_object", dist.all_gather_object, out, obj)
        return out

    def broadcast_object(self, obj, src: int = 0):
        if not self.distributed:
            return obj
        box = [obj]
        self._call("broadcast_object_list", dist.broadcast_object_list, box, src, device=self.device)
        return box[0]

    def any(self, flag: bool) -> bool:
        """True when flag is true on some rank (sweep mode: a collective; data mode: ranks agree already)."""
        if self.mode != "sweep" or not self.distributed:
            return bool(flag)
        t = torch.tensor([int(bool(flag))], device=self.device)
        self.all_reduce_sum(t)
        return bool(t.item())

    def max(self, value: float) -> float:
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        if self.distributed:
            self._call("all_reduce", dist.all_reduce, t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def first(self, value):
        """The first non-None value over the ranks (rank order), else None."""
        return next((v for v in self.all_gather_object(value) if v is not None), None)

    def agree(self, fn: Callable, *args):
        """fn(*args) on every rank; if it raised on any rank, raise on all (same type where builtin),
        so that a bad setting stops every rank at once instead of leaving the others waiting."""
        if not self.distributed:
            return fn(*args)
        out = err = None
        try:
            out = fn(*args)
        except Exception as e:  # noqa: BLE001 - re-raised below, here or on the other ranks
            err = e
        errs = self.all_gather_object(None if err is None else (type(err).__name__, str(err)))
        if err is not None:
            raise err
        for r, e in enumerate(errs):
            if e is not None:
                cls = getattr(builtins, e[0], None)
                cls = cls if isinstance(cls, type) and issubclass(cls, Exception) else RuntimeError
                raise cls(f"rank {r}: {e[1]}")
        return out

    # ------------------------------------------------------------------ what trainSAE calls

    def share(self, items: Sequence) -> list:
        """Sweep mode: this rank's round-robin share (items rank, rank + world, ...); else all items."""
        return list(items[self.rank :: self.world_size]) if self.mode == "sweep" else list(items)

    def prepare_trainer(self, trainer: JumpReluTrainer) -> JumpReluTrainer:
        """Data mode: the trainer's steps use the gradient of the loss on the global batch."""
        if self.mode == "data" and self.distributed:
            trainer.reduce_sum = self.all_reduce_sum
        return trainer

    def open_runs(self, open_fn: Callable, runs: list, resume: bool, overwrite: bool) -> dict:
        """open_fn(runs, resume, overwrite) -> {run index: checkpoint}. Data mode: rank 0 opens the
        folders (refuse / clear / read checkpoints) and sends the outcome to the others."""
        if self.mode != "data" or not self.distributed:
            return self.agree(open_fn, runs, resume, overwrite)
        ckpts = self.agree(lambda: open_fn(runs, resume, overwrite) if self.is_main else None)
        for r, active in zip(runs, self.broadcast_object([r.active for r in runs])):
            r.active = active
        return self._broadcast_checkpoints(ckpts)

    def _broadcast_checkpoints(self, ckpts: dict | None) -> dict:
        """Rank 0's {i: (tensors, trainer meta, loop, data state)} on every rank; the tensors are sent
        one by one as bytes (no pickling of large arrays), the JSON parts as objects."""
        head = None
        if self.is_main:
            head = {i: ({k: (tuple(t.shape), t.dtype, t.numel() * t.element_size()) for k, t in ck[0].items()},
                        *ck[1:]) for i, ck in ckpts.items()}  # fmt: skip
        out = {}
        for i, (spec, *rest) in self.broadcast_object(head).items():
            tensors = {}
            for k, (shape, dtype, nbytes) in spec.items():
                if self.is_main:
                    buf = ckpts[i][0][k].contiguous().reshape(-1).view(torch.uint8).to(self.device)
                else:
                    buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
                self._call("broadcast", dist.broadcast, buf, 0)
                tensors[k] = buf.cpu().view(dtype).reshape(shape)
            out[i] = (tensors, *rest)
        return out

    def resume_point(self, local_start: int | None, ckpts: dict) -> tuple[int, dict | None]:
        """(start step, this rank's {'data', 'rng', 'tokens'}) of the least advanced active trainer over
        all ranks; (0, None) for a fresh start. local_start: this rank's least advanced active trainer
        (None: none active here)."""
        starts = self.all_gather_object(local_start)
        valid = [s for s in starts if s is not None]
        if not valid or min(valid) == 0:
            return 0, None
        start, src = min(valid), starts.index(min(valid))
        point = None
        if self.rank == src:
            ck = min(ckpts.values(), key=lambda ck: ck[2]["step"])
            point = (ck[2], ck[3])
        loop, ds = self.broadcast_object(point, src)
        if ds.get("kind") == "ranks":
            if ds["world_size"] != self.world_size:
                raise ValueError(f"checkpoint was written by {ds['world_size']} ranks; resume it with the same "
                                 f"world size (torchrun --nproc_per_node ...), not {self.world_size}")  # fmt: skip
            mine = ds["ranks"][self.rank]
            return start, {"data": mine["data"], "rng": mine["rng"], "tokens": loop["tokens"]}
        if self.distributed:
            raise ValueError("checkpoint was written by a single process; resume it without torchrun")
        return start, {"data": ds, "rng": loop["rng"], "tokens": loop["tokens"]}

    def norm_factor(self, fetch: Callable[[], list[torch.Tensor]]) -> float:
        """sqrt(E‖x‖²) over the batches fetch() returns on every rank (trainer.estimate_norm_factor
        pooled over ranks). Any rank's data running out raises on all of them."""
        total, n, err = 0.0, 0, None
        try:
            for x in fetch():
                x = x.reshape(-1, x.shape[-1])
                total += float(x.double().pow(2).sum())
                n += x.shape[0]
        except (StopIteration, DataExhausted) as e:
            err = e
        t = torch.tensor([total, n, err is not None], dtype=torch.float64, device=self.device)
        self.all_reduce_sum(t)
        total, n, failed = t.tolist()
        if failed:
            raise err or DataExhausted(message="the data of another rank ran out")
        if not math.isfinite(total):
            raise ValueError("estimate_norm_factor: the norm-estimate batches contain NaN or inf")
        if not (n > 0 and total > 0):
            raise ValueError("estimate_norm_factor: no batches, or all activations are zero")
        return math.sqrt(total / n)

    def next_batch(self, stream, stopping: bool) -> tuple[torch.Tensor, int] | None:
        """The next training batch and the tokens one step consumes over all ranks, or None when this
        or another rank is stopping (a signal). Raises DataExhausted on every rank when some rank's data
        ran out. Sweep mode returns the all-gathered global batch.
        stream: checkpoint.DataStream (its prefetch queue keeps a pulled-but-unused batch resumable)."""
        if not self.distributed:
            if stopping:
                return None
            x = next(stream)
            return x, x.shape[0]
        err, rows = None, 0
        if not stopping:
            try:
                rows = stream.prefetch(1)[0].shape[0]
            except (StopIteration, DataExhausted) as e:
                err = e
        flags = torch.tensor([int(stopping), int(err is not None), rows], device=self.device)
        table = torch.zeros(self.world_size, 3, dtype=flags.dtype, device=self.device)
        self._call("all_gather", dist.all_gather, list(table.unbind(0)), flags)
        table = table.cpu()
        if table[:, 0].any():
            return None
        if table[:, 1].any():
            ranks = table[:, 1].nonzero().flatten().tolist()
            raise err or DataExhausted(message=f"the data of rank(s) {ranks} ran out")
        x, sizes = next(stream), table[:, 2].tolist()
        return (self.gather_rows(x, sizes) if self.mode == "sweep" else x), sum(sizes)

    def gather_rows(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """All ranks' batches [sizes[r], d] concatenated in rank order -> [sum(sizes), d] on self.device."""
        m = max(sizes)
        pad = torch.zeros(m, *x.shape[1:], dtype=x.dtype, device=self.device)
        pad[: x.shape[0]] = x
        parts = [torch.empty_like(pad) for _ in range(self.world_size)]
        as_bytes = lambda t: t.view(torch.uint8)  # any dtype (gloo lacks bf16 gathers)
        self._call("all_gather", dist.all_gather, [as_bytes(p) for p in parts], as_bytes(pad))
        return torch.cat([p[:s] for p, s in zip(parts, sizes)])

    def checkpoint_state(self, data_state: dict, rng: dict) -> dict:
        """The data_state.json of a checkpoint: every rank's stream state and RNGs when distributed."""
        if not self.distributed:
            return data_state
        ranks = self.all_gather_object({"data": data_state, "rng": rng})
        return {"kind": "ranks", "world_size": self.world_size, "ranks": ranks}

    def finish(self, done: list[str]) -> list[str]:
        """The finished trainers' folders of the whole run on every rank (also a final barrier)."""
        if not self.distributed:
            return done
        if self.mode == "data":
            return self.broadcast_object(done)
        return [p for part in self.all_gather_object(done) for p in part]


_CTX = Context()


def context() -> Context:
    """The current Context (single process until init() joined a process group)."""
    return _CTX


def init(mode: str = "data", device: str | None = None, timeout_s: float | None = None,
         backend: str | None = None) -> Context:  # fmt: skip
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT in the environment) and return the Context; a single-process one without them.
    Backend: nccl when `device` is a GPU, else gloo. timeout_s (default $SAE_DIST_TIMEOUT or 1800):
    how long a collective waits for a silent peer before every rank raises."""
    global _CTX
    if mode not in MODES:
        raise ValueError(f"distributed mode must be one of {MODES}, got {mode!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        _CTX = Context()
        return _CTX
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    timeout_s = float(timeout_s or os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S)
    if backend is None:
        on_gpu = str(device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        backend = "nccl" if on_gpu else "gloo"
    ctx = Context(mode, rank, world, local_rank, backend, timeout_s)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        ctx._call("init_process_group", dist.init_process_group, backend, init_method="env://", rank=rank,
                  world_size=world, timeout=datetime.timedelta(seconds=timeout_s))  # fmt: skip
    _CTX = ctx
    return ctx


def shutdown() -> None:
    """Leave the process group (if any); the context becomes single-process again."""
    global _CTX
    if dist.is_initialized():
        dist.destroy_process_group()
    _CTX = Context()


def restart_count() -> int:
    """How often torchrun (--max-restarts) has restarted this worker group."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


# ---------------------------------------------------------------------------- data sharding


def shard(items, rank: int | None = None, world_size: int | None = None):
    """This rank's disjoint share of a list of texts (or a datasets.Dataset): items i with
    i % world_size == rank. The shares of all ranks cover every item exactly once."""
    ctx = context()
    rank = ctx.rank if rank is None else rank
    world_size = ctx.world_size if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if world_size == 1:
        return items
    if hasattr(items, "shard") and hasattr(items, "column_names"):  # datasets.Dataset
        return items.shard(num_shards=world_size, index=rank, contiguous=False)
    return items[rank::world_size]


class RankSlice:
    """This rank's rows of every batch of a global-batch source (e.g. an ActivationCache read with
    the global batch size): torch.tensor_split(x, world_size)[rank], so the ranks' slices concatenate
    to the source's batch. state_dict()/load_state_dict() pass through (exact resume)."""

    def __init__(self, data, rank: int | None = None, world_size: int | None = None):
        ctx = context()
        self.data, self._it = data, None
        self.rank = ctx.rank if rank is None else rank
        self.world_size = ctx.world_size if world_size is None else world_size

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self._it is None:
            self._it = iter(self.data)
        return torch.tensor_split(next(self._it), self.world_size)[self.rank]

    def state_dict(self) -> dict:
        return self.data.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.data.load_state_dict(state)
