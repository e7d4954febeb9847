"""ActivationBuffer, hook points and tokenization (tokens.py), checked against plain transformers forwards.

Tiny random Llama / Gemma-2 / GPT-2 / GPT-NeoX models (hidden 32, 3 layers) with the SmolLM2
tokenizer; one small test on the embedded SmolLM2-135M.
"""

import json

import pytest
import torch
import transformers
from nnsight.modeling.transformers import TransformersModel

from dictionary_learning.buffer import ActivationBuffer
from dictionary_learning.hooks import (
    SITES,
    get_hook_module,
    get_layers,
    hook_name,
    hook_value,
    set_hook_value,
)
from dictionary_learning.tokens import pack_texts, pad_texts, position_ids
from dictionary_learning.utils import DataExhausted, prepare_embedded_model

TEXTS = [
    "The heart pumps blood through the body.",
    "",
    "Aspirin inhibits cyclooxygenase.",
    "A much longer text about clinical medicine, " * 6,  # > ctx_len tokens
    "Yes",
    "Patients with diabetes need insulin therapy and regular monitoring of glucose.",
    "   ",
    "Renal failure raises serum creatinine.",
] * 3
NONEMPTY = [t for t in TEXTS[:8] if t]


@pytest.fixture(scope="module")
def tok():
    return transformers.AutoTokenizer.from_pretrained(prepare_embedded_model())


@pytest.fixture(scope="module")
def bos_tok():
    """The same vocabulary, but adding BOS like Gemma's tokenizer does."""
    return transformers.AutoTokenizer.from_pretrained(prepare_embedded_model(), add_bos_token=True)


def tiny(arch: str, tok, n_layers: int = 3):
    V = len(tok)
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers)
    cfg = {
        "llama": lambda: transformers.LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=2),
        "gemma2": lambda: transformers.Gemma2Config(
            **common, num_attention_heads=4, num_key_value_heads=2, head_dim=8
        ),
        "gpt2": lambda: transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=n_layers, n_head=4),
        "neox": lambda: transformers.GPTNeoXConfig(**common, num_attention_heads=4),
    }[arch]()
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    return TransformersModel(hf, tokenizer=tok), hf


@pytest.fixture(scope="module")
def llama(tok):
    return tiny("llama", tok)


@pytest.fixture(scope="module")
def gemma(bos_tok):
    return tiny("gemma2", bos_tok)


def drain(buf):
    """All batches until DataExhausted -> (x [N, d] or dict, index [N, 2] or None, the error)."""
    xs, idx = [], []
    with pytest.raises(DataExhausted) as err:
        while True:
            b = next(buf)
            xs.append(b[0] if isinstance(b, tuple) else b)
            if isinstance(b, tuple):
                idx.append(b[1])
    if isinstance(xs[0], dict):
        x = {k: torch.cat([b[k] for b in xs]) for k in xs[0]}
    else:
        x = torch.cat(xs)
    return x, (torch.cat(idx) if idx else None), err.value


def hidden(hf, ids, **kw):
    with torch.inference_mode():
        return hf(input_ids=ids, output_hidden_states=True, **kw).hidden_states


# ---------------------------------------------------------------------------- hook points


