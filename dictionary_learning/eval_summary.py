"""The evaluation's reports across SAEs: the SAEs of a run folder (find_saes), the sweep summary
(eval_summary.csv and .md), the frontier plots, the training curves and each SAE's firing-density
histogram (eval_report.py writes them)."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

from .runs import FAILED_FILE, SAE_FILES, STATUS_FILE
from .utils import atomic_path, read_json

log = logging.getLogger(__name__)

SUMMARY_COLUMNS = (
    "trainer",
    "dict_size",
    "l0",
    "frac_variance_explained",
    "frac_variance_explained_centred",
    "delta_loss",
    "frac_recovered_mean",
    "frac_recovered",
    "kl_div",
    "mse",
    "cossim",
    "frac_alive",
    "loss_original",
    "loss_reconstructed",
    "n_tokens",
    "massive_share",
    "fve_all_tokens",
)
"""eval_summary columns; the .md shows each metric that has one with its 95% interval, the .csv adds
`<metric>_lo` and `<metric>_hi` columns. massive_share: share of the real held-out tokens dropped as
massive; fve_all_tokens: the standard FVE with them included."""
COLUMN_TITLES = {
    "frac_variance_explained": "FVE (standard)",
    "frac_variance_explained_centred": "FVE (centred)",
    "delta_loss": "delta loss (nats)",
    "frac_recovered_mean": "loss rec. (mean abl.)",
    "frac_recovered": "loss rec. (zero abl.)",
    "frac_alive": "frac_alive (over n_tokens)",
}
CURVE_KEYS = ("loss", "mse", "l0", "fve", "val_fve", "dead", "lr")


def find_saes(run_dir: str | os.PathLike, finished: bool = False) -> list[Path]:
    """SAE locations at or under run_dir, sorted: folders with sae_weights.safetensors plus config.json
    or cfg.json (checkpoints/ skipped), or run_dir itself when it is a params.npz file. finished: only
    trainer folders whose run is done (not failed, not unfinished), each with all of SAE_FILES."""
    run_dir = Path(run_dir)
    if run_dir.is_file() and run_dir.suffix == ".npz" and not finished:
        return [run_dir]
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such folder" + ("" if finished else " (or .npz file)"))
    found = []
    for w in sorted(run_dir.rglob(SAE_FILES[0])):
        d = w.parent
        if "checkpoints" in d.relative_to(run_dir).parts:
            continue
        if not finished:
            if (d / "config.json").exists() or (d / "cfg.json").exists():
                found.append(d)
            continue
        status = read_json(d / STATUS_FILE).get("status") if (d / STATUS_FILE).exists() else "done"
        if (d / FAILED_FILE).exists() or status != "done":
            log.warning("%s: skipped (status %s)", d, "failed" if (d / FAILED_FILE).exists() else status)
            continue
        missing = [f for f in SAE_FILES if not (d / f).exists()]
        if missing:
            raise FileNotFoundError(f"{d}: incomplete SAE folder, missing {missing}")
        found.append(d)
    if not found:
        what = "finished trainer folder" if finished else "SAE found (no folder"
        raise FileNotFoundError(f"{run_dir}: no {what} with sae_weights.safetensors + config.json"
                                + ("" if finished else ")"))  # fmt: skip
    return sorted(found)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_fig(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)


def plot_density(log_density, path: Path, title: str = "") -> None:
    """Histogram of log10 firing density per latent [m] (dead latents sit at the floor)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(log_density.numpy(), bins=50)
    ax.set(xlabel="log10 firing density", ylabel="latents", title=title)
    _save_fig(fig, path)


