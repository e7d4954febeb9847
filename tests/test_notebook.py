"""train_sae.ipynb runs end to end (nbmake) on a small activation cache built here from the embedded model."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_notebook_runs_on_a_small_cache(tmp_path, embedded_model):
    from dataset import load_texts
    from dictionary_learning.buffer import ActivationBuffer
    from dictionary_learning.cache import write_cache

    texts = load_texts("sample", split="train")
    buf = ActivationBuffer(
        texts, embedded_model, layer=2, ctx_len=64, n_ctxs=64, lm_batch_size=16, batch_size=1024
    )
    cache = tmp_path / "cache"
    meta = {
        "model": "smollm2-135m",
        "layer": 2,
        "site": "resid_post",
        "dataset": "sample",
        "data_seed": 0,
        "validation_fraction": 0.1,
    }
    manifest = write_cache(buf, cache, n_tokens=6144, meta=meta)
    assert manifest["n_tokens"] == 6144
    env = dict(
        os.environ,
        SAE_NOTEBOOK_CACHE=str(cache),
        SAE_NOTEBOOK_STEPS="60",
        SAE_NOTEBOOK_EVAL_TOKENS="256",
        SAE_NOTEBOOK_OUT=str(tmp_path / "sae"),
        HF_HUB_OFFLINE="1",
    )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--nbmake",
            "--nbmake-timeout=600",
            str(REPO / "train_sae.ipynb"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert (tmp_path / "sae" / "sae_weights.safetensors").exists()
