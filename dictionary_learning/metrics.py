"""Metric formulas, written once: fraction of variance explained (both definitions in use), loss
recovered, and a bootstrap interval over context windows. Pure functions of sums; the trainer's
log and the evaluation both call these (REFERENCE.md, "Evaluation metrics").

Fraction of variance explained, from sums over n tokens (x: activation, r = x − x̂: residual):
    standard (SAELens `explained_variance`, SAEBench core)   1 − Σ‖r‖² / Σ‖x − mean x‖²
    centred  (dictionary_learning)                            1 − Σ_d Var(r_d) / Σ_d Var(x_d)
with Σ‖x − mean x‖² = Σ‖x‖² − ‖Σx‖²/n and Σ_d Var(r_d)·n = Σ‖r‖² − ‖Σr‖²/n. The centred one forgives
a constant bias in x̂, so it is never below the standard one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_LEVEL = 0.95
DENSITY_FLOOR = 1e-10
"""Floor of the per-latent firing density before log10 (dead latents get log10(1e-10) = -10)."""


def _sq(v: torch.Tensor) -> torch.Tensor:
    return (v * v).sum(-1)


def fve(sq_err, sq_x, sum_x, n, sum_err=None) -> torch.Tensor:
    """Fraction of variance explained from sums over n tokens: sq_err = Σ‖x − x̂‖², sq_x = Σ‖x‖²,
    sum_x = Σx [..., d]; standard definition, or the centred one when sum_err = Σ(x − x̂) [..., d] is
    given. Means work as well as sums (n = 1). Any leading dims (bootstrap resamples) broadcast."""
    var_x = sq_x - _sq(sum_x) / n
    var_err = sq_err if sum_err is None else sq_err - _sq(sum_err) / n
    return 1 - var_err / var_x


def frac_recovered(loss_ablated, loss_sae, loss_clean):
    """Loss recovered (the CE-loss score): (L_ablated − L_sae) / (L_ablated − L_clean);
    1 = perfect splice, 0 = no better than the ablation. Floats (NaN when the ablation does not change
    the loss), or tensors of resamples."""
    den = loss_ablated - loss_clean
    if torch.is_tensor(den):  # a resample whose ablation changes nothing: NaN (left out), not ±inf
        return torch.where(den != 0, (loss_ablated - loss_sae) / den, torch.nan)
    return float("nan") if den == 0 else (loss_ablated - loss_sae) / den


def resample_weights(n_units: int, n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> torch.Tensor:
    """[n_resamples, n_units] float64: how often each unit is drawn in each bootstrap resample (n_units
    draws with replacement), from a generator seeded with `seed`."""
    if n_units < 1:
        raise ValueError("bootstrap: no units to resample")
    g = torch.Generator().manual_seed(seed)
    draws = torch.randint(n_units, (n_resamples, n_units), generator=g)
    w = torch.zeros(n_resamples, n_units, dtype=torch.float64)
    return w.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float64))


def bootstrap(stat, per_unit: dict[str, torch.Tensor], weights: torch.Tensor | None,
              level: float = BOOTSTRAP_LEVEL) -> tuple[float, list[float] | None]:  # fmt: skip
    """Point estimate and percentile bootstrap interval of a statistic of sums.

    per_unit: name -> [U, ...] float64 sums per unit (a context window); stat(sums: dict name ->
    [R, ...]) -> [R] computes the metric from summed values (the same formula for the point estimate,
    R = 1, and the resamples); weights [R, U] from resample_weights, or None for the point alone.
    Returns (point, [lo, hi] or None); NaN resamples (an undefined ratio) are left out of the interval."""
    full = stat({k: v.sum(0, keepdim=True) for k, v in per_unit.items()})
    if weights is None:
        return float(full[0]), None
    boot = stat({k: torch.tensordot(weights, v, dims=1) for k, v in per_unit.items()})
    boot = boot[~torch.isnan(boot)]
    point = float(full[0])
    if not len(boot) or math.isnan(point):
        return point, [float("nan"), float("nan")]
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=boot.dtype)
    lo, hi = torch.quantile(boot, q).tolist()
    return point, [lo, hi]


def cross_entropy(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p(target) per row: logp [K, V] (log-probabilities), targets [K] -> [K]."""
    return -logp.gather(-1, targets[:, None]).squeeze(-1)


