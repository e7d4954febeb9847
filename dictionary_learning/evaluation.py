"""Evaluate a sparse autoencoder on held-out text: fidelity, sparsity and downstream next-token loss.

One procedure for every SAE that `JumpReluAutoEncoder.from_pretrained` loads (our run folders, SAELens
folders, Gemma Scope params.npz), so their numbers are comparable (REFERENCE.md, "Evaluation metrics").

Protocol (`evaluate`; `evaluate_many` runs it for several SAEs at one hook, sharing every pass
that does not depend on the SAE, with identical results):
- Text: the caller passes held-out text (the CLI uses the validation split of the run's data set).
  It is packed by `tokens.pack_texts` into [N, ctx_len] windows; the first windows holding at least
  `n_tokens` real tokens are evaluated. The selection does not depend on `batch_size`.
- Special tokens (BOS/EOS/PAD, and the first `exclude_first_k` positions of a window; keep_mask
  False) are handled the same way everywhere:
  * excluded from every reconstruction and sparsity metric;
  * left UNPATCHED in the spliced / zero-ablated / mean-ablated forward passes (only real positions
    are replaced);
  * next-token loss and KL are taken over the positions whose NEXT token is a real token.
- Mean ablation replaces each real position's activation by the mean activation over the same
  evaluated real tokens, computed in a first pass that stops at the hook layer.
- Everything is computed in fp32 (the SAE is cast to fp32; logits are upcast) and accumulated as
  float64 sums over tokens, so results do not depend on the evaluation batch size.

Metrics (per token means unless stated; x: activation, x_hat: reconstruction, f: latents):
- l0 = E #(f != 0); frac_alive = share of latents firing at least once; dead_latents = how many never do.
- frac_variance_explained = 1 - sum_d Var(x - x_hat) / sum_d Var(x), variances pooled over tokens.
- mse = E ||x - x_hat||^2 (summed over dims, as the training loss); cossim = E cos(x, x_hat);
  l2_ratio = E ||x_hat|| / ||x||; relative_reconstruction_bias = E||x_hat||^2 / E<x, x_hat>
  (arXiv 2404.16014 eq. 10).
- loss_original / loss_reconstructed / loss_zero / loss_mean: mean next-token cross-entropy with the
  clean activation, x_hat spliced in, zero ablation, mean ablation.
- frac_recovered = (L_zero - L_sae) / (L_zero - L_clean); frac_recovered_mean uses L_mean.
- kl_div = E KL(clean || spliced) per token; kl_score = 1 - kl_div / kl_div_zero (the same form as
  frac_recovered with KL_clean = 0); kl_score_mean likewise against mean ablation.

CLI: `python -m dictionary_learning.evaluation RUN_DIR ...` (see eval_report.py, which holds the CLI,
the summary tables and the plots).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .buffer import get_hook_module, hook_name, hook_value, set_hook_value
from .tokens import pack_texts

log = logging.getLogger(__name__)

DENSITY_FLOOR = 1e-10
"""Floor of the per-latent firing density before log10 (dead latents get log10(1e-10) = -10)."""


@dataclass
class EvalConfig:
    """Evaluation settings; the CLI flags default to these."""

    n_tokens: int = 8192
    """Real (non-special) held-out tokens to evaluate; the first packed windows reaching it are used."""
    batch_size: int = 8
    """Contexts per language-model forward pass (does not change the results)."""
    ctx_len: int = 128
    """Tokens per packed context window."""
    device: str | None = None
    """Device for the SAE and inputs; None: the language model's device."""
    exclude_first_k: int = 0
    """Also treat the first k positions of each window like special tokens (attention sinks);
    the CLI takes it from the run's buffer config."""


# ---------------------------------------------------------------------------- pure metrics


