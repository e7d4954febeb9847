"""Dictionaries (sparse autoencoders) and their files.

JumpReluAutoEncoder (Rajamanoharan et al. 2024, arXiv 2407.14435), its forward written once in
jumprelu.encode / jumprelu.decode (the training step runs the same functions):
    pre_acts = x @ W_enc + b_enc                      x [B, d] -> pre_acts [B, m]
    f        = pre_acts * 1[pre_acts > threshold]     f [B, m]   (threshold >= 0, one per latent, fp32)
    x̂        = f @ W_dec + b_dec                      x̂ [B, d]

Files (no pickle):
  our folder      sae_weights.safetensors (W_enc, W_dec, b_enc, b_dec, threshold)
                  + config.json (ours: the run config, architecture, activation_dim, dict_size)
                  + cfg.json (SAELens 6.x: `SAE.load_from_disk(folder)` loads it as a JumpReLU SAE)
  Gemma Scope     params.npz with W_enc [d, m], W_dec [m, d], b_enc [m], b_dec [d], threshold [m]
from_pretrained reads all three. A SAELens cfg.json may say that the encoder sees x − b_dec
(`apply_b_dec_to_input`, true by default); that is folded exactly into the encoder bias, so every loaded
SAE takes raw activations with the formula above. Configs it cannot carry are refused by field.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import jumprelu
from .utils import atomic_path, dtype_name, parse_dtype, read_json, write_json

WEIGHTS_FILE = "sae_weights.safetensors"
CONFIG_FILE = "config.json"  # ours
SAELENS_CFG_FILE = "cfg.json"  # SAELens 6.x
GEMMA_SCOPE_FILE = "params.npz"
TENSOR_NAMES = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
SAELENS_VERSION = "6.0.0"  # the cfg.json layout we write (SAELens >= 6 reads `metadata`)
# SAELens SAEMetadata fields and the keys of our config they are read from (first present wins).
SAELENS_METADATA = {
    "model_name": ("model_name", "model"),
    "hook_name": ("hook_name", "hook"),
    "hook_layer": ("hook_layer", "layer"),
    "context_size": ("context_size", "ctx_len"),
    "prepend_bos": ("prepend_bos",),
    "dataset_path": ("dataset_path", "dataset"),
    "model_class_name": ("model_class_name",),
    "exclude_special_tokens": ("exclude_special_tokens",),
    "neuronpedia_id": ("neuronpedia_id",),
}


class Dictionary(nn.Module):
    """A dictionary of `dict_size` directions in an `activation_dim`-wide activation space."""

    activation_dim: int
    dict_size: int

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # [..., d] -> [..., m]
        raise NotImplementedError

    def decode(self, f: torch.Tensor) -> torch.Tensor:  # [..., m] -> [..., d]
        raise NotImplementedError

    def forward(self, x: torch.Tensor, output_features: bool = False):
        """x [..., d] -> x̂ [..., d], or (x̂, f [..., m]) when output_features."""
        f = self.encode(x)
        x_hat = self.decode(f)
        return (x_hat, f) if output_features else x_hat


class JumpReluAutoEncoder(Dictionary):
    """JumpReLU SAE. Parameters W_enc [d, m], b_enc [m], W_dec [m, d], b_dec [d], threshold [m] (fp32)."""

    def __init__(
        self,
        activation_dim: int,
        dict_size: int,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = torch.float32,
        *,
        threshold_init: float = 0.001,
        generator: torch.Generator | None = None,
        init: bool = True,
    ):
        super().__init__()
        for name, v in (("activation_dim", activation_dim), ("dict_size", dict_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"JumpReluAutoEncoder: {name} must be an integer >= 1, got {v!r}")
        self.activation_dim, self.dict_size = activation_dim, dict_size
        dtype = parse_dtype(dtype)
        kw = dict(device=device, dtype=dtype)
        # W_enc is [d, m] but stored latent-major (its transpose is contiguous, like nn.Linear's
        # weight): the trainer's per-latent gradient bags then come out in its layout, no copy.
        self.W_enc = nn.Parameter(torch.empty(dict_size, activation_dim, **kw).T)
        self.b_enc = nn.Parameter(torch.zeros(dict_size, **kw))
        self.W_dec = nn.Parameter(torch.empty(dict_size, activation_dim, **kw))
        self.b_dec = nn.Parameter(torch.zeros(activation_dim, **kw))
        # θ stays fp32 whatever the model dtype: bf16 would round small θ updates away (SAELens PR #728).
        self.threshold = nn.Parameter(torch.zeros(dict_size, device=device, dtype=torch.float32))
        self.cfg: dict = {}  # the config.json / cfg.json it was loaded from, if any
        if init:
            self.reset_parameters(threshold_init=threshold_init, generator=generator)

    @torch.no_grad()
    def reset_parameters(self, threshold_init: float = 0.001, generator: torch.Generator | None = None):
        """Gemma Scope / dictionary_learning init: W_dec rows Kaiming-uniform then unit norm,
        W_enc = W_decᵀ, zero biases, threshold = threshold_init. Drawn in fp32 on CPU from
        `generator`, so a seed gives the same weights whatever the device or dtype."""
        if threshold_init < 0:
            raise ValueError(f"threshold_init must be >= 0, got {threshold_init}")
        w = torch.empty(self.dict_size, self.activation_dim, dtype=torch.float32)
        nn.init.kaiming_uniform_(w, generator=generator)
        w /= w.norm(dim=1, keepdim=True)
        self.W_dec.copy_(w)
        self.W_enc.copy_(w.T)
        self.b_enc.zero_()
        self.b_dec.zero_()
        self.threshold.fill_(threshold_init)

    def _check_width(self, x: torch.Tensor, want: int, what: str) -> None:
        if x.shape[-1] != want:
            raise ValueError(f"JumpReluAutoEncoder: {what} has last dim {x.shape[-1]}, expected {want}")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d] -> f = pre_acts * 1[pre_acts > threshold] [..., m] (jumprelu.encode, dense)."""
        self._check_width(x, self.activation_dim, "input x")
        flat = x.reshape(-1, x.shape[-1]).to(self.W_enc.dtype)
        f = jumprelu.encode(flat, self.W_enc.T, self.b_enc, self.threshold).f
        return f.reshape(*x.shape[:-1], self.dict_size)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """f [..., m] -> x̂ = f @ W_dec + b_dec [..., d] (jumprelu.decode)."""
        self._check_width(f, self.dict_size, "features f")
        return jumprelu.decode(f.to(self.W_dec.dtype), self.W_dec, self.b_dec)

    # ------------------------------------------------------------------ files

    def weights(self) -> dict[str, torch.Tensor]:
        """The five tensors by name (contiguous, CPU, detached)."""
        return {n: getattr(self, n).detach().to("cpu").contiguous() for n in TENSOR_NAMES}

    def save(self, path_dir: str | Path, cfg: dict | None = None) -> Path:
        """Write sae_weights.safetensors + config.json (ours) + cfg.json (SAELens) into `path_dir`."""
        path_dir = Path(path_dir)
        path_dir.mkdir(parents=True, exist_ok=True)
        cfg = dict(cfg or {})
        with atomic_path(path_dir / WEIGHTS_FILE) as tmp:
            save_file(self.weights(), str(tmp), metadata={"architecture": "jumprelu"})
        ours = {
            **cfg,
            "architecture": "jumprelu",
            "activation_dim": self.activation_dim,
            "dict_size": self.dict_size,
            "sae_dtype": dtype_name(self.W_enc.dtype),
        }
        write_json(path_dir / CONFIG_FILE, ours)
        write_json(path_dir / SAELENS_CFG_FILE, self.saelens_cfg(cfg))
        return path_dir

    def saelens_cfg(self, cfg: dict | None = None) -> dict:
        """SAELens 6.x JumpReLUSAEConfig dict; metadata taken from `cfg` where present."""
        cfg = cfg or {}
        meta: dict = {}
        for field, keys in SAELENS_METADATA.items():
            meta[field] = next((cfg[k] for k in keys if cfg.get(k) is not None), None)
        if not isinstance(meta["dataset_path"], (str, type(None))):
            meta["dataset_path"] = str(meta["dataset_path"])
        meta["sae_lens_version"] = SAELENS_VERSION
        meta["sae_lens_training_version"] = None
        return {
            "architecture": "jumprelu",
            "d_in": self.activation_dim,
            "d_sae": self.dict_size,
            "dtype": dtype_name(self.W_enc.dtype),
            "device": "cpu",
            "apply_b_dec_to_input": False,
            # The normalisation factor is folded into the weights before saving (Gemma Scope §3.1).
            "normalize_activations": "none",
            "reshape_activations": "none",
            "sae_lens_version": SAELENS_VERSION,
            "metadata": meta,
        }

    def export_gemma_scope(self, path_npz: str | Path) -> Path:
        """Write a Gemma Scope params.npz (fp32). A folder path gets `params.npz` inside it."""
        path = Path(path_npz)
        if path.is_dir() or path.suffix != ".npz":
            path = path / GEMMA_SCOPE_FILE
        arrays = {n: t.float().numpy() for n, t in self.weights().items()}
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        return path

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> JumpReluAutoEncoder:
        """Load our folder, a SAELens folder (cfg.json + sae_weights.safetensors), or a Gemma Scope
        params.npz (the file, or a folder holding it). Bad files get an error naming file and tensor.

        In a folder our config.json governs where present, else SAELens's cfg.json (see `_folder_config`:
        what is refused, and how SAELens's `apply_b_dec_to_input` is folded into b_enc). `ae.cfg` is that
        config, with SAELens `metadata` (hook_name, context_size, prepend_bos, ...) also at its top level."""
        path = Path(path)
        cfg, fold = {}, False
        if path.is_file() and path.suffix == ".npz":
            tensors, source = _read_npz(path), path
        elif path.is_dir() and (path / WEIGHTS_FILE).exists():
            source = path / WEIGHTS_FILE
            cfg, fold = _folder_config(path)
            tensors = _read_safetensors(source)
        elif path.is_dir() and (path / GEMMA_SCOPE_FILE).exists():
            source = path / GEMMA_SCOPE_FILE
            tensors = _read_npz(source)
        else:
            raise FileNotFoundError(
                f"{path}: not an SAE (expected a folder with {WEIGHTS_FILE} or {GEMMA_SCOPE_FILE}, "
                "or a .npz file)"
            )
        d, m = _check_tensors(tensors, source, cfg)
        for key, want in (("activation_dim", d), ("d_in", d), ("dict_size", m), ("d_sae", m)):
            if key in cfg and cfg[key] != want:
                raise ValueError(f"{path}: config says {key}={cfg[key]} but {source.name} has {want}")
        if dtype is not None:
            dtype = parse_dtype(dtype)  # the caller's choice: a bad name is an error
        else:  # the file's dtype; an unknown name written by another tool falls back to fp32
            try:
                dtype = parse_dtype(cfg.get("sae_dtype") or cfg.get("dtype") or tensors["W_enc"].dtype)
            except ValueError:
                dtype = torch.float32
        if fold:  # (x − b_dec)·W_enc + b_enc = x·W_enc + (b_enc − b_dec·W_enc); exact in fp64, one rounding
            w, b_enc, b_dec = (tensors[n].double() for n in ("W_enc", "b_enc", "b_dec"))
            tensors["b_enc"] = b_enc - b_dec @ w
        ae = cls(d, m, device=device, dtype=dtype, init=False)
        with torch.no_grad():
            for n in TENSOR_NAMES:
                getattr(ae, n).copy_(tensors[n])
        ae.cfg = cfg
        return ae


