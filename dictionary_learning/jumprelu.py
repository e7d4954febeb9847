"""JumpReLU SAE math: the forward pass, its pseudo-derivatives, and the losses.

Rajamanoharan et al. 2024, "Jumping Ahead" (arXiv 2407.14435), §3 and eq. 11-12. Symbols: z = pre_acts =
x·W_enc + b_enc [B, m], θ = threshold [m] (fp32), ε = bandwidth, f the feature values, x̂ the reconstruction:
    f = JumpReLU_θ(z) = z · H(z − θ),      x̂ = f·W_dec + b_dec,      L0 = (1/B) Σ_b Σ_j H(z_bj − θ_j)
    L = ‖x − x̂‖² (sum over d, mean over B) + S(L0)
The jump and the step have zero derivative w.r.t. θ almost everywhere, so θ is trained with kernel
density "pseudo-derivatives", rectangle kernel K(u) = 1[−½ < u < ½] (eq. 11-12):
    JumpReLU:  ∂f/∂z = H(z − θ),  ∂f/∂θ = −(θ/ε) · K((z − θ)/ε)
    Step:      ∂H/∂z = 0,         ∂H/∂θ = −(1/ε) · K((z − θ)/ε)
`threshold_grad` is that formula, written once. JumpReLUFunction and StepFunction apply it to dense
tensors (the reference); `encode`'s autograd Function, the training step's encoder, applies it to the
(token, latent) pairs it keeps. The step acts on z, not on f (dictionary_learning bug #55). θ keeps its
own dtype (fp32) even when z is bf16, so small θ updates are not rounded away.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .pairs import Workspace, bags, candidates, offsets, rounding_bound, sampled_products, sum_by

SPARSITY_MODES = ("l0", "target_l0", "tanh")


def rectangle(u: torch.Tensor) -> torch.Tensor:
    """Rectangle kernel K(u) = 1[−½ < u < ½], same shape and dtype as u."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


