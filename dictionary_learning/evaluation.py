"""Evaluate a sparse autoencoder on held-out text: fidelity, sparsity and downstream next-token loss.

One procedure for every SAE that `JumpReluAutoEncoder.from_pretrained` loads (our run folders, SAELens
folders, Gemma Scope params.npz), so their numbers are comparable (REFERENCE.md, "Evaluation metrics").

Protocol (`evaluate_many`; `evaluate` is it with one SAE; the passes that do not depend on the SAE
run once for all):
- Text: held-out text (the CLI: the data set's validation split), packed by `tokens.pack_texts`
  into [N, ctx_len] windows (BOS first where the model expects it: `prepend_bos`); the first
  windows holding at least `n_tokens` real tokens are scored. The selection does not depend on
  `lm_batch_size`.
- Special tokens (BOS/EOS/PAD, the first `exclude_first_k` positions of a window) and massive-
  activation tokens (norm > max_norm_multiple x the median norm; Sun et al. 2024, arXiv 2402.17762)
  are treated alike for the headline metrics: excluded from every reconstruction and sparsity metric,
  left UNPATCHED in the spliced / zero- / mean-ablated passes, and the loss and KL are taken over the
  positions whose NEXT token is kept and that come at or after the first kept one (before it the
  splice changes nothing, and such positions would dilute delta_loss and KL). `all_tokens` repeats
  FVE, MSE and the spliced loss with the massive tokens included (and patched), so the reader sees
  what they do.
- Reference tokens, disjoint from the scored ones: `mean_texts` (the CLI: the data set's train split)
  or else the held-out windows after the scored ones. Their median norm sets the massive-token
  threshold, and their mean (over kept tokens) is the mean-ablation activation.
- Everything in fp32 (the SAE is cast to fp32, logits upcast), accumulated as float64 sums per
  window, so results do not depend on the batch size. 95% intervals: percentile bootstrap over the
  scored windows (metrics.bootstrap; windows of the same text are not independent, so it is a
  little optimistic).

Metrics (per token means unless stated; x: activation, x̂: reconstruction, f: latents):
- l0 = E #(f != 0); frac_alive = share of latents firing at least once on the n_tokens scored
  tokens; dead_latents = how many never do (few tokens call rare latents dead).
- frac_variance_explained = 1 − Σ‖x − x̂‖² / Σ‖x − mean x‖² (SAELens, SAEBench);
  frac_variance_explained_centred = 1 − Σ_d Var(x − x̂) / Σ_d Var(x) (dictionary_learning);
  sums pooled over all scored tokens (metrics.fve).
- mse = E ‖x − x̂‖² (summed over dims, as the training loss); cossim = E cos(x, x̂);
  l2_ratio = E ‖x̂‖ / ‖x‖; relative_reconstruction_bias = E‖x̂‖² / E<x, x̂> (arXiv 2404.16014 eq. 10).
- loss_original / loss_reconstructed / loss_zero / loss_mean: mean next-token cross-entropy (nats)
  with the clean activation, x̂ spliced in, zero ablation, mean ablation; delta_loss = loss_reconstructed
  − loss_original.
- frac_recovered = (L_zero − L_sae) / (L_zero − L_clean); frac_recovered_mean uses L_mean.
- kl_div = E KL(clean ‖ spliced) per token; kl_score = 1 − kl_div / kl_div_zero; kl_score_mean
  likewise against mean ablation.
- `*_ci`: the 95% bootstrap interval [lo, hi] of frac_variance_explained(_centred), delta_loss,
  frac_recovered(_mean) and kl_div.

CLI: `python -m dictionary_learning.eval_report RUN_DIR ...` (eval_report.py holds the CLI, the summary
tables and the plots).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from .buffer import check_max_norm_multiple, massive_limit, massive_record
from .hooks import get_hook_module, hook_name, traced_forward
from .metrics import (
    BOOTSTRAP_RESAMPLES,
    ReconstructionStats,
    bootstrap,
    cross_entropy,
    frac_recovered,
    kl_divergence,
    resample_weights,
)
from .tokens import adds_bos, pack_texts

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """Evaluation settings; the CLI flags default to these."""

    n_tokens: int = 8192
    """Real (non-special) held-out tokens to score; the first packed windows reaching it are used."""
    lm_batch_size: int = 8
    """Contexts per language-model forward pass (does not change the results)."""
    ctx_len: int = 128
    """Tokens per packed context window."""
    device: str | None = None
    """Device for the SAE and inputs; None: the language model's device."""
    exclude_first_k: int = 0
    """Also treat the first k positions of each window like special tokens (attention sinks);
    the CLI takes it from the run's buffer config."""
    prepend_bos: bool | None = None
    """Start every window with BOS (never scored); None: when the tokenizer adds BOS itself (Gemma)."""
    max_norm_multiple: float | None = 10.0
    """Tokens with activation norm above this multiple of the reference tokens' median norm are
    massive: left out of the headline metrics (reported in `all_tokens`); None: none are."""
    n_ref_tokens: int = 8192
    """Reference tokens (mean ablation, median norm), disjoint from the scored ones."""
    bootstrap_resamples: int = BOOTSTRAP_RESAMPLES
    """Bootstrap resamples of the scored windows for the 95% intervals."""