# ---------------------------------------------------------------------------- configs


def _folder_config(path: Path) -> tuple[dict, bool]:
    """(config, fold) for a folder: our config.json where present, else SAELens's cfg.json. `fold` says
    that the encoder sees x − b_dec (`apply_b_dec_to_input`: SAELens's default is true, ours false), so
    b_dec·W_enc must be folded into b_enc; the returned config then says apply_b_dec_to_input false and
    b_dec_folded_into_b_enc true. Both files are checked, and must agree on the fold."""
    found = {}
    for name, default in ((CONFIG_FILE, False), (SAELENS_CFG_FILE, True)):
        if (path / name).exists():
            c = read_json(path / name)
            if not isinstance(c, dict):
                raise ValueError(f"{path / name}: expected a JSON object, got {type(c).__name__}")
            found[name] = (c, _input_rule(path / name, c, default))
    if not found:
        return {}, False
    if len({fold for _, fold in found.values()}) > 1:
        says = ", ".join(f"{n} {fold}" for n, (_, fold) in found.items())
        raise ValueError(f"{path}: the two configs disagree on apply_b_dec_to_input ({says})")
    cfg, fold = found.get(CONFIG_FILE) or found[SAELENS_CFG_FILE]
    cfg = dict(cfg)
    if isinstance(cfg.get("metadata"), dict):  # SAELens >= 6 nests these; < 6 had them at the top
        for k, v in cfg["metadata"].items():
            cfg.setdefault(k, v)
    if "hook_point" in cfg:  # SAELens < 6 name
        cfg.setdefault("hook_name", cfg["hook_point"])
    if fold:
        cfg.update(apply_b_dec_to_input=False, b_dec_folded_into_b_enc=True)
    return cfg, fold


