"""Harvest activations, train a sweep of JumpReLU SAEs, evaluate them, save and optionally push.

    python dictionary_learning/demo.py                         # embedded SmolLM2-135M on the sample, CPU
    python dictionary_learning/demo.py --preset gemma-2-2b     # the original recipe (GPU, Hub)
    python dictionary_learning/demo.py --preset gemma-2-2b --plan   # what would run, without running it
    torchrun --nproc_per_node 4 dictionary_learning/demo.py ...     # 4 GPUs, data parallel (distributed.py)

Stages: data (dataset.load_texts, train and validation splits) -> activations (buffer.ActivationBuffer,
optionally written once to an on-disk cache.ActivationCache) -> training (training.trainSAE, one
harvest for the whole sweep) -> evaluation (eval_report on the held-out split) -> Hub push.
Presets live in demo_config.py; every DemoConfig field can be overridden from the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dictionary_learning.demo_config import (
    DEFAULT_PRESET,
    PRESETS,
    DemoConfig,
    get_preset,
    parse_value,
    problems,
)
from dictionary_learning.utils import read_json

log = logging.getLogger("demo")

# Depth and width of well-known models, so --plan works without downloading a config.
KNOWN_MODELS = {
    "smollm2-135m": (30, 576),
    "google/gemma-2-2b": (26, 2304),
    "google/gemma-2-9b": (42, 3584),
    "EleutherAI/pythia-70m-deduped": (6, 512),
    "EleutherAI/pythia-160m-deduped": (12, 768),
    "gpt2": (12, 768),
}


class UsageError(Exception):
    """Bad flags or settings: printed as one line, exit code 2."""


# ---------------------------------------------------------------------------- command line


def _list(kind):
    return lambda s: [kind(v) for v in s.replace(",", " ").split()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=DEFAULT_PRESET, help=f"one of {', '.join(PRESETS)}")
    o = p.add_argument_group("overrides of the preset's fields (demo_config.DemoConfig)")
    o.add_argument("--model", help="embedded name, local folder or Hub id")
    o.add_argument("--layer", type=int)
    o.add_argument("--site", choices=["resid_post", "resid_pre", "mlp_out"])
    o.add_argument("--dataset", help="'sample', 'hub', a local folder/file, or a Hub dataset id")
    o.add_argument("--tokens", type=int, help="training tokens per trainer")
    o.add_argument("--ctx-len", type=int)
    o.add_argument("--batch-size", dest="batch_size", type=int, help="SAE batch (activation vectors)")
    o.add_argument("--lm-batch-size", type=int, help="contexts per LM forward")
    o.add_argument("--dict-size", "--widths", dest="widths", type=_list(int), help="e.g. 4608 or 2304,4608")
    o.add_argument("--target-l0s", type=_list(float), help="e.g. 20,40,80")
    o.add_argument("--sparsity-coeffs", type=_list(float))
    o.add_argument("--sparsity-mode", choices=["target_l0", "l0", "tanh"])
    o.add_argument("--lrs", type=_list(float))
    o.add_argument("--seeds", type=_list(int))
    o.add_argument("--device", help="cpu, cuda, cuda:1 (default: a GPU where present)")
    o.add_argument("--dtype", help="language-model dtype: float32, bfloat16, float16")
    o.add_argument("--eval-tokens", type=int)
    o.add_argument("--save-dir")
    o.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override any DemoConfig field, e.g. --set warmup_steps=500 (repeatable)",
    )
    p.add_argument(
        "--cache-activations",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="harvest once into an on-disk activation cache, train from it",
    )
    p.add_argument("--from-cache", metavar="DIR_OR_REPO", help="train from an existing activation cache")
    p.add_argument("--wandb", action="store_true", help="log to Weights & Biases (WANDB_MODE=offline works)")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="push the trained SAEs to this Hub model repo")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create a private repo")
    p.add_argument("--push-checkpoints", action="store_true",
                   help="with --push-to-hub: also push the SAE snapshots checkpoints/step_*/")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoints")
    p.add_argument("--overwrite", action="store_true", help="replace existing run folders")
    p.add_argument("--eval-only", metavar="RUN_DIR", help="only evaluate the SAEs under RUN_DIR")
    p.add_argument("--plan", action="store_true", help="print what would run, then exit")
    p.add_argument("--features", choices=["middle", "all"], default="middle",
                   help="feature browser (features.py) of the SAE with the middle target L0, or of all")  # fmt: skip
    p.add_argument("--no-features", dest="features", action="store_const", const=None, help="no feature browser")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    d = p.add_argument_group("under torchrun (distributed.py)")
    d.add_argument("--distributed-mode", choices=["data", "sweep"], default="data",
                   help="data: every rank trains every SAE on its data shard, gradients all-reduced; "
                   "sweep: the sweep's trainers are split across the ranks (default: data)")  # fmt: skip
    d.add_argument("--dist-timeout", type=float, metavar="SECONDS",
                   help="a rank waiting longer for a silent peer fails (default $SAE_DIST_TIMEOUT or 1800)")  # fmt: skip
    return p.parse_args(argv)


def _flag(name: str, value) -> str:
    """How a DemoConfig field is given on the command line: '--batch-size 0', '--widths 4608,9216'."""
    flag = "--" + name.replace("_", "-")
    return f"{flag} {','.join(map(str, value)) if isinstance(value, list) else value}"


def build_config(args) -> DemoConfig:
    """The preset with the command-line overrides applied; unknown presets/fields, values of the wrong
    type (--set values are parsed by the field's type) or out of range -> UsageError naming the flag."""
    try:
        cfg = get_preset(args.preset)
    except ValueError as e:
        raise UsageError(str(e)) from None
    fields = {f.name: f for f in dataclasses.fields(DemoConfig)}
    given = {}  # field -> the flag that set it, for the messages
    for name in fields:
        value = getattr(args, name, None)
        if value is not None:
            setattr(cfg, name, value)
            given[name] = _flag(name, value)
    if args.cache_activations is not None:
        cfg.cache_activations = args.cache_activations
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep or key not in fields:
            raise UsageError(f"--set {item!r}: unknown field {key!r}; fields: {', '.join(fields)}")
        try:
            setattr(cfg, key, parse_value(key, raw))
        except ValueError as e:
            raise UsageError(f"--set {e}") from None
        given[key] = f"--set {item}"
    for name, why in problems(cfg):
        where = given.get(name) or f"preset {args.preset!r}: {name}={getattr(cfg, name)!r}"
        raise UsageError(f"{where}: {why}")
    if cfg.tokens < cfg.batch_size:
        raise UsageError(f"--tokens {cfg.tokens} is less than one SAE batch ({cfg.batch_size})")
    return cfg


# ---------------------------------------------------------------------------- sweep and plan


def model_shape(cfg: DemoConfig) -> tuple[int, int]:
    """(n_layers, d_model) from the known table, else the local/Hub config."""
    if cfg.model in KNOWN_MODELS:
        return KNOWN_MODELS[cfg.model]
    from transformers import AutoConfig

    from dictionary_learning.utils import resolve_model

    try:
        path = resolve_model(cfg.model)
    except FileNotFoundError as e:  # a local path that is not there (a Hub id is looked up below)
        raise UsageError(f"--model {e}") from None
    try:
        c = AutoConfig.from_pretrained(path)
    except OSError as e:
        raise UsageError(f"--model {cfg.model!r}: config not found ({str(e).splitlines()[0]})") from None
    c = getattr(c, "text_config", c)
    return c.num_hidden_layers, c.hidden_size


def sweep(cfg: DemoConfig, d_model: int, steps: int) -> list:
    """One TrainerConfig per point of widths x sparsity x lrs x seeds."""
    from dictionary_learning.config import TrainerConfig

    if cfg.sparsity_mode == "target_l0":
        sparsity = [
            {"target_l0": t, "sparsity_coeff": c} for t in cfg.target_l0s for c in cfg.sparsity_coeffs
        ]
    else:
        sparsity = [{"sparsity_coeff": c} for c in cfg.sparsity_coeffs]
    return [
        TrainerConfig(
            activation_dim=d_model,
            dict_size=w,
            lr=lr,
            seed=seed,
            steps=steps,
            sparsity_mode=cfg.sparsity_mode,
            pre_act_loss_coeff=cfg.pre_act_loss_coeff,
            bandwidth=cfg.bandwidth,
            threshold_init=cfg.threshold_init,
            warmup_steps=cfg.warmup_steps,
            sparsity_warmup_steps=cfg.sparsity_warmup_steps,
            decay_start=cfg.decay_start,
            device=cfg.device,
            autocast=cfg.sae_autocast,
            **sp,
        )
        for w, sp, lr, seed in itertools.product(cfg.widths, sparsity, cfg.lrs, cfg.seeds)
    ]


def run_meta(cfg: DemoConfig, buffer_cfg: dict | None = None) -> dict:
    from dictionary_learning.hooks import hook_name

    return {
        "model": cfg.model,
        "layer": cfg.layer,
        "site": cfg.site,
        "hook": hook_name(cfg.layer, cfg.site),
        "dataset": cfg.dataset,
        "data_seed": cfg.seed,
        "validation_fraction": cfg.validation_fraction,
        "ctx_len": cfg.ctx_len,
        "exclude_first_k": cfg.exclude_first_k,
        "prepend_bos": cfg.prepend_bos,
        "max_norm_multiple": cfg.max_norm_multiple,
        "buffer": buffer_cfg or {},
        "demo": cfg.to_dict(),
    }


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def plan(cfg: DemoConfig) -> dict:
    """What would run: sizes, steps, trainers, memory estimates, output folder (no model load)."""
    from dictionary_learning.training import layer_dir

    n_layers, d = model_shape(cfg)
    if not 0 <= cfg.layer < n_layers:
        raise UsageError(f"--layer {cfg.layer} is out of range: {cfg.model} has layers 0..{n_layers - 1}")
    steps = cfg.tokens // cfg.batch_size
    trainers = sweep(dataclasses.replace(cfg, device=cfg.device or "cpu"), d, steps)
    # per trainer: params + grads + 2 Adam moments (fp32), plus a few [B, m] activations per step
    per_trainer = [
        4 * (4 * (2 * d * t.dict_size + t.dict_size * 2 + d) + 3 * cfg.batch_size * t.dict_size)
        for t in trainers
    ]
    buffer_bytes = cfg.buffer_tokens * d * 4
    return {
        "preset": cfg.model,
        "layer": cfg.layer,
        "site": cfg.site,
        "d_model": d,
        "dataset": cfg.dataset,
        "tokens_per_trainer": steps * cfg.batch_size,
        "steps": steps,
        "batch_size": cfg.batch_size,
        "trainers": [t.name for t in trainers],
        "activation_buffer": _gib(buffer_bytes),
        "sae_and_optimizer_memory": _gib(sum(per_trainer)),
        "activation_cache_on_disk": "at most " + _gib(cfg.tokens * d * 4)
        if cfg.cache_activations
        else "none (streaming)",
        "output_folder": str(layer_dir(cfg.save_dir, run_meta(cfg))),
    }


# ---------------------------------------------------------------------------- the run


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
    epochs = int(ctx.max(math.ceil(steps * batch / cache.n_tokens)))  # the ranks agree
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


def evaluate_run(run_dir: Path, cfg: DemoConfig, args) -> list[dict]:
    """Evaluate every SAE under run_dir on the held-out split; returns their eval_results."""
    from dictionary_learning import eval_report
    from dictionary_learning.eval_summary import find_saes

    argv = [str(run_dir), "--n-tokens", str(cfg.eval_tokens), "--dtype", cfg.dtype]
    if cfg.device:
        argv += ["--device", cfg.device]
    if args.quiet:
        argv.append("--no-progress")
    if eval_report.main(argv) != 0:
        raise RuntimeError(f"evaluation of {run_dir} failed (see the messages above)")
    return [
        {"folder": str(p), **json.loads((p / "eval_results.json").read_text())} for p in find_saes(run_dir)
    ]


def print_summary(rows: list[dict]) -> None:
    """The headline table: FVE in both definitions (standard = SAELens/SAEBench, centred =
    dictionary_learning), delta loss and loss recovered vs mean ablation, with 95% intervals."""
    num = lambda v: "n/a" if v is None else f"{v:.3f}"
    ci = lambda r, k: (
        num(r.get(k)) + (" [{}, {}]".format(*map(num, r[k + "_ci"])) if r.get(k + "_ci") else "")
    )
    print(f"\n{'width':>7} {'L0':>7} {'FVE standard [95%]':>24} {'FVE centred':>11} {'delta loss':>10} "
          f"{'loss rec. mean abl. [95%]':>26} {'massive':>8}  folder")  # fmt: skip
    for r in rows:
        width = r.get("dict_size") or r.get("d_sae") or "?"
        massive = (r.get("massive_tokens") or {}).get("share_dropped", 0.0)
        print(f"{width:>7} {r['l0']:7.1f} {ci(r, 'frac_variance_explained'):>24} "
              f"{num(r.get('frac_variance_explained_centred')):>11} {num(r.get('delta_loss')):>10} "
              f"{ci(r, 'frac_recovered_mean'):>26} {massive:8.2%}  {r['folder']}")  # fmt: skip


def preflight(cfg: DemoConfig, args) -> None:
    """What can be checked before any data, model or folder is touched: flag clashes, the device
    (and the CUDA allocator setting), the Hub push (repo id, online, token)."""
    from dictionary_learning.hub import HubPushError, check_push
    from dictionary_learning.utils import check_device, cuda_alloc_conf

    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite: pass one, not both")
    if args.push_checkpoints and not args.push_to_hub:
        raise UsageError("--push-checkpoints needs --push-to-hub REPO_ID")
    try:
        cfg.device = check_device(cfg.device)
    except ValueError as e:
        raise UsageError(f"--device {cfg.device}: {e}; pick the CPU with --device cpu") from None
    cuda_alloc_conf(cfg.device)  # expandable_segments:True unless set; before the first CUDA allocation
    if args.push_to_hub:  # fail before hours of training, not after
        try:
            check_push(args.push_to_hub)
        except HubPushError as e:
            raise UsageError(f"--push-to-hub {args.push_to_hub}: {e}") from None


def check_splits(cfg: DemoConfig, train_texts: list[str], need_train: bool) -> None:
    """The evaluation reads the held-out split: an empty one fails now, not after training."""
    from dataset import load_texts

    if need_train and not train_texts:
        raise UsageError(f"--dataset {cfg.dataset}: its train split is empty")
    if not load_texts(cfg.dataset, "validation", seed=cfg.seed, validation_fraction=cfg.validation_fraction):
        raise UsageError(
            f"--dataset {cfg.dataset}: its validation split is empty (the evaluation's held-out text; "
            f"validation_fraction {cfg.validation_fraction}): add texts, or --set validation_fraction=..."
        )


# the library's words for what the user typed as flags
CLI_WORDS = {"resume=True": "--resume", "overwrite=True": "--overwrite"}


def cli_words(msg: str) -> str:
    for api, flag in CLI_WORDS.items():
        msg = msg.replace(api, flag)
    return msg


def run(cfg: DemoConfig, args) -> list[dict] | None:
    """The whole run; the run folder stays locked from before its first write to the end (_run)."""
    with contextlib.ExitStack() as held:
        return _run(cfg, args, held)


def _run(cfg: DemoConfig, args, held: contextlib.ExitStack) -> list[dict] | None:
    from dataset import load_texts
    from dictionary_learning import distributed
    from dictionary_learning.training import hold_run_folder, layer_dir, trainSAE
    from dictionary_learning.utils import default_device, load_language_model, write_json

    cfg.device = cfg.device or default_device()
    ctx = distributed.init(args.distributed_mode, device=cfg.device, timeout_s=args.dist_timeout)  # torchrun
    cfg.device = ctx.pin_device(cfg.device)  # cuda -> cuda:{LOCAL_RANK}
    if not ctx.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    info = plan(cfg)
    steps = info["steps"]
    out_dir = layer_dir(cfg.save_dir, run_meta(cfg))
    t0 = time.time()
    train_texts = []  # --from-cache: the activations are given
    if not args.from_cache:
        train_texts = load_texts(
            cfg.dataset, "train", seed=cfg.seed, validation_fraction=cfg.validation_fraction
        )
    check_splits(cfg, train_texts, need_train=not args.from_cache)
    train_texts = distributed.shard(train_texts)  # texts i with i % world_size == rank
    # from here to the end of run() the run folder (cache, trainers, summaries) is this run's: a
    # process using it already makes this one stop now, before anything in it is written
    held.enter_context(hold_run_folder(out_dir))
    model = None
    if not args.from_cache:
        model = load_language_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    data, buffer_cfg = activations(cfg, args, model, train_texts, steps, out_dir)
    times = {"data_and_activations_s": time.time() - t0}  # loading, and the harvest into a cache
    val_texts = None if args.from_cache else load_texts(cfg.dataset, "validation", seed=cfg.seed,
                                                        validation_fraction=cfg.validation_fraction)  # fmt: skip
    validation = validation_activations(cfg, model, val_texts) if ctx.is_main else None
    trainers = sweep(cfg, info["d_model"], steps)
    log_every = max(1, min(100, steps // 20))
    trainSAE(
        data,
        trainers,
        steps,
        cfg.save_dir,
        run_meta(cfg, buffer_cfg),
        log_every=log_every,
        checkpoint_every=max(log_every, min(1000, steps // 4)),
        resume=args.resume or distributed.restart_count() > 0,  # torchrun --max-restarts resumes
        overwrite=args.overwrite,
        use_wandb=args.wandb,
        validation=validation,
        eval_every=cfg.eval_every or max(1, steps // 10),
        progress=not args.quiet,
    )
    del model, data
    distributed.shutdown()
    if not ctx.is_main:  # rank 0 evaluates and pushes every trainer
        return None
    times["training_s"] = time.time() - t0 - sum(times.values())  # (streaming: harvest included)
    log.info("training done in %.0f s", time.time() - t0)
    rows = evaluate_run(out_dir, cfg, args)
    times["evaluation_s"] = time.time() - t0 - sum(times.values())
    if args.features:  # <trainer>/features/index.html
        from dictionary_learning import features

        flags = ["--dtype", cfg.dtype, *(["--device", cfg.device] if cfg.device else [])]
        flags += ["--no-progress"] * args.quiet + ["--overwrite"] * args.overwrite
        features.build_for_run([Path(r["folder"]) for r in rows], args.features, flags)
    times["features_s"] = time.time() - t0 - sum(times.values())
    write_json(out_dir / "demo_config.json", cfg.to_dict())
    write_json(out_dir / "timings.json", {**times, "total_s": time.time() - t0})
    if args.push_to_hub:
        from dictionary_learning.hub import push_to_hub

        push_to_hub(out_dir, args.push_to_hub, private=args.private, checkpoints=args.push_checkpoints)
    log.info("all stages done in %.0f s", time.time() - t0)
    return rows


def main(argv=None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    args = parse_args(argv)
    try:
        cfg = build_config(args)
        if args.plan:
            print(json.dumps(plan(cfg), indent=2))
            return 0
        preflight(cfg, args)
        if args.eval_only:
            print_summary(evaluate_run(Path(args.eval_only), cfg, args))
            return 0
        rows = run(cfg, args)
        if rows is not None:
            print_summary(rows)
        return 0
    except UsageError as e:
        print(f"demo.py: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError, RuntimeError) as e:  # data, files, Hub, data exhausted, distributed
        msg = cli_words(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
        log.debug("traceback", exc_info=True)
        print(f"demo.py: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("demo.py: interrupted; resume with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
