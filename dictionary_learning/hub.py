"""Push finished run folders to the Hugging Face Hub, one subfolder per trainer, with a model card.

    python -m dictionary_learning.hub RUN_DIR REPO_ID [--private] [--checkpoints]

RUN_DIR is one trainer folder or any folder above several (a layer folder, a whole save_dir). Each
finished trainer folder uploads its final SAE (sae_weights.safetensors, config.json, cfg.json),
eval_results.json when present and training_log.jsonl into `{path relative to RUN_DIR}/` of the repo
(a trainer folder given alone goes to `{its name}/`). The full-state checkpoints stay local; with
`checkpoints=True` (--checkpoints; demo.py --push-checkpoints) the log-spaced SAE snapshots
`checkpoints/step_*/` go too, with the same SAE files. The model card
README.md is built in memory: nothing is written into the run folders. The token comes from the
`token` argument, else HF_TOKEN or `hf auth login` (huggingface_hub.get_token()); never from code.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path

from .eval_summary import find_saes
from .runs import SAE_FILES
from .utils import EMBEDDED_ALIASES, read_json

log = logging.getLogger(__name__)

EXTRA_FILES = ("eval_results.json", "training_log.jsonl", "sparsity.safetensors")
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


class HubPushError(RuntimeError):
    """A push to the Hub failed; local files are untouched."""


def hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return bool(constants.HF_HUB_OFFLINE) or env


def check_push(repo_id: str, token: str | None = None) -> str:
    """What can be checked of a push before any training: the repo id's form, that the Hub is not
    offline, that there is a token. Returns the token; HubPushError (one line) otherwise."""
    import huggingface_hub
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise HubPushError(f"{repo_id!r} is not a valid Hub repo id, e.g. user/name ({first})") from None
    if hub_offline():
        raise HubPushError("the Hub is offline (HF_HUB_OFFLINE=1); unset it and retry")
    token = token or os.environ.get("HF_TOKEN") or huggingface_hub.get_token()
    if not token:
        raise HubPushError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    return token


def snapshot_dirs(trainer_dir: Path) -> list[Path]:
    """The SAE snapshots `checkpoints/step_XXXXXXXX/` of a trainer folder that hold an SAE, in step order."""
    snaps = (trainer_dir / "checkpoints").glob("step_*")
    return sorted(p for p in snaps if re.fullmatch(r"step_\d+", p.name) and (p / SAE_FILES[0]).is_file())


def _base_model(name) -> str | None:
    """A Hub model id for the card's `base_model`, or None for local folders."""
    if name in EMBEDDED_ALIASES:
        return EMBEDDED_HUB_ID
    if isinstance(name, str) and name.count("/") == 1 and not os.path.exists(name):
        return name
    return None


def _summary(d: Path, path_in_repo: str) -> dict:
    """One model-card table row: from config.json, eval_results.json, and the last log line."""
    cfg = read_json(d / "config.json")
    ev = read_json(d / "eval_results.json") if (d / "eval_results.json").exists() else {}
    ev = ev.get("metrics", ev) if isinstance(ev, dict) else {}
    last = {}
    if (d / "training_log.jsonl").exists():
        for ln in reversed((d / "training_log.jsonl").read_text().splitlines()):
            try:  # the last complete line (a kill can cut the final one)
                last = json.loads(ln)
                break
            except json.JSONDecodeError:
                continue

    def metric(ev_key, log_key):
        if ev.get(ev_key) is not None:
            return f"{ev[ev_key]:.4g}"
        return f"{last[log_key]:.4g} (train)" if last.get(log_key) is not None else "–"

    return {
        "path": path_in_repo,
        "model": cfg.get("model_name") or cfg.get("model") or "?",
        "layer": cfg.get("layer", cfg.get("hook_layer", "?")),
        "hook": cfg.get("hook_name") or cfg.get("site") or "?",
        "dataset": cfg.get("dataset_path") or cfg.get("dataset") or "?",
        "width": cfg.get("dict_size", "?"),
        "l0": metric("l0", "l0"),
        "fve": metric("frac_variance_explained", "fve"),
        **{k: f"{ev[k]:.4g}" if ev.get(k) is not None else "–"
           for k in ("delta_loss", "frac_recovered_mean", "frac_recovered")},
    }  # fmt: skip