# ---------------------------------------------------------------------------- pure metrics


def next_token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, keep: torch.Tensor):
    """Log-probabilities at the loss positions: those whose NEXT token is kept and that a splice at the
    kept positions reaches (a kept position at or before them; before the first one, spliced = clean).

    logits [B, T, V], input_ids and keep [B, T] -> (logp [K, V] fp32, targets [K], rows [K]), where the
    K positions are t < T-1 with keep[:, t+1] and any(keep[:, :t+1]), targets the tokens
    input_ids[:, t+1] and rows their row in the batch.
    """
    at = keep[:, 1:] & (keep.cumsum(1) > 0)[:, :-1]
    return logits[:, :-1][at].float().log_softmax(-1), input_ids[:, 1:][at], at.nonzero()[:, 0]


def _ratio(a: float, b: float) -> float:
    return a / b if b != 0 else float("nan")


# ---------------------------------------------------------------------------- model plumbing


def select_contexts(texts: list[str], tokenizer, ctx_len: int, n_tokens: int, exclude_first_k: int = 0,
                    prepend_bos: bool | None = None):  # fmt: skip
    """Pack texts into windows and keep the first ones that hold >= n_tokens real tokens.

    Returns (input_ids LongTensor [N, ctx_len], keep_mask BoolTensor [N, ctx_len]). Texts are packed in
    growing prefixes (so a huge validation set is not tokenised whole); the last window of a prefix is
    never used unless all texts are packed, so the windows are those of packing all texts at once.
    Fewer real tokens than n_tokens: all of them are used (the caller reports the count).
    """
    if not texts:
        raise ValueError("no evaluation texts given (empty validation split?)")
    n_texts = min(len(texts), 64)
    while True:
        ids, keep = pack_texts(texts[:n_texts], tokenizer, ctx_len, exclude_first_k, prepend_bos=prepend_bos)
        complete = n_texts >= len(texts)
        usable = keep if complete else keep[:-1]
        cum = usable.sum(1).cumsum(0)
        if complete or (len(cum) and cum[-1] >= n_tokens):
            break
        n_texts = min(len(texts), n_texts * 2)
    if len(cum) == 0 or cum[-1] == 0:
        raise ValueError("the evaluation texts hold no real (non-special) tokens")
    k = _windows_holding(keep, n_tokens)
    return ids[:k], keep[:k]


def _windows_holding(keep: torch.Tensor, n_tokens: int) -> int:
    """How many of the first windows (keep [N, T]) hold >= n_tokens kept tokens (all N if they never do)."""
    cum = keep.sum(1).cumsum(0)
    return int(torch.searchsorted(cum, torch.tensor(n_tokens, dtype=cum.dtype)).item()) + 1


def evaluate(sae, model, layer: int, site: str = "resid_post", texts: list[str] | None = None, **kwargs):
    """Evaluate `sae` (encode [N, d] -> [N, m], decode) at (`layer`, `site`) of nnsight `model` on
    held-out `texts`: `evaluate_many` with one SAE (one implementation; same keyword arguments).
    Returns its metrics dict, or (metrics, counts) with return_counts."""
    return evaluate_many([sae], model, layer, site, texts, **kwargs)[0]


def _batches(ids, keep, lm_batch_size, device):
    return [(ids[i : i + lm_batch_size].to(device), keep[i : i + lm_batch_size].to(device))
            for i in range(0, len(ids), lm_batch_size)]  # fmt: skip


