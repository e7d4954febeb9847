"""Feature browser: what each latent of an SAE fires on, as a static HTML folder that opens from disk.

    python -m dictionary_learning.features SAE_PATH [--dataset SPEC] [--n-tokens N]
        [--latents all|N|i,j,k] [--out DIR] [--overwrite] [--model M --layer L --site S ...]

SAE_PATH is anything `JumpReluAutoEncoder.from_pretrained` loads (our run folder, a SAELens folder,
a Gemma Scope params.npz). Model, layer, site, data set, ctx_len, exclude_first_k and the data split
come from its config exactly as in the evaluation CLI (`eval_report.run_settings`); flags override.
--latents: `all` (default), `N` (latents 0..N-1) or a comma list `i,j,k` (`7,` for latent 7 alone).

Procedure (`collect`): the held-out windows of the evaluation (`evaluation.select_contexts`: the validation
split, packed and masked as evaluation does) run once through the model, stopped at the hook; the
real-token activations x [N, d] are kept. Positions whose keep mask is False (BOS/EOS/PAD, the first
exclude_first_k positions) are never scored: they appear in contexts as greyed tokens with no value.
One streamed pass over x in chunks (feature_stats.LatentStats) then gives, per latent, in O(m·k)
memory: firing counts, min/max, the top-k tokens, a histogram of the non-zero activations and uniform
samples from the lower bands [0, ¼), [¼, ½), [½, ¾) of the latent's max. Each chosen token is shown
with up to `radius` tokens either side inside its window, every token coloured by the latent's
activation (re-encoded from the kept x, a block of windows at a time). Plus the logit lens (10
promoted / suppressed output tokens) and the 5 latents with the most similar decoder directions.

Output (features_html.py writes it; the README lists the JSON fields): index.html, app.js, style.css,
data/index.js + data/latents_NNN.js (the JSON assigned to window.FB_DATA, so file:// pages can read
it) and the same JSON as data/*.json when the folder stays small. The folder is written to a
temporary folder beside --out and renamed; an existing --out not written by this command (no
marker file) is refused unless --overwrite. Bad input exits with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .buffer import massive_limit, massive_record
from .eval_report import add_run_flags, load_sae, run_settings
from .evaluation import EvalConfig, select_contexts
from .feature_stats import (
    DEFAULT_BANDS,
    LatentStats,
    context_values,
    encode_latents,
    logit_lens,
    round_sig,
    similar_latents,
)
from .features_html import MARKER, SCHEMA_VERSION, write_browser
from .hooks import get_hook_module, hook_name, traced_forward
from .metrics import DENSITY_FLOOR, log_feature_density
from .utils import first_line


@dataclass
class BrowserConfig:
    """Feature-browser settings; the CLI flags default to these."""

    n_tokens: int = 50_000
    """Real held-out tokens to scan (the first evaluation windows holding that many)."""
    min_tokens: int = 1000
    """Fewer real held-out tokens than this is an error (too small a data set to say anything)."""
    top_k: int = 20
    """Top activating contexts per latent."""
    radius: int = 10
    """Tokens shown either side of the chosen token (inside its window)."""
    n_bins: int = 64
    """Histogram bins over [0, R), R the power of two above a latent's max (feature_stats.bin_range)."""
    per_band: int = 3
    """Sampled contexts per lower activation band (feature_stats.DEFAULT_BANDS) and per histogram bin."""
    logit_k: int = 10
    """Output tokens promoted and suppressed shown by the logit lens."""
    n_similar: int = 5
    """Latents with the most similar decoder directions."""
    lm_batch_size: int = 8
    """Windows per language-model forward pass."""
    seed: int = 0
    """Seed of the band samples."""


