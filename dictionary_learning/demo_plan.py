"""What a demo run will do, from its DemoConfig: the model's shape, the sweep of trainer configs, the
run metadata every run folder records, and the plan `demo.py --plan` prints (no model is loaded)."""

from __future__ import annotations

import dataclasses
import itertools

from dictionary_learning.demo_config import DemoConfig, UsageError

# Depth and width of well-known models, so --plan works without downloading a config.
KNOWN_MODELS = {
    "smollm2-135m": (30, 576),
    "google/gemma-2-2b": (26, 2304),
    "google/gemma-2-9b": (42, 3584),
    "EleutherAI/pythia-70m-deduped": (6, 512),
    "EleutherAI/pythia-160m-deduped": (12, 768),
    "gpt2": (12, 768),
}


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
