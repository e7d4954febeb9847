"""Loss and gradients of one JumpReLU SAE batch, written out by hand (no autograd graph).

    L = ‖x − x̂‖² (sum over d, mean over B) + S(L0),   x̂ = f @ W_dec + b_dec,  f = z·H(z − θ),
    z = x @ W_enc + b_enc,  L0 = (1/B) Σ H(z − θ)        (Rajamanoharan et al. 2024, eq. 11)
with the pseudo-derivatives of jumprelu.py (rectangle kernel K, bandwidth ε):
    ∂L/∂z = H(z − θ)·∂L/∂f,   ∂L/∂θ = Σ_b K((z − θ)/ε)·(−(θ/ε)·∂L/∂f − S'(L0)/(ε·B)).
Three implementations, the same numbers up to summation order:
  sparse_grads    only the (token, latent) pairs near or above θ: cheap once L0 << m
  dense_grads     [B, m] matrices and four more GEMMs, few elementwise passes (early, dense phase)
  autograd_grads  plain autograd through JumpReLUFunction / StepFunction (the reference; any dtype)
Each takes xW = x @ W_enc [B, m] (no bias) from the caller's reused buffer and may overwrite it,
and returns ({W_enc [d, m], b_enc, W_dec, b_dec, threshold} gradients, GradStats).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from dictionary_learning.jumprelu import _kernel, jumprelu, reconstruction_loss, step

SparsityFn = Callable[[torch.Tensor], torch.Tensor]  # scalar L0 tensor -> sparsity loss


class GradStats(NamedTuple):
    loss: torch.Tensor  # scalar
    mse: torch.Tensor  # scalar
    sparsity_loss: torch.Tensor  # scalar
    l0: torch.Tensor  # scalar, batch-mean number of active latents
    x_hat: torch.Tensor  # [B, d]
    mean_err: torch.Tensor  # [d], batch mean of x̂ − x (for the fraction of variance explained)
    fired: torch.Tensor  # [m] bool, latent active on some row


# ---------------------------------------------------------------------------- index helpers


def _offsets(sorted_index: torch.Tensor, n: int) -> torch.Tensor:
    """Ids in [0, n) -> CSR pointers [n + 1] (counts cumulated), in the ids' dtype."""
    out = torch.zeros(n + 1, dtype=sorted_index.dtype, device=sorted_index.device)
    torch.cumsum(torch.bincount(sorted_index, minlength=n), 0, out=out[1:])
    return out


def flat_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices of the True entries of a contiguous bool tensor, ascending, as int64 [n].
    On CPU scans 8 bytes at a time first (most words are all-False at low density)."""
    flat = mask.reshape(-1)
    if flat.device.type != "cpu" or flat.numel() % 8:
        return flat.nonzero().squeeze(1)
    words = flat.view(torch.int64).nonzero().squeeze(1)  # words holding at least one True
    sub = flat.view(-1, 8).index_select(0, words).nonzero()  # [n, 2]: (word, byte in word)
    return words.index_select(0, sub[:, 0]).mul_(8).add_(sub[:, 1])


def candidates(xW: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor | None = None, chunk_bytes: int = 1 << 21):
    """Flat indices (ascending, int64) of the entries of xW [B, m] with lo < xW (and xW < hi), lo and
    hi [m]; a few rows at a time so the bool masks stay in cache (no [B, m] mask)."""
    B, m = xW.shape
    rows = max(1, min(B, chunk_bytes // m))
    buf = torch.empty(rows, m, dtype=torch.bool, device=xW.device)
    buf2 = None if hi is None else torch.empty_like(buf)
    out = []
    for r in range(0, B, rows):
        part = xW[r : r + rows]
        mask = torch.gt(part, lo, out=buf[: part.shape[0]])
        if hi is not None:
            mask &= torch.lt(part, hi, out=buf2[: part.shape[0]])
        out.append(flat_nonzero(mask).add_(r * m))
    return out[0] if len(out) == 1 else torch.cat(out)


def _split(flat: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices into [B, m] -> (rows, cols), int32 when that fits (faster gathers and bags)."""
    if flat.numel() == 0 or int(flat[-1]) < 2**31:
        flat = flat.to(torch.int32)
    rows = torch.div(flat, m, rounding_mode="floor")
    return rows, flat.sub_(rows * m)


def _latent_bags(offsets, rows, weights, src, out=None):
    """[m, d] = Σ over each latent's pairs of weight · src[row]; offsets [m + 1] (CSR over latents),
    rows, weights [n], src [B, d]. Into `out` by a CSR matmul if given, else embedding_bag."""
    if out is None:
        return F.embedding_bag(rows, src, offsets[:-1], mode="sum", per_sample_weights=weights)
    return torch.addmm(out, _csr(offsets, rows, weights, (out.shape[0], src.shape[0])), src, beta=0.0, out=out)


