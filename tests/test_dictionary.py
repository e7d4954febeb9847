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


# ------------------------------------------------------------------ SAELens folders written by others


def _saelens_folder(path, ae, **fields):
    """A SAELens-layout folder (cfg.json + sae_weights.safetensors, no config.json) holding `ae`'s tensors;
    `fields` are set in cfg.json (a value of None leaves the field out)."""
    path.mkdir(parents=True, exist_ok=True)
    save_file(ae.weights(), str(path / "sae_weights.safetensors"))
    meta = {"hook_name": "blocks.3.hook_resid_post", "context_size": 1024, "prepend_bos": True,
            "model_name": "gemma-2-2b", "sae_lens_version": "6.54.12"}  # fmt: skip
    cfg = {"architecture": "jumprelu", "d_in": ae.activation_dim, "d_sae": ae.dict_size, "dtype": "float32",
           "device": "cpu", "normalize_activations": "none", "reshape_activations": "none", "metadata": meta}  # fmt: skip
    cfg.update(fields)
    (path / "cfg.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return path


def _jumprelu_by_hand(ae, x, sub_b_dec):
    """SAELens's JumpReLU in fp64: pre = (x − b_dec)·W_enc + b_enc (no b_dec term when not sub_b_dec),
    f = pre·1[pre > threshold], x̂ = f·W_dec + b_dec."""
    w = {n: t.double() for n, t in ae.weights().items()}
    pre = (x.double() - w["b_dec"] * sub_b_dec) @ w["W_enc"] + w["b_enc"]
    f = pre * (pre > w["threshold"])
    return f, f @ w["W_dec"] + w["b_dec"]


@pytest.mark.parametrize("apply", [True, None, False], ids=["true", "absent", "false"])
def test_saelens_apply_b_dec_to_input_folded_exactly(tmp_path, apply):
    ae = random_ae(1)
    with torch.no_grad():
        ae.b_dec.copy_(torch.randn(D, generator=torch.Generator().manual_seed(5)))  # large enough to matter
    path = _saelens_folder(tmp_path, ae, apply_b_dec_to_input=apply)
    loaded = JumpReluAutoEncoder.from_pretrained(path)
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(6))
    sub = apply is not False  # SAELens's default is true
    f, x_hat = _jumprelu_by_hand(ae, x, sub)
    f_other, _ = _jumprelu_by_hand(ae, x, not sub)
    assert 0 < (f > 0).double().mean() < 1 and not torch.equal(f > 0, f_other > 0)  # the test discriminates
    assert torch.allclose(loaded.encode(x).double(), f, atol=1e-5)
    assert torch.allclose(loaded.decode(f.float()).double(), x_hat, atol=1e-5)  # decode unchanged
    assert torch.allclose(loaded(x).double(), x_hat, atol=1e-5)
    assert loaded.cfg["apply_b_dec_to_input"] is False  # the loaded weights take raw activations
    assert loaded.cfg.get("b_dec_folded_into_b_enc", False) is sub
    # SAELens metadata, for the evaluation's defaults
    assert loaded.cfg["context_size"] == 1024 and loaded.cfg["prepend_bos"] is True
    assert loaded.cfg["hook_name"] == "blocks.3.hook_resid_post"


def test_fold_is_done_in_float64_then_cast(tmp_path):
    ae = random_ae(2)
    with torch.no_grad():
        ae.b_dec.mul_(100.0)
    loaded = JumpReluAutoEncoder.from_pretrained(_saelens_folder(tmp_path, ae), dtype="bfloat16")
    w = {n: t.double() for n, t in ae.weights().items()}
    want = (w["b_enc"] - w["b_dec"] @ w["W_enc"]).to(torch.bfloat16)  # one rounding, from the exact value
    assert loaded.b_enc.dtype == torch.bfloat16 and torch.equal(loaded.b_enc, want)


@pytest.mark.parametrize(
    "field,value",
    [
        ("normalize_activations", "layer_norm"),
        ("normalize_activations", "expected_average_only_in"),
        ("normalize_activations", "constant_norm_rescale"),
        ("normalize_activations", True),  # SAELens < 6 spelling of expected_average_only_in
        ("reshape_activations", "hook_z"),
        ("architecture", "topk"),
        ("architecture", "gated"),
        ("architecture", "standard"),
    ],
)
def test_saelens_config_the_weights_cannot_carry_is_refused(tmp_path, field, value):
    path = _saelens_folder(tmp_path, random_ae(), **{field: value})
    with pytest.raises(ValueError, match=rf"cfg\.json: {field}={value!r}") as e:
        JumpReluAutoEncoder.from_pretrained(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("arch", ["topk", "gated"])
def test_our_config_with_another_architecture_is_refused(tmp_path, arch):
    random_ae().save(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "architecture": arch}))
    with pytest.raises(ValueError, match=rf"config\.json: architecture='{arch}'"):
        JumpReluAutoEncoder.from_pretrained(tmp_path)


def test_our_config_governs_and_must_agree_with_cfg_json(tmp_path):
    ae = random_ae()
    ae.save(tmp_path)
    loaded = JumpReluAutoEncoder.from_pretrained(tmp_path)  # both files present: raw activations
    assert torch.equal(loaded.b_enc, ae.b_enc) and "b_dec_folded_into_b_enc" not in loaded.cfg
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "apply_b_dec_to_input": True}))
    with pytest.raises(ValueError, match="disagree on apply_b_dec_to_input"):
        JumpReluAutoEncoder.from_pretrained(tmp_path)


