"""Activation harvesting: the shuffled ActivationBuffer over nnsight, at the hook points of hooks.py.

Texts become model inputs in tokens.py (text sources, packing rule, padding). BOS, EOS and PAD
positions (by token id) are never yielded.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, fields

import torch

from .hooks import hook_points, hook_value
from .texts import TextSource
from .tokens import TokenStream
from .utils import DataExhausted, parse_dtype

# ---------------------------------------------------------------------------- buffer


@dataclass
class BufferConfig:
    ctx_len: int = 128
    """Tokens per context (window when packing, truncation length when padding)."""
    n_ctxs: int = 256
    """Capacity in contexts: each refill harvests n_ctxs // 2 contexts (~n_ctxs * ctx_len / 2 tokens)."""
    lm_batch_size: int = 16
    """Contexts per language-model forward pass."""
    batch_size: int = 4096
    """Activation vectors per yielded batch (the last batch of the data may be smaller)."""
    pack: bool = True
    """Pack texts into full windows (packing rule: tokens.py); False: one padded row per text."""
    padding_side: str = "left"
    """Padding side when pack=False (either is handled exactly)."""
    exclude_first_k: int = 0
    """Also drop the first k real positions of every context (attention sinks)."""
    prepend_bos: bool | None = None
    """Start every packed window with BOS (tokens.py); None: when the tokenizer adds BOS itself
    (Gemma: yes, SmolLM2: no). BOS is never yielded."""
    max_norm_multiple: float | None = 10.0
    """Drop tokens whose activation norm exceeds this multiple of the median norm, like special
    tokens ("massive activations", Sun et al. 2024, arXiv 2402.17762: a few tokens past position 0
    with norms 10-150x the median that would set the norm factor and the loss). The median is
    estimated per hook on the first refill; a token is dropped when it is massive at any hook.
    None keeps every token."""
    dtype: str = "float32"
    """Storage / yield dtype (float32, bfloat16, float16)."""
    device: str = "cpu"
    """Storage / yield device."""
    epochs: int | None = 1
    """Passes over the data before DataExhausted; None repeats forever."""
    seed: int = 0
    """Seed of the buffer's own shuffling generator."""
    return_index: bool = False
    """Yield (x, index) with index [B, 2] = (context number, position in context) per vector."""


def check_max_norm_multiple(multiple: float | None) -> None:
    """The massive-token rule's multiple: > 1, or None for no rule."""
    if multiple is not None and not multiple > 1:
        raise ValueError(f"max_norm_multiple must be > 1 or None, got {multiple}")


def massive_limit(norms: torch.Tensor, multiple: float | None) -> float | None:
    """The massive-activation threshold in raw units (Sun et al. 2024, arXiv 2402.17762): `multiple` x
    the median of norms [n] (a token's activation norm). None: no rule (multiple None, or no norms)."""
    check_max_norm_multiple(multiple)
    return None if multiple is None or not len(norms) else multiple * float(norms.float().median())


def massive_record(multiple: float | None, max_norm: dict, dropped: int, total: int) -> dict:
    """How massive-activation tokens were handled: the rule, the threshold per hook in raw units,
    and how many of the real tokens seen it dropped (config.json, cache manifest, eval_results)."""
    return {
        "rule": "drop tokens with activation norm > max_norm_multiple x median norm (per hook)"
        if multiple is not None
        else "none: every token kept",
        "max_norm_multiple": multiple,
        "max_norm": max_norm,
        "dropped": dropped,
        "of_tokens": total,
        "share_dropped": dropped / total if total else 0.0,
    }


def seeded_generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of ints, e.g. (seed, round, kind). Hashed, because
    torch's CPU generator only uses the low 32 bits of a seed."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