def test_hook_name_and_errors(llama):
    nm, _ = llama
    assert hook_name(12) == "blocks.12.hook_resid_post"
    assert hook_name(3, "mlp_out") == "blocks.3.hook_mlp_out"
    with pytest.raises(ValueError, match="unknown site 'attn_out'"):
        hook_name(1, "attn_out")
    for bad in (3, -1, True, 1.0):
        with pytest.raises(ValueError, match="out of range"):
            get_hook_module(nm, bad)
    with pytest.raises(ValueError, match="unknown site"):
        ActivationBuffer(TEXTS, nm, 1, site="resid_mid")
    with pytest.raises(ValueError, match="out of range"):
        ActivationBuffer(TEXTS, nm, [1, 7])
    with pytest.raises(ValueError, match="cannot find the decoder layers"):
        get_layers(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2", "neox"])
def test_hook_values_match_hidden_states(arch, tok):
    nm, hf = tiny(arch, tok)
    assert len(get_layers(nm)) == 3
    ids, mask, _ = pad_texts(NONEMPTY[:4], tok, 24, "left")
    pos = position_ids(mask)
    vals = {}
    with torch.inference_mode(), nm.trace(input_ids=ids, attention_mask=mask, position_ids=pos):
        for s in ("resid_pre", "mlp_out", "resid_post"):  # in execution order
            vals[s] = hook_value(get_hook_module(nm, 1, s), s).save()
    hs = hidden(hf, ids, attention_mask=mask, position_ids=pos)
    assert isinstance(vals["resid_post"], torch.Tensor) and vals["resid_post"].shape == (4, ids.shape[1], 32)
    torch.testing.assert_close(vals["resid_pre"], hs[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(vals["resid_post"], hs[2], atol=1e-5, rtol=0)
    # mlp_out is what the MLP adds: resid_post - (residual after attention), read with torch hooks.
    mid_module = {"llama": "post_attention_layernorm", "gemma2": "pre_feedforward_layernorm", "gpt2": "ln_2"}
    if arch in mid_module:
        got = {}
        block = get_layers(hf)[1]
        h = getattr(block, mid_module[arch]).register_forward_pre_hook(
            lambda m, a: got.setdefault("mid", a[0])
        )
        hidden(hf, ids, attention_mask=mask, position_ids=pos)
        h.remove()
        torch.testing.assert_close(vals["mlp_out"], hs[2] - got["mid"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("site", SITES)
def test_set_hook_value_replaces(site, llama, tok):
    nm, _ = llama
    ids, _ = pack_texts(TEXTS[:3], tok, 16)
    with torch.inference_mode():
        with nm.trace(input_ids=ids):
            env = get_hook_module(nm, 1, site)
            x = hook_value(env, site)
            set_hook_value(env, site, torch.zeros_like(x) + 0.5)
            after = hook_value(get_hook_module(nm, 2, "resid_pre"), "resid_pre").save()
            logits = nm.output.logits.save()
        with nm.trace(input_ids=ids):
            clean = nm.output.logits.save()
    if site == "resid_post":
        assert bool((after == 0.5).all())
    assert not torch.allclose(logits, clean)


# ---------------------------------------------------------------------------- tokenization


def expected_stream(tok, texts, bos_first):
    flat = []
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"] if t else []
        if ids:
            flat += [tok.bos_token_id, *ids] if bos_first else [*ids, tok.eos_token_id]
    return flat


@pytest.mark.parametrize("bos", [False, True])
def test_pack_texts(bos, tok, bos_tok):
    """Without BOS-first windows: the separated stream cut into windows (for a BOS tokenizer only when
    asked with prepend_bos=False)."""
    t = bos_tok if bos else tok
    ids, keep = pack_texts(TEXTS, t, 16, prepend_bos=False)
    flat = expected_stream(t, TEXTS, bos)
    assert ids.shape == (-(-len(flat) // 16), 16)
    assert ids.flatten()[: len(flat)].tolist() == flat
    assert bool((ids.flatten()[len(flat) :] == t.pad_token_id).all())
    sep = t.bos_token_id if bos else t.eos_token_id
    assert (ids == sep).sum() == sum(1 for x in TEXTS if x)  # one separator per non-empty text
    special = torch.isin(ids, torch.tensor([t.bos_token_id, t.eos_token_id, t.pad_token_id]))
    assert torch.equal(keep, ~special)
    ids2, keep2 = pack_texts(TEXTS, t, 16, drop_last=True, exclude_first_k=2, prepend_bos=False)
    assert ids2.shape[0] == len(flat) // 16 and torch.equal(ids2, ids[: ids2.shape[0]])
    assert not keep2[:, :2].any() and torch.equal(keep2[:, 2:], keep[: ids2.shape[0], 2:])
    with pytest.raises(ValueError, match="record 1: `text` is int"):
        pack_texts(["ok", 5], t, 16)


def test_pack_texts_starts_every_window_with_bos_where_the_tokenizer_adds_it(tok, bos_tok):
    """Gemma-style tokenizers: every window is BOS + the next 15 tokens of the BOS-separated stream
    (a separator BOS right at a window start is not doubled); BOS is never kept."""
    flat = expected_stream(bos_tok, TEXTS, True)
    want, i = [], 0
    while i < len(flat):
        if flat[i] == bos_tok.bos_token_id:
            i += 1  # the window's own BOS stands in for it
        want.append([bos_tok.bos_token_id, *flat[i : i + 15]])
        i += 15
    ids, keep = pack_texts(TEXTS, bos_tok, 16)  # prepend_bos=None: the tokenizer adds BOS, so yes
    assert ids.shape == (len(want), 16)
    assert (ids[:, 0] == bos_tok.bos_token_id).all() and not keep[:, 0].any()
    for row, w in zip(ids.tolist(), want):
        assert row[: len(w)] == w
    assert not keep[ids == bos_tok.bos_token_id].any()
    assert not pack_texts(TEXTS, tok, 16)[0][:, 0].eq(tok.bos_token_id).all()  # SmolLM2: no BOS first
    with pytest.raises(ValueError, match="no BOS"):
        pack_texts(TEXTS, _no_bos(tok), 16, prepend_bos=True)


def _no_bos(tok):
    import copy

    t = copy.deepcopy(tok)
    t.bos_token = None
    return t


@pytest.mark.parametrize("side", ["left", "right"])
def test_pad_texts(side, tok):
    texts = NONEMPTY
    ids, mask, keep = pad_texts(texts, tok, 12, side, exclude_first_k=1)
    for i, t in enumerate(texts):
        want = tok(t)["input_ids"][:12]
        row = ids[i][mask[i].bool()].tolist()
        assert row == want
        real = mask[i].nonzero().flatten()
        assert (real[0] == 0) if side == "right" else (real[-1] == ids.shape[1] - 1)
        assert keep[i].nonzero().flatten().tolist() == real[1:].tolist()  # first real token excluded
    with pytest.raises(ValueError, match="record 1: empty text"):
        pad_texts(["a", ""], tok, 12)


# ---------------------------------------------------------------------------- buffer vs transformers


def check_against_reference(hf, tok, buf_kwargs, texts, layer=1, bos=False):
    nm = TransformersModel(hf, tokenizer=tok)
    buf = ActivationBuffer(texts, nm, layer, return_index=True, **buf_kwargs)
    x, idx, err = drain(buf)
    assert not x.is_inference()
    ctx_len = buf_kwargs["ctx_len"]
    if buf_kwargs.get("pack", True):
        ids, keep = pack_texts(texts, tok, ctx_len, exclude_first_k=buf_kwargs.get("exclude_first_k", 0))
        ref = hidden(hf, ids)[layer + 1]
        want = {(c, p) for c, p in keep.nonzero().tolist()}
        toks = {(c, p): ids[c, p].item() for c, p in want}
        got_ref = torch.stack([ref[c, p] for c, p in idx.tolist()])
    else:  # each text alone, unpadded, is the reference
        rows = [tok(t)["input_ids"][:ctx_len] for t in texts if t]
        refs = [hidden(hf, torch.tensor([r]))[layer + 1][0] for r in rows]
        k = buf_kwargs.get("exclude_first_k", 0)
        special = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
        want = {(c, p) for c, r in enumerate(rows) for p in range(len(r)) if p >= k and r[p] not in special}
        toks = {(c, p): rows[c][p] for c, p in want}
        got_ref = torch.stack([refs[c][p] for c, p in idx.tolist()])
    got = [tuple(r) for r in idx.tolist()]
    assert len(got) == len(set(got)), "a token was yielded twice"
    assert set(got) == want, "yielded positions != real (non-special) tokens"
    assert not any(toks[i] in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) for i in got)
    torch.testing.assert_close(x, got_ref, atol=1e-5, rtol=0)
    assert err.tokens_yielded == len(want) and buf.tokens_yielded == len(want)
    return buf


def test_buffer_packed_matches_transformers(llama, tok):
    buf = check_against_reference(
        llama[1], tok, dict(ctx_len=16, n_ctxs=6, lm_batch_size=2, batch_size=7), TEXTS
    )
    assert buf.counters["texts_skipped"] == 3 and buf.texts_consumed == len(TEXTS)


@pytest.mark.parametrize("side", ["left", "right"])
def test_buffer_padded_matches_transformers(side, llama, tok):
    buf = check_against_reference(
        llama[1],
        tok,
        dict(
            ctx_len=16,
            n_ctxs=6,
            lm_batch_size=4,
            batch_size=9,
            pack=False,
            padding_side=side,
            exclude_first_k=1,
        ),
        TEXTS,
    )
    n_long = sum(len(tok(t)["input_ids"]) > 16 for t in TEXTS)
    assert n_long > 0 and buf.counters["texts_truncated"] == n_long
    assert buf.counters["tokens_truncated"] == sum(max(0, len(tok(t)["input_ids"]) - 16) for t in TEXTS)


@pytest.mark.parametrize("pack", [True, False])
def test_gemma2_bos_tokenizer_matches_transformers(pack, gemma, bos_tok):
    check_against_reference(
        gemma[1],
        bos_tok,
        dict(ctx_len=16, n_ctxs=4, lm_batch_size=3, batch_size=5, pack=pack, padding_side="left"),
        TEXTS[:8],
    )


def test_gpt2_absolute_positions_padded_left(tok):
    # GPT-2 has absolute position embeddings: left padding is only right with mask-derived position_ids.
    check_against_reference(
        tiny("gpt2", tok)[1],
        tok,
        dict(ctx_len=16, n_ctxs=4, lm_batch_size=3, batch_size=5, pack=False),
        TEXTS[:8],
    )


def test_exclude_first_k_packed(llama, tok):
    check_against_reference(
        llama[1], tok, dict(ctx_len=16, n_ctxs=4, batch_size=11, exclude_first_k=3), TEXTS
    )


def test_multi_layer_one_forward_and_early_stop(tok):
    nm, hf = tiny("llama", tok, n_layers=4)
    fired = {"layer1": 0, "layer2": 0, "layer3": 0, "lm_head": 0, "norm": 0}
    count = lambda k: lambda *a: fired.__setitem__(k, fired[k] + 1)
    hooks = [get_layers(hf)[i].register_forward_pre_hook(count(f"layer{i}")) for i in (1, 2, 3)]
    hooks.append(hf.lm_head.register_forward_pre_hook(count("lm_head")))
    hooks.append(hf.model.norm.register_forward_pre_hook(count("norm")))
    buf = ActivationBuffer(
        TEXTS, nm, [1, 0], ctx_len=16, n_ctxs=4, lm_batch_size=2, batch_size=8, return_index=True
    )
    x, idx, _ = drain(buf)
    for h in hooks:
        h.remove()
    assert set(x) == {"blocks.0.hook_resid_post", "blocks.1.hook_resid_post"}
    assert fired["layer1"] > 0  # the deepest requested layer ran ...
    assert (
        fired["layer2"] == fired["layer3"] == fired["lm_head"] == fired["norm"] == 0
    )  # ... and nothing after
    ids, _ = pack_texts(TEXTS, tok, 16)
    hs = hidden(hf, ids)
    for L in (0, 1):
        ref = torch.stack([hs[L + 1][c, p] for c, p in idx.tolist()])
        torch.testing.assert_close(x[hook_name(L)], ref, atol=1e-5, rtol=0)
    assert buf.config["hook"] == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


def test_mlp_out_and_resid_pre_sites(llama, tok):
    nm, hf = llama
    for site in ("resid_pre", "mlp_out"):
        buf = ActivationBuffer(
            TEXTS[:5], nm, 2, site=site, ctx_len=16, n_ctxs=4, batch_size=1000, return_index=True
        )
        x, idx = next(buf)
        ids, _ = pack_texts(TEXTS[:5], tok, 16)
        with torch.inference_mode(), nm.trace(input_ids=ids):
            ref = hook_value(get_hook_module(nm, 2, site), site).save()
        torch.testing.assert_close(x, ref[idx[:, 0], idx[:, 1]], atol=1e-6, rtol=0)
        if site == "resid_pre":  # = resid_post of layer 1
            torch.testing.assert_close(x, hidden(hf, ids)[2][idx[:, 0], idx[:, 1]], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- shuffling, state, end of data


KW = dict(ctx_len=16, n_ctxs=6, lm_batch_size=2, batch_size=10, return_index=True)


def test_shuffled_across_contexts_and_seeded(llama):
    nm, _ = llama
    a, b, c = (ActivationBuffer(TEXTS, nm, 1, seed=s, **KW) for s in (0, 0, 1))
    xa, ia = next(a)
    xb, ib = next(b)
    _, ic = next(c)
    assert torch.equal(xa, xb) and torch.equal(ia, ib)
    assert not torch.equal(ia, ic)
    assert len(set(ia[:, 0].tolist())) >= 3  # one batch mixes several contexts
    assert ia[:, 1].tolist() != sorted(ia[:, 1].tolist())


@pytest.mark.parametrize("k", [0, 1, 4, 9, 15])
def test_state_dict_exact_resume(k, llama):
    nm, _ = llama
    full = ActivationBuffer(TEXTS, nm, 1, epochs=2, **KW)
    for _ in range(k):
        next(full)
    state = json.loads(json.dumps(full.state_dict()))  # JSON-able
    resumed = ActivationBuffer(TEXTS, nm, 1, epochs=2, **KW)
    resumed.load_state_dict(state)
    for _ in range(12):
        x1, i1 = next(full)
        x2, i2 = next(resumed)
        assert torch.equal(x1, x2) and torch.equal(i1, i2)
    assert full.counters == resumed.counters


def test_state_dict_refuses_other_config(llama):
    nm, _ = llama
    state = ActivationBuffer(TEXTS, nm, 1, **KW).state_dict()
    with pytest.raises(ValueError, match="seed=0 does not match"):
        ActivationBuffer(TEXTS, nm, 1, **{**KW, "seed": 3}).load_state_dict(state)


def test_epochs_and_exhaustion(llama, tok):
    nm, _ = llama
    n_real = int(pack_texts(TEXTS, tok, 16)[1].sum())
    x, idx, err = drain(ActivationBuffer(TEXTS, nm, 1, epochs=2, **KW))
    assert len(x) == 2 * n_real and err.tokens_yielded == 2 * n_real and err.texts_consumed == 2 * len(TEXTS)
    assert "exhausted after 2 epoch(s)" in str(err)
    forever = ActivationBuffer(TEXTS, nm, 1, epochs=None, **KW)
    assert sum(len(next(forever)[0]) for _ in range(3 * n_real // 10 + 1)) > 3 * n_real - 10


def test_storage_dtype_and_autograd(llama):
    nm, _ = llama
    x32 = next(ActivationBuffer(TEXTS, nm, 1, **KW))[0]
    x16 = next(ActivationBuffer(TEXTS, nm, 1, **{**KW, "dtype": "bfloat16"}))[0]
    assert x16.dtype == torch.bfloat16 and torch.equal(x16, x32.bfloat16())
    w = torch.randn(32, 8, requires_grad=True)
    (x32 @ w).square().sum().backward()  # yielded tensors are not inference tensors
    assert w.grad is not None


# ---------------------------------------------------------------------------- data sources, bad input


def test_sources_agree(tmp_path, llama):
    import datasets

    nm, _ = llama
    (tmp_path / "d.jsonl").write_text(
        "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(TEXTS))
    )
    (tmp_path / "d.txt").write_text("\n".join(TEXTS) + "\n")
    ref, _, _ = drain(ActivationBuffer(TEXTS, nm, 1, **KW))
    for data in (
        tmp_path / "d.jsonl",
        str(tmp_path / "d.txt"),
        datasets.Dataset.from_dict({"text": TEXTS}),
        iter(TEXTS),
    ):
        x, _, _ = drain(ActivationBuffer(data, nm, 1, **KW))
        assert torch.equal(x, ref)


def test_bad_input(tmp_path, llama):
    nm, _ = llama
    with pytest.raises(ValueError, match="record 2: `text` is NoneType"):
        next(ActivationBuffer(["a", "b", None], nm, 1, **KW))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not a JSON object with a `text` field"):
        next(ActivationBuffer(tmp_path / "bad.jsonl", nm, 1, **KW))
    with pytest.raises(ValueError, match="no usable text"):
        next(ActivationBuffer(["", ""], nm, 1, **KW))
    with pytest.raises(ValueError, match="cannot re-stream a one-shot iterator"):
        drain(ActivationBuffer(iter(TEXTS), nm, 1, epochs=2, **KW))
    with pytest.raises(ValueError, match="unknown buffer option"):
        ActivationBuffer(TEXTS, nm, 1, ctx_length=3)
    with pytest.raises(ValueError, match="not a .jsonl or .txt file"):
        ActivationBuffer(tmp_path / "missing.parquet", nm, 1)
    with pytest.raises(ValueError, match="unknown dtype"):
        ActivationBuffer(TEXTS, nm, 1, dtype="float8")


# ---------------------------------------------------------------------------- embedded SmolLM2


def test_embedded_smollm2(embedded_model):
    nm = embedded_model
    hf = nm._module
    tok = nm.tokenizer
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2
    fired = []
    h = get_layers(hf)[2].register_forward_pre_hook(lambda *a: fired.append(1))
    texts = TEXTS[:6]
    buf = ActivationBuffer(
        texts, nm, 1, ctx_len=32, n_ctxs=4, lm_batch_size=2, batch_size=64, return_index=True
    )
    x, idx, _ = drain(buf)
    h.remove()
    assert not fired and buf.d_submodule == 576 and x.shape[1] == 576
    ids, keep = pack_texts(texts, tok, 32)
    assert len(x) == int(keep.sum())
    ref = hidden(hf, ids)[2]
    torch.testing.assert_close(x, ref[idx[:, 0], idx[:, 1]], atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------- BOS and massive tokens


def test_gemma2_windows_start_with_bos_and_no_bos_is_yielded(gemma, bos_tok):
    """A Gemma-style tokenizer (adds BOS): every packed window the model sees starts with BOS, and no
    BOS position reaches a batch (the index of every yielded row points at a non-BOS token)."""
    nm, hf = gemma
    seen = []
    handle = hf.register_forward_pre_hook(
        lambda mod, args, kw: seen.append(kw["input_ids"].clone()), with_kwargs=True
    )
    try:
        buf = ActivationBuffer(TEXTS, nm, 1, ctx_len=16, n_ctxs=4, lm_batch_size=3, return_index=True)
        x, idx, _ = drain(buf)
    finally:
        handle.remove()
    ids = torch.cat(seen)
    assert len(ids) == buf.stream.st["contexts"] > 1
    assert (ids[:, 0] == bos_tok.bos_token_id).all()
    assert buf.config["prepend_bos"] is True
    yielded = ids[idx[:, 0], idx[:, 1]]
    assert not (yielded == bos_tok.bos_token_id).any() and (idx[:, 1] > 0).all()
    assert len(x) == int((ids != bos_tok.bos_token_id).logical_and(ids != bos_tok.eos_token_id).sum())


def planted(tok, scale: float = 1000.0):
    """A tiny Llama whose embedding of the first token of "Aspirin" is `scale` times larger, so the
    residual stream carries a massive activation at every such position (as SmolLM2 layer 15 does at
    a few tokens). Returns (nnsight model, hf model, token id)."""
    nm, hf = tiny("llama", tok)
    target = tok("Aspirin", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        hf.model.embed_tokens.weight[target] *= scale
    return nm, hf, target


def test_massive_tokens_are_dropped_recorded_and_kept_out_of_the_norm_factor(tok):
    from dictionary_learning.trainer import estimate_norm_factor

    nm, hf, target = planted(tok)
    kw = dict(ctx_len=16, n_ctxs=64, lm_batch_size=8, batch_size=7, return_index=True)
    buf = ActivationBuffer(TEXTS, nm, 1, **kw)
    x, idx, _ = drain(buf)
    everything, all_idx, _ = drain(ActivationBuffer(TEXTS, nm, 1, max_norm_multiple=None, **kw))
    ids, keep = pack_texts(TEXTS, tok, 16)
    ref = hidden(hf, ids)[2]  # plain transformers forward: layer 1's output
    planted_at = {(c, p) for c, p in keep.nonzero().tolist() if ids[c, p] == target}
    assert len(planted_at) == sum(t.count("Aspirin") for t in TEXTS) > 0
    # exactly the planted positions are gone; the rest are the model's activations there
    assert {tuple(i) for i in all_idx.tolist()} == set(map(tuple, keep.nonzero().tolist()))
    assert {tuple(i) for i in idx.tolist()} == set(map(tuple, keep.nonzero().tolist())) - planted_at
    torch.testing.assert_close(x, ref[idx[:, 0], idx[:, 1]], atol=1e-5, rtol=0)
    m = buf.massive
    assert (
        m["dropped"] == len(planted_at)
        and m["of_tokens"] == len(everything)
        and m["max_norm_multiple"] == 10.0
    )
    limit = m["max_norm"]["blocks.1.hook_resid_post"]
    planted_norms = torch.stack([ref[c, p] for c, p in planted_at]).norm(dim=1)
    assert x.norm(dim=1).max() < limit < planted_norms.min()  # ordinary tokens below it, planted above
    assert buf.config["massive_tokens"]["dropped"] == len(planted_at)
    # the norm factor sqrt(E‖x‖²) is that of the ordinary tokens; without the rule, the planted set it
    kept = torch.stack([ref[c, p] for c, p in set(map(tuple, keep.nonzero().tolist())) - planted_at])
    want = kept.double().pow(2).sum(1).mean().sqrt().item()
    assert estimate_norm_factor([x]) == pytest.approx(want, rel=1e-6)
    assert estimate_norm_factor([everything]) > 5 * want


def test_massive_rule_resumes_exactly(tok):
    """The threshold is part of the buffer state: a resumed buffer drops the same tokens and counts."""
    nm, _, _ = planted(tok)
    kw = dict(ctx_len=16, n_ctxs=8, lm_batch_size=3, batch_size=5)
    whole_buf = ActivationBuffer(TEXTS, nm, 1, **kw)
    whole, _, _ = drain(whole_buf)
    a = ActivationBuffer(TEXTS, nm, 1, **kw)
    head = [next(a) for _ in range(6)]
    state = json.loads(json.dumps(a.state_dict()))
    b = ActivationBuffer(TEXTS, nm, 1, **kw)
    b.load_state_dict(state)
    assert state["max_norm"] is not None and b.massive == a.massive
    tail, _, _ = drain(b)
    torch.testing.assert_close(torch.cat([*head, tail]), whole, rtol=0, atol=0)
    assert b.massive == whole_buf.massive and whole_buf.massive["dropped"] > 0
