"""JumpReLU SAE trainer: loss, schedules, optimiser, normalisation, resumable state.

Recipe (Rajamanoharan et al. 2024, arXiv 2407.14435; Gemma Scope, arXiv 2408.05147):
  * activations divided by a fixed scalar so that E‖x‖² = 1 (Gemma Scope §3.1), folded into the
    weights on save so the saved SAE takes raw activations;
  * L = ‖x − x̂‖² (summed over d, mean over batch) + sparsity (λ·L0, or λ·(L0/target − 1)²),
    λ warmed up linearly from 0;
  * Adam(β1=0, β2=0.999, eps=1e-8), lr 7e-5 with linear warm-up, constant, linear decay over the
    final (1 − decay_start) of the steps; gradient-norm clipping; θ clamped >= 0 after each step;
    optional unit-norm decoder rows (gradient component parallel to each row removed).
The gradients are hand-written (grads.py): sparse once few latents fire, dense before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from .dictionary import TENSOR_NAMES, JumpReluAutoEncoder
from .grads import (
    autograd_grads,
    dense_grads,
    exact_near_threshold,
    make_adam,
    optimizer_step,
    sparse_grads,
)
from .jumprelu import SPARSITY_MODES, sparsity_loss
from .metrics import ReconstructionStats, fve
from .utils import default_device, dtype_name, parse_dtype

BACKWARDS = ("auto", "sparse", "dense", "autograd")
# Where 'auto' switches from the sparse to the dense backward, by device and autocast, from the
# crossover of sparse vs dense compute_grads (bench_train.py --crossover):
#   CPU (2 threads, fp32): 0.09 at d=2304, m=16384, B=1024; 0.16 at d=576, m=4608, B=4096; 0.3 at
#     d=576, m=4608, B=1024. 0.1 is right where a wrong choice costs most (the large SAE).
#   H200, fp32: 0.023 at d=2304, m=65536, B=4096. bf16 autocast: the dense step (bf16 GEMMs) is
#     faster from density 0.02 up; the sparse step won at density 0.0009 (m=65536, L0 ~60: 23 vs
#     34 ms) and lost at 0.0034 (m=16384, L0 ~55: 6.4 vs 5.0 ms) and 0.012 (m=4608: 3.8 vs 3.1 ms).
SPARSE_MAX_DENSITY = {("cpu", False): 0.1, ("cpu", True): 0.1, ("gpu", False): 0.02, ("gpu", True): 0.002}
STATE_FORMAT = 1


@dataclass
class TrainerConfig:
    activation_dim: int
    """Width d of the activations."""
    dict_size: int
    """Number of latents m."""
    lr: float = 7e-5
    """Peak Adam learning rate (Rajamanoharan et al. 2024)."""
    sparsity_mode: str = "target_l0"
    """'l0': λ·L0 (paper); 'target_l0': λ·(L0/target_l0 − 1)² (dictionary_learning)."""
    sparsity_coeff: float = 1.0
    """λ after warm-up."""
    target_l0: float | None = 64.0
    """Target L0 for sparsity_mode='target_l0'."""
    bandwidth: float = 0.001
    """ε of the rectangle-kernel pseudo-derivatives (paper: 0.001 on E‖x‖²=1 data)."""
    threshold_init: float = 0.001
    """Initial θ for every latent."""
    steps: int = 10_000
    """Total steps (sets the LR decay)."""
    warmup_steps: int = 1000
    """Linear LR warm-up steps."""
    sparsity_warmup_steps: int = 5000
    """Linear warm-up of λ from 0."""
    decay_start: float | None = 0.8
    """LR decays linearly to 0 from this fraction of `steps` on; None: no decay."""
    max_grad_norm: float | None = 1.0
    """Gradient-norm clip over all parameters; None: no clipping."""
    adam_betas: tuple[float, float] = (0.0, 0.999)
    adam_eps: float = 1e-8
    seed: int = 0
    """Seeds the trainer's own torch.Generator for the init."""
    device: str | None = None
    """None: cuda if available, else cpu."""
    dtype: str = "float32"
    """Dtype of W_enc, W_dec, b_enc, b_dec (threshold is always fp32)."""
    autocast: str | None = None
    """'bfloat16': the encoder GEMM in bf16, parameters, gradients and Adam state in `dtype`. bf16 rounds
    z by ~0.4%, more than the paper's ε = 0.001 kernel window, so z is recomputed in fp32 wherever the
    rounding could matter: at the sparse phase's candidate pairs (grads.sparse_grads' refine: the fp32
    gradients), and in the dense phase (autograd under torch.autocast) at the pairs near θ
    (grads.exact_near_threshold: θ's gradient within 0.03% of fp32 where the raw bf16 step is ~35%
    off; the others within 0.5%, bf16 rounding of the values). For GPUs with fast bf16 (H200: about 2x
    faster steps before the recomputation was added); slower on CPUs without it. float16 is refused
    (no loss scaling here)."""
    norm_factor: float | None = None
    """x is divided by this inside update (sqrt(E‖x‖²)); None: no scaling until set_norm_factor."""
    unit_norm_decoder: bool = True
    """Keep W_dec rows unit norm (parallel gradient removed, rows renormalised after each step)."""
    dead_feature_threshold: int | None = None
    """A latent counts as dead (the log's `dead`) after this many tokens without firing; None: a tenth
    of the run's tokens (steps x the first batch's rows), at most 10M, so it means something in a
    short run as in a long one."""
    backward: str = "auto"
    """'sparse' (active pairs only), 'dense' ([B, m] GEMMs), 'autograd' (reference), or 'auto'."""
    sparse_max_density: float | None = None
    """'auto' uses the sparse backward when the fraction of (token, latent) pairs near or above θ
    is below this; None: the measured default for the device (SPARSE_MAX_DENSITY)."""
    extra: dict = field(default_factory=dict)
    """Free-form JSON metadata carried into config.json."""

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"TrainerConfig.{name}: {why}, got {getattr(self, name)!r}")

        for n in ("activation_dim", "dict_size", "steps"):
            v = getattr(self, n)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                bad(n, "must be an integer >= 1")
        for n in ("warmup_steps", "sparsity_warmup_steps", "dead_feature_threshold", "seed"):
            v = getattr(self, n)
            if n == "dead_feature_threshold" and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                bad(n, "must be an integer >= 0")
        for n in ("lr", "bandwidth", "adam_eps"):
            if not (isinstance(getattr(self, n), (int, float)) and getattr(self, n) > 0):
                bad(n, "must be > 0")
        if not self.threshold_init >= 0:
            bad("threshold_init", "must be >= 0")
        if not self.sparsity_coeff >= 0:
            bad("sparsity_coeff", "must be >= 0")
        if self.sparsity_mode not in SPARSITY_MODES:
            bad("sparsity_mode", f"must be one of {SPARSITY_MODES}")
        if self.sparsity_mode == "target_l0" and not (self.target_l0 is not None and self.target_l0 > 0):
            bad("target_l0", "must be > 0 when sparsity_mode='target_l0'")
        if self.decay_start is not None and not 0 <= self.decay_start <= 1:
            bad("decay_start", "must be a fraction in [0, 1] or None")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            bad("max_grad_norm", "must be > 0 or None")
        self.adam_betas = tuple(float(b) for b in self.adam_betas)
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            bad("adam_betas", "must be two numbers in [0, 1)")
        if self.norm_factor is not None and not (math.isfinite(self.norm_factor) and self.norm_factor > 0):
            bad("norm_factor", "must be a finite number > 0 or None")
        if self.backward not in BACKWARDS:
            bad("backward", f"must be one of {BACKWARDS}")
        if self.sparse_max_density is not None and not 0 <= self.sparse_max_density <= 1:
            bad("sparse_max_density", "must be in [0, 1]")
        self.dtype = dtype_name(parse_dtype(self.dtype))
        if self.autocast is not None:
            try:
                self.autocast = dtype_name(parse_dtype(self.autocast))
            except ValueError:
                pass  # not a dtype name: refused just below
            if self.autocast != "bfloat16":
                bad("autocast", "must be 'bfloat16' or None")
            if self.backward == "dense":
                bad(
                    "backward",
                    "'dense' is the fp32 hand-written path; with autocast use 'auto', 'sparse' or 'autograd'",
                )
        self.device = str(self.device or default_device())

    @property
    def name(self) -> str:
        """Run-folder name: width, sparsity setting, lr, seed (e.g. jumprelu_w4608_tl0-64_lr7e-05_s0)."""
        if self.sparsity_mode == "target_l0":
            sp = f"tl0-{self.target_l0:g}"
        else:
            sp = f"l0c-{self.sparsity_coeff:g}"
        return f"jumprelu_w{self.dict_size}_{sp}_lr{self.lr:g}_s{self.seed}"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainerConfig:
        """Inverse of to_dict; also accepts trainer.config (ignores its derived keys)."""
        known = {f.name for f in dataclasses.fields(cls)}
        derived = {"name", "architecture", "trainer"}
        unknown = set(d) - known - derived
        if unknown:
            raise ValueError(f"TrainerConfig: unknown field(s) {sorted(unknown)}")
        return cls(**{k: v for k, v in d.items() if k in known})


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
    """Trains one JumpReluAutoEncoder. `update(step, x)` does one optimiser step on a [B, d] batch."""

    def __init__(self, config: TrainerConfig | dict | None = None, **kwargs):
        if config is None:
            config = TrainerConfig(**kwargs)
        elif isinstance(config, dict):
            config = TrainerConfig.from_dict({**config, **kwargs})
        elif kwargs:
            config = dataclasses.replace(config, **kwargs)
        self.cfg = config
        c = config
        self.device = torch.device(c.device)
        self.generator = torch.Generator().manual_seed(c.seed)  # init only; CPU so seeds match anywhere
        self.ae = JumpReluAutoEncoder(
            c.activation_dim, c.dict_size, device=c.device, dtype=c.dtype,
            threshold_init=c.threshold_init, generator=self.generator,
        )  # fmt: skip
        # The tensors the optimiser updates, by name. W_enc [d, m] is stored latent-major, so it
        # appears here as its contiguous [m, d] transpose (same storage): its gradient from the
        # per-latent bags then needs no copy, and the fused Adam kernel (which copies non-contiguous
        # tensors in and out) stays a single pass.
        self.params = {n: getattr(self.ae, n) for n in TENSOR_NAMES}
        self.params["W_enc"] = torch.nn.Parameter(self.ae.W_enc.detach().T)
        self.optimizer = make_adam(list(self.params.values()), c.lr, c.adam_betas, c.adam_eps)
        self.step = 0  # steps done
        self.tokens_seen = 0
        self.tokens_since_fired = torch.zeros(c.dict_size, dtype=torch.int64, device=self.device)
        # Firing counts since firing_density() last read them (a diagnostic window; not resumed).
        self.fire_counts = torch.zeros(c.dict_size, dtype=torch.int64, device=self.device)
        self.fire_tokens = 0
        self.dead_window: int | None = c.dead_feature_threshold  # resolved at the first update if None
        self.last_backward = None  # "sparse", "dense" or "autograd", for logs and tests
        self._pre_buf = None  # [B, m] buffer for x @ W_enc
        self._scratch = None  # second [B, m] buffer of the dense path

    # ------------------------------------------------------------------ config

    @property
    def config(self) -> dict:
        """Complete JSON-serialisable config (a fresh dict: change settings through .cfg)."""
        return {**self.cfg.to_dict(), "name": self.cfg.name, "architecture": "jumprelu",
                "trainer": type(self).__name__}  # fmt: skip

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def sparse_max_density(self) -> float:
        """cfg.sparse_max_density, or the measured default for this device (SPARSE_MAX_DENSITY)."""
        if self.cfg.sparse_max_density is not None:
            return self.cfg.sparse_max_density
        return SPARSE_MAX_DENSITY[
            "cpu" if self.device.type == "cpu" else "gpu", self.cfg.autocast is not None
        ]

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
        """Sparsity loss of the batch-mean L0 (scalar tensor). distributed.DataParallelTrainer
        overrides it to take the L0 of the global batch."""
        return sparsity_loss(l0, self.cfg.sparsity_mode, coeff, self.cfg.target_l0)

    # ------------------------------------------------------------------ training step

    def _prepare(self, step: int, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"update step {step}: x must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim < 2 or x.shape[-1] != self.cfg.activation_dim:
            raise ValueError(
                f"update step {step}: x has shape {tuple(x.shape)}, expected [batch, {self.cfg.activation_dim}]"
            )
        x = x.reshape(-1, x.shape[-1])
        if x.shape[0] == 0:
            raise ValueError(f"update step {step}: empty batch")
        if not torch.isfinite(x.sum()) and not torch.isfinite(x).all():  # one cheap pass first
            raise FloatingPointError(f"update step {step}: input batch contains NaN or inf")
        x = x.to(self.device, parse_dtype(self.cfg.dtype))
        if self.cfg.norm_factor is not None:
            x = x / self.cfg.norm_factor
        return x

    def compute_grads(self, x: torch.Tensor, coeff: float, backward: str | None = None) -> dict:
        """Set .grad of every parameter for the loss on the normalised batch x [B, d]; return stats
        (tensors: loss, mse, sparsity_loss, l0, x_hat [B, d] (valid until the next call), mean_err
        [d] = mean(x̂ − x), fired [m] bool, counts [m] int: rows each latent fired on). `backward`
        overrides cfg.backward (see grads.py): 'sparse', 'dense', 'autograd', or 'auto' = sparse while at most sparse_max_density of the
        pairs are candidates, else dense (autograd for dtypes other than fp32 and under autocast)."""
        c, ae = self.cfg, self.ae
        kind = backward or c.backward
        if kind not in BACKWARDS:
            raise ValueError(f"backward must be one of {BACKWARDS}, got {kind!r}")
        if kind == "dense" and c.autocast:
            raise ValueError("backward='dense' is the fp32 hand-written path; not with autocast")
        B, m = x.shape[0], c.dict_size
        out = self._grad_buffers() if kind != "autograd" else None
        for p in self.params.values():
            p.grad = None
        ac = parse_dtype(c.autocast) if c.autocast else None
        with torch.no_grad():
            if self._pre_buf is None or self._pre_buf.shape[0] != B:  # reused: a fresh [B, m]
                self._pre_buf = self._scratch = None  # tensor costs page faults every step
                self._pre_buf = torch.empty(B, m, dtype=x.dtype, device=x.device)
            if ac is None:  # the one dense GEMM; b_enc added later
                xW = torch.mm(x, ae.W_enc, out=self._pre_buf)
            else:
                xW = self._pre_buf.copy_(torch.mm(x.to(ac), ae.W_enc.to(ac)))
        args = (x, xW, ae.b_enc, ae.W_dec, ae.b_dec, ae.threshold, c.bandwidth,
                lambda l0: self.sparsity_penalty(l0, coeff))  # fmt: skip
        res = None
        bound = None if ac is None else self._autocast_error(x, ac)  # (rel, err [m]) of the bf16 xW
        if kind == "sparse" or (kind == "auto" and c.dtype == "float32"):
            max_density = None if kind == "sparse" else self.sparse_max_density
            refine = None if ac is None else (ae.W_enc, *bound)
            res = sparse_grads(*args, max_density=max_density, out=out, refine=refine)
            self.last_backward = "sparse"
        if res is None and (kind == "autograd" or c.dtype != "float32" or ac is not None):
            if ac is not None:  # exact z where rounding could move a pair across θ or the kernel window
                exact_near_threshold(x, xW, ae.W_enc, ae.b_enc, ae.threshold, c.bandwidth, *bound)
            with torch.autocast(x.device.type, dtype=ac) if ac is not None else contextlib.nullcontext():
                res, self.last_backward = autograd_grads(*args), "autograd"
        elif res is None:
            if self._scratch is None:  # ∂L/∂f [B, m], kept while the dense path is in use
                self._scratch = torch.empty_like(self._pre_buf)
            res, self.last_backward = dense_grads(*args, out=out, scratch=self._scratch), "dense"
        if self.last_backward == "sparse":
            self._scratch = None
        grads, stats = res
        grads["W_enc"] = grads["W_enc"].T  # [m, d], the layout of params["W_enc"]
        for n, g in grads.items():
            self.params[n].grad = g.to(self.params[n].dtype)  # no-op unless autocast made it bf16
        return stats._asdict()

    def _autocast_error(self, x: torch.Tensor, dtype: torch.dtype) -> tuple[float, torch.Tensor]:
        """(rel, err [m]) with |x·W_enc in `dtype` − the fp32 product| <= rel·|product| + err_j: the
        output's rounding (rel = u, the unit roundoff, +1%) plus 8 standard deviations of the error the
        inputs' rounding makes, u·sqrt(2/3)·|x_b · w_j|₂ with |x_b · w_j|₂ <= ‖x_b‖·‖w_j‖/sqrt(d) for
        spread-out vectors, at the batch's largest ‖x_b‖. Measured: at most 3.6 of those deviations
        over 17-19M pairs (d = 576, 2304), and 1.1x the fp32 candidates."""
        u = torch.finfo(dtype).eps / 2
        x_max = torch.linalg.vector_norm(x, dim=1).max()
        w = torch.linalg.vector_norm(self.ae.W_enc.detach(), dim=0)
        return 1.01 * u, 8 * u * math.sqrt(2 / (3 * x.shape[1])) * x_max * w

    def _grad_buffers(self) -> dict:
        """Last step's W_dec / W_enc gradient tensors, to write this step's into: a fresh [m, d] tensor
        costs page faults, and freeing one every step grows glibc's heap (its mmap threshold rises)."""
        shape = (self.cfg.dict_size, self.cfg.activation_dim)
        grads = (("W_dec", self.params["W_dec"].grad), ("W_enc_t", self.params["W_enc"].grad))
        return {k: g if g is not None and g.shape == shape and g.is_contiguous() else torch.empty_like(self.ae.W_dec)
                for k, g in grads}  # fmt: skip

    def update(self, step: int, x: torch.Tensor) -> dict:
        """One optimiser step on raw activations x [B, d] (divided by norm_factor here). Returns floats:
        loss, mse, sparsity_loss, l0, frac_variance_explained (standard definition, metrics.py),
        frac_variance_explained_centred, lr, sparsity_coeff, dead_latents."""
        c = self.cfg
        x = self._prepare(step, x)
        lr = c.lr * self.lr_factor(step)
        coeff = c.sparsity_coeff * self.sparsity_factor(step)
        s = self.compute_grads(x, coeff)
        loss = float(s["loss"])
        if not math.isfinite(loss):
            for p in self.params.values():
                p.grad = None
            raise FloatingPointError(f"update step {step}: loss is {loss} (mse {float(s['mse'])}); "
                                     "no update applied")  # fmt: skip
        with torch.no_grad():
            optimizer_step(self.optimizer, self.params, lr, c.max_grad_norm, c.unit_norm_decoder)
            n = x.shape[0]
            self.tokens_since_fired.add_(n).masked_fill_(s["fired"], 0)
            self.fire_counts.add_(s["counts"])
            self.fire_tokens += n
            self.tokens_seen += n
            self.step = step + 1
            xf = x.float()
            moments = (s["mse"], xf.reshape(-1).dot(xf.reshape(-1)) / n, xf.mean(0), 1)
            fves = fve(*moments), fve(*moments, s["mean_err"])
            dead = self.dead_fraction(n)
        return {
            "loss": loss,
            "mse": float(s["mse"]),
            "sparsity_loss": float(s["sparsity_loss"]),
            "l0": float(s["l0"]),
            "frac_variance_explained": float(fves[0]),
            "frac_variance_explained_centred": float(fves[1]),
            "lr": lr,
            "sparsity_coeff": coeff,
            "dead_latents": float(dead),
        }

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

    def dead_fraction(self, batch_rows: int) -> torch.Tensor:
        """Fraction of latents silent for the last dead_window tokens (resolved from the first batch)."""
        if self.dead_window is None:
            self.dead_window = max(1, min(10_000_000, self.cfg.steps * batch_rows // 10))
        return (self.tokens_since_fired >= self.dead_window).float().mean()

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
        cfg = {**self.config, **(extra_cfg or {}), "norm_factor_folded": True, "step": self.step}
        return self.folded_ae().save(path_dir, cfg)

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, meta) for exact resume. Tensors (safetensors-ready; some share memory with the
        live trainer: save them before the next update): the SAE (ae.*), Adam state (optim.*, shaped
        like the SAE's tensors), dead-latent counters, RNG. meta (JSON): step, tokens seen, config."""
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
                "config": self.config, "last_backward": self.last_backward}  # fmt: skip
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Restore a state_dict(); the config must match except device, norm_factor (restored) and the
        speed settings backward and sparse_max_density (same math, other summation order)."""
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