class ActivationBuffer:
    """Stream texts through `model` (nnsight TransformersModel) and yield shuffled activations.

    Yields [batch_size, d] tensors (a dict {hook_name: [B, d]} when `layer` is a list,
    harvested in one forward pass that stops after the deepest layer). Raises DataExhausted
    after `epochs` passes.

    Shuffling (exactly resumable): refill c harvests n_ctxs // 2 contexts, keeps their real
    tokens and splits them at random into halves A_c, B_c. Round r yields B_{r-1} + A_r in a
    random order, so every batch mixes tokens of ~n_ctxs contexts from two refills, and each
    token is yielded exactly once per epoch. Permutations come from generators seeded with
    (seed, round), so the state is small: the stream position before refill r-1, the round,
    and the rows consumed in it; load_state_dict re-harvests refills r-1 and r.
    """

    def __init__(
        self,
        data,
        model,
        layer: int | list[int],
        site: str = "resid_post",
        config: BufferConfig | None = None,
        **kwargs,
    ):
        cfg = config or BufferConfig()
        unknown = set(kwargs) - {f.name for f in fields(BufferConfig)}
        if unknown:
            raise ValueError(f"unknown buffer option(s) {sorted(unknown)}")
        self.cfg = cfg = BufferConfig(**{**asdict(cfg), **kwargs})
        if cfg.ctx_len < 1 or cfg.n_ctxs < 2 or cfg.lm_batch_size < 1 or cfg.batch_size < 1:
            raise ValueError("ctx_len, lm_batch_size, batch_size must be >= 1 and n_ctxs >= 2")
        if not 0 <= cfg.exclude_first_k < cfg.ctx_len:
            raise ValueError(f"exclude_first_k must be in [0, ctx_len), got {cfg.exclude_first_k}")
        if cfg.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {cfg.padding_side!r}")
        if cfg.epochs is not None and cfg.epochs < 1:
            raise ValueError(f"epochs must be >= 1 or None, got {cfg.epochs}")
        check_max_norm_multiple(cfg.max_norm_multiple)
        self.dtype = parse_dtype(cfg.dtype)
        self.model, self.site = model, site
        self.multi = isinstance(layer, (list, tuple))
        self.points = hook_points(model, list(layer) if self.multi else [layer], site)  # validates them
        self.layers = sorted(set(layer)) if self.multi else [layer]
        self.hooks = [name for name, _ in self.points]
        self.d_submodule = int(model.config.hidden_size)
        self.stream = TokenStream(TextSource(data), model.tokenizer, cfg)
        cfg.prepend_bos = self.stream.bos is not None  # recorded as resolved
        self.max_norm: list[float] | None = None  # per hook: multiple x median norm (first refill)
        self.massive_dropped, self._kept = 0, 0  # tokens dropped as massive / kept, so far
        self.tokens_yielded, self.batches_yielded = 0, 0
        self._round, self._pos, self._pool, self._B, self._perm = -1, 0, None, None, None
        self._snaps = [None, None]  # stream position before refill r-1 and before refill r

    # -- counters
    @property
    def texts_consumed(self) -> int:
        """Texts read from the data so far (including those still in the buffer and skipped ones)."""
        return self.stream.st["texts_consumed"]

    @property
    def epoch(self) -> int:
        return self.stream.st["epoch"]

    @property
    def counters(self) -> dict:
        return {
            "tokens_yielded": self.tokens_yielded,
            "batches_yielded": self.batches_yielded,
            "massive_dropped": self.massive_dropped,
            **{k: v for k, v in self.stream.st.items() if k not in ("text", "offset")},
        }

    @property
    def massive(self) -> dict:
        """The massive-token rule as applied so far (for config.json and cache manifests)."""
        return massive_record(self.cfg.max_norm_multiple, dict(zip(self.hooks, self.max_norm or [])),
                              self.massive_dropped, self.massive_dropped + self._kept)  # fmt: skip

    @property
    def config(self) -> dict:
        name = getattr(getattr(self.model, "config", None), "name_or_path", None)
        return {
            **asdict(self.cfg),
            "model": name,
            "layer": self.layers if self.multi else self.layers[0],
            "site": self.site,
            "hook": self.hooks if self.multi else self.hooks[0],
            "d": self.d_submodule,
            "massive_tokens": self.massive,
        }

    # -- harvesting
    def _forward(self, ids, mask, pos):
        """One LM batch -> [[b, T, d] per hook], stopping after the deepest hooked layer."""
        dev = self.model.device
        inputs = {"input_ids": ids.to(dev), "use_cache": False}  # no KV cache: ~3% faster
        if mask is not None:  # padded: left padding needs mask-derived positions
            inputs["attention_mask"] = mask.to(dev)
            inputs["position_ids"] = pos.to(dev)
        saved = []
        with torch.inference_mode(), self.model.trace(**inputs) as tracer:
            for _, envoy in self.points:
                saved.append(hook_value(envoy, self.site).save())
            tracer.stop()
        return saved

    def _harvest(self) -> list[torch.Tensor]:
        """Refill: n_ctxs // 2 contexts -> [per hook [n, d]] (+ index [n, 2] if return_index)."""
        cfg, n_ctx = self.cfg, self.cfg.n_ctxs // 2
        cap = n_ctx * cfg.ctx_len
        pin = self.model.device.type == "cuda" and torch.device(cfg.device).type == "cpu"
        out = [
            torch.empty(cap, self.d_submodule, dtype=self.dtype, device=cfg.device, pin_memory=pin)
            for _ in self.points
        ]
        index, n, done = [], 0, 0
        while done < n_ctx or n == 0:  # (a refill whose contexts had no kept token takes more)
            batch = self.stream.next_batch(min(cfg.lm_batch_size, max(n_ctx - done, 1)))
            if batch is None:
                break
            ids, mask, keep, pos, first = batch
            done += ids.shape[0]
            acts = self._forward(ids, mask, pos)
            k = int(keep.sum())
            keep_dev = keep.to(acts[0].device)
            for o, a in zip(out, acts):
                o[n : n + k].copy_(a[keep_dev], non_blocking=pin)
            if cfg.return_index:
                index.append(torch.stack([keep.nonzero()[:, 0] + first, pos[keep]], 1))
            n += k
        if pin:
            torch.cuda.synchronize()
        out = [o[:n] for o in out]
        if cfg.return_index:
            out.append(torch.cat(index).to(cfg.device) if index else torch.empty(0, 2, dtype=torch.long))
        return self._drop_massive(out)

    def _drop_massive(self, out: list[torch.Tensor]) -> list[torch.Tensor]:
        """Drop the rows whose norm at any hook exceeds max_norm (set from this refill's median the
        first time); out = [per hook [n, d]] (+ index [n, 2])."""
        if self.cfg.max_norm_multiple is None or not len(out[0]):
            self._kept += len(out[0])
            return out
        norms = [torch.linalg.vector_norm(x.float(), dim=1) for x in out[: len(self.points)]]
        if self.max_norm is None:
            self.max_norm = [massive_limit(n, self.cfg.max_norm_multiple) for n in norms]
        massive = torch.zeros_like(norms[0], dtype=torch.bool)
        for n, limit in zip(norms, self.max_norm):
            massive |= n > limit
        n_massive = int(massive.sum())
        self.massive_dropped += n_massive
        self._kept += len(massive) - n_massive
        if not n_massive:
            return out
        keep = (~massive).nonzero().squeeze(1)
        return [t.index_select(0, keep) for t in out]

    def _next_round(self) -> bool:
        """Harvest refill r+1 and build the pool B_r + A_{r+1}; False when nothing is left.

        Peak memory ~1.5x the capacity: B_r, the new refill and the new pool; batches are
        gathered from the pool through the round's permutation (one copy per batch)."""
        r = self._round + 1
        self._snaps = [self._snaps[1], self.stream.state()]
        self._pool = None  # consumed: free it before harvesting
        chunk = self._harvest() if not self.stream.ended else None
        B_prev, self._B = self._B, None
        n_prev = len(B_prev[0]) if B_prev is not None else 0
        if chunk is not None and len(chunk[0]):
            split = torch.randperm(len(chunk[0]), generator=seeded_generator(self.cfg.seed, r, 0))
            split = split.to(chunk[0].device)
            A, B = split[: len(split) // 2], split[len(split) // 2 :]
            pool = []
            for i, t in enumerate(chunk):
                p = torch.empty((n_prev + len(A), *t.shape[1:]), dtype=t.dtype, device=t.device)
                if n_prev:
                    p[:n_prev] = B_prev[i]
                torch.index_select(t, 0, A, out=p[n_prev:])
                pool.append(p)
            self._B = [t[B] for t in chunk]
            del chunk
        else:
            pool = B_prev
        self._round, self._pos = r, 0
        if pool is None or not len(pool[0]):
            return False
        self._pool = pool
        self._perm = torch.randperm(len(pool[0]), generator=seeded_generator(self.cfg.seed, r, 1)).to(
            pool[0].device
        )
        return True

    def __iter__(self):
        return self

    def __next__(self):
        parts, need = [], self.cfg.batch_size
        while need > 0:
            if self._pool is None or self._pos >= len(self._pool[0]):
                if not self._next_round():
                    break
            take = min(need, len(self._pool[0]) - self._pos)
            idx = self._perm[self._pos : self._pos + take]
            parts.append([t.index_select(0, idx) for t in self._pool])
            self._pos += take
            need -= take
        if not parts:
            raise DataExhausted(self.tokens_yielded, self.texts_consumed, self.cfg.epochs)
        cols = [p[0] if len(parts) == 1 else torch.cat(p) for p in zip(*parts)]
        self.tokens_yielded += len(cols[0])
        self.batches_yielded += 1
        x = dict(zip(self.hooks, cols)) if self.multi else cols[0]
        return (x, cols[-1]) if self.cfg.return_index else x

    # -- exact resume
    _STATE_KEYS = (
        "ctx_len",
        "n_ctxs",
        "lm_batch_size",
        "pack",
        "padding_side",
        "exclude_first_k",
        "prepend_bos",
        "max_norm_multiple",
        "seed",
    )

    def state_dict(self) -> dict:
        """JSON-able state for exact resume (see the class docstring)."""
        return {
            "version": 1,
            "round": self._round,
            "pos": self._pos,
            "snaps": self._snaps,
            "hooks": self.hooks,
            "tokens_yielded": self.tokens_yielded,
            "batches_yielded": self.batches_yielded,
            "stream": self.stream.state(),
            "max_norm": self.max_norm,
            "massive_counts": [self.massive_dropped, self._kept],
            **{k: getattr(self.cfg, k) for k in self._STATE_KEYS},
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was taken (same data and config required)."""
        if "refresh_batch_size" in state:  # states written before it was renamed lm_batch_size
            state = {**state, "lm_batch_size": state["refresh_batch_size"]}
        for k in ("hooks", *self._STATE_KEYS):
            mine = self.hooks if k == "hooks" else getattr(self.cfg, k)
            if state.get(k) != mine:
                raise ValueError(f"buffer state: {k}={state.get(k)!r} does not match this buffer's {mine!r}")
        self.tokens_yielded, self.batches_yielded = state["tokens_yielded"], state["batches_yielded"]
        self.max_norm = state.get("max_norm")  # the saved rule, not one re-estimated on a later refill
        r, (snap_prev, snap_cur) = state["round"], state["snaps"]
        self._round, self._pos, self._pool, self._B, self._snaps = -1, 0, None, None, [None, None]
        if r < 0:
            self.stream.restore(state["stream"])
            return
        if snap_prev is not None:  # rebuild B_{r-1} by re-harvesting refill r-1
            self.stream.restore(snap_prev)
            self._round = r - 2
            self._next_round()
            if self.stream.state() != snap_cur:
                raise ValueError(
                    "buffer state: re-harvest did not reach the saved stream position (data changed?)"
                )
        else:
            self.stream.restore(snap_cur)
            self._round = r - 1
        self._next_round()
        self._pos = state["pos"]
        self.massive_dropped, self._kept = state.get("massive_counts", [0, 0])  # re-harvests counted again
        if self.stream.state() != state["stream"]:
            raise ValueError(
                "buffer state: re-harvest did not reach the saved stream position (data changed?)"
            )
