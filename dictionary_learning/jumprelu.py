"""JumpReLU math: the activation, its straight-through estimators and the losses.

Rajamanoharan et al. 2024, "Jumping Ahead" (arXiv 2407.14435), §3 and eq. 11-12:
    f = JumpReLU_θ(z) = z · H(z − θ),  z = x·W_enc + b_enc
    L = ‖x − x̂‖² + λ · ‖f‖₀,          ‖f‖₀ = Σᵢ H(zᵢ − θᵢ)
The jump and the step have zero derivative w.r.t. θ almost everywhere, so θ is trained with
kernel density "pseudo-derivatives" using the rectangle kernel K(u) = 1[−½ < u < ½], bandwidth ε:
    JumpReLU:  ∂/∂z = H(z − θ),  ∂/∂θ = −(θ/ε) · K((z − θ)/ε)
    Step:      ∂/∂z = 0,         ∂/∂θ = −(1/ε) · K((z − θ)/ε)
The step is applied to the pre-activations z (not to f: dictionary_learning bug #55).
Gradients w.r.t. θ are summed over every leading (batch) dimension. θ keeps its own dtype (fp32)
even when z is bf16, so small θ updates are not rounded away.

This module holds no state; trainer.py wires it up (and has the fast sparse backward).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

SPARSITY_MODES = ("l0", "target_l0")


def rectangle(u: torch.Tensor) -> torch.Tensor:
    """Rectangle kernel K(u) = 1[−½ < u < ½], same shape and dtype as u."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