@torch.no_grad()
def _reference(model, envoy, site, batches, multiple):
    """(median norm, max_norm or None, mean activation [d] over the kept reference tokens, how many)."""
    acts = []
    for ids, kp in batches:
        act, _ = traced_forward(model, envoy, site, ids, stop_at_hook=True)
        acts.append(act[kp].double())
    x = torch.cat(acts)
    norms = torch.linalg.vector_norm(x, dim=1)
    median, max_norm = float(norms.median()), massive_limit(norms, multiple)
    kept = x if max_norm is None else x[norms <= max_norm]
    return median, max_norm, kept.mean(0).float(), len(kept)


@torch.no_grad()
def evaluate_many(
    saes: list,
    model,
    layer: int,
    site: str = "resid_post",
    texts: list[str] | None = None,
    mean_texts: list[str] | None = None,
    n_tokens: int = EvalConfig.n_tokens,
    lm_batch_size: int = EvalConfig.lm_batch_size,
    ctx_len: int = EvalConfig.ctx_len,
    device: str | None = EvalConfig.device,
    exclude_first_k: int = EvalConfig.exclude_first_k,
    prepend_bos: bool | None = EvalConfig.prepend_bos,
    max_norm_multiple: float | None = EvalConfig.max_norm_multiple,
    n_ref_tokens: int = EvalConfig.n_ref_tokens,
    bootstrap_resamples: int = EvalConfig.bootstrap_resamples,
    progress: bool = True,
    return_counts: bool = False,
) -> list:
    """Evaluate several SAEs at the same (`layer`, `site`) on the same held-out `texts` (module
    docstring: protocol and metrics). The reference pass and, per batch, the clean pass (which also
    captures the activation every SAE reconstructs) and the zero- and mean-ablated passes run once;
    only the spliced pass runs per SAE (plus one with the massive tokens patched too, in the few
    batches holding any). mean_texts: reference text (mean ablation, median norm); None: the held-out
    windows after the scored ones.

    Returns one result per SAE, in order, each exactly what evaluating that SAE alone gives: a metrics
    dict, or (metrics, firing counts LongTensor [m] over the scored tokens) with return_counts.
    Memory: one batch's logits at a time, plus one batch of latents of one SAE.
    """
    from tqdm.auto import tqdm

    if texts is None:
        raise ValueError("evaluate: pass the held-out texts (e.g. dataset.load_texts(spec, 'validation'))")
    if not saes:
        raise ValueError("evaluate_many: no SAEs given")
    if lm_batch_size < 1 or ctx_len < 2 or n_tokens < 1 or n_ref_tokens < 1:
        raise ValueError(f"evaluate: need lm_batch_size >= 1, ctx_len >= 2, n_tokens >= 1, n_ref_tokens >= 1 "
                         f"(got {lm_batch_size}, {ctx_len}, {n_tokens}, {n_ref_tokens})")  # fmt: skip
    check_max_norm_multiple(max_norm_multiple)
    device = torch.device(device) if device else model.device
    saes = [sae.to(device=device, dtype=torch.float32).eval() for sae in saes]
    envoy, hook = get_hook_module(model, layer, site), hook_name(layer, site)
    bar = lambda items, desc: tqdm(items, desc=f"eval {hook} {desc}", disable=not progress, leave=False)
    windows = dict(ctx_len=ctx_len, exclude_first_k=exclude_first_k, prepend_bos=prepend_bos)
    (ids, keep), (ref_ids, ref_keep), ref_source = _windows(texts, mean_texts, model.tokenizer, n_tokens,
                                                            n_ref_tokens, windows)  # fmt: skip
    if keep.sum() < n_tokens:
        log.warning("only %d real held-out tokens to score (asked for %d)", int(keep.sum()), n_tokens)
    ref = _batches(ref_ids, ref_keep, lm_batch_size, model.device)
    median, max_norm, mean_act, n_mean = _reference(
        model, envoy, site, bar(ref, "reference"), max_norm_multiple
    )
    for i, sae in enumerate(saes):
        if sae.activation_dim != len(mean_act):
            which = f" #{i}" if len(saes) > 1 else ""
            raise ValueError(
                f"SAE{which} activation_dim {sae.activation_dim} != width {len(mean_act)} of {hook}"
            )
    scored = bar(_batches(ids, keep, lm_batch_size, model.device), f"x{len(saes)} SAE(s)")
    acc = _score(
        saes, model, envoy, site, scored, lm_batch_size, len(ids), mean_act.to(device), max_norm, device
    )

    weights = resample_weights(len(ids), bootstrap_resamples)
    loss, full = acc["loss"], acc["all_loss"]
    mean = lambda v: v.sum().item() / acc["n_loss"] if acc["n_loss"] else float("nan")
    setting = dict(n_loss_tokens=acc["n_loss"], n_contexts=len(ids), ctx_len=ctx_len, exclude_first_k=exclude_first_k,
                   prepend_bos=bool(adds_bos(model.tokenizer) if prepend_bos is None else prepend_bos),
                   layer=layer, site=site, hook_name=hook, activation_dim=len(mean_act))  # fmt: skip
    massive = {**massive_record(max_norm_multiple, {hook: max_norm}, acc["n_massive"], acc["n_real"]),
               "median_norm": median, "median_of": f"{int(ref_keep.sum())} reference tokens"}  # fmt: skip
    results = []
    for i, sae in enumerate(saes):
        L = {k: mean(loss["ce", k]) for k in (i, "zero", "mean")}
        KL = {k: mean(loss["kl", k]) for k in (i, "zero", "mean")}
        L_clean = mean(loss["clean"])
        per = {"n": loss["n"], "clean": loss["clean"], "sae": loss["ce", i], "zero": loss["ce", "zero"],
               "mean": loss["ce", "mean"], "kl": loss["kl", i]}  # fmt: skip
        intervals = {k + "_ci": bootstrap(stat, per, weights)[1] for k, stat in LOSS_STATS.items()}
        every = acc["kept"][i].merge(acc["massive"][i]).compute()
        out = {
            **acc["kept"][i].compute(weights),
            "loss_original": L_clean,
            "loss_reconstructed": L[i],
            "loss_zero": L["zero"],
            "loss_mean": L["mean"],
            "delta_loss": L[i] - L_clean,
            "frac_recovered": frac_recovered(L["zero"], L[i], L_clean),
            "frac_recovered_mean": frac_recovered(L["mean"], L[i], L_clean),
            "kl_div": KL[i],
            "kl_div_zero": KL["zero"],
            "kl_div_mean": KL["mean"],
            "kl_score": frac_recovered(KL["zero"], KL[i], 0.0),
            "kl_score_mean": frac_recovered(KL["mean"], KL[i], 0.0),
            **intervals,
            **setting,
            "dict_size": sae.dict_size,
            "massive_tokens": massive,
            "all_tokens": {
                **{
                    k: every[k]
                    for k in (
                        "n_tokens",
                        "l0",
                        "frac_variance_explained",
                        "frac_variance_explained_centred",
                        "mse",
                    )
                },  # fmt: skip
                "loss_original": _ratio(full["clean"], full["n"]),
                "loss_reconstructed": _ratio(full[i], full["n"]),
                "delta_loss": _ratio(full[i] - full["clean"], full["n"]),
                "n_loss_tokens": int(full["n"]),
            },
            "mean_ablation": {"source": ref_source, "n_tokens": n_mean},  # kept (not massive) tokens
            "bootstrap": {
                "unit": "context window",
                "n_units": len(ids),
                "resamples": bootstrap_resamples,
                "level": 0.95,
                "method": "percentile",
            },  # fmt: skip
        }
        out = _nan_to_none(out)
        results.append((out, acc["kept"][i].fire_counts.cpu()) if return_counts else out)
    return results


