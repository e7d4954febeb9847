"""One JumpReLU SAE training step's math: loss and gradients written out by hand (no autograd
graph), and the optimiser step that applies them (trainer.py holds the state and wires these up).

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
On CPU the per-pair passes of sparse_grads (candidate scan, decode + ∂L/∂f, sort by latent, bags)
and the unit-norm steps run as fused C++ kernels (kernels.py) where they are built; the torch ops
next to each call are the same math, used on GPUs and as the fallback.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import kernels
from .jumprelu import jumprelu, kernel, reconstruction_loss, step

SparsityFn = Callable[[torch.Tensor], torch.Tensor]  # scalar L0 tensor -> sparsity loss


class GradStats(NamedTuple):
    loss: torch.Tensor  # scalar
    mse: torch.Tensor  # scalar
    sparsity_loss: torch.Tensor  # scalar
    l0: torch.Tensor  # scalar, batch-mean number of active latents
    x_hat: torch.Tensor  # [B, d]
    mean_err: torch.Tensor  # [d], batch mean of x̂ − x (for the fraction of variance explained)
    fired: torch.Tensor  # [m] bool, latent active on some row
    counts: torch.Tensor  # [m] int, rows on which each latent is active


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


def candidates(xW: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor | None = None,
               max_count: float | None = None, chunk_bytes: int = 1 << 21) -> tuple | None:  # fmt: skip
    """The entries of xW [B, m] with lo < xW (and xW < hi), lo and hi [m], in row-major order:
    (rows, cols, values xW[rows, cols]), rows and cols int32 where they fit. None as soon as more
    than max_count are found. On CPU one fused pass (kernels.cpp), or in torch ops a few rows at a
    time so the bool masks stay in cache (no [B, m] mask)."""
    B, m = xW.shape
    ops = kernels.ops_for(xW, lo, *(() if hi is None else (hi,)))
    if ops is not None and min(B * m, max_count if max_count is not None else B * m) < 2**31:  # int32 pairs
        rows, cols, values, n = ops.candidates(xW, lo, hi, -1 if max_count is None else int(max_count))
        return None if n < 0 else (rows, cols, values)
    rows = max(1, min(B, chunk_bytes // m)) if xW.device.type == "cpu" else B  # GPU: one pass
    buf = torch.empty(rows, m, dtype=torch.bool, device=xW.device)
    buf2 = None if hi is None else torch.empty_like(buf)
    out, n = [], 0
    for r in range(0, B, rows):
        part = xW[r : r + rows]
        mask = torch.gt(part, lo, out=buf[: part.shape[0]])
        if hi is not None:
            mask &= torch.lt(part, hi, out=buf2[: part.shape[0]])
        out.append(flat_nonzero(mask).add_(r * m))
        n += out[-1].numel()
        if max_count is not None and n > max_count:
            return None
    flat = out[0] if len(out) == 1 else torch.cat(out)
    return (*_split(flat, m), xW.reshape(-1).index_select(0, flat))


def sum_by(index: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """Σ of values [k] per id of index [k] in [0, n) -> [n]. index_add_ (deterministic on CPU); on CUDA
    a stable sort by id and per-segment sums, because CUDA's index_add_ accumulates with atomics in
    a varying order, and the same state must give the same bits (exact resume)."""
    if values.device.type == "cuda":
        return segment_sums(index, values, n)
    return torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, index, values)


def segment_sums(index: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """sum_by's deterministic path for CUDA (any device: tested on CPU)."""
    order = torch.argsort(index, stable=True)
    return torch.segment_reduce(values.index_select(0, order), "sum", offsets=_offsets(index, n), unsafe=True)


