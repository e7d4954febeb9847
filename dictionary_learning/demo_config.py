"""Presets and sweep grids for demo.py. Plain Python: edit a block, or add your own.

Each preset is one `DemoConfig`. A sweep is the product widths x target_l0s (or sparsity_coeffs)
x lrs x seeds; every trainer in it sees the same activation batches (one harvest per sweep).
Command-line flags of demo.py override any field (`--layer`, `--widths`, `--tokens`, ...).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field


class UsageError(Exception):
    """Bad flags or settings: printed as one line, exit code 2."""


@dataclass
class DemoConfig:
    model: str
    """Embedded model name ('smollm2-135m'), a local folder, or a Hub id."""
    layer: int
    """Decoder layer whose activation is harvested (0-based)."""
    site: str = "resid_post"
    """Hook site: resid_post (layer output), resid_pre (layer input) or mlp_out."""
    dataset: str = "sample"
    """'sample' (shipped data/sample), 'hub' (the six medical QA sets), a local folder/file, or a Hub id."""
    tokens: int = 200_000
    """Training token budget per trainer (steps = tokens // batch_size)."""
    ctx_len: int = 128
    """Tokens per context window."""
    exclude_first_k: int = 1
    """Drop the first k positions of every context window from training and evaluation. Position 0 is
    an attention sink with a huge norm (SmolLM2 layer 15: ~24,000 vs ~180 elsewhere) that would dominate
    the norm estimate and the loss; where a window starts with BOS it is dropped anyway."""
    prepend_bos: bool | None = None
    """Start every context window with BOS (never trained on or scored); None: where the tokenizer adds
    BOS itself (Gemma: yes, trained with BOS first; SmolLM2: no BOS)."""
    max_norm_multiple: float | None = 10.0
    """Drop tokens whose activation norm exceeds this multiple of the median norm (massive activations,
    arXiv 2402.17762) from the norm estimate, training and the headline evaluation metrics, like special
    tokens; the evaluation also reports all tokens. None keeps them."""
    lm_batch_size: int = 32
    """Contexts per language-model forward pass."""
    batch_size: int = 1024
    """Activation vectors per SAE step (the paper uses 4096)."""
    buffer_tokens: int = 65_536
    """Activation buffer capacity in tokens (refilled when half consumed)."""
    device: str | None = None
    """'cpu', 'cuda', 'cuda:1'...; None: a GPU where present, else the CPU."""
    dtype: str = "float32"
    """Language-model dtype (bfloat16 on GPU; float32 on CPU, where bf16 matmuls are slow)."""
    sae_autocast: str | None = None
    """Dtype of the SAE's matrix products (TrainerConfig.autocast), e.g. 'bfloat16' on a GPU with fast
    bf16; parameters and Adam state stay fp32. None: fp32 throughout (right on CPUs)."""
    cache_activations: bool = False
    """Harvest the training activations once into an on-disk cache and train from it (epochs re-read
    the cache instead of re-running the model). Right for small data sets; wrong for 49M-token runs."""
    widths: list[int] = field(default_factory=lambda: [4608])
    """Dictionary sizes (dict_size) to sweep."""
    sparsity_mode: str = "target_l0"
    """'target_l0' (lambda * (L0/target - 1)^2, the original pipeline), 'l0' (the paper: lambda * L0) or
    'tanh' (Anthropic's smooth L0: lambda * mean sum tanh(4 * f * |W_dec row|))."""
    target_l0s: list[float] = field(default_factory=lambda: [32, 64, 128])
    """Target L0 per trainer (sparsity_mode 'target_l0')."""
    sparsity_coeffs: list[float] = field(default_factory=lambda: [1.0])
    """lambda per trainer (with 'l0' mode, the sweep axis; with 'target_l0', usually 1)."""
    lrs: list[float] = field(default_factory=lambda: [7e-5])
    """Adam learning rates to sweep."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """SAE initialisation seeds to sweep."""
    pre_act_loss_coeff: float | None = None
    """Weight of Anthropic's pre-activation loss on dead latents (TrainerConfig.pre_act_loss_coeff;
    SAELens suggests 3e-6); None: off."""
    bandwidth: float = 0.001
    """Straight-through estimator bandwidth epsilon (on normalised activations)."""
    threshold_init: float = 0.001
    """Initial JumpReLU threshold (on normalised activations)."""
    warmup_steps: int = 1000
    """Linear LR warm-up steps."""
    sparsity_warmup_steps: int = 5000
    """Linear warm-up steps of the sparsity coefficient from 0."""
    decay_start: float = 0.8
    """LR decays linearly to 0 over the steps after this fraction of training."""
    max_epochs: int = 1
    """Most passes over the training text; a budget needing more fails up front (or, when streaming,
    with a clear error when the data runs out) instead of silently training on less."""
    eval_tokens: int = 8192
    """Held-out tokens used by the evaluation."""
    val_tokens: int = 4096
    """Held-out activations (validation split) on which L0, both FVEs and MSE are logged during
    training, every eval_every steps; 0: none."""
    eval_every: int | None = None
    """Steps between those held-out checks; None: a tenth of the run."""
    validation_fraction: float = 0.1
    """Fraction of the data set held out for evaluation (never trained on)."""
    save_dir: str = "runs"
    """Root folder of the run folders."""
    seed: int = 0
    """Data order and split seed."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The embedded default: SmolLM2-135M-Instruct (30 layers, d_model 576) on the shipped sample.