def parse_latents(spec: str, dict_size: int) -> torch.Tensor:
    """--latents `all` | `N` (0..N-1) | `i,j,k` -> sorted unique LongTensor; out of range -> ValueError."""
    spec = str(spec).strip()
    try:
        if spec == "all":
            return torch.arange(dict_size)
        if "," not in spec:
            n = int(spec)
            if not 1 <= n <= dict_size:
                raise ValueError(f"--latents {spec}: out of range; the SAE has {dict_size} latents")
            return torch.arange(n)
        ids = sorted({int(p) for p in spec.split(",") if p.strip()})
    except ValueError as e:
        if "out of range" in str(e):
            raise
        raise ValueError(f"--latents {spec!r}: expected 'all', a count N or a list i,j,k") from None
    bad = [i for i in ids if not 0 <= i < dict_size]
    if bad or not ids:
        raise ValueError(f"--latents {spec}: out of range; the SAE has latents 0..{dict_size - 1}")
    return torch.tensor(ids)


# ---------------------------------------------------------------------------- harvest


def drop_massive(x: torch.Tensor, pos: torch.Tensor, multiple: float | None):
    """The evaluation's massive-token rule on the harvested rows x [N, d] (positions pos [N]): rows with
    norm > multiple x their median norm are left unscored, like special tokens. -> (x, pos, record)."""
    norms = torch.linalg.vector_norm(x, dim=1)
    limit = massive_limit(norms, multiple)
    kept = norms <= limit if limit is not None else torch.ones_like(norms, dtype=torch.bool)
    record = massive_record(multiple, {"held-out median": limit}, int((~kept).sum()), len(x))
    return x[kept], pos[kept], record


@torch.no_grad()
def harvest(model, layer: int, site: str, input_ids, keep, lm_batch_size: int, d_sae: int, device, progress):
    """Activations of the kept positions: (x [N_real, d] fp32 on `device`, position [N_real] int64,
    the flat index row·T + col of each into input_ids). The forward stops at the hook. An SAE width
    d_sae other than the hook's width is a ValueError after the first batch."""
    from tqdm.auto import tqdm

    envoy = get_hook_module(model, layer, site)
    flat = torch.arange(input_ids.numel()).view_as(input_ids)
    xs, ps = [], []
    for i in tqdm(range(0, len(input_ids), lm_batch_size), desc="features: harvest", disable=not progress):
        ids, kp = input_ids[i : i + lm_batch_size], keep[i : i + lm_batch_size]
        act, _ = traced_forward(model, envoy, site, ids.to(model.device), stop_at_hook=True)
        if act.shape[-1] != d_sae:
            raise ValueError(
                f"SAE width {d_sae} does not match the width {act.shape[-1]} of {hook_name(layer, site)} "
                f"in {getattr(model.config, '_name_or_path', 'the model')}"
            )
        xs.append(act[kp.to(act.device)].to(device=device, dtype=torch.float32))
        ps.append(flat[i : i + lm_batch_size][kp])
    return torch.cat(xs), torch.cat(ps).to(device)


# ---------------------------------------------------------------------------- the data


