"""JumpReLU SAE trainer: one training step, schedules, optimiser, normalisation, resumable state.

Recipe (Rajamanoharan et al. 2024, arXiv 2407.14435; Gemma Scope, arXiv 2408.05147):
  * activations divided by a fixed scalar so that E‖x‖² = 1 (Gemma Scope §3.1), folded into the
    weights on save so the saved SAE takes raw activations;
  * L = ‖x − x̂‖² (summed over d, mean over batch) + sparsity (λ·L0, λ·(L0/target − 1)², or the tanh
    penalty), λ warmed up linearly from 0; optionally Anthropic's pre-activation loss for dead latents;
  * Adam(β1=0, β2=0.999, eps=1e-8), lr 7e-5 with linear warm-up, constant, linear decay over the
    final (1 − decay_start) of the steps; gradient-norm clipping; θ clamped >= 0 after each step;
    optional unit-norm decoder rows (gradient component parallel to each row removed).
One step (`update`, which calls `compute_grads`): jumprelu.encode (the encoder GEMM and the pairs near or above
θ, with the paper's pseudo-derivatives), jumprelu.decode, the loss terms in plain torch, loss.backward(),
Adam. Under data parallel (`reduce_sum` set) the gradients are those of the loss on the global batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from .config import BACKWARDS, TrainerConfig
from .dictionary import TENSOR_NAMES, JumpReluAutoEncoder
from .jumprelu import decode, encode, pre_act_loss, reconstruction_loss, sparsity_loss, tanh_penalty
from .metrics import ReconstructionStats, fve
from .pairs import Workspace
from .utils import parse_dtype

STATE_FORMAT = 1


def estimate_norm_factor(batches: Iterable[torch.Tensor]) -> float:
    """sqrt(E‖x‖²) over the rows of the batches ([B, d] each); divide by it to get E‖x‖² = 1."""
    total, n = 0.0, 0
    for i, x in enumerate(batches):
        x = x.reshape(-1, x.shape[-1]).double()
        if not torch.isfinite(x.sum()) and not torch.isfinite(x).all():  # one cheap pass first
            raise ValueError(f"estimate_norm_factor: batch {i} contains NaN or inf")
        total += x.pow(2).sum().item()
        n += x.shape[0]
    if n == 0:
        raise ValueError("estimate_norm_factor: no batches given")
    if not total > 0:
        raise ValueError("estimate_norm_factor: all activations are zero")
    return math.sqrt(total / n)


class JumpReluTrainer:
    """Trains one JumpReluAutoEncoder. `update(step, x)` does one optimiser step on a [B, d] batch.
    reduce_sum: None on one process; under data parallel an in-place sum over the ranks (distributed.py
    sets it), which makes every step use the gradient of the loss on the global batch."""

    def __init__(self, config: TrainerConfig | dict | None = None, **kwargs):
        if config is None:
            config = TrainerConfig(**kwargs)
        elif isinstance(config, dict):
            config = TrainerConfig.from_dict({**config, **kwargs})
        elif kwargs:
            config = config.replace(**kwargs)
        self.cfg = c = config
        self.device = torch.device(c.device)
        self.generator = torch.Generator().manual_seed(c.seed)  # init only; CPU so seeds match anywhere
        self.ae = JumpReluAutoEncoder(
            c.activation_dim, c.dict_size, device=c.device, dtype=c.dtype,
            threshold_init=c.threshold_init, generator=self.generator,
        )  # fmt: skip
        # The tensors the optimiser updates, by name. W_enc [d, m] is stored latent-major, so it appears
        # here as its contiguous [m, d] transpose (same storage): the per-latent gradient bags then come
        # out in its layout, and the fused Adam kernel (which copies non-contiguous tensors) is one pass.
        self.params = {n: getattr(self.ae, n) for n in TENSOR_NAMES}
        self.params["W_enc"] = torch.nn.Parameter(self.ae.W_enc.detach().T)
        adam = dict(lr=c.lr, betas=c.adam_betas, eps=c.adam_eps)
        try:  # the fused kernel where this torch has it (several times faster on CPU; same update up to the last bit)
            self.optimizer = torch.optim.Adam(list(self.params.values()), **adam, fused=True)
        except (RuntimeError, ValueError):
            self.optimizer = torch.optim.Adam(list(self.params.values()), **adam, foreach=True)
        self.reduce_sum: Callable[[torch.Tensor], None] | None = None
        self.workspace = Workspace()
        self.step = 0  # steps done
        self.tokens_seen = 0
        self.tokens_since_fired = torch.zeros(c.dict_size, dtype=torch.int64, device=self.device)
        # Firing counts since firing_density() last read them (a diagnostic window; not resumed).
        self.fire_counts = torch.zeros(c.dict_size, dtype=torch.int64, device=self.device)
        self.fire_tokens = 0
        self.dead_window: int | None = c.dead_feature_threshold  # resolved at the first update if None
        self.last_backward = None  # "sparse" or "dense": the branch the last step's encoder took

    @property
    def name(self) -> str:
        return self.cfg.name

    def set_norm_factor(self, f: float) -> None:
        """x is divided by f inside update (f = sqrt(E‖x‖²), see estimate_norm_factor)."""
        f = float(f)
        if not (math.isfinite(f) and f > 0):
            raise ValueError(f"set_norm_factor: factor must be a finite number > 0, got {f}")
        self.cfg.norm_factor = f

    # ------------------------------------------------------------------ schedules

    def lr_factor(self, step: int) -> float:
        """Linear warm-up over warmup_steps, constant, then linear decay to 0 over the final
        (1 − decay_start) of the steps."""
        c = self.cfg
        f = 1.0
        if step < c.warmup_steps:
            f = (step + 1) / c.warmup_steps
        if c.decay_start is not None:
            start = int(c.decay_start * c.steps)
            if step >= start and c.steps > start:
                f = min(f, max(0.0, (c.steps - step) / (c.steps - start)))
        return f

    def sparsity_factor(self, step: int) -> float:
        """λ multiplier: linear from 0 over sparsity_warmup_steps (Rajamanoharan et al. 2024)."""
        s = self.cfg.sparsity_warmup_steps
        return 1.0 if s == 0 else min(1.0, step / s)

    def sparsity_penalty(self, l0: torch.Tensor, coeff: float) -> torch.Tensor:
        """S(L0) of the batch-mean L0 (scalar tensor), modes 'l0' and 'target_l0'."""
        return sparsity_loss(l0, self.cfg.sparsity_mode, coeff, self.cfg.target_l0)

    # ------------------------------------------------------------------ one training step

    def _prepare(self, step: int, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"update step {step}: x must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim < 2 or x.shape[-1] != self.cfg.activation_dim:
            want = f"[batch, {self.cfg.activation_dim}]"
            raise ValueError(f"update step {step}: x has shape {tuple(x.shape)}, expected {want}")
        x = x.reshape(-1, x.shape[-1])
        if x.shape[0] == 0:
            raise ValueError(f"update step {step}: empty batch")
        if not torch.isfinite(x.sum()) and not torch.isfinite(x).all():  # one cheap pass first
            if self.reduce_sum is None:
                raise FloatingPointError(f"update step {step}: input batch contains NaN or inf")
            x = torch.full_like(x, float("nan"))  # every rank then sees a non-finite global loss and stops
        x = x.to(self.device, parse_dtype(self.cfg.dtype))
        if self.cfg.norm_factor is not None:
            x = x / self.cfg.norm_factor
        return x

    def loss_terms(self, x: torch.Tensor, coeff: float, backward: str | None = None) -> tuple:
        """The forward pass of one step, in autograd: the loss on the normalised batch x [B, d] as named
        scalar terms (their sum is the loss), the encoder's Codes and x̂ [B, d]."""
        c, ae, B = self.cfg, self.ae, x.shape[0]
        kind = backward or c.backward
        if kind not in BACKWARDS:
            raise ValueError(f"backward must be one of {BACKWARDS}, got {kind!r}")
        fp32 = c.dtype == "float32"
        density = c.max_density(self.device.type) if kind == "auto" else float(kind == "sparse" and fp32)
        low = parse_dtype(c.autocast) if c.autocast else None
        dead = self.dead_latents() if c.pre_act_loss_coeff else None
        codes = encode(x, self.params["W_enc"], ae.b_enc, ae.threshold, c.bandwidth, max_density=density,
                       matmul_dtype=low, columns=dead, workspace=self.workspace)  # fmt: skip
        self.last_backward = "dense" if codes.pairs is None else "sparse"
        x_hat = decode(codes.f, ae.W_dec, ae.b_dec, codes.pairs, matmul_dtype=low, workspace=self.workspace)
        terms = {"mse": reconstruction_loss(x, x_hat)}
        if c.sparsity_mode == "tanh":
            norm = ae.W_dec.norm(dim=1)
            norm = norm if codes.pairs is None else norm.index_select(0, codes.pairs.cols)
            terms["sparsity_loss"] = coeff * tanh_penalty(codes.f, norm, c.tanh_scale, B)
        else:
            terms["sparsity_loss"] = self.sparsity_penalty(self.global_l0(codes.l0, B), coeff)
        if c.pre_act_loss_coeff:  # 0 while no latent is dead
            terms["pre_act_loss"] = x.new_zeros((), dtype=torch.float32)
            if dead is not None:
                pre = pre_act_loss(codes.pre_acts_at, ae.threshold[dead], ae.W_dec[dead].norm(dim=1))
                terms["pre_act_loss"] = c.pre_act_loss_coeff * pre
        return terms, codes, x_hat

    def compute_grads(self, x: torch.Tensor, coeff: float, backward: str | None = None) -> dict:
        """Set .grad of every parameter for the loss on the normalised batch x [B, d]; return the batch's
        statistics (the global batch's under data parallel), tensors: loss, mse, sparsity_loss
        (+ pre_act_loss), l0, x_hat [B, d], mean_err [d] = mean(x̂ − x), fired [m] bool, counts [m] int
        (rows each latent fired on), rows (of the batch), mean_x [d] and mean_sq_x (E‖x‖²). `backward` overrides cfg.backward: 'sparse', 'dense' or 'auto'."""
        for name in ("W_enc", "W_dec"):  # last step's [m, d] gradients: this step's are written into them
            if self.params[name].grad is not None:
                self.workspace.spare[name] = self.params[name].grad
        for p in self.params.values():
            p.grad = None
        terms, codes, x_hat = self.loss_terms(x, coeff, backward)
        sum(terms.values()).backward()
        return self._statistics(x, terms, codes, x_hat.detach())

    def global_l0(self, l0: torch.Tensor, rows: int) -> torch.Tensor:
        """The global batch's L0 with the gradient of this rank's (one scalar all_reduce). The loss on the
        global batch has ∂L/∂θ = Σ_r (n_r/N)·[∂mse_r/∂θ + S'(L0)·∂L0_r/∂θ]: S is nonlinear for
        target_l0, so each rank takes S' at the global L0; the gradients are then summed weighted by n_r/N."""
        if self.reduce_sum is None:
            return l0
        t = torch.tensor([float(l0.detach()) * rows, rows], dtype=torch.float64, device=l0.device)
        self.reduce_sum(t)
        return (t[0] / t[1]).to(l0.dtype) + (l0 - l0.detach())

    @torch.no_grad()
    def _statistics(self, x: torch.Tensor, terms: dict, codes, x_hat: torch.Tensor) -> dict:
        """The step's statistics, as means over the batch's rows. Under data parallel these and the
        gradients, each times this rank's rows n_r, are summed over the ranks in one all_reduce and divided
        by N = Σ n_r: the global batch's statistics and the gradient of its loss."""
        xf, n = x.float(), x.shape[0]
        scalars = {**terms, "l0": codes.l0}
        means = {"scalars": torch.stack([v.detach().float() for v in scalars.values()]),
                 "counts": codes.counts.float() / n, "mean_x": xf.mean(0), "mean_err": (x_hat.float() - xf).mean(0),
                 "mean_sq_x": xf.reshape(-1).dot(xf.reshape(-1)).reshape(1) / n}  # fmt: skip
        rows, counts = n, codes.counts
        if self.reduce_sum is not None:
            params = list(self.params.values())
            parts = [torch.zeros_like(p) if p.grad is None else p.grad for p in params] + list(means.values())
            flat = torch.cat([t.reshape(-1).float() * n for t in parts] + [xf.new_full((1,), n)])
            self.reduce_sum(flat)
            rows = int(flat[-1])
            parts = flat[:-1].div_(rows).split([t.numel() for t in parts])
            for p, g in zip(params, parts):
                p.grad = g.view(p.shape).to(p.dtype)
            means = dict(zip(means, parts[len(params) :]))
            counts = (means["counts"] * rows).round().to(counts.dtype)
        scalars = dict(zip(scalars, means["scalars"]))
        return {**scalars, "loss": sum(v for k, v in scalars.items() if k != "l0"), "x_hat": x_hat,
                "fired": counts > 0, "counts": counts, "rows": torch.tensor(rows), "mean_x": means["mean_x"],
                "mean_err": means["mean_err"], "mean_sq_x": means["mean_sq_x"].reshape(())}  # fmt: skip

    def update(self, step: int, x: torch.Tensor) -> dict:
        """One optimiser step on raw activations x [B, d] (divided by norm_factor here). Returns floats:
        loss, mse, sparsity_loss (+ pre_act_loss), l0, frac_variance_explained (standard definition,
        metrics.py), frac_variance_explained_centred, lr, sparsity_coeff, frac_dead (share of latents
        silent for the last dead_window tokens)."""
        c = self.cfg
        x = self._prepare(step, x)
        lr = c.lr * self.lr_factor(step)
        coeff = c.sparsity_coeff * self.sparsity_factor(step)
        s = self.compute_grads(x, coeff)
        loss = float(s["loss"])
        # θ's gradient also comes from pairs just below θ, whose f = 0 never reaches the loss
        g_th = self.params["threshold"].grad
        bad = None if math.isfinite(loss) else f"loss is {loss} (mse {float(s['mse'])})"
        if bad is None and g_th is not None and not bool(torch.isfinite(g_th).all()):
            bad = "the threshold's gradient is not finite (a non-finite W_dec row?)"
        if bad is not None:
            for p in self.params.values():
                p.grad = None
            raise FloatingPointError(f"update step {step}: {bad}; no update applied")
        self._optimizer_step(lr)
        with torch.no_grad():
            n = int(s["rows"])
            self.tokens_since_fired.add_(n).masked_fill_(s["fired"], 0)
            self.fire_counts.add_(s["counts"])
            self.fire_tokens += n
            self.tokens_seen += n
            self.step = step + 1
            moments = (s["mse"], s["mean_sq_x"], s["mean_x"], 1)
            fves = fve(*moments), fve(*moments, s["mean_err"])
            dead = self.dead_fraction(n)
        terms = ("loss", "mse", "sparsity_loss", "pre_act_loss", "l0")
        return {
            **{k: float(s[k]) for k in terms if k in s},
            "frac_variance_explained": float(fves[0]),
            "frac_variance_explained_centred": float(fves[1]),
            "lr": lr,
            "sparsity_coeff": coeff,
            "frac_dead": float(dead),
        }

    @torch.no_grad()
    def _optimizer_step(self, lr: float) -> None:
        """Apply the gradients: with unit-norm decoder rows, the component of W_dec's gradient parallel to
        each row is removed first and the rows renormalised after; gradient-norm clipping; Adam at `lr`;
        θ clamped >= 0, so encode = z·1[z > θ] is the same in training and inference."""
        c, params = self.cfg, self.params
        for p in params.values():  # the fused Adam kernel needs grads laid out like params
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            elif p.grad.stride() != p.stride():
                p.grad = torch.empty_like(p).copy_(p.grad)
        W_dec = params["W_dec"]
        if c.unit_norm_decoder:  # ~2 MB of rows at a time: the second read comes from cache, few ops
            rows = max(1, 2**19 // W_dec.shape[1])
            for g, w in zip(W_dec.grad.split(rows), W_dec.split(rows)):
                g.addcmul_(torch.linalg.vecdot(g, w).unsqueeze(1), w, value=-1.0)
        self.optimizer.grad_scale = None
        if c.max_grad_norm is not None:  # = clip_grad_norm_, minus the no-op ×1 pass when not clipping
            total = torch.nn.utils.get_total_norm([p.grad for p in params.values()])
            if total > c.max_grad_norm:
                if self.optimizer.defaults.get("fused"):  # the fused kernel divides by it: one pass fewer
                    self.optimizer.grad_scale = (total + 1e-6) / c.max_grad_norm
                else:
                    torch.nn.utils.clip_grads_with_norm_(list(params.values()), c.max_grad_norm, total)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        params["threshold"].clamp_(min=0.0)
        if c.unit_norm_decoder:
            W_dec.div_(torch.linalg.vector_norm(W_dec, dim=1, keepdim=True))

    # ------------------------------------------------------------------ evaluation and counters

    @torch.no_grad()
    def validate(self, x: torch.Tensor, chunk: int = 1024) -> dict:
        """Held-out metrics of the SAE as it stands, on raw activations x [N, d] (normalised like the
        training batches): l0, frac_variance_explained (standard), frac_variance_explained_centred, mse
        (metrics.py), `chunk` rows at a time."""
        stats = ReconstructionStats(self.cfg.activation_dim, self.cfg.dict_size, device=self.device)
        for i in range(0, len(x), chunk):
            xi = self._prepare(self.step, x[i : i + chunk])
            f = self.ae.encode(xi)
            stats.update(xi, self.ae.decode(f), f)
        m = stats.compute()
        return {k: m[k] for k in ("l0", "frac_variance_explained", "frac_variance_explained_centred", "mse")}

    def dead_fraction(self, batch_size: int) -> torch.Tensor:
        """Fraction of latents silent for the last dead_window tokens (resolved from the first batch)."""
        if self.dead_window is None:
            self.dead_window = max(1, min(10_000_000, self.cfg.steps * batch_size // 10))
        return (self.tokens_since_fired >= self.dead_window).float().mean()

    def dead_latents(self) -> torch.Tensor | None:
        """Indices [k] (int64) of the latents silent for the last dead_window tokens; None if none is."""
        if self.dead_window is None:
            return None
        dead = (self.tokens_since_fired >= self.dead_window).nonzero().squeeze(1)
        return dead if dead.numel() else None

    def firing_density(self) -> torch.Tensor:
        """Fraction of the tokens trained on since the last call on which each latent fired, [m] float
        (all zeros before any token), then a new window starts."""
        density = self.fire_counts.double() / max(self.fire_tokens, 1)
        self.fire_counts.zero_()
        self.fire_tokens = 0
        return density

    # ------------------------------------------------------------------ saving and state

    def folded_ae(self) -> JumpReluAutoEncoder:
        """A copy of the SAE with the norm factor folded in (Gemma Scope §3.1): b_enc, b_dec and θ
        multiplied by it, W_enc and W_dec shared unchanged, so it takes raw activations."""
        f = self.cfg.norm_factor or 1.0
        ae = self.ae
        out = JumpReluAutoEncoder(ae.activation_dim, ae.dict_size, device=self.device,
                                  dtype=ae.W_enc.dtype, init=False)  # fmt: skip
        with torch.no_grad():
            out.W_enc.data = ae.W_enc.detach()
            out.W_dec.data = ae.W_dec.detach()
            out.b_enc.copy_(ae.b_enc * f)
            out.b_dec.copy_(ae.b_dec * f)
            out.threshold.copy_(ae.threshold * f)
        return out

    def save(self, path_dir, extra_cfg: dict | None = None):
        """Save the SAE (norm factor folded in) with config.json (trainer config + extra_cfg) and cfg.json."""
        cfg = {**self.cfg.to_dict(), **(extra_cfg or {}), "norm_factor_folded": True, "step": self.step}
        return self.folded_ae().save(path_dir, cfg)

    def state_dict(self) -> dict:
        """{"tensors", "meta"} for exact resume (load_state_dict restores it). tensors (safetensors-ready;
        some share memory with the live trainer: save them before the next update): the SAE (ae.*), Adam
        state (optim.*, shaped like the SAE's tensors), dead-latent counters, RNG. meta (JSON): step,
        tokens seen, config."""
        tensors: dict[str, torch.Tensor] = {}
        for n, p in self.params.items():
            tensors[f"ae.{n}"] = getattr(self.ae, n).detach().contiguous()
            for k, v in self.optimizer.state.get(p, {}).items():
                v = v.detach()
                if n == "W_enc" and v.shape == p.shape:
                    v = v.T  # [m, d] optimiser layout -> [d, m] like W_enc
                tensors[f"optim.{n}.{k}"] = v.reshape(-1) if v.ndim == 0 else v.contiguous()
        tensors["tokens_since_fired"] = self.tokens_since_fired
        tensors["rng.generator"] = self.generator.get_state()
        meta = {"format": STATE_FORMAT, "step": self.step, "tokens_seen": self.tokens_seen,
                "config": self.cfg.to_dict(), "last_backward": self.last_backward}  # fmt: skip
        return {"tensors": tensors, "meta": meta}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state_dict(); the config must match except device, norm_factor (restored) and the
        speed settings backward and sparse_max_density (same math, other summation order)."""
        tensors, meta = state["tensors"], state["meta"]
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(f"trainer state: unknown format {meta.get('format')!r} (want {STATE_FORMAT})")
        saved = TrainerConfig.from_dict(meta["config"]).to_dict()
        mine = self.cfg.to_dict()
        free = ("device", "norm_factor", "backward", "sparse_max_density")
        diff = [k for k in mine if k not in free and saved[k] != mine[k]]
        if diff:
            raise ValueError("trainer state: config differs from this trainer's in "
                             + ", ".join(f"{k} (saved {saved[k]!r}, here {mine[k]!r})" for k in diff))  # fmt: skip
        opt_state = self.optimizer.state_dict()
        with torch.no_grad():
            for i, (n, p) in enumerate(self.params.items()):
                t, target = tensors.get(f"ae.{n}"), getattr(self.ae, n)
                if t is None or t.shape != target.shape:
                    got = "missing" if t is None else f"has shape {tuple(t.shape)}"
                    raise ValueError(f"trainer state: tensor 'ae.{n}' {got}, expected {tuple(target.shape)}")
                target.copy_(t)
                st = {k.split(".")[-1]: v for k, v in tensors.items() if k.startswith(f"optim.{n}.")}
                if "step" in st:
                    st["step"] = st["step"].reshape(()).clone()
                for k, v in st.items():
                    if v.shape == target.shape and k != "step":  # into the optimiser's layout
                        st[k] = torch.empty_like(p).copy_(v.T if n == "W_enc" else v)
                if st:
                    opt_state["state"][i] = st
            self.optimizer.load_state_dict(opt_state)
            self.tokens_since_fired.copy_(tensors["tokens_since_fired"])
        self.generator.set_state(tensors["rng.generator"].clone())
        self.cfg.norm_factor = saved["norm_factor"]
        self.step = int(meta["step"])
        self.tokens_seen = int(meta["tokens_seen"])