def _split(flat: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices into [B, m] -> (rows, cols), int32 when that fits (faster gathers and bags)."""
    if flat.numel() == 0 or int(flat[-1]) < 2**31:
        flat = flat.to(torch.int32)
    rows = torch.div(flat, m, rounding_mode="floor")
    return rows, flat - rows * m  # not in place: the caller may still use `flat`


def _bags(offsets, idx, weights, src, out=None, block_bytes: int = 1 << 21):
    """Weighted sums of rows of src [N, d]: bag i = Σ_{p in offsets[i]:offsets[i+1]} weights[p] ·
    src[idx[p]] -> [len(offsets) − 1, d]. Into `out` if given: on CPU straight into it (kernels.cpp), or
    with embedding_bag (which has no out=) a block of bags at a time; small blocks mean no fresh [bags, d]
    tensor per step: no page faults, and glibc's heap does not grow, as it does once a multi-MB block
    is freed every step. GPU: one embedding_bag call."""
    ops = None if out is None else kernels.ops_for(weights, src, out)
    if ops is not None and idx.dtype == offsets.dtype == torch.int32:
        ops.bags(offsets, idx, weights, src, out)  # straight into out
        return out
    if out is None or src.device.type != "cpu":
        bags = F.embedding_bag(idx, src, offsets[:-1], mode="sum", per_sample_weights=weights)
        return bags if out is None else out.copy_(bags)
    n_bags, d = out.shape
    step = max(1, block_bytes // (src.element_size() * d))
    for i in range(0, n_bags, step):
        j = min(i + step, n_bags)
        s, e = int(offsets[i]), int(offsets[j])
        part = F.embedding_bag(idx[s:e], src, offsets[i:j] - s, mode="sum", per_sample_weights=weights[s:e])
        out[i:j].copy_(part)
    return out


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
    k = kernel(z, th, bandwidth)  # K((z − θ)/ε), exactly as the autograd functions compute it
    g = k.mul_(-(th / bandwidth) * g_f - dsp_dl0.to(k.dtype) / (bandwidth * B))
    return sum_by(cols, g, threshold.shape[0])


def _products_at(x, W_enc, rows, cols, approx) -> torch.Tensor:
    """x·W_enc in fp32 at the pairs (rows, cols) of [B, m] (row-major order), by a sampled matmul;
    `approx`, their current values, only fills the sparsity pattern."""
    shape = (x.shape[0], W_enc.shape[1])
    csr = _csr(_offsets(rows, shape[0]), cols, approx, shape)
    return torch.sparse.sampled_addmm(csr, x, W_enc, beta=0.0).values()


def _reconstruction(err: torch.Tensor):
    """err = x̂ − x [B, d] -> (mse, mean_err [d], ∂L/∂x̂ = 2·err/B, in err's storage). ∂L/∂b_dec = Σ_b ∂L/∂x̂_b
    = 2·mean_err."""
    mse = err.reshape(-1).dot(err.reshape(-1)) / err.shape[0]
    return mse, err.mean(0), err.mul_(2.0 / err.shape[0])


# ---------------------------------------------------------------------------- step statistics


def row_dot(a: torch.Tensor, b: torch.Tensor, chunk_elems: int = 1 << 18) -> torch.Tensor:
    """Row-wise dot products of a, b [m, d] -> [m], a block of rows at a time (no [m, d] temporary)."""
    out = torch.empty(a.shape[0], dtype=a.dtype, device=a.device)
    rows = max(1, chunk_elems // max(1, a.shape[1]))
    for r in range(0, a.shape[0], rows):
        torch.linalg.vecdot(a[r : r + rows], b[r : r + rows], out=out[r : r + rows])
    return out


# ---------------------------------------------------------------------------- the three ways


@torch.no_grad()
def sparse_grads(x, xW, b_enc, W_dec, b_dec, threshold, bandwidth, sparsity_fn: SparsityFn,
                 max_density: float | None = None, out: dict | None = None, refine: tuple | None = None):  # fmt: skip
    """Touches only the pairs with z > θ − ε/2; returns None (xW untouched) when more than
    `max_density` of the B·m pairs are such candidates. Shapes: x [B, d], xW [B, m] fp32, b_enc [m],
    W_dec [m, d], b_dec [d], threshold [m]. `out` may hold [m, d] tensors "W_dec" and "W_enc_t" to
    write those gradients into (last step's: no fresh [m, d] tensors, no page faults, no heap churn).
    Decode with embedding_bag, ∂L/∂f by a sampled matmul (SDDMM) at the pairs, and the W_dec / W_enc
    gradients as per-latent bags; xW's storage is reused for ∂L/∂x̂ once the pairs are read.
    refine = (W_enc [d, m] fp32, rel, err [m]): xW is a low-precision product, off by at most
    rel·|xW| + err_j; the pairs are then found with that much more slack and their x·W_enc recomputed
    in fp32 (an SDDMM), so the gradients are the fp32 ones."""
    B, m = xW.shape
    eps = bandwidth
    # Candidates z > θ − ε/2 (slack for rounding): every active pair (z > θ) and the kernel window.
    lo = threshold - b_enc - eps / 2 - 1e-6 * (threshold.abs() + b_enc.abs() + eps)
    max_count = None if max_density is None else max_density * B * m
    found = candidates(
        xW, lo if refine is None else lo - refine[1] * lo.abs() - refine[2], max_count=max_count
    )
    if found is None:
        return None
    rows, cols, z = found  # [n] each, row-major: sorted by token
    if refine is not None:  # x·W_enc in fp32 at the candidates; keep those that really are
        z = _products_at(x, refine[0], rows, cols, z)
        keep = (z > lo.index_select(0, cols)).nonzero().squeeze(1)
        rows, cols, z = (v.index_select(0, keep) for v in (rows, cols, z))
    z.add_(b_enc.index_select(0, cols))
    th = threshold.index_select(0, cols)
    active = z > th  # [n]
    f = z * active  # feature values (0 at inactive candidates: those only matter for θ)
    t_offsets = _offsets(rows, B)  # CSR pointers over tokens

    # xW is dead from here on: x̂ and x̂ − x [B, d] go into its storage when it has room.
    d = x.shape[1]
    x_hat, err = xW.reshape(-1)[: 2 * B * d].view(2, B, d) if m >= 2 * d else x.new_empty(2, B, d)
    # x̂_b = Σ_j f_bj W_dec_j + b_dec, and ∂L/∂f_bj = W_dec_j · ∂L/∂x̂_b at every candidate (token order)
    ops = kernels.ops_for(x, W_dec, b_dec, f) if cols.dtype == torch.int32 else None
    if ops is not None:  # fused per token: its W_dec rows are read once for x̂ and again from cache
        g_f = ops.decode_grad(t_offsets.long(), cols, f, W_dec, b_dec, x, 2.0 / B, x_hat, err)
        mse, mean_err, g_xhat = _reconstruction(err)
    else:
        _bags(t_offsets, cols, f, W_dec, x_hat).add_(b_dec)
        mse, mean_err, g_xhat = _reconstruction(torch.sub(x_hat, x, out=err))
        g_f = torch.sparse.sampled_addmm(_csr(t_offsets, cols, z, (B, m)), g_xhat, W_dec.T, beta=0.0).values()
    l0, sp, dsp_dl0 = _sparsity(sparsity_fn, float(active.sum()), B, x.device)
    g_threshold = _threshold_grad(z, th, g_f, cols, threshold, eps, dsp_dl0, B)
    g_z = g_f.mul_(active)  # ∂f/∂z = H(z − θ); the step passes nothing to z
    g_b_enc = sum_by(cols, g_z, m)
    counts = torch.zeros(m, dtype=torch.int32, device=x.device).index_add_(0, cols, active.int())
    del z, th, t_offsets

    # Per-latent bags: pairs re-sorted by latent, stably (the tokens stay ascending in each).
    if ops is not None:
        l_offsets, (rows, f, g_z) = ops.by_latent(cols, m, [rows, f, g_z])  # a counting sort
    else:
        perm = torch.argsort(cols, stable=True)
        l_offsets = _offsets(cols, m)  # cols are only counted here, so their order doesn't matter
        rows, f, g_z = (v.index_select(0, perm) for v in (rows, f, g_z))
        del perm
    del cols, active
    out = out or {}
    g_W_dec = _bags(l_offsets, rows, f, g_xhat, out.get("W_dec"))  # Σ_b f_bj ∂L/∂x̂_b
    g_W_enc_t = _bags(l_offsets, rows, g_z, x, out.get("W_enc_t"))  # Σ_b ∂L/∂z_bj x_b
    grads = {"W_enc": g_W_enc_t.T, "b_enc": g_b_enc, "W_dec": g_W_dec, "b_dec": 2 * mean_err,
             "threshold": g_threshold}  # fmt: skip
    return grads, GradStats(mse + sp, mse, sp, l0, x_hat, mean_err, counts > 0, counts)


@torch.no_grad()
def exact_near_threshold(x, xW, W_enc, b_enc, threshold, bandwidth, rel, err) -> int:
    """xW [B, m] is a low-precision x·W_enc, off by at most rel·|xW| + err_j (err [m]). Overwrite it
    with the fp32 product (an SDDMM) wherever z = xW + b_enc may lie within ε/2 of θ or across it:
    the pairs whose JumpReLU and step decisions and kernel weights rounding could change. Elsewhere
    only bf16 rounding of the values remains. Returns how many pairs were recomputed."""
    m = xW.shape[1]
    centre = threshold - b_enc
    half = bandwidth / 2 + err + 1e-6 * (threshold.abs() + b_enc.abs() + bandwidth)
    half = half + rel * (centre.abs() + half)
    rows, cols, approx = candidates(xW, centre - half, centre + half)
    xW.view(-1).index_copy_(0, rows.long() * m + cols, _products_at(x, W_enc, rows, cols, approx))
    return rows.numel()


@torch.no_grad()
def dense_grads(x, xW, b_enc, W_dec, b_dec, threshold, bandwidth, sparsity_fn: SparsityFn,
                out: dict | None = None, scratch: torch.Tensor | None = None):  # fmt: skip
    """All B·m pairs: z = xW + b_enc, f and ∂L/∂z in place, in xW's storage and one more [B, m]
    (`scratch` if given); GEMMs for x̂, ∂L/∂f, and the W_dec / W_enc gradients (into `out` as in
    sparse_grads). θ's gradient needs only the kernel-window pairs, found by one chunked scan."""
    B, m = xW.shape
    eps = bandwidth
    z = xW.add_(b_enc)  # [B, m]
    slack = 1e-6 * (threshold.abs() + eps)
    rows_w, cols_w, z_w = candidates(z, threshold - eps / 2 - slack, threshold + eps / 2 + slack)  # ⊃ window
    flat = rows_w.long() * m + cols_w
    th_w = threshold.index_select(0, cols_w)
    active = z > threshold  # [B, m] bool
    l0, sp, dsp_dl0 = _sparsity(sparsity_fn, float(active.sum()), B, x.device)
    counts = active.sum(0, dtype=torch.int32)
    f = z.mul_(active)  # xW's storage now holds f
    x_hat = torch.addmm(b_dec, f, W_dec)
    mse, mean_err, g_xhat = _reconstruction(x_hat - x)
    out = out or {}
    g_W_dec = torch.mm(f.T, g_xhat, out=out.get("W_dec"))  # [m, d]
    g_f = torch.mm(g_xhat, W_dec.T, out=scratch)  # ∂L/∂f [B, m]
    g_threshold = _threshold_grad(z_w, th_w, g_f.reshape(-1).index_select(0, flat), cols_w, threshold,
                                  eps, dsp_dl0, B)  # fmt: skip
    g_z = g_f.mul_(active)
    del active
    g_W_enc_t = torch.mm(g_z.T, x, out=out.get("W_enc_t"))  # [m, d]
    grads = {"W_enc": g_W_enc_t.T, "b_enc": g_z.sum(0), "W_dec": g_W_dec, "b_dec": 2 * mean_err,
             "threshold": g_threshold}  # fmt: skip
    return grads, GradStats(mse + sp, mse, sp, l0, x_hat, mean_err, counts > 0, counts)


def autograd_grads(x, xW, b_enc, W_dec, b_dec, threshold, bandwidth, sparsity_fn: SparsityFn):
    """Plain autograd through JumpReLUFunction and StepFunction from z = xW + b_enc on (the reference
    the hand-written paths are tested against; works in any dtype). Step on z, not f (bug #55)."""
    with torch.enable_grad():
        pre = (xW + b_enc).detach().requires_grad_(True)
        W_dec, b_dec, threshold = (t.detach().requires_grad_(True) for t in (W_dec, b_dec, threshold))
        x_hat = jumprelu(pre, threshold, bandwidth) @ W_dec + b_dec
        mse = reconstruction_loss(x, x_hat)
        l0 = step(pre, threshold, bandwidth).sum(-1).mean()
        sp = sparsity_fn(l0)
        loss = mse + sp
        g_pre, g_W_dec, g_b_dec, g_th = torch.autograd.grad(loss, (pre, W_dec, b_dec, threshold))
    with torch.no_grad():
        grads = {"W_enc": (g_pre.T @ x).T, "b_enc": g_pre.sum(0), "W_dec": g_W_dec, "b_dec": g_b_dec,
                 "threshold": g_th}  # fmt: skip
        counts = (pre > threshold).sum(0, dtype=torch.int32)
        x_hat = x_hat.detach()
        stats = GradStats(loss.detach(), mse.detach(), sp.detach(), l0.detach(), x_hat,
                          (x_hat - x).mean(0), counts > 0, counts)  # fmt: skip
    return grads, stats


# ---------------------------------------------------------------------------- optimiser step


def make_adam(params: list[torch.Tensor], lr: float, betas: tuple, eps: float) -> torch.optim.Adam:
    """torch.optim.Adam: the fused kernel where this torch build has it (several times faster on CPU;
    same update as the for-loop Adam up to the last bit), else foreach."""
    try:
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, foreach=True)


@torch.no_grad()
def optimizer_step(optimizer, params: dict, lr: float, max_grad_norm: float | None, unit_norm_decoder: bool):
    """Apply the .grad of params (by name, as in TENSOR_NAMES; params["W_enc"] may be W_enc's [m, d]
    transpose): with unit-norm decoder rows, the gradient component parallel to each W_dec row is
    removed first and the rows renormalised after; gradient-norm clipping; Adam at `lr`; θ >= 0."""
    for p in params.values():  # the fused Adam kernel needs grads laid out like params
        if p.grad.stride() != p.stride():
            p.grad = torch.empty_like(p).copy_(p.grad)
    W_dec = params["W_dec"]
    ops = kernels.ops_for(W_dec, W_dec.grad) if unit_norm_decoder else None
    if ops is not None:  # fused per row (no [m, d] temporaries, one pass over memory)
        ops.remove_parallel(W_dec.grad, W_dec)
    elif unit_norm_decoder:
        W_dec.grad.addcmul_(row_dot(W_dec.grad, W_dec).unsqueeze(1), W_dec, value=-1.0)
    if max_grad_norm is not None:  # = clip_grad_norm_, minus the no-op ×1 pass when not clipping
        total = torch.nn.utils.get_total_norm([p.grad for p in params.values()])
        if total > max_grad_norm:
            torch.nn.utils.clip_grads_with_norm_(list(params.values()), max_grad_norm, total)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    params["threshold"].clamp_(min=0.0)  # so encode = z·1[z > θ] is the same in training and inference
    if ops is not None:
        ops.normalize_rows(W_dec)
    elif unit_norm_decoder:
        W_dec.div_(torch.linalg.vector_norm(W_dec, dim=1, keepdim=True))