def model_card(repo_id: str, rows: list[dict], snapshots: bool = False) -> str:
    """README.md text: YAML metadata, a table of the SAEs, and how to load them."""
    bases = sorted({b for r in rows if (b := _base_model(r["model"]))})
    datasets = sorted({r["dataset"] for r in rows if _base_model(r["dataset"])})
    yaml = ["---", "library_name: saelens", "tags:"]
    yaml += [
        f"- {t}" for t in ("sparse-autoencoder", "jumprelu", "sae-lens", "interpretability", "sae-factory")
    ]
    if bases:
        yaml += ["base_model:"] + [f"- {b}" for b in bases]
    if datasets:
        yaml += ["datasets:"] + [f"- {x}" for x in datasets]
    yaml.append("---")
    table = [
        "| SAE (subfolder) | model | layer | hook | dataset | width | L0 | FVE (standard) | delta loss (nats) "
        "| loss recovered (mean abl.) | loss recovered (zero abl.) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ] + [
        f"| `{r['path']}` | {r['model']} | {r['layer']} | {r['hook']} | {r['dataset']} | {r['width']} "
        f"| {r['l0']} | {r['fve']} | {r['delta_loss']} | {r['frac_recovered_mean']} | {r['frac_recovered']} |"
        for r in rows
    ]
    ex = rows[0]["path"]
    snapshot_note = (
        "\n\nSnapshots taken during training, on a log-spaced schedule, are in "
        "`<SAE subfolder>/checkpoints/step_XXXXXXXX/` (the same files: the SAE at that step)."
    )
    body = f"""
# JumpReLU sparse autoencoders

JumpReLU SAEs (Rajamanoharan et al. 2024, arXiv 2407.14435) trained with SAE Factory. Each subfolder
holds one SAE: `sae_weights.safetensors` (W_enc [d, m], W_dec [m, d], b_enc, b_dec, threshold; the
activation normalisation factor is folded in, so the SAE takes raw activations), `config.json`
(the full training config), `cfg.json` (SAELens), and the training log. The figures are on held-out
text, from `eval_results.json` (which also holds their 95% bootstrap intervals and how they were taken);
without it, L0 and FVE come from the last training log step (marked "train"). FVE (standard) is
1 - sum ||x - x_hat||^2 / sum ||x - mean x||^2 (SAELens, SAEBench); delta loss the increase in next-token
loss with the SAE spliced in; loss recovered (L_abl - L_sae) / (L_abl - L_clean) against mean and zero
ablation.{snapshot_note if snapshots else ""}

{chr(10).join(table)}

## Load with SAE Factory

```python
from huggingface_hub import snapshot_download
from dictionary_learning.dictionary import JumpReluAutoEncoder

local = snapshot_download("{repo_id}", allow_patterns=["{ex}/*"])
sae = JumpReluAutoEncoder.from_pretrained(f"{{local}}/{ex}")
x_hat = sae(x)  # x: [batch, d] activations at the hook
```

## Load with SAELens

```python
from sae_lens import SAE

sae = SAE.load_from_disk(f"{{local}}/{ex}")   # the folder downloaded above
# or straight from the Hub (SAELens >= 6): SAE.from_pretrained("{repo_id}", "{ex}")
```
"""
    return "\n".join(yaml) + "\n" + body


def push_to_hub(
    run_dir: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    checkpoints: bool = False,
) -> str:
    """Upload every finished trainer folder under `run_dir` to model repo `repo_id` in one commit
    (with checkpoints=True, their SAE snapshots `checkpoints/step_*/` too).

    Creates the repo if needed. Returns the commit URL. Any failure -> HubPushError (one line);
    nothing local is written or changed."""
    try:
        token = check_push(repo_id, token)
    except HubPushError as e:
        raise HubPushError(f"cannot push to {repo_id}: {e}") from None
    from huggingface_hub import CommitOperationAdd, HfApi

    run_dir = Path(run_dir)
    try:
        dirs = find_saes(run_dir, finished=True)
    except FileNotFoundError as e:
        raise HubPushError(str(e)) from None
    ops, rows = [], []
    for d in dirs:
        rel = d.name if d == run_dir else d.relative_to(run_dir).as_posix()
        rows.append(_summary(d, rel))
        for f in SAE_FILES + EXTRA_FILES:
            if (d / f).exists():
                ops.append(CommitOperationAdd(path_in_repo=f"{rel}/{f}", path_or_fileobj=str(d / f)))
        for snap in snapshot_dirs(d) if checkpoints else ():
            for f in SAE_FILES:
                if (snap / f).exists():
                    path = f"{rel}/checkpoints/{snap.name}/{f}"
                    ops.append(CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(snap / f)))
    card = model_card(repo_id, rows, snapshots=checkpoints)
    ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.create_commit(
            repo_id, operations=ops, commit_message=f"Upload {len(dirs)} JumpReLU SAE(s)", repo_type="model"
        )
    except Exception as e:  # HTTP errors, connection errors, bad metadata...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise HubPushError(f"push to {repo_id} failed: {type(e).__name__}: {first}") from None
    log.info("pushed %d SAE folder(s) to %s", len(dirs), info.commit_url)
    return str(info.commit_url)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dictionary_learning.hub", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="a trainer folder or a folder above several")
    p.add_argument("repo_id", help="Hub model repo, e.g. user/smollm2-135m-saes")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument(
        "--checkpoints", action="store_true", help="also push the SAE snapshots checkpoints/step_*/"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        url = push_to_hub(args.run_dir, args.repo_id, private=args.private, checkpoints=args.checkpoints)
    except (HubPushError, ValueError, OSError) as e:  # ValueError: a malformed JSON file, named
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
