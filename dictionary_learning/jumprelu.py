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

This module holds no state; grads.py has the hand-written (sparse and dense) gradients.
"""

from __future__ import annotations

import torch

SPARSITY_MODES = ("l0", "target_l0")


def rectangle(u: torch.Tensor) -> torch.Tensor:
    """Rectangle kernel K(u) = 1[−½ < u < ½], same shape and dtype as u."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


def kernel(z: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
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
            k = kernel(z, threshold, ctx.bandwidth).mul_(grad_f)
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
            k = kernel(z, threshold, ctx.bandwidth).mul_(grad_out)
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
