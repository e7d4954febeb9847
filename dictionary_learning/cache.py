"""On-disk activation cache: safetensors shards + manifest.json, local or as a Hub dataset repo.

Layout of a cache folder:
    manifest.json             model, hook, layer, site, ctx_len, dtype, d, n_tokens,
                              mean_squared_norm, shards [{file, rows, bytes, sha256}], ...
    shard_00000.safetensors   key "activations": [rows, d]
    shard_00001.safetensors   ...

write_cache harvests once; ActivationCache then serves shuffled batches (shuffled across
shards: a few shards are loaded together and their rows permuted) with the same state_dict
API and DataExhausted as the ActivationBuffer, for many training runs.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .buffer import massive_limit, massive_record, seeded_generator
from .utils import (
    DataExhausted,
    atomic_path,
    dtype_name,
    package_versions,
    parse_dtype,
    read_json,
    write_json,
)

log = logging.getLogger(__name__)

SHARD_KEY = "activations"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_cache(
    source,
    out_dir,
    n_tokens: int,
    meta: dict | None = None,
    shard_rows: int = 1 << 16,
    overwrite: bool = False,
    progress: bool = False,
    reread: bool = False,
) -> dict:
    """Write up to `n_tokens` activation vectors from `source` to `out_dir`; returns the manifest.

    source: an ActivationBuffer (its config fills the manifest) or any iterable of [B, d]
    tensors. meta: manifest fields (model, hook, layer, site, ctx_len, ...) that override the
    buffer's. If the data runs out first, what was harvested is written, the manifest says
    `"exhausted": true` with the counts, and a warning is logged (INFO with reread=True: the cache
    holds all the data and will be re-read for several epochs, as planned). Shards are written
    atomically and the manifest last, so a folder without manifest.json is an incomplete write.
    progress: a bar of tokens harvested against n_tokens, with tok/s.
    """
    out = Path(out_dir)
    if (out / MANIFEST).exists() and not overwrite:
        raise FileExistsError(f"{out}: already holds an activation cache (pass overwrite=True)")
    out.mkdir(parents=True, exist_ok=True)
    for p in out.glob(".*.tmp"):  # a killed write's temporaries (atomic_path's), never part of a cache
        p.unlink(missing_ok=True)
    if overwrite:
        for p in [out / MANIFEST, *out.glob("shard_*.safetensors")]:
            p.unlink(missing_ok=True)
    info = {}
    if hasattr(source, "config") and hasattr(source, "counters"):
        cfg = source.config
        info = {k: cfg.get(k) for k in ("model", "hook", "layer", "site", "ctx_len", "dtype")}
        info["buffer"] = cfg
    info.update(meta or {})
    it, pending, n_pending, shards = iter(source), [], 0, []
    written, sq_sum, d, dtype, exhausted = 0, 0.0, None, None, None

    def flush(rows: torch.Tensor) -> None:
        path = out / f"shard_{len(shards):05d}.safetensors"
        with atomic_path(path) as tmp:
            save_file({SHARD_KEY: rows.contiguous().cpu()}, str(tmp))
        shards.append(
            {"file": path.name, "rows": len(rows), "bytes": path.stat().st_size, "sha256": _sha256(path)}
        )

    bar = tqdm(total=n_tokens, desc="harvest", unit="tok", unit_scale=True, disable=not progress)
    while written + n_pending < n_tokens:
        try:
            x = next(it)
        except (DataExhausted, StopIteration) as e:
            exhausted = str(e) or "the iterable ended"
            break
        if isinstance(x, tuple):
            x = x[0]
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            raise ValueError(
                f"write_cache: batches must be [B, d] tensors, got {type(x).__name__}"
                " (for a multi-layer buffer pass (b[hook] for b in buffer))"
            )
        d, dtype = d or x.shape[1], dtype or x.dtype
        if x.shape[1] != d or x.dtype != dtype:
            raise ValueError(f"write_cache: batch of shape {tuple(x.shape)} {x.dtype} after [*, {d}] {dtype}")
        x = x[: n_tokens - written - n_pending]
        bar.update(len(x))
        sq_sum += float(x.double().pow(2).sum())
        pending.append(x)
        n_pending += len(x)
        while n_pending >= shard_rows:
            rows = torch.cat(pending)
            flush(rows[:shard_rows])
            pending, n_pending, written = [rows[shard_rows:]], n_pending - shard_rows, written + shard_rows
    if n_pending:
        flush(torch.cat(pending))
        written += n_pending
    bar.close()
    if written == 0:
        raise ValueError(f"write_cache: no activations to write to {out} ({exhausted})")
    if exhausted and reread:
        log.info("write_cache: the data ended after %d of %d tokens: all of it is cached, to be re-read "
                 "for more epochs", written, n_tokens)  # fmt: skip
    elif exhausted:
        log.warning("write_cache: data ran out after %d of %d tokens (%s)", written, n_tokens, exhausted)
    manifest = {
        "format": "sae-factory-activation-cache",
        "format_version": FORMAT_VERSION,
        **{k: info.pop(k, None) for k in ("model", "hook", "layer", "site", "ctx_len")},
        **{k: v for k, v in info.items() if k != "dtype"},  # the buffer's dtype name is not the shards' dtype
        "dtype": dtype_name(dtype),
        "d": d,
        "n_tokens": written,
        "requested_tokens": n_tokens,
        "mean_squared_norm": sq_sum / written,
        "exhausted": bool(exhausted),
        "counters": getattr(source, "counters", None),
        "massive_tokens": getattr(source, "massive", None) or massive_record(None, {}, 0, written),
        "shard_key": SHARD_KEY,
        "shards": shards,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": package_versions(),
    }
    write_json(out / MANIFEST, manifest)
    return manifest


def _resolve(path_or_repo, revision=None, token=None) -> Path:
    """A local cache folder, else a Hub dataset repo id downloaded with snapshot_download."""
    p = Path(path_or_repo)
    if p.exists():
        return p
    if str(path_or_repo).count("/") != 1:
        raise FileNotFoundError(f"{path_or_repo}: no such cache folder (nor a Hub repo id 'user/name')")
    import huggingface_hub

    try:
        return Path(
            huggingface_hub.snapshot_download(
                str(path_or_repo), repo_type="dataset", revision=revision, token=token
            )
        )
    except Exception as e:  # noqa: BLE001 - one clear line whatever the Hub says
        raise FileNotFoundError(
            f"{path_or_repo}: no such cache folder, and the Hub dataset repo could not "
            f"be downloaded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None


def _shard_path(cache_dir: Path, i: int, shard) -> Path:
    """The path of manifest shard entry i, refused (ValueError naming the manifest) unless its `file` is a
    plain file name that resolves inside the cache folder: caches come from the Hub, so an absolute
    name, '..' or a symlink out of the folder must not make us read (or stat) any other file. A Hub
    download folder (`.../snapshots/<rev>/`) links its files to `../../blobs/`: its repo folder is the
    bound."""
    where = f"{cache_dir / MANIFEST}: shard {i}"
    for key, kind in (("file", str), ("rows", int), ("bytes", int), ("sha256", str)):
        if not isinstance(shard, dict) or not isinstance(shard.get(key), kind):
            raise ValueError(f"{where}: field {key!r} is missing or not a {kind.__name__}")
    name = shard["file"]
    if name in ("", ".", "..") or "/" in name or "\\" in name or Path(name).is_absolute():
        raise ValueError(f"{where}: file {name!r} is outside the cache folder (plain file names only)")
    bound = cache_dir.resolve()
    if bound.parent.name == "snapshots":
        bound = bound.parent.parent
    p = cache_dir / name
    if not p.resolve().is_relative_to(bound):
        raise ValueError(f"{where}: file {name!r} is a link to outside the cache folder")
    return p


class ActivationCache:
    """Shuffled [batch_size, d] batches from a cache folder or Hub dataset repo.

    Epoch e visits the shards in a random order, `shards_per_group` at a time; the rows of a
    group are permuted together (generators seeded with (seed, epoch, group)). Every row is
    yielded once per epoch; batches run on across group and epoch boundaries; the last batch
    of the last epoch may be smaller, then DataExhausted. epochs=None repeats forever.
    """

    def __init__(
        self,
        path_or_repo,
        batch_size: int = 4096,
        seed: int = 0,
        epochs: int | None = 1,
        device: str = "cpu",
        dtype=None,
        shards_per_group: int = 4,
        verify: bool = True,
        revision: str | None = None,
        token: str | None = None,
        max_norm_multiple: float | None = 10.0,
    ):
        if batch_size < 1 or shards_per_group < 1 or (epochs is not None and epochs < 1):
            raise ValueError("batch_size and shards_per_group must be >= 1, epochs >= 1 or None")
        self.dir = _resolve(path_or_repo, revision, token)
        self.manifest = m = read_json(self.dir / MANIFEST)
        if m.get("format") != "sae-factory-activation-cache" or not m.get("shards"):
            raise ValueError(f"{self.dir / MANIFEST}: not an activation-cache manifest")
        paths = [_shard_path(self.dir, i, s) for i, s in enumerate(m["shards"])]  # before any stat
        for s, p in zip(m["shards"], paths):
            if not p.is_file():
                raise FileNotFoundError(f"{p}: shard listed in the manifest is missing")
            if p.stat().st_size != s["bytes"]:
                raise ValueError(
                    f"{p}: {p.stat().st_size} bytes, the manifest says {s['bytes']} (truncated?)"
                )
        if sum(s["rows"] for s in m["shards"]) != m["n_tokens"]:
            raise ValueError(f"{self.dir / MANIFEST}: shard rows do not add up to n_tokens")
        self.batch_size, self.seed, self.epochs, self.device = batch_size, seed, epochs, device
        self.dtype = parse_dtype(dtype) if dtype is not None else None
        self.shards_per_group, self.verify = shards_per_group, verify
        self.n_tokens, self.d = m["n_tokens"], m["d"]
        self.tokens_yielded, self.batches_yielded = 0, 0
        self._epoch, self._group, self._pos, self._rows = 0, 0, 0, None
        self._verified: set[int] = set()
        done = (m.get("massive_tokens") or {}).get("max_norm_multiple")
        # Rows are filtered as they are read only where the harvest applied no rule as strict (a cache
        # from another tool or an older version); the threshold then comes from shard 0's median norm.
        self.read_multiple = None if max_norm_multiple is None or (done is not None and done <= max_norm_multiple) \
            else max_norm_multiple  # fmt: skip
        self._max_norm = None
        self.massive_dropped = 0  # rows dropped when read

    @property
    def max_norm(self) -> float | None:
        """The norm above which rows are dropped when read (None: none are)."""
        if self.read_multiple is not None and self._max_norm is None:
            norms = torch.linalg.vector_norm(self.load_shard(0).float(), dim=1)
            self._max_norm = massive_limit(norms, self.read_multiple)
            log.info("activation cache %s: rows with norm > %.4g (%g x the median of shard 0) are dropped "
                     "as they are read", self.dir, self._max_norm, self.read_multiple)  # fmt: skip
        return self._max_norm

    @property
    def massive(self) -> dict:
        """The massive-token rule of this cache: as harvested (manifest), or as applied when read."""
        if self.read_multiple is None:
            return self.manifest.get("massive_tokens") or massive_record(None, {}, 0, self.n_tokens)
        record = massive_record(self.read_multiple, {self.manifest.get("hook"): self.max_norm},
                                self.massive_dropped, self.n_tokens)  # fmt: skip
        return {**record, "applied": "when read (median of shard 0)"}

    @property
    def n_groups(self) -> int:
        return math.ceil(len(self.manifest["shards"]) / self.shards_per_group)

    def load_shard(self, i: int) -> torch.Tensor:
        """Shard i -> [rows, d], checked against the manifest (a bad file gets an error naming it)."""
        s = self.manifest["shards"][i]
        p = _shard_path(self.dir, i, s)
        if self.verify and i not in self._verified:  # hash each shard once, not every epoch
            if _sha256(p) != s["sha256"]:
                raise ValueError(f"{p}: sha256 does not match the manifest (corrupted or replaced shard)")
            self._verified.add(i)
        try:
            x = load_file(str(p))[SHARD_KEY]
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{p}: unreadable safetensors shard ({type(e).__name__}: {e})") from None
        if tuple(x.shape) != (s["rows"], self.d) or dtype_name(x.dtype) != self.manifest["dtype"]:
            raise ValueError(
                f"{p}: holds {tuple(x.shape)} {x.dtype}, the manifest says "
                f"({s['rows']}, {self.d}) {self.manifest['dtype']}"
            )
        return x

    def _load_group(self) -> None:
        e, g = self._epoch, self._group
        order = torch.randperm(
            len(self.manifest["shards"]), generator=seeded_generator(self.seed, e)
        ).tolist()
        ids = order[g * self.shards_per_group : (g + 1) * self.shards_per_group]
        rows = torch.cat([self.load_shard(i) for i in ids])
        if self.max_norm is not None:
            keep = torch.linalg.vector_norm(rows.float(), dim=1) <= self.max_norm
            self.massive_dropped += int((~keep).sum()) if e == 0 else 0
            rows = rows[keep]
        perm = torch.randperm(len(rows), generator=seeded_generator(self.seed, e, g))
        rows = rows[perm]
        self._rows = rows.to(self.device, self.dtype) if self.dtype else rows.to(self.device)

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        parts, need = [], self.batch_size
        while need > 0:
            if self._rows is not None and self._pos >= len(self._rows):
                self._rows, self._pos, self._group = None, 0, self._group + 1
                if self._group >= self.n_groups:
                    self._epoch, self._group = self._epoch + 1, 0
            if self.epochs is not None and self._epoch >= self.epochs:
                break
            if self._rows is None:
                self._load_group()
            take = min(need, len(self._rows) - self._pos)
            parts.append(self._rows[self._pos : self._pos + take])
            self._pos, need = self._pos + take, need - take
        if not parts:
            raise DataExhausted(self.tokens_yielded, None, self.epochs, where=f"activation cache {self.dir}")
        x = parts[0] if len(parts) == 1 else torch.cat(parts)
        self.tokens_yielded += len(x)
        self.batches_yielded += 1
        return x

    def state_dict(self) -> dict:
        """JSON-able position: (epoch, group, row in group) + counters."""
        return {
            "version": 1,
            "epoch": self._epoch,
            "group": self._group,
            "pos": self._pos,
            "seed": self.seed,
            "shards_per_group": self.shards_per_group,
            "n_tokens": self.n_tokens,
            "tokens_yielded": self.tokens_yielded,
            "batches_yielded": self.batches_yielded,
            "massive_dropped": self.massive_dropped,
        }

    def load_state_dict(self, state: dict) -> None:
        for k in ("seed", "shards_per_group", "n_tokens"):
            if state.get(k) != getattr(self, k):
                raise ValueError(
                    f"cache state: {k}={state.get(k)!r} does not match this cache's {getattr(self, k)!r}"
                )
        self._epoch, self._group, self._pos, self._rows = state["epoch"], state["group"], state["pos"], None
        self.tokens_yielded, self.batches_yielded = state["tokens_yielded"], state["batches_yielded"]
        if self._pos and (self.epochs is None or self._epoch < self.epochs):
            self._load_group()
        self.massive_dropped = state.get("massive_dropped", 0)  # as counted when first read


def push_cache_to_hub(
    cache_dir,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
):
    """Upload a cache folder as a Hub *dataset* repo (created if needed); returns the CommitInfo.

    Load it back with ActivationCache(repo_id). The token comes from `token`, else the usual
    huggingface_hub login / HF_TOKEN; it is never written anywhere.
    """
    from huggingface_hub import HfApi

    cache_dir = Path(cache_dir)
    manifest = read_json(cache_dir / MANIFEST)
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    return api.upload_folder(
        folder_path=str(cache_dir),
        repo_id=repo_id,
        repo_type="dataset",
        allow_patterns=[MANIFEST, "shard_*.safetensors", "README.md"],
        commit_message=commit_message
        or f"activation cache: {manifest.get('model')} {manifest.get('hook')} "
        f"({manifest['n_tokens']} tokens)",
    )