class ReconstructionStats:
    """Exact running sums (float64) for the reconstruction and sparsity metrics.

    `update(x [N, d], x_hat [N, d], f [N, m])` with rows = real tokens; `compute()` -> dict.
    Sums are over tokens, so splitting the tokens into batches differently gives the same result.
    """

    def __init__(self, activation_dim: int, dict_size: int, device: str | torch.device = "cpu"):
        z = lambda n: torch.zeros(n, dtype=torch.float64, device=device)
        self.n = 0
        self.sum_x, self.sum_x2 = z(activation_dim), z(activation_dim)
        self.sum_r, self.sum_r2 = z(activation_dim), z(activation_dim)
        self.sum_cos = self.sum_l2_ratio = self.sum_xhat_sq = self.sum_dot = 0.0
        self.sum_l0 = 0
        self.fire_counts = torch.zeros(dict_size, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor) -> None:
        x, x_hat = x.double(), x_hat.double()
        r = x - x_hat
        self.n += x.shape[0]
        self.sum_x += x.sum(0)
        self.sum_x2 += (x * x).sum(0)
        self.sum_r += r.sum(0)
        self.sum_r2 += (r * r).sum(0)
        self.sum_cos += F.cosine_similarity(x, x_hat, dim=-1, eps=1e-8).sum().item()
        self.sum_l2_ratio += (x_hat.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)).sum().item()
        self.sum_xhat_sq += (x_hat * x_hat).sum().item()
        self.sum_dot += (x * x_hat).sum().item()
        active = f != 0
        self.sum_l0 += int(active.sum().item())
        self.fire_counts += active.sum(0).to(torch.int64)

    def compute(self) -> dict:
        n = self.n
        if n == 0:
            raise ValueError("no real tokens were evaluated (all positions are special tokens?)")
        var_x = (self.sum_x2 / n - (self.sum_x / n) ** 2).sum().item()  # sum_d Var(x_d)
        var_r = (self.sum_r2 / n - (self.sum_r / n) ** 2).sum().item()  # sum_d Var((x - x_hat)_d)
        alive = self.fire_counts > 0
        return {
            "l0": self.sum_l0 / n,
            "frac_alive": alive.double().mean().item(),
            "dead_latents": int((~alive).sum().item()),
            "frac_variance_explained": 1.0 - var_r / var_x if var_x > 0 else float("nan"),
            "mse": self.sum_r2.sum().item() / n,
            "cossim": self.sum_cos / n,
            "l2_ratio": self.sum_l2_ratio / n,
            "relative_reconstruction_bias": _ratio(self.sum_xhat_sq, self.sum_dot),
            "n_tokens": n,
        }


def reconstruction_metrics(x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor) -> dict:
    """Reconstruction/sparsity metrics of one set of tokens: x, x_hat [N, d], f [N, m]."""
    stats = ReconstructionStats(x.shape[-1], f.shape[-1], device=x.device)
    stats.update(x, x_hat, f)
    return stats.compute()


def log_feature_density(
    fire_counts: torch.Tensor, n_tokens: int, floor: float = DENSITY_FLOOR
) -> torch.Tensor:
    """log10 firing density per latent [m] (SAELens `sparsity.safetensors`); never-firing -> log10(floor)."""
    density = fire_counts.double() / max(n_tokens, 1)
    return density.clamp_min(floor).log10().float()


def next_token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, keep: torch.Tensor):
    """Log-probabilities at the loss positions: those whose NEXT token is real.

    logits [B, T, V], input_ids and keep [B, T] -> (logp [K, V] fp32, targets [K]), where the K rows
    are the positions t < T-1 with keep[:, t+1] True and targets are the tokens input_ids[:, t+1].
    """
    at = keep[:, 1:]
    return logits[:, :-1][at].float().log_softmax(-1), input_ids[:, 1:][at]