@torch.no_grad()
def collect(sae, model, layer, site, texts, ctx_len, exclude_first_k=0, latents=None, cfg=None,
            device=None, progress=True, meta=None, timings=None, prepend_bos=None,
            max_norm_multiple=EvalConfig.max_norm_multiple) -> dict:  # fmt: skip
    """Everything the browser shows, as the JSON-able dict {"index": ..., "latents": [record, ...]}
    (schema in features_html.py and the README). sae: encode/decode with W_enc [d, m], W_dec [m, d];
    latents: LongTensor of latent ids (default all); meta: extra fields for index["meta"]; timings:
    a dict that receives the seconds of each phase. prepend_bos, max_norm_multiple: as in evaluation
    (BOS-first windows; massive-activation tokens shown but not scored)."""
    clock = _Clock(timings)
    cfg = cfg or BrowserConfig()
    device = torch.device(device) if device else model.device
    sae = sae.to(device=device, dtype=torch.float32)
    sel = (torch.arange(sae.dict_size) if latents is None else latents).to(device)
    ids, keep = select_contexts(texts, model.tokenizer, ctx_len, cfg.n_tokens, exclude_first_k, prepend_bos)
    n_real = int(keep.sum())
    if n_real < cfg.min_tokens:
        raise ValueError(
            f"the held-out text holds only {n_real} real tokens (need at least {cfg.min_tokens}: "
            "use a larger --dataset or lower --min-tokens)"
        )
    clock("windows")
    x, pos = harvest(model, layer, site, ids, keep, cfg.lm_batch_size, sae.activation_dim, device, progress)
    x, pos, massive = drop_massive(x, pos, max_norm_multiple)
    clock("harvest")
    W, b, th = sae.W_enc[:, sel].contiguous(), sae.b_enc[sel], sae.threshold[sel]
    stats = LatentStats(len(sel), cfg.top_k, cfg.n_bins, cfg.per_band, device, cfg.seed)
    for i in range(0, len(x), 2048):
        stats.update(encode_latents(x[i : i + 2048], W, b, th), pos[i : i + 2048])
    clock("stats")

    # the chosen tokens: top-k, then the band samples; -1 marks an empty slot
    m, k = stats.top.positions.shape
    band_count, bands = stats.bands(DEFAULT_BANDS, cfg.per_band)  # [m, n_bands], [m, n_bands, s]
    chosen = torch.cat([stats.top.positions, bands.reshape(m, -1)], 1)  # [m, k + n_bands·s]
    lat_local = torch.arange(m, device=device)[:, None].expand_as(chosen)
    ok = chosen >= 0
    T = ids.shape[1]
    row_of = torch.full((ids.numel(),), -1, dtype=torch.long, device=device)
    row_of[pos] = torch.arange(len(pos), device=device)
    start, vals = context_values(x, row_of, W, b, th, lat_local[ok], chosen[ok], T, cfg.radius)
    del x
    clock("contexts")

    top_ids, top_v, bot_ids, bot_v, lens_info = logit_lens(model._module, sae.W_dec[sel], cfg.logit_k)
    clock("logit_lens")
    sim_ids, sim_cos = similar_latents(sae.W_dec, sel, cfg.n_similar)
    clock("similar")

    # one vocabulary table for every token shown: window tokens and logit-lens tokens
    used = torch.cat([ids.flatten(), top_ids.flatten(), bot_ids.flatten()]).unique()
    local = torch.full((int(used.max()) + 1,), -1, dtype=torch.long)
    local[used] = torch.arange(len(used))
    index = {
        "schema_version": SCHEMA_VERSION,
        "meta": {
            "layer": layer, "site": site, "hook_name": hook_name(layer, site),
            "ctx_len": ctx_len, "exclude_first_k": exclude_first_k, "n_tokens": stats.n_tokens,
            "n_windows": len(ids), "dict_size": sae.dict_size, "activation_dim": sae.activation_dim,
            "n_latents": m, "bands": [list(b_) for b_ in DEFAULT_BANDS], "logit_lens": lens_info,
            "density_floor": DENSITY_FLOOR, "config": asdict(cfg), "massive_tokens": massive, **(meta or {}),
        },
        "vocab": model.tokenizer.batch_decode([[i] for i in used.tolist()], clean_up_tokenization_spaces=False),
        "vocab_ids": used.tolist(),
        "windows": local[ids].tolist(),
    }  # fmt: skip
    ctx_pos = chosen[ok].cpu()
    parts = {
        "contexts": (ctx_pos, start.cpu(), vals, local[ids.flatten()[ctx_pos]]),
        "per_latent": (ok.sum(1).tolist(), (stats.top.positions >= 0).sum(1).tolist(), (bands >= 0).sum(2).tolist()),
        "logits": (local[top_ids].tolist(), round_sig(top_v), local[bot_ids].tolist(), round_sig(bot_v)),
        "similar": (sim_ids.tolist(), round_sig(sim_cos)),
    }  # fmt: skip
    records, index["latents"] = _records(sel.tolist(), stats, band_count, parts, T, cfg)
    clock("records")
    return {"index": index, "latents": records}