def _input_rule(path: Path, cfg: dict, b_dec_default: bool) -> bool:
    """Refuse a config whose forward pass the five tensors do not carry; return apply_b_dec_to_input.
    SAELens 6.54's jumprelu SAE (saes/sae.py `process_sae_in`, saes/jumprelu_sae.py) computes
        pre_acts = (norm_in(reshape(x)) − apply_b_dec_to_input·b_dec)·W_enc + b_enc
        f = ReLU(pre_acts)·1[pre_acts > threshold],  x̂ = reshape⁻¹(norm_out(f·W_dec + b_dec)),
    the ReLU a no-op for threshold >= 0. The b_dec term folds into b_enc; a normalisation other than
    "none" is a per-token rescaling (or a scale we do not have), and reshaping changes the input's shape."""
    arch = cfg.get("architecture")
    if arch is not None and arch != "jumprelu":
        raise ValueError(f"{path}: architecture={arch!r} is not supported (only 'jumprelu' SAEs load)")
    for key in ("normalize_activations", "reshape_activations"):
        value = cfg.get(key)
        if value not in (None, False, "none"):  # SAELens < 6 wrote normalize_activations as a bool
            raise ValueError(
                f"{path}: {key}={value!r} is not supported: it transforms the SAE's input in a way "
                "its weights do not carry (only 'none' loads)"
            )
    apply = cfg.get("apply_b_dec_to_input", b_dec_default)
    if not isinstance(apply, bool):
        raise ValueError(f"{path}: apply_b_dec_to_input must be true or false, got {apply!r}")
    return apply


