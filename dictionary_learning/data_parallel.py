"""Data-parallel SAE training step: a JumpReluTrainer whose gradients are those of the loss on the
global batch (the rows of all ranks), given an in-place all-reduce sum. Used by distributed.py in
`data` mode; it needs no process group itself (any reduce_sum callable works).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .metrics import fve
from .trainer import JumpReluTrainer


class DataParallelTrainer(JumpReluTrainer):
    """A JumpReluTrainer whose step uses the gradient of the loss on the GLOBAL batch, rows of all ranks.

    With N = Σ_r n_r rows, L0 = (1/N) Σ_b ‖f_b‖₀ and L0_r the local mean on rank r:
        L = (1/N) Σ_b ‖x_b − x̂_b‖² + S(L0)
        ∂L/∂θ = Σ_r (n_r/N) · [∂mse_r/∂θ + S'(L0) · ∂L0_r/∂θ]
    S is nonlinear for target_l0 ((L0/target − 1)², so S' depends on L0), hence each rank evaluates
    its sparsity term at the GLOBAL L0 with its local derivative (sparsity_penalty, one scalar
    all_reduce), and the gradients are then summed weighted by n_r/N (one all_reduce of all gradients
    plus the statistics). Every rank then takes the same optimiser step. Logged loss, mse, l0, FVE and
    dead-latent counts are those of the global batch.
    """

    reduce_sum: Callable[[torch.Tensor], None]

    @classmethod
    def wrap(
        cls, trainer: JumpReluTrainer, reduce_sum: Callable[[torch.Tensor], None]
    ) -> DataParallelTrainer:
        """Turn a JumpReluTrainer into a DataParallelTrainer in place (methods only; its state is kept).
        reduce_sum(t): in-place sum of tensor t over the ranks."""
        trainer.__class__ = cls
        trainer.reduce_sum = reduce_sum
        trainer._rows, trainer._global = 0, {}
        return trainer

    def _prepare(self, step: int, x: torch.Tensor) -> torch.Tensor:
        try:
            return super()._prepare(step, x)
        except FloatingPointError:  # NaN/inf on this rank only: poison the batch so that every rank
            rows = x.reshape(-1, x.shape[-1]).shape[0]  # sees the same non-finite global loss and stops
            return torch.full((rows, self.cfg.activation_dim), float("nan"), device=self.device,
                              dtype=self.ae.W_enc.dtype)  # fmt: skip

    def sparsity_penalty(self, l0: torch.Tensor, coeff: float) -> torch.Tensor:
        """S at the global L0, with the derivative of the local L0 (value L0, gradient ∂L0_r)."""
        n = float(self._rows)
        t = torch.tensor([float(l0.detach()) * n, n], dtype=torch.float64, device=l0.device)
        self.reduce_sum(t)
        l0_global = (t[0] / t[1]).to(l0.dtype) + (l0 - l0.detach())
        return super().sparsity_penalty(l0_global, coeff)

    def compute_grads(self, x: torch.Tensor, coeff: float, backward: str | None = None) -> dict:
        """Local gradients (trainer.compute_grads, sparsity at the global L0), then the n_r/N-weighted
        sum over ranks, written back to .grad; returns the global batch's statistics. x [n_r, d]."""
        n = self._rows = x.shape[0]
        s = super().compute_grads(x, coeff, backward)
        params = list(self.params.values())
        xf = x.float()
        # One buffer, one all_reduce: [n_r·grads, n_r·mse, n_r·L0, n_r | counts, Σx, Σ(x̂ − x), Σ‖x‖²].
        weighted = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        weighted += [s["mse"], s["l0"], torch.ones((), device=x.device)]
        head = torch.cat([t.reshape(-1).float() for t in weighted]) * n
        tail = [s["counts"].float(), xf.sum(0), (s["x_hat"].float() - xf).sum(0), xf.pow(2).sum().reshape(1)]
        flat = torch.cat([head, *tail])
        self.reduce_sum(flat)
        N = flat[head.numel() - 1].clone()  # rows over all ranks
        flat[: head.numel()] /= N
        *grads, mse, l0, _ = flat[: head.numel()].split([t.numel() for t in weighted])
        for p, g in zip(params, grads):
            p.grad = g.view(p.shape).to(p.dtype)
        counts, sx, se, sxx = flat[head.numel() :].split([t.numel() for t in tail])
        counts, sx, se, sxx = counts.round().to(s["counts"].dtype), sx / N, se / N, sxx[0] / N
        fired = counts > 0
        moments = (mse[0], sxx, sx, 1)  # pooled over all ranks
        self._global = {"rows": int(N), "fired": fired, "fve": float(fve(*moments)),
                        "fve_centred": float(fve(*moments, se))}  # fmt: skip
        return {**s, "loss": mse[0] + s["sparsity_loss"], "mse": mse[0], "l0": l0[0], "fired": fired,
                "counts": counts}  # fmt: skip

    def dead_fraction(self, batch_rows: int) -> torch.Tensor:
        """As JumpReluTrainer's, with the dead window resolved from the global batch's rows."""
        return super().dead_fraction(self._global.get("rows", batch_rows))

    def update(self, step: int, x: torch.Tensor) -> dict:
        """trainer.update on this rank's rows x [n_r, d]; counters and statistics of the global batch."""
        out = super().update(step, x)
        g, extra = self._global, self._global["rows"] - self._rows
        with torch.no_grad():  # super() counted this rank's n_r tokens; add the other ranks'
            self.tokens_since_fired.add_(extra).masked_fill_(g["fired"], 0)
            self.tokens_seen += extra
            self.fire_tokens += extra  # fire_counts already holds the global batch's
            dead = self.dead_fraction(g["rows"])  # after the other ranks' tokens are counted
        return {**out, "frac_variance_explained": g["fve"], "frac_variance_explained_centred": g["fve_centred"],
                "dead_latents": float(dead)}  # fmt: skip