# CPU-sized: 8x width, ~40k unique training tokens cached once and re-read for a few epochs.
# A short run needs a larger lr and bandwidth than the paper's multi-billion-token recipe.
SMOLLM2_135M = DemoConfig(
    model="smollm2-135m",
    layer=15,  # middle of 30 layers
    dataset="sample",
    tokens=300_000,
    ctx_len=128,
    lm_batch_size=16,
    batch_size=1024,
    buffer_tokens=32_768,
    dtype="float32",
    cache_activations=True,
    max_epochs=20,  # ~40k unique tokens: re-read the cache
    widths=[4608],
    target_l0s=[20, 40, 80],
    lrs=[1e-3],
    bandwidth=0.05,
    threshold_init=0.05,
    warmup_steps=20,
    sparsity_warmup_steps=100,
    decay_start=0.8,
    eval_tokens=4096,
)

# The original recipe: Gemma-2-2B, layer 20 residual stream, 16k latents, ~49M tokens of the
# combined medical QA set, target-L0 sweep as in dictionary_learning's JumpReLU variant.
GEMMA_2_2B = DemoConfig(
    model="google/gemma-2-2b",
    layer=20,
    dataset="hub",
    tokens=49_000_000,  # 23,925 steps at batch 2048
    ctx_len=1024,
    lm_batch_size=4,
    batch_size=2048,
    buffer_tokens=2**20,
    dtype="bfloat16",
    widths=[2**14],
    target_l0s=[20, 40, 80, 160, 320, 640],
    lrs=[7e-5],
    warmup_steps=1000,
    sparsity_warmup_steps=5000,
    decay_start=0.8,
    eval_tokens=2**18,
)

# Pythia presets, as in the original config (a quick GPU sanity sweep).
PYTHIA_70M = DemoConfig(
    model="EleutherAI/pythia-70m-deduped",
    layer=3,
    dataset="hub",
    tokens=10_000_000,
    ctx_len=128,
    lm_batch_size=32,
    batch_size=2048,
    buffer_tokens=2**19,
    widths=[2**12, 2**14],
    target_l0s=[20, 40, 80, 160],
    lrs=[7e-5],
)

PYTHIA_160M = dataclasses.replace(PYTHIA_70M, model="EleutherAI/pythia-160m-deduped", layer=8, widths=[2**14])

PRESETS: dict[str, DemoConfig] = {
    "smollm2-135m": SMOLLM2_135M,
    "gemma-2-2b": GEMMA_2_2B,
    "pythia-70m": PYTHIA_70M,
    "pythia-160m": PYTHIA_160M,
}
DEFAULT_PRESET = "smollm2-135m"