def _records(ids: list[int], stats: LatentStats, band_count, parts: dict, T: int, cfg: BrowserConfig):
    """The JSON records of the latents (features_html.py documents the fields) and the index columns."""
    ctx_pos, start, vals, center_tok = parts["contexts"]
    lengths = (torch.clamp(ctx_pos % T + cfg.radius + 1, max=T) - start).tolist()
    ctx = [[w, s, c, v[:n]] for w, s, c, v, n in zip((ctx_pos // T).tolist(), start.tolist(),
                                                    (ctx_pos % T).tolist(), round_sig(vals), lengths)]  # fmt: skip
    center_tok = center_tok.tolist()
    n_ctx, n_top, n_band = parts["per_latent"]
    p_ids, p_v, s_ids, s_v = parts["logits"]
    sim_ids, sim_cos = parts["similar"]
    nz = stats.hist > 0  # histograms trimmed to their non-empty bins
    first = nz.float().argmax(1)
    last = stats.n_bins - 1 - nz.flip(1).float().argmax(1)
    width = stats.range / stats.n_bins
    lo, hi = (first * width).tolist(), ((last + 1) * width).tolist()
    hist, first, last = stats.hist.tolist(), first.tolist(), last.tolist()
    fires, vmax, band_count = stats.fires.tolist(), round_sig(stats.max), band_count.tolist()
    dens = round_sig(log_feature_density(stats.fires, stats.n_tokens).double(), digits=4)
    records, top_tokens, c0 = [], [], 0
    for j, latent in enumerate(ids):
        mine, c0 = ctx[c0 : c0 + n_ctx[j]], c0 + n_ctx[j]
        top, rest = mine[: n_top[j]], mine[n_top[j] :]
        top_tokens.append(list(dict.fromkeys(center_tok[c0 - n_ctx[j] : c0 - n_ctx[j] + n_top[j]]))[:10])
        bands = []
        for bi, (a, z) in enumerate(DEFAULT_BANDS):
            bands.append({"lo": a, "hi": z, "count": band_count[j][bi], "samples": rest[: n_band[j][bi]]})
            rest = rest[n_band[j][bi] :]
        records.append({
            "id": latent, "fires": fires[j], "density_log10": dens[j], "max": vmax[j],
            "hist": {"lo": lo[j], "hi": hi[j], "counts": hist[j][first[j] : last[j] + 1] if fires[j] else []},
            "top": top, "bands": bands,
            "logits": {"promoted": [list(x) for x in zip(p_ids[j], p_v[j])],
                       "suppressed": [list(x) for x in zip(s_ids[j], s_v[j])]},
            "similar": [list(x) for x in zip(sim_ids[j], sim_cos[j])],
        })  # fmt: skip
    return records, {"id": ids, "fires": fires, "max": vmax, "top_tokens": top_tokens}


class _Clock:
    """clock(name) adds the seconds since the previous call to timings[name] (no-op without a dict)."""

    def __init__(self, timings: dict | None):
        import time

        self.timings, self.now, self.t = timings, time.perf_counter, time.perf_counter()

    def __call__(self, name: str) -> None:
        t = self.now()
        if self.timings is not None:
            self.timings[name] = round(self.timings.get(name, 0.0) + t - self.t, 3)
        self.t = t


# ---------------------------------------------------------------------------- CLI


def check_out(out: Path, overwrite: bool) -> None:
    """--out may be new, a folder this command wrote (marker file), or anything with --overwrite."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    if out.exists() and not (out / MARKER).exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out {out}: folder exists and was not written by this command; pass --overwrite")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m dictionary_learning.features",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = BrowserConfig()
    p.add_argument("sae_path", help="SAE run folder, SAELens folder or Gemma Scope params.npz")
    p.add_argument("--out", help="output folder (default: SAE_PATH/features, or beside a .npz)")
    p.add_argument("--overwrite", action="store_true", help="replace an --out folder not written by us")
    p.add_argument("--latents", default="all", help="all | N (latents 0..N-1) | i,j,k")
    p.add_argument("--n-tokens", type=int, default=d.n_tokens, help="real held-out tokens to scan")
    p.add_argument("--min-tokens", type=int, default=d.min_tokens, help="fewer held-out tokens: error")
    p.add_argument("--top-k", type=int, default=d.top_k, help="top activating contexts per latent")
    p.add_argument("--lm-batch-size", type=int, default=d.lm_batch_size, help="windows per LM forward")
    add_run_flags(p)
    return p.parse_args(argv)


def build(args, models: dict | None = None) -> Path:
    """One browser for args.sae_path (see the module docstring); `models` caches loaded models by name."""
    from dataset import load_texts

    from .utils import default_device, git_commit, load_language_model, package_versions, write_dir_atomic

    sae_path = Path(args.sae_path)
    sae = load_sae(str(sae_path), device="cpu")
    s = run_settings(sae_path, args)
    latents = parse_latents(args.latents, sae.dict_size)
    folder = sae_path.parent if sae_path.is_file() else sae_path
    out = Path(args.out) if args.out else folder / "features"
    check_out(out, args.overwrite)
    if args.n_tokens < 1 or args.top_k < 1 or args.lm_batch_size < 1:
        raise ValueError("--n-tokens, --top-k and --lm-batch-size must be >= 1")
    texts = load_texts(
        s["dataset"], split="validation", seed=s["seed"], validation_fraction=s["validation_fraction"]
    )
    if not any(t.strip() for t in texts):
        raise ValueError(f"--dataset {s['dataset']}: the validation split holds no text")
    models = {} if models is None else models
    if s["model"] not in models:
        models.clear()  # one language model in memory at a time
        models[s["model"]] = load_language_model(s["model"], device=args.device, dtype=args.dtype)
    model = models[s["model"]]
    cfg = BrowserConfig(n_tokens=args.n_tokens, min_tokens=args.min_tokens, top_k=args.top_k,
                        lm_batch_size=args.lm_batch_size)  # fmt: skip
    meta = {"sae": str(sae_path), "model": s["model"], "dataset": s["dataset"], "split": "validation",
            "seed": s["seed"], "validation_fraction": s["validation_fraction"], "lm_dtype": args.dtype,
            "versions": package_versions(), "git_commit": git_commit()}  # fmt: skip
    try:
        data = collect(sae, model, s["layer"], s["site"], texts, s["ctx_len"], s["exclude_first_k"],
                       latents, cfg, device=args.device or default_device(), progress=not args.no_progress,
                       meta=meta, prepend_bos=s["prepend_bos"], max_norm_multiple=s["max_norm_multiple"])  # fmt: skip
    except ValueError as e:
        if "real tokens" in str(e) or "no evaluation texts" in str(e):
            raise ValueError(f"--dataset {s['dataset']}: {e}") from None
        raise
    write_dir_atomic(out, lambda tmp: write_browser(data, tmp))  # no half-written folder is left
    return out


def build_for_run(folders: list[Path], which: str = "middle", argv: list[str] | None = None) -> list[Path]:
    """demo.py: the browser of the SAE with the middle target L0 (which='middle'; measured L0 where the
    sparsity mode has no target) or of every SAE ('all'), into <trainer>/features/. argv: extra CLI flags
    for each."""
    from .utils import read_json

    def key(f):
        cfg = read_json(f / "config.json") if (f / "config.json").exists() else {}
        trainer = cfg.get("trainer") or {}
        t = trainer.get("target_l0") if trainer.get("sparsity_mode", "target_l0") == "target_l0" else None
        if t is None and (f / "eval_results.json").exists():
            t = read_json(f / "eval_results.json").get("l0")
        return (math.inf if t is None else float(t), str(f))

    folders = sorted(folders, key=key)
    if which == "middle" and folders:
        folders = [folders[(len(folders) - 1) // 2]]
    models: dict = {}
    return [build(parse_args([str(f), *(argv or [])]), models) for f in folders]


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        out = build(args)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    print(f"feature browser written to {out / 'index.html'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