def _csr(crow, col, values, shape):
    with warnings.catch_warnings():  # torch warns that CSR support is "beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


# ---------------------------------------------------------------------------- shared pieces


def _sparsity(sparsity_fn: SparsityFn, n_active: float, B: int, device) -> tuple:
    """(L0, S(L0), S'(L0)) for the batch-mean L0 = n_active / B."""
    l0 = torch.tensor(n_active / B, dtype=torch.float32, device=device, requires_grad=True)
    with torch.enable_grad():
        sp = sparsity_fn(l0)
        (dsp_dl0,) = torch.autograd.grad(sp, l0)
    return l0.detach(), sp.detach(), dsp_dl0


def _threshold_grad(z, th, g_f, cols, threshold, bandwidth, dsp_dl0, B) -> torch.Tensor:
    """∂L/∂θ [m] from pairs (z, θ_j, ∂L/∂f) [n] of latents `cols`: JumpReLU −(θ/ε)·K·∂L/∂f plus
    Step −(1/ε)·K·∂L/∂H with ∂L/∂H = S'(L0)/B. Pairs outside the kernel window add 0."""
    k = _kernel(z, th, bandwidth)  # K((z − θ)/ε), exactly as the autograd functions compute it
    g = k.mul_(-(th / bandwidth) * g_f - dsp_dl0.to(k.dtype) / (bandwidth * B))
    return torch.zeros_like(threshold).index_add_(0, cols, g)


def _reconstruction(x: torch.Tensor, x_hat: torch.Tensor, err_out: torch.Tensor | None = None):
    """(mse, mean_err [d], ∂L/∂x̂ = 2(x̂ − x)/B [B, d], written into err_out if given)."""
    err = torch.sub(x_hat, x, out=err_out) if err_out is not None else x_hat - x
    mse = err.reshape(-1).dot(err.reshape(-1)) / x.shape[0]
    return mse, err.mean(0), err.mul_(2.0 / x.shape[0])


# ---------------------------------------------------------------------------- the three ways


@torch.no_grad()
def sparse_grads(x, xW, b_enc, W_dec, b_dec, threshold, bandwidth, sparsity_fn: SparsityFn,
                 max_density: float | None = None, out: dict | None = None):  # fmt: skip
    """Touches only the pairs with z > θ − ε/2; returns None (xW untouched) when more than
    `max_density` of the B·m pairs are such candidates. Shapes: x [B, d], xW [B, m] fp32, b_enc [m],
    W_dec [m, d], b_dec [d], threshold [m]. `out` may hold [m, d] tensors "W_dec" and "W_enc_t" to
    write those gradients into (worth it when [m, d] is large: a fresh tensor costs page faults).
    Decode with embedding_bag, ∂L/∂f by a sampled matmul (SDDMM) at the pairs, and the W_dec / W_enc
    gradients as per-latent bags; xW's storage is reused for ∂L/∂x̂ once the pairs are read."""
    B, m = xW.shape
    eps = bandwidth
    # Candidates z > θ − ε/2 (slack for rounding): every active pair (z > θ) and the kernel window.
    lo = threshold - b_enc - eps / 2 - 1e-6 * (threshold.abs() + b_enc.abs() + eps)
    flat = candidates(xW, lo)  # [n] row-major, so sorted by token
    if max_density is not None and flat.numel() > max_density * B * m:
        return None
    z = xW.reshape(-1).index_select(0, flat)
    rows, cols = _split(flat, m)
    del flat
    z.add_(b_enc.index_select(0, cols))
    th = threshold.index_select(0, cols)
    active = z > th  # [n]
    f = z * active  # feature values (0 at inactive candidates: those only matter for θ)
    t_offsets = _offsets(rows, B)  # CSR pointers over tokens

    x_hat = F.embedding_bag(cols, W_dec, t_offsets[:-1], mode="sum", per_sample_weights=f).add_(b_dec)
    arena = xW.reshape(-1)[: B * x.shape[1]].view_as(x) if m >= x.shape[1] else None  # xW is dead now
    mse, mean_err, g_xhat = _reconstruction(x, x_hat, arena)
    l0, sp, dsp_dl0 = _sparsity(sparsity_fn, float(active.sum()), B, x.device)

    # ∂L/∂f_bj = W_dec_j · ∂L/∂x̂_b at every candidate, in token order.
    g_f = torch.sparse.sampled_addmm(_csr(t_offsets, cols, z, (B, m)), g_xhat, W_dec.T, beta=0.0).values()
    g_z = g_f.mul_(active) if True else None  # ∂f/∂z = H(z − θ); the step passes nothing to z
    g_threshold = _threshold_grad(z, th, g_f_window := g_f, cols, threshold, eps, dsp_dl0, B) if False else None
    del g_f_window
    raise NotImplementedError