def get_preset(name: str) -> DemoConfig:
    """A fresh copy of preset `name`; unknown names get a one-line error listing the choices."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


# ---------------------------------------------------------------------------- command-line values

NULL = ("null", "none")
KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def field_types() -> dict[str, object]:
    """{field name: its annotation} of DemoConfig (int, float, str, bool, list[int], list[float], X | None)."""
    return typing.get_type_hints(DemoConfig)


def _split_optional(kind) -> tuple[object, bool]:
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return kind, False


def _scalar(kind, raw: str):
    s = raw.strip()
    if kind is bool:
        if s.lower() in ("true", "1", "yes", "on"):
            return True
        if s.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"expected {KIND_NAMES[bool]}")
    if kind is str:
        if s.lower() in NULL or not s:
            raise ValueError("expected a string (not null or empty)")
        return raw
    if kind is int:
        try:
            return int(s)  # exact, however large
        except ValueError:
            pass
    try:
        v = float(s)  # 1e6, 0.5
    except ValueError:
        raise ValueError(f"expected {KIND_NAMES[kind]}") from None
    if not math.isfinite(v) or (kind is int and not v.is_integer()):
        raise ValueError(f"expected {KIND_NAMES[kind]}")
    return int(v) if kind is int else v


def parse_value(name: str, raw: str):
    """The text of `--set NAME=RAW` as the type of DemoConfig field NAME: int, float, bool (true/false,
    1/0, yes/no, on/off), str, a list (`4608,9216`, `4608 9216`, `[4608, 9216]` or one value), or null
    where the field is Optional. ValueError "NAME=RAW: expected ..." (one line) when it does not fit."""
    kind, optional = _split_optional(field_types()[name])
    try:
        if optional and raw.strip().lower() in (*NULL, ""):
            return None
        if typing.get_origin(kind) is list:
            (item,) = typing.get_args(kind)
            parts = raw.strip().removeprefix("[").removesuffix("]").replace(",", " ").split()
            if not parts:
                raise ValueError("expected a non-empty list")
            try:
                return [_scalar(item, p) for p in parts]
            except ValueError:
                what = "a list of integers" if item is int else "a list of numbers"
                raise ValueError(
                    f"expected {what}, e.g. {name}={'4608,9216' if item is int else '1e-3,3e-4'}"
                ) from None
        return _scalar(kind, raw)
    except ValueError as e:
        null = " or null" if optional else ""
        raise ValueError(f"{name}={raw}: {e}{null}") from None


def _fits(kind, value) -> bool:
    kind, optional = _split_optional(kind)
    if value is None:
        return optional
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind)
        return isinstance(value, list) and bool(value) and all(_fits(item, v) for v in value)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def problems(cfg: DemoConfig) -> list[tuple[str, str]]:
    """(field, what is wrong) for every field of cfg of the wrong type or out of range."""
    from .hooks import SITES
    from .jumprelu import SPARSITY_MODES
    from .utils import DTYPES

    out = [
        (n, f"expected {KIND_NAMES.get(k, k)}")
        for n, k in field_types().items()
        if not _fits(k, getattr(cfg, n))
    ]
    if out:
        return out
    rules: dict[str, tuple[Callable, str]] = {
        **{n: (lambda v: v >= 1, "must be >= 1") for n in ("tokens", "ctx_len", "lm_batch_size", "batch_size",
                                                          "buffer_tokens", "max_epochs", "eval_tokens")},
        **{n: (lambda v: v >= 0, "must be >= 0") for n in ("layer", "warmup_steps", "sparsity_warmup_steps", "seed")},
        "exclude_first_k": (lambda v: 0 <= v < cfg.ctx_len, f"must be >= 0 and < ctx_len ({cfg.ctx_len})"),
        "widths": (lambda v: min(v) >= 1, "every value must be >= 1"),
        "target_l0s": (lambda v: min(v) > 0, "every value must be > 0"),
        "sparsity_coeffs": (lambda v: min(v) >= 0, "every value must be >= 0"),
        "lrs": (lambda v: min(v) > 0, "every value must be > 0"),
        "seeds": (lambda v: min(v) >= 0, "every value must be >= 0"),
        "bandwidth": (lambda v: v > 0, "must be > 0"),
        "max_norm_multiple": (lambda v: v is None or v > 1, "must be > 1, or null for no massive-token rule"),
        "threshold_init": (lambda v: v >= 0, "must be >= 0"),
        "decay_start": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
        "validation_fraction": (lambda v: 0 < v < 1, "must be > 0 and < 1 (the evaluation's held-out split)"),
        "site": (lambda v: v in SITES, f"must be one of {', '.join(SITES)}"),
        "sparsity_mode": (lambda v: v in SPARSITY_MODES, f"must be one of {', '.join(SPARSITY_MODES)}"),
        "dtype": (lambda v: v in DTYPES, f"must be one of {', '.join(DTYPES)}"),
        "sae_autocast": (lambda v: v in (None, "bfloat16"), "must be bfloat16 or null"),
    }  # fmt: skip
    return [(n, why) for n, (ok, why) in rules.items() if not ok(getattr(cfg, n))]