def cross_entropy(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p(target) per row: logp [K, V] (log-probabilities), targets [K] -> [K]."""
    return -logp.gather(-1, targets[:, None]).squeeze(-1)


def kl_divergence(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row of two log-probability tensors [..., V] -> [...]."""
    return (logp.exp() * (logp - logq)).sum(-1)


def frac_recovered(loss_ablated: float, loss_sae: float, loss_clean: float) -> float:
    """Loss recovered: (L_ablated - L_sae) / (L_ablated - L_clean); 1 = perfect splice, 0 = no better
    than ablation. NaN when the ablation does not change the loss."""
    return _ratio(loss_ablated - loss_sae, loss_ablated - loss_clean)


def _ratio(a: float, b: float) -> float:
    return a / b if b != 0 else float("nan")


# ---------------------------------------------------------------------------- model plumbing


@torch.no_grad()
def traced_forward(model, envoy, site: str, input_ids: torch.Tensor, replacement=None, stop_at_hook=False):
    """One traced forward pass on input_ids [B, T].

    replacement None: returns (activation [B, T, d], logits [B, T, V] or None when stop_at_hook).
    replacement [B, T, d]: the activation at the hook is replaced; returns (None, logits).
    """
    act = logits = None
    with model.trace(input_ids) as tracer:
        if replacement is not None:
            set_hook_value(envoy, site, replacement)
        else:
            act = hook_value(envoy, site).save()
            if stop_at_hook:
                tracer.stop()
        if not stop_at_hook:
            logits = model.output.logits.save()
    return act, logits


def select_contexts(texts: list[str], tokenizer, ctx_len: int, n_tokens: int, exclude_first_k: int = 0):
    """Pack texts into windows and keep the first ones that hold >= n_tokens real tokens.

    Returns (input_ids LongTensor [N, ctx_len], keep_mask BoolTensor [N, ctx_len]). Texts are packed in
    growing prefixes (so a huge validation set is not tokenised whole); the last window of a prefix is
    never used unless all texts are packed, so the windows are those of packing all texts at once.
    Fewer real tokens than n_tokens: all of them are used, with a warning (n_tokens reports the count).
    """
    if not texts:
        raise ValueError("no evaluation texts given (empty validation split?)")
    n_texts = min(len(texts), 64)
    while True:
        ids, keep = pack_texts(texts[:n_texts], tokenizer, ctx_len, exclude_first_k=exclude_first_k)
        complete = n_texts >= len(texts)
        usable = keep if complete else keep[:-1]
        cum = usable.sum(1).cumsum(0)
        if complete or (len(cum) and cum[-1] >= n_tokens):
            break
        n_texts = min(len(texts), n_texts * 2)
    if len(cum) == 0 or cum[-1] == 0:
        raise ValueError("the evaluation texts hold no real (non-special) tokens")
    k = int(torch.searchsorted(cum, torch.tensor(n_tokens, dtype=cum.dtype)).item()) + 1
    if k > len(cum):
        log.warning("only %d real evaluation tokens available (asked for %d)", int(cum[-1]), n_tokens)
        k = len(cum)
    return ids[:k], keep[:k]


def evaluate(
    sae,
    model,
    layer: int,
    site: str = "resid_post",
    texts: list[str] | None = None,
    n_tokens: int = EvalConfig.n_tokens,
    batch_size: int = EvalConfig.batch_size,
    ctx_len: int = EvalConfig.ctx_len,
    device: str | None = EvalConfig.device,
    exclude_first_k: int = EvalConfig.exclude_first_k,
    progress: bool = True,
    return_counts: bool = False,
):
    """Evaluate `sae` (encode [N, d] -> [N, m], decode) at (`layer`, `site`) of nnsight `model` on
    held-out `texts`. See the module docstring for the protocol and metric definitions; this is
    `evaluate_many` with one SAE (one implementation).

    Returns a JSON-able dict of metrics; with return_counts also the firing counts per latent
    (LongTensor [m], over the n_tokens real tokens): (metrics, counts).
    The SAE is moved to `device` in fp32 (nn.Module.to, in place).
    """
    kw = dict(n_tokens=n_tokens, batch_size=batch_size, ctx_len=ctx_len, device=device)
    kw.update(exclude_first_k=exclude_first_k, progress=progress, return_counts=return_counts)
    return evaluate_many([sae], model, layer, site, texts, **kw)[0]


@torch.no_grad()
def evaluate_many(
    saes: list,
    model,
    layer: int,
    site: str = "resid_post",
    texts: list[str] | None = None,
    n_tokens: int = EvalConfig.n_tokens,
    batch_size: int = EvalConfig.batch_size,
    ctx_len: int = EvalConfig.ctx_len,
    device: str | None = EvalConfig.device,
    exclude_first_k: int = EvalConfig.exclude_first_k,
    progress: bool = True,
    return_counts: bool = False,
) -> list:
    """Evaluate several SAEs at the same (`layer`, `site`) on the same held-out `texts`, sharing the
    passes that do not depend on the SAE: the mean pass, and per batch the clean (which also captures
    the activation every SAE reconstructs), zero- and mean-ablated passes run once; only the spliced
    pass runs per SAE. k SAEs cost k + 3 full forward passes per batch instead of 4k.

    Returns one result per SAE, in order, each exactly what evaluating that SAE alone gives
    (`evaluate` is this with one SAE): a metrics dict, or (metrics, counts) with return_counts.
    Memory: one batch's logits at a time, plus one batch of latents of one SAE.
    """
    from tqdm.auto import tqdm

    if texts is None:
        raise ValueError("evaluate: pass the held-out texts (e.g. dataset.load_texts(spec, 'validation'))")
    if not saes:
        raise ValueError("evaluate_many: no SAEs given")
    if batch_size < 1 or ctx_len < 2 or n_tokens < 1:
        raise ValueError(
            f"evaluate: need batch_size >= 1, ctx_len >= 2, n_tokens >= 1 "
            f"(got {batch_size}, {ctx_len}, {n_tokens})"
        )
    lm_device = model.device
    device = torch.device(device) if device else lm_device
    saes = [sae.to(device=device, dtype=torch.float32).eval() for sae in saes]
    envoy = get_hook_module(model, layer, site)
    hook = hook_name(layer, site)
    input_ids, keep = select_contexts(texts, model.tokenizer, ctx_len, n_tokens, exclude_first_k)
    batches = [
        (input_ids[i : i + batch_size].to(lm_device), keep[i : i + batch_size].to(lm_device))
        for i in range(0, len(input_ids), batch_size)
    ]
    bar = lambda desc: tqdm(batches, desc=desc, disable=not progress, leave=False)

    # Pass 1: mean activation over the evaluated real tokens (for mean ablation); stops at the hook.
    sum_act, n_real = None, 0
    for ids, kp in bar(f"eval {hook} mean"):
        act, _ = traced_forward(model, envoy, site, ids, stop_at_hook=True)
        x = act[kp].double()
        sum_act = x.sum(0) if sum_act is None else sum_act + x.sum(0)
        n_real += x.shape[0]
    d = sum_act.shape[0]
    for i, sae in enumerate(saes):
        if sae.activation_dim != d:
            which = f" #{i}" if len(saes) > 1 else ""
            raise ValueError(f"SAE{which} activation_dim {sae.activation_dim} != width {d} of {hook}")
    mean_act = (sum_act / n_real).float()

    # Pass 2, per batch: clean run, then each SAE's x_hat, zero and mean spliced in at the real
    # positions only. Keys: SAE index i (spliced x_hat), "zero", "mean" and "original" (clean).
    stats = [ReconstructionStats(d, sae.dict_size, device=device) for sae in saes]
    patches = [*range(len(saes)), "zero", "mean"]
    ce = dict.fromkeys(["original", *patches], 0.0)
    kl = dict.fromkeys(patches, 0.0)
    n_loss = 0
    for ids, kp in bar(f"eval {hook}" + (f" x{len(saes)} SAEs" if len(saes) > 1 else "")):
        act, logits = traced_forward(model, envoy, site, ids)
        logp_clean, targets = next_token_logprobs(logits, ids, kp)
        del logits
        n_loss += len(targets)
        ce["original"] += cross_entropy(logp_clean, targets).double().sum().item()
        x = act[kp].to(device=device, dtype=torch.float32)
        for key in patches:
            if key == "zero":
                value = 0.0
            elif key == "mean":
                value = mean_act
            else:
                f = saes[key].encode(x)
                value = saes[key].decode(f)
                stats[key].update(x, value, f)
                del f
            patched = act.clone()
            patched[kp] = value.to(act) if torch.is_tensor(value) else value
            _, logits_p = traced_forward(model, envoy, site, ids, replacement=patched)
            logp, _ = next_token_logprobs(logits_p, ids, kp)
            del logits_p, patched
            ce[key] += cross_entropy(logp, targets).double().sum().item()
            kl[key] += kl_divergence(logp_clean, logp).double().sum().item()

    loss = {k: _ratio(v, n_loss) for k, v in ce.items()}
    kl_div = {k: _ratio(v, n_loss) for k, v in kl.items()}
    results = []
    for i, sae in enumerate(saes):
        out = stats[i].compute()
        out.update(
            loss_original=loss["original"],
            loss_reconstructed=loss[i],
            loss_zero=loss["zero"],
            loss_mean=loss["mean"],
            frac_recovered=frac_recovered(loss["zero"], loss[i], loss["original"]),
            frac_recovered_mean=frac_recovered(loss["mean"], loss[i], loss["original"]),
            kl_div=kl_div[i],
            kl_div_zero=kl_div["zero"],
            kl_div_mean=kl_div["mean"],
            kl_score=frac_recovered(kl_div["zero"], kl_div[i], 0.0),
            kl_score_mean=frac_recovered(kl_div["mean"], kl_div[i], 0.0),
            n_loss_tokens=n_loss,
            n_contexts=len(input_ids),
            ctx_len=ctx_len,
            exclude_first_k=exclude_first_k,
            layer=layer,
            site=site,
            hook_name=hook,
            activation_dim=d,
            dict_size=sae.dict_size,
        )
        out = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}
        results.append((out, stats[i].fire_counts.cpu()) if return_counts else out)
    return results


# ---------------------------------------------------------------------------- SAEs and artefacts


def load_sae(path: str, device: str | None = None):
    """Any SAE `JumpReluAutoEncoder.from_pretrained` reads (our run folder, a SAELens folder, a Gemma
    Scope params.npz), in fp32, ready for `evaluate`."""
    from .dictionary import JumpReluAutoEncoder

    return JumpReluAutoEncoder.from_pretrained(path, device=device, dtype=torch.float32)


def save_sparsity(path, fire_counts: torch.Tensor, n_tokens: int) -> None:
    """Write SAELens-style `sparsity.safetensors`: key `sparsity` = log10 firing density [m] (atomic)."""
    from safetensors.torch import save_file

    from .utils import atomic_path

    with atomic_path(path) as tmp:
        save_file({"sparsity": log_feature_density(fire_counts, n_tokens).contiguous()}, str(tmp))


if __name__ == "__main__":
    from .eval_report import main

    raise SystemExit(main())