def test_topk_like_folder_without_threshold_names_the_architecture(tmp_path):
    # SAELens's TopK layout: no threshold tensor, `k` in cfg.json; here without an architecture field
    tensors = {n: t for n, t in random_ae().weights().items() if n != "threshold"}
    save_file(tensors, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({"d_in": D, "d_sae": M, "k": 4}))
    with pytest.raises(ValueError, match="tensor 'threshold' missing.*looks like a topk SAE"):
        JumpReluAutoEncoder.from_pretrained(tmp_path)


# ------------------------------------------------------------------ damaged Gemma Scope files


@pytest.mark.parametrize("damage", ["empty", "truncated", "cut_short", "flipped"])
def test_damaged_params_npz_named(tmp_path, damage):
    out = random_ae().export_gemma_scope(tmp_path / "gs")
    raw = out.read_bytes()
    damaged = {
        "empty": b"",
        "truncated": raw[: len(raw) // 2],
        "cut_short": raw[:3],
        "flipped": raw[:200] + bytes(b ^ 0xFF for b in raw[200:260]) + raw[260:],
    }[damage]
    out.write_bytes(damaged)
    for path in (out, out.parent):
        with pytest.raises(ValueError, match=r"params\.npz: cannot read npz file") as e:
            JumpReluAutoEncoder.from_pretrained(path)
        assert "\n" not in str(e.value)


# ------------------------------------------------------------------ the installed sae-lens package


def _saelens_jumprelu(sae_lens, apply_b_dec_to_input, seed=0):
    """SAELens's own JumpReLU SAE, every parameter random (non-zero biases, thresholds >= 0)."""
    meta = {"hook_name": "blocks.2.hook_resid_post", "context_size": 256, "prepend_bos": True}
    cfg = sae_lens.JumpReLUSAEConfig.from_dict(
        {
            "architecture": "jumprelu",
            "d_in": D,
            "d_sae": M,
            "apply_b_dec_to_input": apply_b_dec_to_input,
            "metadata": meta,
        }  # fmt: skip
    )
    sae = sae_lens.JumpReLUSAE(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D, M, generator=g) / D**0.5)
        sae.W_dec.copy_(torch.randn(M, D, generator=g) / M**0.5)
        sae.b_enc.copy_(torch.randn(M, generator=g) * 0.3)
        sae.b_dec.copy_(torch.randn(D, generator=g))
        sae.threshold.copy_(torch.rand(M, generator=g) * 0.5)
    return sae


def test_our_folder_loads_in_saelens(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    ae = random_ae()
    ae.save(tmp_path, {"model_name": "m", "hook_name": "blocks.0.hook_resid_post"})
    sae = sae_lens.SAE.load_from_disk(str(tmp_path), device="cpu")
    assert type(sae).__name__ == "JumpReLUSAE"
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(7))
    f = ae.encode(x)
    assert 0 < (f > 0).float().mean() < 1
    with torch.no_grad():
        assert torch.allclose(sae.encode(x), f, atol=1e-5)
        assert torch.allclose(sae.decode(f), ae.decode(f), atol=1e-5)
        assert torch.allclose(sae(x), ae(x), atol=1e-5)


@pytest.mark.parametrize("apply", [True, False], ids=["apply_b_dec_true", "apply_b_dec_false"])
def test_saelens_saved_folder_matches_saelens(tmp_path, apply):
    sae_lens = pytest.importorskip("sae_lens")
    sae = _saelens_jumprelu(sae_lens, apply)
    sae.save_model(tmp_path / "saelens")
    assert not (tmp_path / "saelens" / "config.json").exists()
    ae = JumpReluAutoEncoder.from_pretrained(tmp_path / "saelens")
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        f = sae.encode(x)
        assert 0 < (f > 0).float().mean() < 1
        assert torch.allclose(ae.encode(x), f, atol=1e-5)
        assert torch.allclose(ae.decode(f), sae.decode(f), atol=1e-5)
        assert torch.allclose(ae(x), sae(x), atol=1e-5)
    assert ae.cfg["context_size"] == 256 and ae.cfg["hook_name"] == "blocks.2.hook_resid_post"
    # and back: our save of the folded SAE loads in SAELens and computes the same as the original
    ae.save(tmp_path / "ours", ae.cfg)
    assert torch.equal(
        JumpReluAutoEncoder.from_pretrained(tmp_path / "ours").b_enc, ae.b_enc
    )  # no second fold
    again = sae_lens.SAE.load_from_disk(str(tmp_path / "ours"), device="cpu")
    assert again.cfg.apply_b_dec_to_input is False
    with torch.no_grad():
        assert torch.allclose(again.encode(x), f, atol=1e-5)
        assert torch.allclose(again(x), sae(x), atol=1e-5)


@pytest.mark.parametrize("arch", ["topk", "gated"])
def test_saelens_topk_and_gated_folders_refused_by_name(tmp_path, arch):
    sae_lens = pytest.importorskip("sae_lens")
    if arch == "topk":
        sae = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=D, d_sae=M, k=3))
    else:
        sae = sae_lens.GatedSAE(sae_lens.GatedSAEConfig(d_in=D, d_sae=M))
    sae.save_model(tmp_path)
    with pytest.raises(ValueError, match=rf"cfg\.json: architecture='{arch}'"):
        JumpReluAutoEncoder.from_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    del cfg["architecture"]  # without the field, the tensors (or `k`) still name it
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"missing.*looks like a {arch} SAE"):
        JumpReluAutoEncoder.from_pretrained(tmp_path)
