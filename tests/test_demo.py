"""demo.py end to end on a tiny configuration, plus its plan and its one-line failures."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "dictionary_learning" / "demo.py"


def run_demo(*args, cwd=None, timeout=900):
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true")
    return subprocess.run(
        [sys.executable, str(DEMO), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd or REPO,
        timeout=timeout,
    )


def test_plan_for_gemma_needs_no_gpu_or_hub():
    r = run_demo("--preset", "gemma-2-2b", "--plan", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["d_model"] == 2304 and plan["layer"] == 20
    assert plan["steps"] == 23925 and plan["batch_size"] == 2048
    assert len(plan["trainers"]) == 6 and all("w16384" in t for t in plan["trainers"])
    assert plan["output_folder"].endswith("google__gemma-2-2b/resid_post_layer20")


@pytest.mark.parametrize(
    "args, words",
    [
        (["--preset", "nope"], ["unknown preset 'nope'"]),
        (["--set", "bogus=1"], ["unknown field 'bogus'"]),
        (["--layer", "30", "--plan"], ["--layer 30", "0..29"]),
        (["--tokens", "10", "--plan"], ["--tokens 10"]),
        (["--dataset", "no/such-dataset", "--tokens", "2048"], ["no/such-dataset"]),
        (["--push-to-hub", "me/saes", "--tokens", "2048"], ["--push-to-hub me/saes", "offline"]),
    ],
)
def test_bad_settings_fail_with_one_line(args, words, tmp_path):
    r = run_demo(*args, "--save-dir", str(tmp_path), timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("demo.py: error")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0]


@pytest.mark.slow
def test_demo_end_to_end_tiny(tmp_path):
    args = [
        "--layer",
        "3",
        "--ctx-len",
        "64",
        "--tokens",
        "49152",
        "--batch-size",
        "512",
        "--widths",
        "1152",
        "--target-l0s",
        "16,48",
        "--eval-tokens",
        "1024",
        "--save-dir",
        str(tmp_path),
        "--set",
        "warmup_steps=5",
        "--set",
        "sparsity_warmup_steps=30",
        "--set",
        "buffer_tokens=8192",
        "--quiet",
    ]
    r = run_demo(*args)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    layer_dir = tmp_path / "smollm2-135m" / "resid_post_layer3"
    trainers = sorted(p for p in layer_dir.iterdir() if p.name.startswith("jumprelu_"))
    assert [p.name for p in trainers] == [
        "jumprelu_w1152_tl0-16_lr0.001_s0",
        "jumprelu_w1152_tl0-48_lr0.001_s0",
    ]
    for folder in trainers:
        for f in (
            "sae_weights.safetensors",
            "config.json",
            "cfg.json",
            "training_log.jsonl",
            "eval_results.json",
            "sparsity.safetensors",
        ):
            assert (folder / f).exists(), folder / f
        res = json.loads((folder / "eval_results.json").read_text())
        assert 1 <= res["l0"] < 1152 / 4  # non-degenerate: far below the width
        assert res["frac_variance_explained"] > 0.3
        assert res["frac_recovered_mean"] > 0.5
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["norm_factor"] > 0 and cfg["run_meta"]["dataset"] == "sample"
    for f in ("eval_summary.csv", "eval_summary.md", "frontier_fve.png", "training_curves.png"):
        assert (layer_dir / f).exists(), f
    assert (layer_dir / "activation_cache" / "manifest.json").exists()
    assert "jumprelu_w1152_tl0-16_lr0.001_s0" in r.stdout  # the summary table

    # a second run must not overwrite the finished folders
    before = (trainers[0] / "sae_weights.safetensors").read_bytes()
    r2 = run_demo(*args)
    assert r2.returncode == 2 and "overwrite" in r2.stderr
    assert (trainers[0] / "sae_weights.safetensors").read_bytes() == before

    # a cache harvested with other settings is never silently reused
    r4 = run_demo(*[a if a != "64" else "32" for a in args])
    assert r4.returncode == 2 and "other settings" in r4.stderr, r4.stderr[-2000:]

    # --from-cache refuses a cache harvested at another layer
    cache = layer_dir / "activation_cache"
    r5 = run_demo(
        "--from-cache", str(cache), "--layer", "4", "--tokens", "2048", "--save-dir", str(tmp_path / "b")
    )
    assert r5.returncode == 2 and "harvested with" in r5.stderr and "'layer': 3" in r5.stderr, r5.stderr[
        -2000:
    ]

    # --eval-only re-evaluates the existing run
    r3 = run_demo("--eval-only", str(layer_dir), "--eval-tokens", "256", "--quiet")
    assert r3.returncode == 0, r3.stderr[-2000:]