# ---------------------------------------------------------------------------- readers


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{path}: cannot read safetensors file ({e})") from None


def _read_npz(path: Path) -> dict[str, torch.Tensor]:
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: cannot read npz file (the file is empty)")
    try:
        with np.load(path, allow_pickle=False) as data:
            # Gemma Scope spells them W_enc ...; some copies use w_enc.
            return {
                ("W_" + k[2:] if k.startswith("w_") else k): torch.from_numpy(np.array(data[k])) for k in data
            }
    except Exception as e:  # a truncated or damaged zip raises BadZipFile, EOFError, zlib.error, OSError, ...
        why = " ".join(str(e).split())  # one line
        raise ValueError(f"{path}: cannot read npz file ({type(e).__name__}: {why})") from None


def _check_tensors(t: dict[str, torch.Tensor], source: Path, cfg: dict) -> tuple[int, int]:
    """Check presence, shapes and finiteness; return (d, m)."""
    missing = [n for n in TENSOR_NAMES if n not in t]
    if missing:
        other = _other_architecture(t, cfg)
        hint = f"; this looks like a {other} SAE, and only JumpReLU SAEs load" if other else ""
        raise ValueError(f"{source}: tensor {missing[0]!r} missing (has {sorted(t)}){hint}")
    if "scaling_factor" in t and not torch.allclose(t["scaling_factor"].float(), torch.ones(())):
        raise ValueError(f"{source}: tensor 'scaling_factor' is not all ones (SAELens < 6 fine-tuning scale)")
    for n in TENSOR_NAMES:
        if not t[n].is_floating_point():
            raise ValueError(f"{source}: tensor {n!r} has non-float dtype {t[n].dtype}")
    if t["W_enc"].ndim != 2:
        raise ValueError(f"{source}: tensor 'W_enc' must be 2-D [d, m], got shape {tuple(t['W_enc'].shape)}")
    d, m = t["W_enc"].shape
    want = {"W_dec": (m, d), "b_enc": (m,), "b_dec": (d,), "threshold": (m,)}
    for n, shape in want.items():
        if tuple(t[n].shape) != shape:
            raise ValueError(f"{source}: tensor {n!r} has shape {tuple(t[n].shape)}, expected {shape}")
    for n in TENSOR_NAMES:
        if not torch.isfinite(t[n]).all():
            raise ValueError(f"{source}: tensor {n!r} contains NaN or inf")
    if (t["threshold"] < 0).any():
        raise ValueError(f"{source}: tensor 'threshold' has negative entries (JumpReLU needs threshold >= 0)")
    if not math.prod(t["W_enc"].shape):
        raise ValueError(f"{source}: tensor 'W_enc' is empty")
    return int(d), int(m)


def _other_architecture(t: dict[str, torch.Tensor], cfg: dict) -> str | None:
    """Name the SAE architecture whose tensors these are, when it is not JumpReLU (SAELens's names)."""
    if cfg.get("architecture") == "jumprelu":
        return None  # a damaged JumpReLU file
    if {"b_gate", "b_mag", "r_mag"} & set(t):
        return "gated"
    if "k" in cfg or "topk" in str(cfg.get("activation_fn", "")):
        return "topk"
    if "threshold" not in t and {"W_enc", "W_dec", "b_enc", "b_dec"} <= set(t):
        return "standard (ReLU) or TopK"
    return None
