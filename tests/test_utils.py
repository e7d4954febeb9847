"""Foundation: the embedded model loads offline through nnsight and matches plain transformers."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dictionary_learning import utils


def test_atomic_path_keeps_old_file_on_error(tmp_path):
    target = tmp_path / "a.json"
    utils.write_json(target, {"x": 1})
    with pytest.raises(RuntimeError):
        with utils.atomic_path(target) as tmp:
            tmp.write_text("half written")
            raise RuntimeError("boom")
    assert utils.read_json(target) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_read_json_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        utils.read_json(bad)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        utils.read_json(tmp_path / "missing.json")


def test_parse_dtype():
    assert utils.parse_dtype("bf16") is torch.bfloat16
    assert utils.parse_dtype("torch.float32") is torch.float32
    with pytest.raises(ValueError, match="float8"):
        utils.parse_dtype("float8")


def test_resolve_model_passes_hub_ids_and_folders(tmp_path):
    assert utils.resolve_model("google/gemma-2-2b") == "google/gemma-2-2b"
    assert utils.resolve_model(str(tmp_path)) == str(tmp_path)


def test_embedded_model_is_prepared_offline():
    path = utils.prepare_embedded_model()
    assert (path / "model.safetensors").exists()
    assert (path / "tokenizer.json").exists()
    assert utils.resolve_model("smollm2-135m") == str(path)


@pytest.mark.slow
def test_nnsight_layer_output_equals_output_hidden_states(embedded_model):
    """A layer's output captured in an nnsight trace equals transformers' hidden state."""
    tok = embedded_model.tokenizer
    ids = tok(["The patient presented with chest pain and dyspnea."], return_tensors="pt").input_ids
    layer = 7
    with torch.inference_mode():
        with embedded_model.trace(ids):
            captured = embedded_model.model.layers[layer].output.save()
        reference = embedded_model._module(ids, output_hidden_states=True).hidden_states[layer + 1]
    assert captured.shape == reference.shape == (1, ids.shape[1], 576)
    torch.testing.assert_close(captured, reference, atol=1e-5, rtol=0)


def test_load_unknown_model_offline_fails_fast(tmp_path):
    """With the Hub offline, an unknown Hub id fails quickly with a clear message."""
    code = "from dictionary_learning.utils import load_language_model; load_language_model('no-such/model', 'cpu')"
    env = dict(os.environ, HF_HUB_OFFLINE="1", SAE_FACTORY_CACHE=str(tmp_path))
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert r.returncode != 0
    assert "no-such/model" in r.stderr


def test_local_model_paths_that_do_not_exist_are_named(tmp_path):
    """Issue 16, defect 17: a path is not looked up as a Hub repo id ('Repo id must be in the form...')."""
    for name in ("/nonexistent/model", "./missing", "~/no/such/model", "a/b/c"):
        with pytest.raises(FileNotFoundError, match="no such model folder"):
            utils.resolve_model(name)
    assert utils.resolve_model("org/name") == "org/name"


def test_check_device(monkeypatch):
    """Issue 16, defect 10: GPUs that torch cannot see are refused in one line."""
    assert utils.check_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        utils.check_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no GPU is visible"):
        utils.check_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert utils.check_device("cuda:1") == "cuda:1"
    with pytest.raises(ValueError, match=r"only 2 GPU\(s\) visible"):
        utils.check_device("cuda:2")
