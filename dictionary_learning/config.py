"""TrainerConfig: every setting of one JumpReLU SAE's training, each documented once (JSON round trip)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .jumprelu import SPARSITY_MODES
from .utils import default_device, dtype_name, parse_dtype

BACKWARDS = ("auto", "sparse", "dense")
# Where 'auto' switches from the sparse to the dense branch, by device and autocast, from the crossover
# of the two (bench_train.py --crossover):
#   CPU (2 threads, fp32, this encoder Function): 0.059 at d=2304, m=16384, B=1024 (at density 0.1
#     sparse 3.6 s, dense 2.0 s); 0.094 at d=576, m=4608, B=4096. 0.06 costs at most ~10% at d=576.
#   H200, fp32 (the hand-written step it replaced): 0.023 at d=2304, m=65536, B=4096. bf16 autocast: the
#     dense step (bf16 GEMMs) is faster from density 0.02 up; the sparse step won at density 0.0009
#     (m=65536, L0 ~60: 23 vs 34 ms) and lost at 0.0034 (m=16384, L0 ~55: 6.4 vs 5.0 ms) and 0.012
#     (m=4608: 3.8 vs 3.1 ms). Not re-measured on a GPU since.
SPARSE_MAX_DENSITY = {("cpu", False): 0.06, ("cpu", True): 0.06, ("gpu", False): 0.02, ("gpu", True): 0.002}


@dataclass
class TrainerConfig:
    activation_dim: int
    """Width d of the activations."""
    dict_size: int
    """Number of latents m."""
    lr: float = 7e-5
    """Peak Adam learning rate (Rajamanoharan et al. 2024)."""
    sparsity_mode: str = "target_l0"
    """'l0': λ·L0 (paper); 'target_l0': λ·(L0/target_l0 − 1)² (dictionary_learning); 'tanh': λ·(1/B)·Σ
    tanh(tanh_scale·f·‖W_dec_j‖), Anthropic's smooth L0 (jumprelu.tanh_penalty)."""
    sparsity_coeff: float = 1.0
    """λ after warm-up."""
    target_l0: float | None = 64.0
    """Target L0 for sparsity_mode='target_l0'."""
    tanh_scale: float = 4.0
    """c in tanh(c·f·‖W_dec_j‖) for sparsity_mode='tanh' (SAELens's jumprelu_tanh_scale default)."""
    pre_act_loss_coeff: float | None = None
    """Weight of Anthropic's pre-activation loss on dead latents (jumprelu.pre_act_loss; SAELens suggests
    3e-6 to match Anthropic's setup); None: off. Dead = silent for the dead-latent window."""
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
    """Dtype of W_enc, W_dec, b_enc, b_dec (threshold is always fp32). Other than float32 the dense
    branch always runs."""
    autocast: str | None = None
    """'bfloat16': the encoder GEMM (and the dense branch's other products) in bf16; parameters,
    gradients and Adam state in `dtype`. bf16 rounds z by ~0.4%, more than the paper's ε = 0.001 kernel
    window, so z is recomputed in fp32 wherever the rounding could matter (jumprelu.JumpReLUEncoder): at
    the sparse branch's candidate pairs (its gradients are then the fp32 ones), and in the dense branch
    at the pairs near θ (θ's gradient within 0.03% of fp32 where the raw bf16 step is ~35% off; the
    others within 0.5%, bf16 rounding of the values). For GPUs with fast bf16; slower on CPUs without
    it. float16 is refused (no loss scaling here)."""
    norm_factor: float | None = None
    """x is divided by this inside update (sqrt(E‖x‖²)); None: no scaling until set_norm_factor."""
    unit_norm_decoder: bool = True
    """Keep W_dec rows unit norm (parallel gradient removed, rows renormalised after each step)."""
    dead_feature_threshold: int | None = None
    """A latent counts as dead (the log's `dead`) after this many tokens without firing; None: a tenth
    of the run's tokens (steps x the first batch's rows), at most 10M, so it means something in a
    short run as in a long one."""
    backward: str = "auto"
    """Which branch of the encoder runs: 'sparse' (pairs near or above θ only), 'dense' ([B, m]
    tensors), or 'auto' (sparse while that is cheaper: see sparse_max_density)."""
    sparse_max_density: float | None = None
    """'auto' runs the sparse branch while its pairs cost at most this fraction of the B·m (token,
    latent) pairs, all active; a pair in the kernel window below θ counts a quarter of an active one
    (jumprelu._sparse_pairs). None: the measured default for the device (SPARSE_MAX_DENSITY)."""
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
        for n in ("lr", "bandwidth", "adam_eps", "tanh_scale"):
            if not (isinstance(getattr(self, n), (int, float)) and getattr(self, n) > 0):
                bad(n, "must be > 0")
        if not self.threshold_init >= 0:
            bad("threshold_init", "must be >= 0")
        if not self.sparsity_coeff >= 0:
            bad("sparsity_coeff", "must be >= 0")
        if self.pre_act_loss_coeff is not None and not self.pre_act_loss_coeff >= 0:
            bad("pre_act_loss_coeff", "must be >= 0 or None")
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
        self.device = str(self.device or default_device())

    @property
    def name(self) -> str:
        """Run-folder name: width, sparsity setting, lr, seed (e.g. jumprelu_w4608_tl0-64_lr7e-05_s0)."""
        sp = {"target_l0": f"tl0-{self.target_l0:g}", "l0": f"l0c-{self.sparsity_coeff:g}",
              "tanh": f"tanh-{self.sparsity_coeff:g}"}[self.sparsity_mode]  # fmt: skip
        return f"jumprelu_w{self.dict_size}_{sp}_lr{self.lr:g}_s{self.seed}"

    def to_dict(self) -> dict:
        """Every field, JSON-ready, plus the derived name, architecture and trainer (what config.json's
        "trainer" holds; from_dict ignores the derived keys)."""
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return {**d, "name": self.name, "architecture": "jumprelu", "trainer": "JumpReluTrainer"}

    @classmethod
    def from_dict(cls, d: dict) -> TrainerConfig:
        """Inverse of to_dict."""
        known = {f.name for f in dataclasses.fields(cls)}
        derived = {"name", "architecture", "trainer"}
        unknown = set(d) - known - derived
        if unknown:
            raise ValueError(f"TrainerConfig: unknown field(s) {sorted(unknown)}")
        return cls(**{k: v for k, v in d.items() if k in known})

    def max_density(self, device_type: str) -> float:
        """sparse_max_density, or the measured default for the device type (0: always the dense branch,
        as for a dtype other than float32)."""
        if self.dtype != "float32":
            return 0.0
        if self.sparse_max_density is not None:
            return self.sparse_max_density
        return SPARSE_MAX_DENSITY["cpu" if device_type == "cpu" else "gpu", self.autocast is not None]

    def replace(self, **changes) -> TrainerConfig:
        return dataclasses.replace(self, **changes)