def kernel(pre_acts: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """K((z − θ)/ε) in θ's dtype (fp32); pre_acts and threshold of broadcastable shapes."""
    return rectangle((pre_acts.to(threshold.dtype) - threshold).div_(bandwidth))


def threshold_grad(pre_acts, threshold, bandwidth: float, grad_f=None, grad_step=None) -> torch.Tensor:
    """∂L/∂θ contributed by each entry, in θ's dtype (eq. 11-12, JumpReLU and Step terms together):
        K((z − θ)/ε) · (−(θ/ε) · ∂L/∂f − (1/ε) · ∂L/∂H)
    pre_acts [...]; threshold, grad_f = ∂L/∂f and grad_step = ∂L/∂H(z − θ) broadcastable to it (None: 0).
    Entries outside the kernel window add 0; the caller sums per latent."""
    g = 0.0
    if grad_f is not None:
        g = grad_f.to(threshold.dtype) * (-(threshold / bandwidth))
    if grad_step is not None:
        g = g - grad_step.to(threshold.dtype) / bandwidth
    return kernel(pre_acts, threshold, bandwidth).mul_(g)


def _sum_to_threshold(g: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Sum a [..., m] gradient over the leading dims -> [m] (θ's shape and dtype)."""
    return g.reshape(-1, g.shape[-1]).sum(0).to(threshold.dtype).reshape(threshold.shape)


def check_bandwidth(bandwidth: float) -> None:
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth}")


class JumpReLUFunction(torch.autograd.Function):
    """f = z · H(z − θ).  z [..., m] (any float dtype), θ [m] (fp32), bandwidth ε > 0 -> f [..., m]."""

    @staticmethod
    def forward(ctx, pre_acts: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        check_bandwidth(bandwidth)
        ctx.save_for_backward(pre_acts, threshold)
        ctx.bandwidth = bandwidth
        return pre_acts * (pre_acts > threshold)

    @staticmethod
    def backward(ctx, grad_f: torch.Tensor):
        pre_acts, threshold = ctx.saved_tensors
        grad_z = grad_th = None
        if ctx.needs_input_grad[0]:
            grad_z = grad_f * (pre_acts > threshold)  # ∂f/∂z = H(z − θ): no pseudo-gradient to z
        if ctx.needs_input_grad[1]:
            grad_th = _sum_to_threshold(
                threshold_grad(pre_acts, threshold, ctx.bandwidth, grad_f=grad_f), threshold
            )
        return grad_z, grad_th, None


class StepFunction(torch.autograd.Function):
    """H(z − θ) in z's dtype.  z [..., m], θ [m], bandwidth ε > 0 -> [..., m] of 0/1."""

    @staticmethod
    def forward(ctx, pre_acts: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        check_bandwidth(bandwidth)
        ctx.save_for_backward(pre_acts, threshold)
        ctx.bandwidth = bandwidth
        return (pre_acts > threshold).to(pre_acts.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        pre_acts, threshold = ctx.saved_tensors
        grad_th = None
        if ctx.needs_input_grad[1]:
            g = threshold_grad(pre_acts, threshold, ctx.bandwidth, grad_step=grad_out)
            grad_th = _sum_to_threshold(g, threshold)
        return None, grad_th, None  # ∂H/∂z = 0: no gradient to z (None, not a [..., m] of zeros)


def jumprelu(pre_acts: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return JumpReLUFunction.apply(pre_acts, threshold, bandwidth)


def step(pre_acts: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    return StepFunction.apply(pre_acts, threshold, bandwidth)


# ---------------------------------------------------------------------------- losses


def reconstruction_loss(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """‖x − x̂‖² summed over the last dim, averaged over the batch. x, x̂ [B, d] -> scalar (fp32)."""
    return F.mse_loss(x_hat.float(), x.float(), reduction="sum") / x.shape[0]


def sparsity_loss(l0: torch.Tensor, mode: str, coeff: float, target_l0: float | None = None) -> torch.Tensor:
    """Sparsity penalty from the batch-mean L0 (a scalar tensor, differentiable through the step).

    mode "l0":        λ · L0                      (Rajamanoharan et al. 2024, eq. 11)
    mode "target_l0": λ · (L0 / target − 1)²      (dictionary_learning's target-L0 variant)
    ("tanh" is not a function of L0: see tanh_penalty.)
    """
    if mode == "l0":
        return coeff * l0
    if mode == "target_l0":
        if target_l0 is None or not target_l0 > 0:
            raise ValueError(f"sparsity mode 'target_l0' needs target_l0 > 0, got {target_l0}")
        return coeff * (l0 / target_l0 - 1.0).pow(2)
    raise ValueError(f"unknown sparsity mode {mode!r} for an L0 penalty; choose 'l0' or 'target_l0'")


def tanh_penalty(f: torch.Tensor, W_dec_norm: torch.Tensor, scale: float, batch: int) -> torch.Tensor:
    """Anthropic's smooth L0 (Circuits Updates, Feb 2024 "Tanh Penalty" and Jan 2025, Conerly et al.;
    the form of SAELens's JumpReLUTrainingSAE, sparsity mode "tanh"):
        (1/B) Σ_b Σ_j tanh(c · f_bj · ‖W_dec_j‖)
    f: feature values, any shape; W_dec_norm: ‖W_dec_j‖ of each value's latent, same shape. Scalar.
    Its gradient reaches θ through JumpReLU's pseudo-derivative, W_enc and b_enc through f."""
    return torch.tanh(scale * f * W_dec_norm).sum() / batch


def pre_act_loss(pre_acts: torch.Tensor, threshold: torch.Tensor, W_dec_norm: torch.Tensor) -> torch.Tensor:
    """Anthropic's pre-activation loss for dead latents (Circuits Updates, Jan 2025, Conerly et al.; as in
    SAELens's JumpReLUTrainingSAE `pre_act_loss`, which keeps only the dead latents):
        (1/B) Σ_b Σ_j ReLU(θ_j − z_bj) · ‖W_dec_j‖       over the dead latents j
    pushes a dead latent's z up towards θ. pre_acts [B, k], threshold and W_dec_norm [k] (those latents).
    Plain gradients: −1 to z and +1 to θ where z < θ."""
    return ((threshold - pre_acts).relu() * W_dec_norm).sum() / pre_acts.shape[0]


# ---------------------------------------------------------------------------- the SAE forward


class Pairs(NamedTuple):
    """The (token, latent) pairs the sparse branch keeps: every pair with z > θ − ε/2, i.e. the active
    ones and the kernel window below θ, sorted by token. θ's gradient needs ∂L/∂f at all of them; f and
    ∂L/∂z are 0 at the inactive ones, so the products with W_dec, W_enc and x run over the active ones
    only (`active*` by token, `latent_*` by latent): with a wide kernel window most pairs are inactive."""

    rows: torch.Tensor  # [n] int32 token of each pair
    cols: torch.Tensor  # [n] int32 latent of each pair
    offsets: torch.Tensor  # [B + 1] token b's pairs are offsets[b]:offsets[b + 1]
    active: torch.Tensor  # [k] int64 the active pairs (z > θ), ascending: positions among the n
    active_cols: torch.Tensor  # [k] cols[active]
    active_offsets: torch.Tensor  # [B + 1] token b's active pairs, as offsets into `active`
    latent_pairs: torch.Tensor | None  # [k] active sorted by latent, stably (None without gradients)
    latent_rows: torch.Tensor | None  # [k] rows[latent_pairs]
    latent_offsets: torch.Tensor | None  # [m + 1] latent j's active pairs, in latent_pairs


class Codes(NamedTuple):
    """encode's output. f and l0 carry gradients; the rest are indices and statistics."""

    f: torch.Tensor  # [n] feature values of the pairs (0 at inactive ones), or [B, m] when pairs is None
    l0: torch.Tensor  # scalar (1/B)·Σ H(z − θ), differentiable w.r.t. θ by the Step pseudo-derivative
    counts: torch.Tensor  # [m] int: on how many tokens each latent is active
    pairs: Pairs | None  # None: the dense branch ran and f is [B, m]
    pre_acts_at: torch.Tensor | None  # [B, k] z of the latents `columns` asked for (true gradient)


class JumpReLUEncoder(torch.autograd.Function):
    """The encoder of one training step: z = x·W_enc + b_enc, f = JumpReLU_θ(z), L0, for the pairs that
    matter only. x [B, d], W_enc_t = W_encᵀ [m, d], b_enc [m], threshold [m].

    Forward: one GEMM, then the pairs with z > θ − ε/2 (every active pair and the kernel window). While
    they cost at most `max_density` of the B·m pairs, all active (_sparse_pairs), f comes back per pair
    (sparse branch); else as [B, m] (dense branch, early in training). With `matmul_dtype` (bf16
    autocast) the GEMM runs in it, the pairs are found with its rounding bound as slack, and z is
    recomputed in fp32 where rounding could change a decision: at every candidate (sparse) or near θ
    (dense).
    Backward, computing only what needs_input_grad asks for: θ by the pseudo-derivatives
    (threshold_grad) at every kept pair, W_enc, b_enc and x by the true gradient ∂f/∂z = H(z − θ),
    through the active pairs only."""

    @staticmethod
    def forward(
        ctx, x, W_enc_t, b_enc, threshold, bandwidth, max_density, matmul_dtype, columns, needs_grad, ws
    ):
        check_bandwidth(bandwidth)
        ctx.set_materialize_grads(False)
        B, m = x.shape[0], W_enc_t.shape[0]
        prod = None if ws is None else ws.gemm_out(B, W_enc_t)  # x·W_enc without b_enc
        if matmul_dtype is None:
            prod = torch.mm(x, W_enc_t.T, out=prod)
        else:
            low = torch.mm(x.to(matmul_dtype), W_enc_t.T.to(matmul_dtype))
            prod = low.to(x.dtype) if prod is None else prod.copy_(low)
            del low
        rel, err = (0.0, 0.0) if matmul_dtype is None else rounding_bound(x, W_enc_t, matmul_dtype)
        tiny = 1e-6 * (threshold.abs() + b_enc.abs() + bandwidth)  # fp32 rounding of z − θ
        lo = threshold - b_enc - bandwidth / 2 - tiny
        found = None
        if max_density > 0:
            found = _sparse_pairs(
                prod, x, W_enc_t, b_enc, threshold, lo, (rel, err), matmul_dtype, max_density
            )
        ctx.dims, ctx.bandwidth, ctx.matmul_dtype = (B, m), bandwidth, matmul_dtype
        ctx.columns, ctx.ws = columns, ws
        if found is not None:  # sparse branch
            pre_at = None if columns is None else prod.index_select(1, columns).add_(b_enc[columns])
            rows, cols, pre_acts, th, active, act = found
            f = pre_acts * active  # 0 at the inactive candidates: those only matter for θ
            act_rows, act_cols = rows.index_select(0, act), cols.index_select(0, act)
            lat_pairs = lat_rows = lat_ptr = None
            if needs_grad:  # both weight gradients (W_enc here, W_dec in decode) sum per latent
                order = torch.argsort(act_cols, stable=True)
                lat_pairs, lat_rows = act.index_select(0, order), act_rows.index_select(0, order)
                lat_ptr = offsets(act_cols, m)
            act_ptr = offsets(act_rows, B)
            pairs = Pairs(rows, cols, offsets(rows, B), act, act_cols, act_ptr, lat_pairs, lat_rows, lat_ptr)
            counts = torch.bincount(act_cols, minlength=m).to(torch.int32)
            ctx.pairs = pairs
            ctx.save_for_backward(x, W_enc_t, pre_acts, th)
        else:  # dense branch: [B, m] tensors
            pairs = None
            if matmul_dtype is not None:  # exact z wherever rounding could move a pair across θ or the window
                centre = threshold - b_enc
                half = bandwidth / 2 + err + tiny
                half = half + rel * (centre.abs() + half)
                rows, cols, approx = candidates(prod, centre - half, centre + half)
                exact = sampled_products(offsets(rows, B), cols, x, W_enc_t, approx)
                prod.view(-1).index_copy_(0, rows.long() * m + cols, exact)
            pre_acts = prod.add_(b_enc)
            pre_at = None if columns is None else pre_acts.index_select(1, columns)
            window = None
            if needs_grad:  # θ's gradient needs only the pairs in the kernel window: found by one scan
                half = bandwidth / 2 + tiny
                rows, cols, pre_w = candidates(pre_acts, threshold - half, threshold + half)
                window = (rows.long() * m + cols, cols, pre_w, threshold.index_select(0, cols))
            active = pre_acts > threshold
            counts = active.sum(0, dtype=torch.int32)
            # the buffer holds f now; a view of it is returned (autograd then marks the view, not the buffer)
            f = pre_acts.mul_(active).view_as(pre_acts)
            ctx.pairs, ctx.window = None, window
            ctx.save_for_backward(x, W_enc_t, active)
        l0 = counts.sum().to(threshold.dtype) / B
        ctx.mark_non_differentiable(counts)
        return f, l0, counts, pairs, pre_at

    @staticmethod
    def backward(ctx, grad_f, grad_l0, _counts, _pairs, grad_pre_at):
        need_x, need_W, need_b, need_th = ctx.needs_input_grad[:4]
        (B, m), eps, low = ctx.dims, ctx.bandwidth, ctx.matmul_dtype
        grad_step = None if grad_l0 is None else grad_l0 / B  # ∂L/∂H for every pair: L0 = (1/B) Σ H
        g_x = g_W = g_b = g_th = None
        if ctx.pairs is not None:  # sparse: per pair
            x, W_enc_t, pre_acts, th = ctx.saved_tensors
            p = ctx.pairs
            if need_th:
                g_th = sum_by(p.cols, threshold_grad(pre_acts, th, eps, grad_f, grad_step), m)
            if grad_f is not None:  # ∂f/∂z = H(z − θ): ∂L/∂z is ∂L/∂f at the active pairs, 0 elsewhere
                g_z = grad_f.index_select(0, p.active) if need_b or need_x else None
                if need_b:
                    g_b = sum_by(p.active_cols, g_z, m)
                if need_W:  # Σ_b ∂L/∂z_bj x_b per latent j
                    out = None if ctx.ws is None else ctx.ws.take("W_enc", W_enc_t)
                    g_z_lat = grad_f.index_select(0, p.latent_pairs)
                    g_W = bags(p.latent_offsets, p.latent_rows, g_z_lat, x, out)
                if need_x:
                    g_x = bags(p.active_offsets, p.active_cols, g_z, W_enc_t)
        else:  # dense: [B, m]
            x, W_enc_t, active = ctx.saved_tensors
            if need_th and ctx.window is not None:
                flat, cols, pre_w, th_w = ctx.window
                g_w = None if grad_f is None else grad_f.reshape(-1).index_select(0, flat)
                g_th = sum_by(cols, threshold_grad(pre_w, th_w, eps, g_w, grad_step), m)
            if grad_f is not None:
                g_z = grad_f * active
                if need_b:
                    g_b = g_z.sum(0)
                if need_W:
                    out = None if ctx.ws is None else ctx.ws.take("W_enc", W_enc_t)
                    g_W = _mm(g_z.T, x, low, out)
                if need_x:
                    g_x = _mm(g_z, W_enc_t, low)
        if grad_pre_at is not None:  # z of the latents asked for, every token: dense in those columns
            cols = ctx.columns
            if need_W:
                g_W = (torch.zeros_like(W_enc_t) if g_W is None else g_W).index_add_(
                    0, cols, grad_pre_at.T @ x
                )
            if need_b:
                g_b = (x.new_zeros(m) if g_b is None else g_b).index_add_(0, cols, grad_pre_at.sum(0))
            if need_x:
                g_x = grad_pre_at @ W_enc_t[cols] + (0 if g_x is None else g_x)
        return g_x, g_W, g_b, g_th, None, None, None, None, None, None


def _sparse_pairs(prod, x, W_enc_t, b_enc, threshold, lo, bound, matmul_dtype, max_density):
    """The sparse branch's pairs, (rows, cols, z, θ_j, z > θ_j) [n] each, sorted by token, and the
    positions of the active ones [k], from prod = x·W_enc [B, m]: those with z > θ − ε/2 (lo = θ −
    b_enc − ε/2), or None when the branch would cost more than max_density·B·m active pairs. An
    active pair takes four products over d (the decode, ∂L/∂f and the two weight gradients), one in the
    kernel window below θ only ∂L/∂f: it counts a quarter (a rough weight; the scan gives up at 4× the
    budget in pairs). bound = (rel, err): prod's rounding bound when it is a matmul_dtype product; the
    pairs are then found with that slack and z recomputed in fp32 at each (those that qualify are kept)."""
    (B, m), (rel, err) = prod.shape, bound
    budget = 4 * max_density * B * m
    found = candidates(prod, lo - rel * lo.abs() - err, max_count=budget)
    if found is None:
        return None
    rows, cols, pre_acts = found
    if matmul_dtype is not None:
        pre_acts = sampled_products(offsets(rows, B), cols, x, W_enc_t, pre_acts)
        keep = (pre_acts > lo.index_select(0, cols)).nonzero().squeeze(1)
        rows, cols, pre_acts = (v.index_select(0, keep) for v in (rows, cols, pre_acts))
    pre_acts += b_enc.index_select(0, cols)
    th = threshold.index_select(0, cols)
    active = pre_acts > th
    act = active.nonzero().squeeze(1)
    if rows.numel() + 3 * act.numel() > budget:
        return None
    return rows, cols, pre_acts, th, active, act


def _mm(a: torch.Tensor, b: torch.Tensor, low: torch.dtype | None, out: torch.Tensor | None = None):
    """a @ b into `out` (if given), in the `low` dtype when given (the result in b's dtype)."""
    if low is None:
        return torch.mm(a, b, out=out)
    prod = torch.mm(a.to(low), b.to(low))
    return prod.to(b.dtype) if out is None else out.copy_(prod)


class Decoder(torch.autograd.Function):
    """x̂ − b_dec = f·W_dec for f [B, m] (dense), or for f [n] at encode's `pairs` (sparse: per token
    b, Σ_{active pairs p of b} f_p · W_dec[col_p]; f is 0 at the inactive pairs, as encode's is). W_dec
    [m, d] -> [B, d]. Backward: ∂L/∂f (sparse: by a sampled matmul at every pair, the inactive ones
    too, which the forward skips: θ's gradient needs them) and ∂L/∂W_dec = Σ_b f_bj ∂L/∂x̂_b (sparse:
    per-latent bags over the active pairs), each only if needed. matmul_dtype: the dense products in
    that dtype (bf16 autocast)."""

    @staticmethod
    def forward(ctx, f, W_dec, pairs: Pairs | None, matmul_dtype, ws: Workspace | None):
        ctx.save_for_backward(f, W_dec)
        ctx.pairs, ctx.matmul_dtype, ctx.ws = pairs, matmul_dtype, ws
        if pairs is None:
            return _mm(f, W_dec, matmul_dtype)
        return bags(pairs.active_offsets, pairs.active_cols, f.index_select(0, pairs.active), W_dec)

    @staticmethod
    def backward(ctx, grad_x_hat):
        f, W_dec = ctx.saved_tensors
        p, low = ctx.pairs, ctx.matmul_dtype
        g_f = g_W = None
        out = None if ctx.ws is None or not ctx.needs_input_grad[1] else ctx.ws.take("W_dec", W_dec)
        if p is None:
            if ctx.needs_input_grad[0]:
                g_f = _mm(grad_x_hat, W_dec.T, low)
            if ctx.needs_input_grad[1]:
                g_W = _mm(f.T, grad_x_hat, low, out)
        else:
            if ctx.needs_input_grad[0]:  # at every pair: θ's gradient needs it below θ too
                g_f = sampled_products(p.offsets, p.cols, grad_x_hat, W_dec, f)
            if ctx.needs_input_grad[1]:  # by latent, over the active pairs (f = 0 at the others)
                f_lat = f.index_select(0, p.latent_pairs)
                g_W = bags(p.latent_offsets, p.latent_rows, f_lat, grad_x_hat, out)
        return g_f, g_W, None, None, None


def encode(x, W_enc_t, b_enc, threshold, bandwidth: float = 0.001, *, max_density: float = 0.0,
           matmul_dtype: torch.dtype | None = None, columns: torch.Tensor | None = None,
           workspace: Workspace | None = None) -> Codes:  # fmt: skip
    """The SAE's encoder: f = JumpReLU_θ(x·W_enc + b_enc) for x [B, d] (W_enc_t = W_encᵀ [m, d], b_enc
    and threshold [m]), with the paper's pseudo-derivatives for θ (JumpReLUEncoder). max_density: the
    sparse branch runs while its pairs cost at most this fraction of the B·m pairs, all active; one in
    the kernel window below θ counts a quarter (0: always dense, 1: always sparse). columns [k] (int64):
    also return those latents' z for every token. bandwidth ε only matters for gradients."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, W_enc_t, b_enc, threshold))
    f, l0, counts, pairs, pre_at = JumpReLUEncoder.apply(
        x, W_enc_t, b_enc, threshold, bandwidth, max_density, matmul_dtype, columns, needs_grad, workspace
    )
    return Codes(f, l0, counts, pairs, pre_at)


def decode(f: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor, pairs: Pairs | None = None, *,
           matmul_dtype: torch.dtype | None = None, workspace: Workspace | None = None) -> torch.Tensor:  # fmt: skip
    """The SAE's decoder: x̂ = f·W_dec + b_dec for f [..., m] (dense), or f [n] at the `pairs` of encode's
    sparse branch -> [B, d] (Decoder). matmul_dtype: the dense product in that dtype (bf16 autocast)."""
    if pairs is None and f.ndim != 2:
        return decode(f.reshape(-1, f.shape[-1]), W_dec, b_dec).reshape(*f.shape[:-1], W_dec.shape[1])
    return Decoder.apply(f, W_dec, pairs, matmul_dtype, workspace) + b_dec