def _kernel(z: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """K((z − θ)/ε) computed in θ's dtype (fp32). z [..., m], θ [m] -> [..., m]."""
    return rectangle((z.to(threshold.dtype) - threshold).div_(bandwidth))


def _sum_to_threshold(g: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Sum a [..., m] gradient over the leading dims -> [m] (θ's shape and dtype)."""
    return g.reshape(-1, g.shape[-1]).sum(0).to(threshold.dtype).reshape(threshold.shape)


def _check_bandwidth(bandwidth: float) -> None:
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth}")


class JumpReLUFunction(torch.autograd.Function):
    """f = z · H(z − θ).  z [..., m] (any float dtype), θ [m] (fp32), bandwidth ε > 0 -> f [..., m]."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        _check_bandwidth(bandwidth)
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return z * (z > threshold)

    @staticmethod
    def backward(ctx, grad_f: torch.Tensor):
        z, threshold = ctx.saved_tensors
        grad_z = grad_th = None
        if ctx.needs_input_grad[0]:
            grad_z = grad_f * (z > threshold)  # ∂f/∂z = H(z − θ): no pseudo-gradient to z
        if ctx.needs_input_grad[1]:  # ∂/∂θ = −(θ/ε)·K((z − θ)/ε), summed over the batch
            k = _kernel(z, threshold, ctx.bandwidth).mul_(grad_f)
            grad_th = _sum_to_threshold(k, threshold) * (-(threshold / ctx.bandwidth))
        return grad_z, grad_th, None


class StepFunction(torch.autograd.Function):
    """H(z − θ) in z's dtype.  z [..., m], θ [m], bandwidth ε > 0 -> [..., m] of 0/1."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        _check_bandwidth(bandwidth)
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        z, threshold = ctx.saved_tensors
        grad_th = None
        if ctx.needs_input_grad[1]:  # ∂/∂θ = −(1/ε)·K((z − θ)/ε), summed over the batch
            k = _kernel(z, threshold, ctx.bandwidth).mul_(grad_out)
            grad_th = _sum_to_threshold(k, threshold) * (-1.0 / ctx.bandwidth)
        return None, grad_th, None  # ∂H/∂z = 0: no gradient to z (None, not a [..., m] of zeros)


def jumprelu(z: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return JumpReLUFunction.apply(z, threshold, bandwidth)


def step(z: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return StepFunction.apply(z, threshold, bandwidth)


def reconstruction_loss(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """‖x − x̂‖² summed over the last dim, averaged over the batch. x, x̂ [B, d] -> scalar (fp32)."""
    return (x.float() - x_hat.float()).pow(2).sum(-1).mean()


def sparsity_loss(l0: torch.Tensor, mode: str, coeff: float, target_l0: float | None = None) -> torch.Tensor:
    """Sparsity penalty from the batch-mean L0 (a scalar tensor, differentiable through StepFunction).

    mode "l0":        λ · L0                      (Rajamanoharan et al. 2024, eq. 11)
    mode "target_l0": λ · (L0 / target − 1)²      (dictionary_learning's target-L0 variant)
    """
    if mode == "l0":
        return coeff * l0
    if mode == "target_l0":
        if target_l0 is None or not target_l0 > 0:
            raise ValueError(f"sparsity mode 'target_l0' needs target_l0 > 0, got {target_l0}")
        return coeff * (l0 / target_l0 - 1.0).pow(2)
    raise ValueError(f"unknown sparsity mode {mode!r}; choose one of {SPARSITY_MODES}")


# ---------------------------------------------------------------------------- sparse backward
#
# Only (token, latent) pairs with z > θ carry gradient to z (∂f/∂z = H(z − θ); the step has ∂/∂z = 0),
# and only pairs with |z − θ| < ε/2 carry gradient to θ. Once L0 << m this is a small set, so after
# the one dense encoder GEMM everything else is done on those pairs: decode with embedding_bag,
# ∂L/∂f at the pairs by a sampled matmul (SDDMM), and W_dec / W_enc gradients as per-latent bags.


class SparseStats(NamedTuple):
    loss: torch.Tensor  # scalar
    mse: torch.Tensor  # scalar
    sparsity_loss: torch.Tensor  # scalar
    l0: torch.Tensor  # scalar, batch-mean number of active latents
    x_hat: torch.Tensor  # [B, d]
    mean_err: torch.Tensor  # [d], batch mean of x̂ − x (for the fraction of variance explained)
    fired: torch.Tensor  # [m] bool, latent active on some row


def _offsets(sorted_index: torch.Tensor, n: int) -> torch.Tensor:
    """Sorted ids in [0, n) -> CSR pointers [n + 1] (counts cumulated)."""
    out = torch.zeros(n + 1, dtype=torch.int64, device=sorted_index.device)
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


def candidates(xW: torch.Tensor, lo: torch.Tensor, chunk_bytes: int = 1 << 21) -> torch.Tensor:
    """Flat indices (ascending) of xW [B, m] > lo [m], found a few rows at a time so the bool mask
    never exceeds chunk_bytes (no [B, m] mask)."""
    B, m = xW.shape
    rows = max(1, chunk_bytes // m)
    if rows >= B:
        return flat_nonzero(xW > lo)
    buf = torch.empty(rows, m, dtype=torch.bool, device=xW.device)
    out = []
    for r in range(0, B, rows):
        part = xW[r : r + rows]
        mask = torch.gt(part, lo, out=buf[: part.shape[0]])
        out.append(flat_nonzero(mask).add_(r * m))
    return torch.cat(out)


def _latent_bags(offsets, rows, weights, src, out=None):
    """[m, d] = Σ over each latent's pairs of weight · src[row]; offsets [m + 1] (CSR over latents),
    rows, weights [n], src [B, d]. Into `out` by a CSR matmul if given, else embedding_bag."""
    if out is None:
        return F.embedding_bag(rows, src, offsets[:-1], mode="sum", per_sample_weights=weights)
    with warnings.catch_warnings():  # torch warns that CSR support is "beta"
        warnings.simplefilter("ignore", UserWarning)
        csr = torch.sparse_csr_tensor(
            offsets, rows, weights, (out.shape[0], src.shape[0]), check_invariants=False
        )
    return torch.addmm(out, csr, src, beta=0.0, out=out)


@torch.no_grad()
def sparse_grads(
    x: torch.Tensor,
    xW: torch.Tensor,
    b_enc: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    threshold: torch.Tensor,
    bandwidth: float,
    sparsity_fn: Callable[[torch.Tensor], torch.Tensor],
    max_density: float | None = None,
    out: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], SparseStats] | None:
    """Loss and gradients of ‖x − x̂‖² (sum over d, mean over B) + sparsity_fn(L0), touching only the
    pairs near or above θ; the same numbers as dense autograd through JumpReLUFunction/StepFunction.

    x [B, d] and xW = x @ W_enc [B, m] (fp32, no bias: z = xW + b_enc is formed only where needed),
    b_enc [m], W_dec [m, d], b_dec [d], threshold [m]; sparsity_fn maps the scalar L0 tensor to the
    sparsity loss. Returns ({W_enc [d, m] (a transposed view of an [m, d] tensor), b_enc, W_dec,
    b_dec, threshold} gradients, stats), or None when more than `max_density` of the pairs are
    candidates (the caller then takes the dense path). `out` may hold [m, d] buffers "W_dec" and
    "W_enc_t" to write those two gradients into (worth it when [m, d] is large: a fresh tensor of
    that size costs more in page faults than the sparse product itself).
    """
    B, m = xW.shape
    eps = bandwidth
    # Candidates: z > θ − ε (with slack for rounding), a superset of the active pairs (z > θ) and of
    # the kernel window (|z − θ| < ε/2); both are then decided exactly on the candidates.
    lo = threshold - b_enc
    lo = lo - eps - 1e-6 * (threshold.abs() + b_enc.abs())
    flat = candidates(xW, lo)  # [n] row-major, so sorted by token
    if max_density is not None and flat.numel() > max_density * B * m:
        return None
    rows = torch.div(flat, m, rounding_mode="floor")
    cols = flat - rows * m
    z = xW.reshape(-1).index_select(0, flat).add_(b_enc.index_select(0, cols))
    del flat
    th = threshold.index_select(0, cols)
    active = z > th  # [n]
    f = z * active  # feature values (0 at inactive candidates: those only matter for θ)

    # Forward: x̂ = f @ W_dec + b_dec, one bag of decoder rows per token.
    x_hat = F.embedding_bag(cols, W_dec, _offsets(rows, B)[:-1], mode="sum", per_sample_weights=f)
    x_hat += b_dec
    err = x_hat - x  # [B, d]
    mse = err.reshape(-1).dot(err.reshape(-1)) / B
    mean_err = err.mean(0)
    l0 = torch.tensor(float(active.sum()) / B, dtype=torch.float32, device=x.device, requires_grad=True)
    with torch.enable_grad():
        sp = sparsity_fn(l0)
        (dsp_dl0,) = torch.autograd.grad(sp, l0)

    # Backward, with the pairs re-sorted by latent (a stable radix sort on int32 keys keeps the
    # tokens ascending within a latent): ∂L/∂x̂ = 2(x̂ − x)/B, ∂L/∂f_bj = W_dec_j · ∂L/∂x̂_b at every
    # candidate (a sampled matmul), then per-latent bags for W_dec and W_enc.
    perm = torch.argsort(cols.to(torch.int32), stable=True)
    t_offsets = _offsets(cols, m)  # cols are only counted here, so their order doesn't matter
    cols = cols.index_select(0, perm)
    rows = rows.index_select(0, perm)
    z, th, active, f = (v.index_select(0, perm) for v in (z, th, active, f))
    del perm
    g_xhat = err.mul_(2.0 / B)
    with warnings.catch_warnings():  # torch warns that CSR support is "beta"
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(t_offsets, rows, z, (m, B), check_invariants=False)
    g_f = torch.sparse.sampled_addmm(pattern, W_dec, g_xhat.T, beta=0.0).values()  # [n]
    del pattern
    g_z = g_f * active  # ∂f/∂z = H(z − θ); the step passes nothing to z

    # θ: JumpReLU −(θ/ε)·K·∂L/∂f  +  Step −(1/ε)·K·∂L/∂H, with ∂L/∂H_bj = (∂S/∂L0)/B.
    k = rectangle((z - th) / eps)  # K((z − θ)/ε), as in _kernel
    g_th_pair = k.mul_(-(th / eps) * g_f - dsp_dl0.to(k.dtype) / (eps * B))
    g_threshold = torch.zeros(m, dtype=threshold.dtype, device=x.device).index_add_(0, cols, g_th_pair)
    g_b_enc = torch.zeros(m, dtype=xW.dtype, device=x.device).index_add_(0, cols, g_z)
    fired = torch.zeros(m, dtype=xW.dtype, device=x.device).index_add_(0, cols, active.to(xW.dtype)) > 0
    del k, g_th_pair, z, th, active, g_f, cols

    g_W_dec = _latent_bags(t_offsets, rows, f, g_xhat, (out or {}).get("W_dec"))  # Σ_b f_bj ∂L/∂x̂_b
    g_W_enc_t = _latent_bags(t_offsets, rows, g_z, x, (out or {}).get("W_enc_t"))  # Σ_b ∂L/∂z_bj x_b
    grads = {
        "W_enc": g_W_enc_t.T,  # [d, m], latent-major like the parameter
        "b_enc": g_b_enc,
        "W_dec": g_W_dec,
        "b_dec": g_xhat.sum(0),
        "threshold": g_threshold,
    }
    stats = SparseStats(mse + sp.detach(), mse, sp.detach(), l0.detach(), x_hat, mean_err, fired)
    return grads, stats
