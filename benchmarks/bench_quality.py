"""SAE quality on real text: the yardstick for every change to training.

    python benchmarks/bench_quality.py --json        # prints ONE JSON object

Trains the default sweep (demo.py's default preset: embedded SmolLM2-135M, layer 15, 4608 latents,
target L0 20/40/80) on 800 real PubMedQA abstracts (`../shared/data/pubmedqa/ori_pqal_800.json`,
beside the repo, never copied into it): the first 600 records are the train split, the last 200 the
held-out split. Then the standard evaluation (eval_report) on the held-out split, and prints the
frontier: per SAE the target and measured L0, both FVE definitions, delta_loss, loss recovered against
zero and mean ablation, KL, each with its 95% bootstrap interval; the share of massive-activation
tokens; the wall time of each stage. A change that claims better SAEs shows it here, at matched L0.
Exit code 0 with {"skipped": reason} where the PubMedQA file is absent.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PUBMEDQA = REPO.parent / "shared" / "data" / "pubmedqa" / "ori_pqal_800.json"
N_TRAIN = 600
METRICS = ("frac_variance_explained", "frac_variance_explained_centred", "delta_loss", "frac_recovered",
           "frac_recovered_mean", "kl_div")  # fmt: skip


def _list(v) -> list[str]:
    """PubMedQA stores CONTEXTS as a list (or its repr)."""
    if isinstance(v, str):
        try:
            v = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            return [v]
    return [str(x) for x in v]


def pubmedqa_texts(path: Path) -> list[str]:
    """One text per record, in file order: question, abstract paragraphs, long answer and decision."""
    records = json.loads(path.read_text())
    texts = []
    for key, r in records.items():
        try:
            parts = [f"Question: {r['QUESTION']}", "Context:", *_list(r["CONTEXTS"]),
                     f"Answer: {r['LONG_ANSWER']} ({r['final_decision']})"]  # fmt: skip
        except KeyError as e:
            raise SystemExit(f"{path}: record {key}: no field {e}") from None
        texts.append("\n".join(parts))
    return texts


def write_split_folder(texts: list[str], out: Path) -> Path:
    """A dataset folder (as `dataset.py --out` writes) with train = the first N_TRAIN texts and
    validation = the rest, so load_texts uses exactly these splits. An existing one is reused (same
    texts; its harvested activation cache beside it is then reused too)."""
    import datasets

    if (out / "dataset_dict.json").exists():
        return out
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": texts[:N_TRAIN]}),
            "validation": datasets.Dataset.from_dict({"text": texts[N_TRAIN:]}),
        }
    )
    dd.save_to_disk(str(out))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object (default: also a table)")
    p.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens scored per SAE")
    p.add_argument("--save-dir", default=None, help="keep the runs here (default: a temporary folder)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="passed on to demo.py")
    args = p.parse_args(argv)
    if not PUBMEDQA.is_file():
        print(
            json.dumps({"skipped": f"{PUBMEDQA} not found (the shared PubMedQA records sit beside the repo)"})
        )
        return 0

    import torch

    from dictionary_learning import demo

    torch.manual_seed(0)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="bench_quality.") as tmp:
        root = Path(args.save_dir or tmp)
        data = write_split_folder(pubmedqa_texts(PUBMEDQA), root / "pubmedqa_600_200")
        argv = ["--dataset", str(data), "--save-dir", str(root / "runs"), "--eval-tokens", str(args.eval_tokens),
                "--device", "cpu", "--quiet", "--overwrite", "--no-features",
                *(f"--set={s}" for s in args.set)]  # fmt: skip
        cfg = demo.build_config(demo.parse_args(argv))
        with contextlib.redirect_stdout(sys.stderr):  # stdout is for the one JSON object
            rows = demo.run(cfg, demo.parse_args(argv))
        out_dir = Path(rows[0]["folder"]).parent
        timings = json.loads((out_dir / "timings.json").read_text())
        manifest = out_dir / "activation_cache" / "manifest.json"
        harvest = json.loads(manifest.read_text()) if manifest.exists() else {}
        frontier = []
        for r in rows:
            trainer = json.loads((Path(r["folder"]) / "config.json").read_text())["trainer"]
            frontier.append(
                {
                    "sae": Path(r["folder"]).name,
                    "target_l0": trainer.get("target_l0"),
                    "l0": r["l0"],
                    **{k: r[k] for k in METRICS},
                    **{k + "_ci": r[k + "_ci"] for k in METRICS},
                    "frac_alive": r["frac_alive"],
                    "n_tokens": r["n_tokens"],
                    "all_tokens": r["all_tokens"],
                }
            )
    result = {
        "benchmark": "bench_quality",
        "data": f"{PUBMEDQA.name}: records 0-{N_TRAIN - 1} train, {N_TRAIN}-799 held out",
        "preset": cfg.model,
        "layer": cfg.layer,
        "widths": cfg.widths,
        "tokens_per_trainer": cfg.tokens,
        "train_tokens_harvested": harvest.get("n_tokens"),
        "frontier": frontier,
        "massive_tokens": {
            "training": harvest.get("massive_tokens"),
            "held_out": rows[0]["massive_tokens"],
        },
        "loss_original": rows[0]["loss_original"],
        "stages_s": {**timings, "benchmark_total_s": time.time() - t0},
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