def kl_divergence(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row of two log-probability tensors [..., V] -> [...]."""
    return (logp.exp() * (logp - logq)).sum(-1)


class ReconstructionStats:
    """Exact running sums (float64) for the reconstruction and sparsity metrics of one SAE, per unit
    (context window) where an interval needs them. update(x [N, d], x̂ [N, d], f [N, m], window [N] in
    [0, n_windows) or None = unit 0); compute(weights) -> dict. Sums over tokens: splitting the
    tokens into batches differently gives the same result."""

    def __init__(self, d: int, m: int, n_windows: int = 1, device: str | torch.device = "cpu"):
        zeros = lambda *shape: torch.zeros(n_windows, *shape, dtype=torch.float64, device=device)
        self.win = {"n": zeros(), "sq_x": zeros(), "sum_x": zeros(d), "sq_err": zeros(), "sum_err": zeros(d)}
        self.cos = self.l2_ratio = self.xhat_sq = self.dot = 0.0
        self.l0 = 0
        self.fire_counts = torch.zeros(m, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor, window=None) -> None:
        x, x_hat = x.double(), x_hat.double()
        r = x - x_hat
        w = torch.zeros(len(x), dtype=torch.long, device=x.device) if window is None else window.to(x.device)
        for k, v in (("n", torch.ones_like(x[:, 0])), ("sq_x", (x * x).sum(1)), ("sum_x", x),
                     ("sq_err", (r * r).sum(1)), ("sum_err", r)):  # fmt: skip
            self.win[k].index_add_(0, w, v)
        self.cos += F.cosine_similarity(x, x_hat, dim=-1, eps=1e-8).sum().item()
        self.l2_ratio += (x_hat.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)).sum().item()
        self.xhat_sq += (x_hat * x_hat).sum().item()
        self.dot += (x * x_hat).sum().item()
        active = f != 0
        self.l0 += int(active.sum().item())
        self.fire_counts += active.sum(0).to(torch.int64)

    def merge(self, other: ReconstructionStats) -> ReconstructionStats:
        """Add another one's sums (its units pooled into unit 0 of a one-unit copy of both)."""
        out = ReconstructionStats(
            self.win["sum_x"].shape[1], len(self.fire_counts), 1, self.fire_counts.device
        )
        for k in out.win:
            out.win[k] = self.win[k].sum(0, keepdim=True) + other.win[k].sum(0, keepdim=True)
        for k in ("cos", "l2_ratio", "xhat_sq", "dot", "l0", "fire_counts"):
            setattr(out, k, getattr(self, k) + getattr(other, k))
        return out

    def compute(self, weights: torch.Tensor | None = None) -> dict:
        """l0, frac_alive, dead_latents, frac_variance_explained(_centred), mse, cossim, l2_ratio,
        relative_reconstruction_bias, n_tokens; with bootstrap weights [R, n_windows] also the
        intervals frac_variance_explained(_centred)_ci."""
        n = int(self.win["n"].sum().item())
        if n == 0:
            raise ValueError("no real tokens were evaluated (all positions are special tokens?)")
        out, alive = {}, self.fire_counts > 0
        for key, centred in (("frac_variance_explained", False), ("frac_variance_explained_centred", True)):
            stat = lambda s, c=centred: fve(
                s["sq_err"], s["sq_x"], s["sum_x"], s["n"], s["sum_err"] if c else None
            )
            out[key], ci = bootstrap(stat, self.win, weights)
            if ci is not None:
                out[key + "_ci"] = ci
        return {
            "l0": self.l0 / n,
            "frac_alive": alive.double().mean().item(),
            "dead_latents": int((~alive).sum().item()),
            **out,
            "mse": self.win["sq_err"].sum().item() / n,
            "cossim": self.cos / n,
            "l2_ratio": self.l2_ratio / n,
            "relative_reconstruction_bias": self.xhat_sq / self.dot if self.dot else float("nan"),
            "n_tokens": n,
        }


def reconstruction_metrics(x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor) -> dict:
    """ReconstructionStats.compute() of one set of tokens: x, x̂ [N, d], f [N, m]."""
    stats = ReconstructionStats(x.shape[-1], f.shape[-1], device=x.device)
    stats.update(x, x_hat, f)
    return stats.compute()


def log_feature_density(
    fire_counts: torch.Tensor, n_tokens: int, floor: float = DENSITY_FLOOR
) -> torch.Tensor:
    """log10 firing density per latent [m] (SAELens `sparsity.safetensors`); never-firing -> log10(floor)."""
    density = fire_counts.double() / max(n_tokens, 1)
    return density.clamp_min(floor).log10().float()
