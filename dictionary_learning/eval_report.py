"""CLI of the evaluation, and its reports: per-trainer eval_results.json, sparsity.safetensors and
density histogram, a sweep summary (CSV + markdown), frontier plots and training curves.

    python -m dictionary_learning.eval_report RUN_DIR [--n-tokens N] [--lm-batch-size B] [--ctx-len T]
        [--device D] [--dataset SPEC] [--model NAME --layer L --site S]

RUN_DIR is one trainer folder (sae_weights.safetensors + config.json), a folder holding several
(searched recursively; checkpoints/ are skipped), a SAELens folder (cfg.json) or a Gemma Scope
params.npz. Model, layer, site, data set and ctx_len come from each folder's config.json (SAELens:
cfg.json metadata); flags override them, and external SAEs without those fields need the flags.
Always the VALIDATION split of the data set is evaluated (held-out text, never the training text).
SAEs sharing model, hook and data are evaluated together (`evaluation.evaluate_many`, up to
--group-size at once): the clean and ablation passes run once per group, only the splice per SAE.

Writes: eval_results.json (metrics + an `eval` block with the settings and versions),
sparsity.safetensors and feature_density.png into each SAE's folder; eval_summary.csv/.md,
frontier_fve.png, frontier_loss_recovered.png and training_curves.png (from each
training_log.jsonl) into RUN_DIR (or --out). Exit status: 0 done, 2 bad RUN_DIR or config,
1 an error while evaluating (one line on stderr either way).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from .buffer import check_max_norm_multiple
from .dictionary import JumpReluAutoEncoder
from .eval_summary import find_saes, plot_density, plot_frontiers, plot_training_curves, write_summary
from .evaluation import EvalConfig, evaluate_many
from .metrics import log_feature_density
from .utils import atomic_path, first_line, git_commit, package_versions, read_json, read_jsonl, write_json

log = logging.getLogger(__name__)

RESULTS_FILE = "eval_results.json"
SPARSITY_FILE = "sparsity.safetensors"
GEMMA_SCOPE_PROTOCOL = {"ctx_len": 1024, "prepend_bos": True}
"""Defaults for a params.npz, which records no settings: Gemma Scope's own evaluation (arXiv
2408.05147): 1024-token contexts, BOS first and excluded."""
DEFAULT_GROUP_SIZE = 16
"""Most SAEs evaluated together (sharing the clean and ablation passes), i.e. held in memory at once."""


def _find(cfg: dict, *keys):
    """First value of any of `keys` in cfg or its nested dicts (breadth-first), else None."""
    todo = [cfg]
    while todo:
        d = todo.pop(0)
        for k in keys:
            if d.get(k) is not None:
                return d[k]
        todo += [v for v in d.values() if isinstance(v, dict)]
    return None


def _has(cfg: dict, key: str) -> bool:
    """Whether `key` occurs in cfg or its nested dicts (a recorded None counts)."""
    return key in cfg or any(_has(v, key) for v in cfg.values() if isinstance(v, dict))


def run_settings(sae_path: Path, args) -> dict:
    """Model, layer, site, data set and window settings of one SAE: its config.json (ours) or cfg.json
    (SAELens), overridden by the CLI flags. A missing field names the file and the flag to pass."""
    folder = sae_path.parent if sae_path.is_file() else sae_path
    cfg_file = next((folder / n for n in ("config.json", "cfg.json") if (folder / n).exists()), None)
    cfg = read_json(cfg_file) if cfg_file else {}
    meta = cfg["run_meta"] if isinstance(cfg.get("run_meta"), dict) else cfg
    hook = _find(cfg, "hook_name", "hook", "hook_point")  # hook_point: SAELens before 6
    if (_find(cfg, "model_from_pretrained_kwargs") or {}).get("center_writing_weights"):
        log.warning("%s: trained on a TransformerLens model with center_writing_weights, whose residual "
                     "stream is centred; this evaluation hooks the unprocessed model", sae_path)  # fmt: skip
    m = re.fullmatch(r"blocks\.(\d+)\.hook_(\w+)", str(hook)) if hook else None
    npz = {} if cfg else GEMMA_SCOPE_PROTOCOL  # a params.npz records nothing: Gemma Scope's protocol
    bos = args.prepend_bos if args.prepend_bos is not None else _find(cfg, "prepend_bos")
    if args.max_norm_multiple is not None:
        multiple = None if args.max_norm_multiple == "none" else args.max_norm_multiple
    else:
        multiple = (
            _find(cfg, "max_norm_multiple")
            if _has(cfg, "max_norm_multiple")
            else EvalConfig.max_norm_multiple
        )
    s = {
        "model": args.model or _find(cfg, "model", "model_name"),
        "layer": args.layer if args.layer is not None else _find(cfg, "layer"),
        "site": args.site or _find(cfg, "site") or (m and m.group(2)),
        "dataset": args.dataset or _find(cfg, "dataset", "dataset_path"),
        "ctx_len": args.ctx_len
        or _find(cfg, "ctx_len", "context_size")
        or npz.get("ctx_len", EvalConfig.ctx_len),
        "prepend_bos": bos if bos is not None else npz.get("prepend_bos"),
        "max_norm_multiple": multiple,
        # the data split seed: from run_meta (the top level of our config.json holds the SAE init seed)
        "seed": next((meta[k] for k in ("data_seed", "split_seed", "seed") if meta.get(k) is not None), 0),
        "validation_fraction": meta.get("validation_fraction") or 0.1,
        "exclude_first_k": args.exclude_first_k
        if args.exclude_first_k is not None
        else _find(cfg, "exclude_first_k") or 0,
    }
    if s["layer"] is None and m:
        s["layer"] = int(m.group(1))
    where = cfg_file or sae_path
    if not args.dataset and s["dataset"] is not None and where.name == "cfg.json":  # an external SAE
        s["dataset_from"] = "the SAE's metadata: its training data, split by this project (may overlap)"
        log.warning("%s: scoring a validation split of %s, the SAE's own training data (its metadata); this "
                    "project's split cannot know which texts it trained on: pass --dataset with unseen text",
                    where, s["dataset"])  # fmt: skip
    for key, flag in (
        ("model", "--model"),
        ("layer", "--layer"),
        ("site", "--site"),
        ("dataset", "--dataset"),
    ):
        if s[key] is None:
            raise ValueError(f"{where}: no {key!r} field; pass {flag}")
    s["layer"], s["ctx_len"] = int(s["layer"]), int(s["ctx_len"])
    return s


# ---------------------------------------------------------------------------- SAEs and artefacts


def load_sae(path: str, device: str | None = None):
    """Any SAE `JumpReluAutoEncoder.from_pretrained` reads (our run folder, a SAELens folder, a Gemma
    Scope params.npz), in fp32, ready for `evaluate`."""
    return JumpReluAutoEncoder.from_pretrained(path, device=device, dtype=torch.float32)


def save_sparsity(path, fire_counts: torch.Tensor, n_tokens: int) -> None:
    """Write SAELens-style `sparsity.safetensors`: key `sparsity` = log10 firing density [m] (atomic)."""
    with atomic_path(path) as tmp:
        save_file({"sparsity": log_feature_density(fire_counts, n_tokens).contiguous()}, str(tmp))


# ---------------------------------------------------------------------------- CLI


def _multiple(v: str):
    if v.strip().lower() in ("none", "off"):
        return "none"
    try:
        x = float(v)
        check_max_norm_multiple(x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 1 or 'none', got {v!r}") from None
    return x


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """The flags that override an SAE's run settings (run_settings), shared by every CLI that reads
    held-out text through an SAE: the evaluation and the feature browser."""
    p.add_argument(
        "--dataset", default=None, help="data set spec (default: the run's); its validation split is used"
    )
    p.add_argument("--model", default=None, help="model name/folder (default: the run's)")
    p.add_argument("--layer", type=int, default=None, help="layer (default: the run's)")
    p.add_argument("--site", default=None, help="resid_post / resid_pre / mlp_out (default: the run's)")
    p.add_argument("--ctx-len", type=int, default=None, help="window length (default: the run's ctx_len)")
    p.add_argument("--exclude-first-k", type=int, default=None, help="default: the run's buffer setting")
    p.add_argument(
        "--prepend-bos",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="start every window with BOS (default: the run's setting; SAELens metadata; "
        "Gemma Scope npz: yes; else where the tokenizer adds BOS)",
    )
    p.add_argument(
        "--max-norm-multiple",
        type=_multiple,
        default=None,
        metavar="X|none",
        help="tokens with norm > X x the median are massive: left out of the headline "
        f"metrics (default: the run's, else {EvalConfig.max_norm_multiple:g}; none: keep all)",
    )
    p.add_argument("--device", default=EvalConfig.device, help="cpu, cuda, ... (default: a GPU if present)")
    p.add_argument("--dtype", default="float32", help="language-model dtype (default float32)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m dictionary_learning.eval_report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", help="trainer folder, folder of trainer folders, SAELens folder or params.npz")
    p.add_argument(
        "--n-tokens", type=int, default=EvalConfig.n_tokens, help="real held-out tokens to evaluate"
    )
    p.add_argument(
        "--lm-batch-size", type=int, default=EvalConfig.lm_batch_size, help="contexts per LM forward"
    )
    add_run_flags(p)
    p.add_argument("--n-ref-tokens", type=int, default=EvalConfig.n_ref_tokens,
                   help="reference tokens of the train split (mean ablation, median norm)")  # fmt: skip
    p.add_argument(
        "--group-size",
        type=int,
        default=DEFAULT_GROUP_SIZE,
        help="most SAEs at one hook evaluated together (they share the clean and ablation passes)",
    )
    p.add_argument("--out", default=None, help="folder for the summary and plots (default: RUN_DIR)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        saes = find_saes(args.run_dir)
        settings = [run_settings(p, args) for p in saes]
        if args.group_size < 1:
            raise ValueError(f"--group-size must be >= 1 (got {args.group_size})")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    try:
        rows = run(args, saes, settings)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 1
    print(
        f"evaluated {len(rows)} SAE(s); summary in {Path(args.out or _out_dir(args.run_dir)) / 'eval_summary.md'}"
    )
    return 0


def _display_names(paths: list[Path]) -> list[str]:
    """Names for tables and legends: each SAE's path below the deepest folder common to all of them
    (a single SAE: its folder or file name)."""
    parents = [p.parent for p in paths]
    common = Path(os.path.commonpath(parents)) if len(paths) > 1 else parents[0]
    return [
        p.relative_to(common).with_suffix("").as_posix() if p.is_file() else p.relative_to(common).as_posix()
        for p in paths
    ]


def _out_dir(run_dir) -> Path:
    p = Path(run_dir)
    return p.parent if p.is_file() else p


def eval_groups(settings: list[dict], max_group: int) -> list[list[int]]:
    """Indices of the SAEs that can share their evaluation passes: same model, layer, site, validation
    split (dataset, seed, validation_fraction), ctx_len and exclude_first_k; groups of at most
    max_group SAEs (bounds the SAEs held in memory), ordered by model so each model loads once."""
    keys = ("model", "layer", "site", "dataset", "seed", "validation_fraction", "ctx_len", "exclude_first_k",
            "prepend_bos", "max_norm_multiple")  # fmt: skip
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(settings):
        groups.setdefault(tuple(str(s[k]) for k in keys), []).append(i)
    ordered = sorted(groups.items(), key=lambda kv: kv[0][0])  # stable: by model, then first seen
    return [idx[j : j + max_group] for _, idx in ordered for j in range(0, len(idx), max_group)]


def run(args, saes: list[Path], settings: list[dict]) -> list[dict]:
    """Evaluate every SAE and write all reports. Each model and validation split is loaded once, and
    the SAEs sharing model, hook and data (`eval_groups`) are evaluated together by `evaluate_many`."""
    from tqdm.auto import tqdm

    from dataset import load_texts

    from .utils import load_language_model

    names = _display_names(saes)
    models, texts, rows, logs = {}, {}, {}, {}
    max_group = getattr(args, "group_size", None) or DEFAULT_GROUP_SIZE  # args built by hand may lack it
    for group in tqdm(eval_groups(settings, max_group), desc="SAE groups", disable=args.no_progress):
        s = settings[group[0]]
        if s["model"] not in models:
            models.clear()  # one language model in memory at a time
            models[s["model"]] = load_language_model(s["model"], device=args.device, dtype=args.dtype)
        data_key = (s["dataset"], s["seed"], s["validation_fraction"])
        if data_key not in texts:  # held-out text to score; the train split for the reference tokens
            texts[data_key] = [
                load_texts(s["dataset"], split=split, seed=s["seed"], validation_fraction=s["validation_fraction"])
                for split in ("validation", "train")
            ]  # fmt: skip
        results = evaluate_many(
            [load_sae(str(saes[i]), device=args.device) for i in group],
            models[s["model"]],
            s["layer"],
            s["site"],
            texts[data_key][0],
            mean_texts=texts[data_key][1],
            n_tokens=args.n_tokens,
            lm_batch_size=args.lm_batch_size,
            ctx_len=s["ctx_len"],
            device=args.device,
            exclude_first_k=s["exclude_first_k"],
            prepend_bos=s["prepend_bos"],
            max_norm_multiple=s["max_norm_multiple"],
            n_ref_tokens=args.n_ref_tokens,
            progress=not args.no_progress,
            return_counts=True,
        )
        for i, (metrics, counts) in zip(group, results):
            path, name = saes[i], names[i]
            folder = path.parent if path.is_file() else path
            eval_block = {
                **settings[i],
                "sae": str(path),
                "split": "validation",
                "reference_split": "train",
                "n_tokens_requested": args.n_tokens,
                "lm_batch_size": args.lm_batch_size,
                "lm_dtype": args.dtype,
                "versions": package_versions(),
                "git_commit": git_commit(),
            }
            write_json(folder / RESULTS_FILE, {**metrics, "eval": eval_block})
            save_sparsity(folder / SPARSITY_FILE, counts, metrics["n_tokens"])
            density = log_feature_density(counts, metrics["n_tokens"])
            plot_density(density, folder / "feature_density.png", name)
            rows[i] = {"trainer": name, **metrics, "massive_share": metrics["massive_tokens"]["share_dropped"],
                       "fve_all_tokens": metrics["all_tokens"]["frac_variance_explained"]}  # fmt: skip
            if (folder / "training_log.jsonl").exists():
                logs[name] = read_jsonl(folder / "training_log.jsonl")
    rows = [rows[i] for i in sorted(rows)]  # the order of `saes`
    logs = {names[i]: logs[names[i]] for i in range(len(saes)) if names[i] in logs}
    out = Path(args.out) if args.out else _out_dir(args.run_dir)
    write_summary(rows, out)
    plot_frontiers(rows, out)
    plot_training_curves(logs, out / "training_curves.png")
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