LOSS_STATS = {  # statistics of per-window loss sums with a bootstrap interval (metrics.bootstrap)
    "delta_loss": lambda s: (s["sae"] - s["clean"]) / s["n"],
    "frac_recovered": lambda s: frac_recovered(s["zero"], s["sae"], s["clean"]),
    "frac_recovered_mean": lambda s: frac_recovered(s["mean"], s["sae"], s["clean"]),
    "kl_div": lambda s: s["kl"] / s["n"],
}


def _windows(texts, mean_texts, tokenizer, n_tokens, n_ref_tokens, windows: dict):
    """(scored ids, keep), (reference ids, keep), where the reference came from."""
    if mean_texts is not None:
        return (select_contexts(texts, tokenizer, n_tokens=n_tokens, **windows),
                select_contexts(mean_texts, tokenizer, n_tokens=n_ref_tokens, **windows), "mean_texts")  # fmt: skip
    ids, keep = select_contexts(texts, tokenizer, n_tokens=n_tokens + n_ref_tokens, **windows)
    k = _windows_holding(keep, n_tokens)
    if not keep[k:].any():
        raise ValueError(f"the held-out text holds no tokens beyond the {n_tokens} scored: lower n_tokens "
                         "or pass mean_texts (e.g. the train split) for the mean ablation")  # fmt: skip
    return (ids[:k], keep[:k]), (ids[k:], keep[k:]), "held-out windows after the scored ones"


