"""The demo's data stage: the training batches (a streaming ActivationBuffer, or an on-disk activation
cache harvested once, or given with --from-cache, and re-read for as many epochs as the budget needs)
and the held-out activations for the checks during training."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from dictionary_learning.demo_config import DemoConfig, UsageError
from dictionary_learning.demo_plan import run_meta
from dictionary_learning.utils import read_json

log = logging.getLogger("demo")


def harvest_key(cfg: DemoConfig, n_tokens: int) -> dict:
    """The settings an activation cache depends on; a cache made with others is never reused."""
    keys = ("model", "layer", "site", "dataset", "seed", "validation_fraction", "ctx_len", "exclude_first_k",
            "prepend_bos", "max_norm_multiple")  # fmt: skip
    return {**{k: getattr(cfg, k) for k in keys}, "n_tokens": n_tokens}


def check_from_cache(cache, cfg: DemoConfig) -> None:
    """A --from-cache cache must have been harvested with this run's model, hook and data split,
    or the SAEs would be saved and evaluated under the wrong names, or evaluated on training text."""
    want = harvest_key(cfg, 0)
    have = dict(cache.manifest.get("harvest_key") or {})
    if not have:  # made outside demo.py: check what its manifest records
        have = {k: cache.manifest[k] for k in ("layer", "site") if cache.manifest.get(k) is not None}
        log.warning(
            "--from-cache %s records no data split: make sure it holds none of the validation text", cache.dir
        )
    diff = {k: v for k, v in have.items() if k != "n_tokens" and v != want.get(k)}
    if diff:
        raise UsageError(
            f"--from-cache {cache.dir} was harvested with {diff}; this run has "
            f"{ {k: want.get(k) for k in diff} }: pass matching flags"
        )


def cache_matches(cache_dir, key: dict, overwrite: bool) -> bool:
    """True when cache_dir holds a complete cache harvested with `key`; False when there is none (or
    a stale one and --overwrite was given); a stale cache without --overwrite is a UsageError."""
    manifest = Path(cache_dir) / "manifest.json"
    if not manifest.exists():
        return False
    old = read_json(manifest).get("harvest_key")
    if old == key:
        return True
    if overwrite:
        return False
    raise UsageError(
        f"{cache_dir} holds activations harvested with other settings ({old}); "
        "pass --overwrite to re-harvest, or another --save-dir"
    )


def activations(cfg: DemoConfig, args, model, train_texts, steps: int, out_dir: Path):
    """The iterator of [batch_size, d] training batches: a streaming buffer, or an activation
    cache harvested once (or given with --from-cache) and re-read for as many epochs as needed."""
    from dictionary_learning import distributed
    from dictionary_learning.buffer import ActivationBuffer
    from dictionary_learning.cache import ActivationCache, write_cache

    ctx = distributed.context()  # under torchrun each rank yields its share of every global batch
    batch = ctx.local_batch_size(cfg.batch_size)
    n_ctxs = max(2, cfg.buffer_tokens // cfg.ctx_len)
    common = dict(
        ctx_len=cfg.ctx_len,
        n_ctxs=n_ctxs,
        lm_batch_size=cfg.lm_batch_size,
        seed=cfg.seed,
        exclude_first_k=cfg.exclude_first_k,
        prepend_bos=cfg.prepend_bos,
        max_norm_multiple=cfg.max_norm_multiple,
    )
    if not (cfg.cache_activations or args.from_cache):
        buf = ActivationBuffer(
            train_texts,
            model,
            cfg.layer,
            cfg.site,
            batch_size=batch,
            epochs=cfg.max_epochs,
            **common,
        )
        return buf, buf.config
    cache_dir = args.from_cache or out_dir / "activation_cache"
    if ctx.distributed and not args.from_cache:  # each rank harvests its text shard into its own cache
        cache_dir = cache_dir / f"rank{ctx.rank}-of-{ctx.world_size}"
    else:
        batch = cfg.batch_size  # one cache read with the global batch; RankSlice below
    n_tokens = cfg.tokens // ctx.world_size
    key = harvest_key(cfg, n_tokens)
    if not args.from_cache and not cache_matches(cache_dir, key, overwrite=args.overwrite):
        buf = ActivationBuffer(train_texts, model, cfg.layer, cfg.site, batch_size=8192, epochs=1, **common)
        t0 = time.time()
        meta = {**run_meta(cfg, buf.config), "harvest_key": key}
        m = write_cache(buf, cache_dir, n_tokens=n_tokens, meta=meta, overwrite=args.overwrite,
                        progress=not args.quiet and ctx.is_main, reread=cfg.max_epochs > 1)  # fmt: skip
        log.info("harvested %d tokens into %s in %.0f s", m["n_tokens"], cache_dir, time.time() - t0)
    cache = ActivationCache(
        cache_dir, batch_size=batch, seed=cfg.seed, epochs=1, max_norm_multiple=cfg.max_norm_multiple
    )
    if args.from_cache:
        check_from_cache(cache, cfg)
    # a cache harvested without the massive-token rule drops rows as they are read: leave room for 1%
    usable = cache.n_tokens if cache.read_multiple is None else cache.n_tokens * 0.99
    epochs = int(ctx.max(math.ceil(steps * batch / usable)))  # the ranks agree
    if epochs > cfg.max_epochs:
        raise UsageError(
            f"not enough tokens: {cache.n_tokens} training tokens, the budget of {steps} steps needs "
            f"{epochs} epochs (max_epochs={cfg.max_epochs}); lower --tokens or --set max_epochs={epochs}"
        )
    log.info("activation cache: %d tokens, %d epoch(s) for %d steps", cache.n_tokens, epochs, steps)
    cache.epochs = epochs  # nothing read yet
    data = distributed.RankSlice(cache) if ctx.distributed and args.from_cache else cache
    buffer_cfg = {**cache.manifest.get("buffer", {}), "cache": str(cache_dir), "epochs": epochs}
    return data, {**buffer_cfg, "massive_tokens": cache.massive}


def validation_activations(cfg: DemoConfig, model, texts):
    """cfg.val_tokens held-out activations [N, d] (or None) from the validation split, by the training
    buffer's rules (windows, BOS, special and massive tokens), for the held-out metrics during training."""
    from dictionary_learning.buffer import ActivationBuffer
    from dictionary_learning.utils import DataExhausted

    if not cfg.val_tokens or model is None or not texts:
        return None
    buf = ActivationBuffer(texts, model, cfg.layer, cfg.site, ctx_len=cfg.ctx_len, lm_batch_size=cfg.lm_batch_size,
                           n_ctxs=max(2, 2 * -(-cfg.val_tokens // cfg.ctx_len)), batch_size=cfg.val_tokens,
                           exclude_first_k=cfg.exclude_first_k, prepend_bos=cfg.prepend_bos,
                           max_norm_multiple=cfg.max_norm_multiple, seed=cfg.seed)  # fmt: skip
    try:
        return next(buf)
    except DataExhausted:
        return None