def plot_frontiers(rows: list[dict], out_dir: Path) -> list[Path]:
    """L0 vs FVE (both definitions, named) and L0 vs loss recovered (zero and mean ablation), one
    series per dict_size, with the 95% bootstrap intervals as error bars; returns the PNG paths."""
    plt = _plt()
    paths = []
    panels = (
        ("frontier_fve.png", "fraction of variance explained",
         [("frac_variance_explained", "FVE (standard)"), ("frac_variance_explained_centred", "FVE (centred)")]),
        ("frontier_loss_recovered.png", "fraction of loss recovered",
         [("frac_recovered", "vs zero ablation"), ("frac_recovered_mean", "vs mean ablation")]),
    )  # fmt: skip
    for name, ylabel, series in panels:
        fig, ax = plt.subplots(figsize=(5, 3.5), layout="constrained")
        for width in sorted({r["dict_size"] for r in rows}):
            pts = sorted(((r["l0"], r) for r in rows if r["dict_size"] == width), key=lambda p: p[0])
            for key, label in series:
                pts_k = [(x, r) for x, r in pts if r.get(key) is not None]
                if not pts_k:
                    continue
                xs, ys = [x for x, _ in pts_k], [r[key] for _, r in pts_k]
                cis = [r.get(key + "_ci") or [r[key], r[key]] for _, r in pts_k]
                err = [[y - (lo if lo is not None else y) for y, (lo, _) in zip(ys, cis)],
                       [(hi if hi is not None else y) - y for y, (_, hi) in zip(ys, cis)]]  # fmt: skip
                ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=f"w={width} {label}")
        l0s = [r["l0"] for r in rows if r["l0"] > 0]
        if l0s and max(l0s) > 5 * min(l0s):
            ax.set_xscale("log")
        ax.set(xlabel="L0", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        paths.append(out_dir / name)
        _save_fig(fig, paths[-1])
    return paths


def plot_training_curves(logs: dict[str, list[dict]], path: Path) -> Path | None:
    """One panel per logged quantity (loss, mse, l0, fve, dead, lr) against step, a line per trainer."""
    keys = [k for k in CURVE_KEYS if any(k in r for rs in logs.values() for r in rs)]
    if not keys:
        return None
    plt = _plt()
    ncol = min(3, len(keys))
    nrow = -(-len(keys) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3 * nrow), squeeze=False, layout="constrained")
    for ax, key in zip(axes.flat, keys):
        for name, recs in logs.items():
            pts = [(r["step"], r[key]) for r in recs if key in r and "step" in r and r[key] is not None]
            if pts:
                ax.plot(*zip(*pts), label=name.lstrip("_") or name)  # "_x" labels are hidden
        ax.set(xlabel="step", title=key)
        if key in ("loss", "mse"):
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    _save_fig(fig, path)
    return path


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return "" if v is None else str(v)


def write_summary(rows: list[dict], out_dir: Path) -> tuple[Path, Path]:
    """eval_summary.csv (full precision, intervals as _lo/_hi columns) and eval_summary.md (a markdown
    table: metric [95% interval], the FVE definitions named, the held-out token count) in out_dir."""
    csv_path, md_path = out_dir / "eval_summary.csv", out_dir / "eval_summary.md"
    ci = [c for c in SUMMARY_COLUMNS if any(r.get(c + "_ci") for r in rows)]
    fields = [*SUMMARY_COLUMNS, *(f"{c}_{e}" for c in ci for e in ("lo", "hi"))]
    flat = [{**r, **{f"{c}_{e}": (r.get(c + "_ci") or [None, None])[j] for c in ci for j, e in enumerate(("lo", "hi"))}}
            for r in rows]  # fmt: skip
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(flat)

    def cell(r, c):
        lo_hi = r.get(c + "_ci")
        return _fmt(r.get(c)) + (
            f" [{_fmt(lo_hi[0])}, {_fmt(lo_hi[1])}]" if lo_hi and None not in lo_hi else ""
        )

    titles = [COLUMN_TITLES.get(c, c) for c in SUMMARY_COLUMNS]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(SUMMARY_COLUMNS)]
    lines += ["| " + " | ".join(cell(r, c) for c in SUMMARY_COLUMNS) + " |" for r in rows]
    lines += ["", "FVE (standard) = 1 − Σ‖x − x̂‖² / Σ‖x − mean x‖² (SAELens, SAEBench); FVE (centred) = "
              "1 − Σ_d Var(x − x̂) / Σ_d Var(x) (dictionary_learning). [95% bootstrap interval over context "
              "windows.] Headline metrics exclude massive-activation tokens (massive_share of the real held-out "
              "tokens); fve_all_tokens includes them."]  # fmt: skip
    with atomic_path(md_path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return csv_path, md_path
