"""JumpReluAutoEncoder: forward formula, init, and its three file formats."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dictionary_learning.dictionary import JumpReluAutoEncoder

D, M = 8, 12
# SAELens 6.x SAEMetadata fields: cfg.json's metadata must use only these (SAEMetadata(**metadata)).
SAELENS_METADATA_FIELDS = {
    "model_name", "hook_name", "model_class_name", "hook_layer", "hook_head_index",
    "model_from_pretrained_kwargs", "prepend_bos", "exclude_special_tokens", "neuronpedia_id",
    "context_size", "seqpos_slice", "dataset_path", "sae_lens_version", "sae_lens_training_version",
}  # fmt: skip


def random_ae(seed=0, d=D, m=M):
    """An SAE with every parameter non-trivial (non-zero biases, varied thresholds)."""
    g = torch.Generator().manual_seed(seed)
    ae = JumpReluAutoEncoder(d, m, generator=g)
    with torch.no_grad():
        ae.b_enc.copy_(torch.randn(m, generator=g) * 0.1)
        ae.b_dec.copy_(torch.randn(d, generator=g) * 0.1)
        ae.threshold.copy_(torch.rand(m, generator=g) * 0.3)
    return ae


def test_forward_matches_hand_computed():
    ae = JumpReluAutoEncoder(2, 3, init=False)
    with torch.no_grad():
        ae.W_enc.copy_(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]))
        ae.b_enc.copy_(torch.tensor([0.0, -0.5, 0.0]))
        ae.threshold.copy_(torch.tensor([0.2, 0.2, 1.0]))
        ae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]))
        ae.b_dec.copy_(torch.tensor([0.1, -0.1]))
    x = torch.tensor([[0.3, 0.6], [0.1, 2.0]])
    # pre = [[0.3, 0.1, 0.9], [0.1, 1.5, 2.1]]; θ = [0.2, 0.2, 1.0]
    f = ae.encode(x)
    assert f.flatten().tolist() == pytest.approx([0.3, 0.0, 0.0, 0.0, 1.5, 2.1])
    x_hat, f2 = ae(x, output_features=True)
    assert torch.equal(f, f2)
    # x̂ = f @ W_dec + b_dec
    assert x_hat.flatten().tolist() == pytest.approx([0.4, -0.1, 0.1 + 1.05, -0.1 + 1.5 + 1.05])
    assert torch.equal(ae(x), x_hat)


def test_init_recipe_and_seed():
    ae = JumpReluAutoEncoder(D, M, threshold_init=0.001, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(ae.W_dec.norm(dim=1), torch.ones(M), atol=1e-6)
    assert torch.equal(ae.W_enc, ae.W_dec.T)
    assert not ae.b_enc.any() and not ae.b_dec.any()
    assert torch.equal(ae.threshold, torch.full((M,), 0.001))
    same = JumpReluAutoEncoder(D, M, threshold_init=0.001, generator=torch.Generator().manual_seed(3))
    other = JumpReluAutoEncoder(D, M, threshold_init=0.001, generator=torch.Generator().manual_seed(4))
    assert torch.equal(ae.W_dec, same.W_dec)
    assert not torch.equal(ae.W_dec, other.W_dec)


def test_threshold_fp32_when_bf16():
    ae = JumpReluAutoEncoder(D, M, dtype="bfloat16")
    assert ae.W_enc.dtype == torch.bfloat16 and ae.threshold.dtype == torch.float32
    assert ae.encode(torch.randn(3, D)).dtype == torch.bfloat16


@pytest.mark.parametrize("d,m", [(0, 4), (4, 0), (4, -1), (4, 2.5)])
def test_bad_sizes(d, m):
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        JumpReluAutoEncoder(d, m)


def test_wrong_width():
    ae = JumpReluAutoEncoder(D, M)
    with pytest.raises(ValueError, match="last dim 5, expected 8"):
        ae.encode(torch.randn(2, 5))
    with pytest.raises(ValueError, match="last dim 5, expected 12"):
        ae.decode(torch.randn(2, 5))


def test_save_writes_one_weights_file_and_two_configs(tmp_path):
    ae = random_ae()
    cfg = {"model_name": "smollm2-135m", "hook_name": "blocks.3.hook_resid_post", "layer": 3,
           "ctx_len": 128, "dataset": "sample", "prepend_bos": False, "lr": 7e-5}  # fmt: skip
    ae.save(tmp_path, cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cfg.json",
        "config.json",
        "sae_weights.safetensors",
    ]
    with safe_open(str(tmp_path / "sae_weights.safetensors"), framework="pt") as fh:
        assert sorted(fh.keys()) == ["W_dec", "W_enc", "b_dec", "b_enc", "threshold"]
        assert fh.get_tensor("W_enc").shape == (D, M) and fh.get_tensor("W_dec").shape == (M, D)
    ours = json.loads((tmp_path / "config.json").read_text())
    assert ours["lr"] == 7e-5 and ours["architecture"] == "jumprelu"
    assert ours["activation_dim"] == D and ours["dict_size"] == M
    sl = json.loads((tmp_path / "cfg.json").read_text())
    assert sl["architecture"] == "jumprelu" and sl["d_in"] == D and sl["d_sae"] == M
    assert sl["dtype"] == "float32" and sl["device"] == "cpu"
    assert sl["apply_b_dec_to_input"] is False and sl["normalize_activations"] == "none"
    meta = sl["metadata"]
    assert set(meta) <= SAELENS_METADATA_FIELDS
    assert meta["model_name"] == "smollm2-135m" and meta["hook_name"] == "blocks.3.hook_resid_post"
    assert meta["hook_layer"] == 3 and meta["context_size"] == 128 and meta["dataset_path"] == "sample"
    assert meta["prepend_bos"] is False
    assert int(meta["sae_lens_version"].split(".")[0]) >= 6  # else SAELens treats it as a pre-6 config


def _assert_same_sae(a, b, x):
    for n in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
        assert torch.equal(getattr(a, n), getattr(b, n)), n
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("fmt", ["ours", "saelens", "npz_file", "npz_folder"])
def test_round_trips(tmp_path, fmt):
    ae = random_ae()
    x = torch.randn(16, D)
    if fmt in ("ours", "saelens"):
        ae.save(tmp_path, {"model_name": "m"})
        if fmt == "saelens":
            (tmp_path / "config.json").unlink()
        path = tmp_path
    else:
        out = ae.export_gemma_scope(tmp_path / "params.npz" if fmt == "npz_file" else tmp_path)
        assert out == tmp_path / "params.npz"
        with np.load(out) as z:
            assert sorted(z.files) == ["W_dec", "W_enc", "b_dec", "b_enc", "threshold"]
            assert z["W_enc"].shape == (D, M) and z["W_dec"].shape == (M, D)
        path = out if fmt == "npz_file" else tmp_path
    loaded = JumpReluAutoEncoder.from_pretrained(path)
    _assert_same_sae(ae, loaded, x)
    if fmt == "ours":
        assert loaded.cfg["model_name"] == "m"


def test_gemma_scope_lowercase_keys(tmp_path):
    ae = random_ae()
    arrays = {("w_" + n[2:] if n.startswith("W_") else n): t.numpy() for n, t in ae.weights().items()}
    np.savez(tmp_path / "params.npz", **arrays)
    _assert_same_sae(ae, JumpReluAutoEncoder.from_pretrained(tmp_path / "params.npz"), torch.randn(4, D))


def test_load_dtype_override(tmp_path):
    random_ae().save(tmp_path)
    ae = JumpReluAutoEncoder.from_pretrained(tmp_path, dtype="bfloat16")
    assert ae.W_enc.dtype == torch.bfloat16 and ae.threshold.dtype == torch.float32


def _corrupt(tmp_path, edit):
    random_ae().save(tmp_path)
    f = tmp_path / "sae_weights.safetensors"
    t = load_file(str(f))
    edit(t)
    save_file(t, str(f))
    return tmp_path


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda t: t.pop("threshold"), "tensor 'threshold' missing"),
        (lambda t: t.__setitem__("W_dec", torch.zeros(M, D + 1)), r"tensor 'W_dec' has shape \(12, 9\)"),
        (lambda t: t.__setitem__("b_enc", torch.zeros(M + 1)), r"tensor 'b_enc' has shape"),
        (lambda t: t["b_dec"].__setitem__(0, float("nan")), "tensor 'b_dec' contains NaN"),
        (lambda t: t["threshold"].__setitem__(0, -1.0), "tensor 'threshold' has negative entries"),
    ],
)
def test_bad_weights_named(tmp_path, edit, match):
    path = _corrupt(tmp_path, edit)
    with pytest.raises(ValueError, match=match) as e:
        JumpReluAutoEncoder.from_pretrained(path)
    assert "sae_weights.safetensors" in str(e.value)


def test_config_disagrees_with_weights(tmp_path):
    random_ae().save(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["dict_size"] = 99
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="dict_size=99"):
        JumpReluAutoEncoder.from_pretrained(tmp_path)


def test_missing_and_unreadable(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an SAE"):
        JumpReluAutoEncoder.from_pretrained(tmp_path)
    (tmp_path / "params.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="params.npz: cannot read npz"):
        JumpReluAutoEncoder.from_pretrained(tmp_path / "params.npz")
    (tmp_path / "sae_weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="sae_weights.safetensors: cannot read safetensors"):
        JumpReluAutoEncoder.from_pretrained(tmp_path)


def test_loads_in_saelens_if_installed(tmp_path):
    """Only runs where sae-lens is installed (it is not in this project's pins)."""
    sae_lens = pytest.importorskip("sae_lens")
    ae = random_ae()
    ae.save(tmp_path, {"model_name": "m", "hook_name": "blocks.0.hook_resid_post"})
    sae = sae_lens.SAE.load_from_disk(str(tmp_path), device="cpu")
    x = torch.randn(5, D)
    assert torch.allclose(sae(x), ae(x), atol=1e-6)