def _score(saes, model, envoy, site, batches, lm_batch_size, n_windows, mean_act, max_norm, device) -> dict:
    """The scoring passes. Returns per SAE ReconstructionStats of the kept tokens (per window) and of
    the massive ones; per-window loss sums (n, clean, ("ce" | "kl", SAE index | "zero" | "mean")); the
    all-tokens loss sums; token counts."""
    W = n_windows
    zw = lambda: torch.zeros(W, dtype=torch.float64)
    keys = [*range(len(saes)), "zero", "mean"]
    loss = {"n": zw(), "clean": zw(), **{(kind, k): zw() for kind in ("ce", "kl") for k in keys}}
    kept = [ReconstructionStats(len(mean_act), s.dict_size, W, device) for s in saes]
    massive_stats = [ReconstructionStats(len(mean_act), s.dict_size, 1, device) for s in saes]
    full = dict.fromkeys(["n", "clean", *range(len(saes))], 0.0)
    n_real = n_massive = 0
    for b, (ids, real) in enumerate(batches):
        act, logits = traced_forward(model, envoy, site, ids)
        massive = (
            real & (torch.linalg.vector_norm(act.float(), dim=-1) > max_norm) if max_norm else real & False
        )
        kp = real & ~massive
        n_real, n_massive = n_real + int(real.sum()), n_massive + int(massive.sum())
        logp_clean, targets, rows = next_token_logprobs(logits, ids, kp)
        rows = rows.cpu() + b * lm_batch_size
        per_window = lambda v, rows=rows: zw().index_add_(0, rows, v.double().cpu())
        ce_clean = cross_entropy(logp_clean, targets)
        loss["n"] += per_window(torch.ones(len(rows)))
        loss["clean"] += per_window(ce_clean)
        any_massive = bool(massive.any())
        if any_massive:  # the all-tokens view scores every position whose next token is real
            logp_all, targets_all, _ = next_token_logprobs(logits, ids, real)
            full["clean"] += cross_entropy(logp_all, targets_all).double().sum().item()
            full["n"] += len(targets_all)
            x_m = act[massive].to(device=device, dtype=torch.float32)
        else:
            full["clean"] += ce_clean.double().sum().item()
            full["n"] += len(targets)
        del logits
        x = act[kp].to(device=device, dtype=torch.float32)
        window = kp.nonzero()[:, 0].to(device) + b * lm_batch_size
        for key in keys:
            if key == "zero":
                value = 0.0
            elif key == "mean":
                value = mean_act.to(act)
            else:
                f = saes[key].encode(x)
                value = saes[key].decode(f)
                kept[key].update(x, value, f, window)
                value = value.to(act)
            patched = act.clone()
            patched[kp] = value
            _, logits_p = traced_forward(model, envoy, site, ids, replacement=patched)
            logp, _, _ = next_token_logprobs(logits_p, ids, kp)
            ce = cross_entropy(logp, targets)
            loss["ce", key] += per_window(ce)
            loss["kl", key] += per_window(kl_divergence(logp_clean, logp))
            if isinstance(key, int) and not any_massive:
                full[key] += ce.double().sum().item()
            elif isinstance(key, int):  # patch the massive tokens too
                f_m = saes[key].encode(x_m)
                x_hat_m = saes[key].decode(f_m)
                massive_stats[key].update(x_m, x_hat_m, f_m)
                patched[massive] = x_hat_m.to(act)
                _, logits_p = traced_forward(model, envoy, site, ids, replacement=patched)
                logp, _, _ = next_token_logprobs(logits_p, ids, real)
                full[key] += cross_entropy(logp, targets_all).double().sum().item()
            del logits_p, patched
    return {"loss": loss, "kept": kept, "massive": massive_stats, "all_loss": full, "n_real": n_real,
            "n_massive": n_massive, "n_loss": int(loss["n"].sum().item())}  # fmt: skip


def _nan_to_none(v):
    """JSON has no NaN: undefined ratios become null (recursively)."""
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: _nan_to_none(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_nan_to_none(x) for x in v]
    return v
