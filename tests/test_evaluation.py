"""Evaluation: metric definitions on hand-computed tensors, the splice, the protocol, the CLI.

The language model is a tiny random LlamaForCausalLM (hidden 32, 2 layers) with a word-level
tokenizer that has SmolLM2's special tokens (EOS-separated packing, so special tokens occur), saved
to a folder and loaded through utils.load_language_model exactly as the CLI loads it.
"""

import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dictionary_learning import eval_report, metrics
from dictionary_learning import evaluation as ev
from dictionary_learning.dictionary import JumpReluAutoEncoder

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

D, LAYER = 32, 1
TEXTS = [
    f"Patient {i} presented with {['fever', 'cough', 'chest pain', 'headache', 'nausea'][i % 5]} for "
    f"{i % 9 + 1} days; the {['nurse', 'doctor', 'resident'][i % 3]} ordered "
    f"{['a blood count', 'an x-ray', 'a culture', 'an ECG'][i % 4]}."
    for i in range(200)
]
KW = dict(n_tokens=600, lm_batch_size=4, ctx_len=32, progress=False)


def loss_positions(keep: torch.Tensor) -> torch.Tensor:
    """[B, T-1]: t predicts a kept token t+1, and some position <= t is kept (patched), by loops."""
    B, T = keep.shape
    out = torch.zeros(B, T - 1, dtype=torch.bool)
    for b in range(B):
        for t in range(T - 1):
            out[b, t] = bool(keep[b, t + 1]) and any(bool(keep[b, s]) for s in range(t + 1))
    return out


# ---------------------------------------------------------------------------- fixtures


def tiny_tokenizer():
    """A word-level tokenizer over TEXTS with SmolLM2's special tokens (bos 1, eos = pad 2; adds no
    BOS, so packing separates texts with EOS). A 60-word vocabulary keeps the logits cheap."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in TEXTS for w in re.findall(r"\w+|[^\w\s]+", t)})
    vocab = {"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<unk>",
    )


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=D,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from dictionary_learning.utils import load_language_model

    return load_language_model(str(tiny_model_dir), device="cpu", dtype="float32")


def identity_sae(d=D):
    """dict_size 2d, W_enc = [I, -I], W_dec = [I; -I], threshold 0: JumpReLU(±x) reconstructs x exactly."""
    sae = JumpReluAutoEncoder(d, 2 * d, init=False)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        for p in (sae.b_enc, sae.b_dec, sae.threshold):
            p.zero_()
    return sae


def assert_same_metrics(got, want, rel: float, abs_: float = 0.0, key="result"):
    """Equal up to float tolerance, recursively through dicts and lists (intervals, sub-reports)."""
    if isinstance(want, dict):
        assert got.keys() == want.keys(), key
        for k, v in want.items():
            assert_same_metrics(got[k], v, rel, abs_, f"{key}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), key
        for i, (g, v) in enumerate(zip(got, want)):
            assert_same_metrics(g, v, rel, abs_, f"{key}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=rel, abs=abs_), key
    else:
        assert got == want, key


def random_sae(d=D, m=4 * D, seed=0):
    sae = JumpReluAutoEncoder(d, m, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():  # thresholds around the pre-activation scale so some latents fire, some not
        sae.threshold.copy_(torch.rand(m, generator=torch.Generator().manual_seed(seed + 1)) * 0.5)
    return sae


# ---------------------------------------------------------------------------- pure metrics


def test_log_feature_density_has_floor():
    got = metrics.log_feature_density(torch.tensor([0, 1, 2, 4]), 4)
    want = torch.tensor([-10.0, math.log10(0.25), math.log10(0.5), 0.0])
    torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------- the procedure


def test_identity_dictionary_is_perfect(tiny_model):
    r = ev.evaluate(identity_sae(), tiny_model, LAYER, "resid_post", TEXTS, **KW)
    assert r["frac_variance_explained"] == pytest.approx(1.0, abs=1e-6)
    assert r["mse"] == pytest.approx(0.0, abs=1e-10)
    assert r["cossim"] == pytest.approx(1.0, abs=1e-6)
    assert r["frac_recovered"] == pytest.approx(1.0, abs=1e-6)
    assert r["frac_recovered_mean"] == pytest.approx(1.0, abs=1e-6)
    assert r["kl_div"] == pytest.approx(0.0, abs=1e-7)
    assert r["kl_score"] == pytest.approx(1.0, abs=1e-6)
    assert r["loss_reconstructed"] == pytest.approx(r["loss_original"], abs=1e-6)
    # the ablations do change the loss, else the scores above would mean nothing
    assert abs(r["loss_zero"] - r["loss_original"]) > 1e-2 and r["kl_div_zero"] > 1e-3
    assert abs(r["loss_mean"] - r["loss_original"]) > 1e-2 and r["kl_div_mean"] > 1e-3
    assert r["n_tokens"] >= KW["n_tokens"] and r["n_loss_tokens"] > 0


def test_all_zero_dictionary_recovers_nothing(tiny_model):
    sae = identity_sae()
    with torch.no_grad():
        sae.W_dec.zero_()  # x_hat = 0 whatever f is
    r = ev.evaluate(sae, tiny_model, LAYER, "resid_post", TEXTS, **KW)
    assert r["frac_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert r["loss_reconstructed"] == pytest.approx(r["loss_zero"], rel=1e-9)
    assert r["kl_div"] == pytest.approx(r["kl_div_zero"], rel=1e-9)
    assert r["kl_score"] == pytest.approx(0.0, abs=1e-6)
    assert r["frac_variance_explained_centred"] == pytest.approx(0.0, abs=1e-9)  # Var(x − 0) = Var(x)
    assert r["frac_variance_explained"] < 0  # Σ‖x‖² > Σ‖x − mean x‖²: x̂ = 0 misses the mean too
    assert r["cossim"] == 0.0 and r["l2_ratio"] == 0.0


def test_dead_latents_and_sparsity_counts(tiny_model, tmp_path):
    sae = identity_sae()
    with torch.no_grad():
        sae.threshold[:4] = 1e6  # these 4 latents can never fire
    r, counts = ev.evaluate(sae, tiny_model, LAYER, "resid_post", TEXTS, return_counts=True, **KW)
    assert counts.shape == (2 * D,) and (counts[:4] == 0).all()
    assert r["dead_latents"] == int((counts == 0).sum()) >= 4
    assert r["frac_alive"] == pytest.approx(1 - r["dead_latents"] / (2 * D))
    assert r["l0"] == pytest.approx(counts.sum().item() / r["n_tokens"])
    eval_report.save_sparsity(tmp_path / "sparsity.safetensors", counts, r["n_tokens"])
    from safetensors.torch import load_file

    s = load_file(tmp_path / "sparsity.safetensors")["sparsity"]
    assert s.shape == (2 * D,) and (s[:4] == -10).all()
    torch.testing.assert_close(s[4:], (counts[4:].double() / r["n_tokens"]).clamp_min(1e-10).log10().float())


@pytest.mark.parametrize("site", ["resid_post", "resid_pre", "mlp_out"])
def test_splice_matches_a_manual_forward_hook(tiny_model, site):
    """The nnsight splice equals replacing the same activation with a plain torch hook, and leaves
    no edit behind (the next clean run is clean)."""
    from dictionary_learning.hooks import get_hook_module
    from dictionary_learning.tokens import pack_texts

    ids, keep = pack_texts(TEXTS[:8], tiny_model.tokenizer, 32)
    ids, keep = ids[:3], keep[:3]
    envoy = get_hook_module(tiny_model, LAYER, site)
    act, clean = ev.traced_forward(tiny_model, envoy, site, ids)
    sae = random_sae()
    patched = act.clone()
    with torch.no_grad():
        patched[keep] = sae(act[keep])
    _, spliced = ev.traced_forward(tiny_model, envoy, site, ids, replacement=patched)

    hf = tiny_model._module
    layer = hf.model.layers[LAYER]
    if site == "resid_pre":
        handle = layer.register_forward_pre_hook(
            lambda mod, args, kwargs: ((patched,), kwargs), with_kwargs=True
        )
    else:
        module = layer.mlp if site == "mlp_out" else layer
        handle = module.register_forward_hook(lambda mod, inp, out: patched)
    try:
        with torch.no_grad():
            manual = hf(ids).logits
    finally:
        handle.remove()
    torch.testing.assert_close(spliced, manual, rtol=1e-5, atol=1e-5)
    assert (spliced - clean).abs().max() > 1e-3  # the splice did something
    _, clean_again = ev.traced_forward(tiny_model, envoy, site, ids)
    torch.testing.assert_close(clean_again, clean, rtol=0, atol=0)


def test_only_real_positions_are_patched_and_mean_is_over_reference_tokens(tiny_model, monkeypatch):
    """Spy on the traced passes: special-token positions keep their clean activation in every
    patched pass; the mean ablation uses the mean over reference tokens disjoint from the scored
    ones (here the held-out windows after them)."""
    calls = []
    real = ev.traced_forward

    def spy(model, envoy, site, input_ids, replacement=None, stop_at_hook=False):
        act, logits = real(model, envoy, site, input_ids, replacement, stop_at_hook)
        calls.append((input_ids, act, replacement, stop_at_hook))
        return act, logits

    monkeypatch.setattr(ev, "traced_forward", spy)
    r = ev.evaluate(random_sae(), tiny_model, LAYER, "resid_post", TEXTS, **KW)
    assert r["massive_tokens"]["dropped"] == 0  # nothing massive in this model: every real token counts
    from dictionary_learning.tokens import keep_mask_for

    clean = [(ids, a) for ids, a, rep, stop in calls if rep is None and not stop]
    reference = [(ids, a) for ids, a, rep, stop in calls if stop]
    patched = [(ids, rep) for ids, a, rep, stop in calls if rep is not None]
    assert len(patched) == 3 * len(clean)  # x_hat, zero, mean per batch
    keeps = [keep_mask_for(ids, tiny_model.tokenizer) for ids, _ in clean]
    assert sum(int(k.sum()) for k in keeps) == r["n_tokens"]
    assert sum(int(loss_positions(k).sum()) for k in keeps) == r["n_loss_tokens"]
    assert any((~k).any() for k in keeps)  # the texts do contain special tokens
    # the reference windows are the packed windows right after the scored ones
    all_ids, _ = ev.select_contexts(TEXTS, tiny_model.tokenizer, 32, 10**9)
    scored_ids = torch.cat([ids for ids, _ in clean])
    ref_ids = torch.cat([ids for ids, _ in reference])
    assert torch.equal(torch.cat([scored_ids, ref_ids]), all_ids[: len(scored_ids) + len(ref_ids)])
    ref_keeps = [keep_mask_for(ids, tiny_model.tokenizer) for ids, _ in reference]
    assert sum(int(k.sum()) for k in ref_keeps) == r["mean_ablation"]["n_tokens"] > 0
    mean = torch.cat([a[k] for (_, a), k in zip(reference, ref_keeps)]).double().mean(0).float()
    for i, ((_ids, act), keep) in enumerate(zip(clean, keeps)):
        reps = [rep for _, rep in patched[3 * i : 3 * i + 3]]
        for rep in reps:
            torch.testing.assert_close(rep[~keep], act[~keep], rtol=0, atol=0)
        assert (reps[1][keep] == 0).all()
        torch.testing.assert_close(reps[2][keep], mean.expand(int(keep.sum()), D), rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def planted_model(tiny_model_dir, tmp_path_factory):
    """The tiny model with the embedding of "fever" 1000x larger: a massive activation in the residual
    stream at every "fever" (as SmolLM2 layer 15 has at a few tokens). (nnsight model, hf, token id)."""
    from transformers import AutoModelForCausalLM

    from dictionary_learning.utils import load_language_model

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = tiny_tokenizer()
    target = tok.convert_tokens_to_ids("fever")
    with torch.no_grad():
        hf.get_input_embeddings().weight[target] *= 1000
    out = tmp_path_factory.mktemp("planted")
    hf.save_pretrained(out)
    tok.save_pretrained(out)
    model = load_language_model(str(out), device="cpu", dtype="float32")
    return model, model._module, target


def test_massive_tokens_left_out_of_the_headline_and_reported_in_all_tokens(planted_model):
    """Planted massive tokens: the headline metrics are those of the other real tokens, all_tokens
    those of every real token, each checked against a direct computation from a plain forward."""
    model, hf, target = planted_model
    sae = random_sae()
    r = ev.evaluate(sae, model, LAYER, "resid_post", TEXTS, **KW)
    ids, real = ev.select_contexts(TEXTS, model.tokenizer, 32, 10**9)
    got = {}
    handle = hf.model.layers[LAYER].register_forward_hook(lambda mod, inp, out: got.update(act=out))
    try:
        with torch.no_grad():
            logits = hf(ids).logits
    finally:
        handle.remove()
    act = got["act"][0] if isinstance(got["act"], tuple) else got["act"]
    W = r["n_contexts"]
    ref_norms = act[W:][real[W:]].norm(dim=-1)  # the reference windows: those after the scored ones
    limit = 10 * ref_norms.median()
    act, logits, ids, real = act[:W], logits[:W], ids[:W], real[:W]
    massive = real & (act.norm(dim=-1) > limit)
    assert torch.equal(massive, real & (ids == target))  # the rule finds exactly the planted tokens
    assert r["massive_tokens"]["dropped"] == int(massive.sum()) > 0
    assert r["massive_tokens"]["max_norm"]["blocks.1.hook_resid_post"] == pytest.approx(
        float(limit), rel=1e-5
    )

    def fve(x):
        with torch.no_grad():
            x_hat = sae(x)
        return float(1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())

    kept = real & ~massive
    assert r["n_tokens"] == int(kept.sum()) and r["all_tokens"]["n_tokens"] == int(real.sum())
    assert r["frac_variance_explained"] == pytest.approx(fve(act[kept]), rel=1e-4)
    assert r["all_tokens"]["frac_variance_explained"] == pytest.approx(fve(act[real]), rel=1e-4)
    assert r["all_tokens"]["frac_variance_explained"] != pytest.approx(r["frac_variance_explained"], abs=0.01)
    # clean next-token loss over the positions whose next token is kept / real (and that a splice reaches)
    logp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert r["loss_original"] == pytest.approx(float(-logp[loss_positions(kept)].mean()), rel=1e-5)
    assert r["all_tokens"]["loss_original"] == pytest.approx(
        float(-logp[loss_positions(real)].mean()), rel=1e-5
    )


def test_bos_first_windows_are_never_scored(tiny_model, monkeypatch):
    """prepend_bos (the default for Gemma's tokenizer; forced here): every window starts with BOS, and
    no BOS position is scored, counted in the reference or patched."""
    seen = []
    real = ev.traced_forward

    def spy(model, envoy, site, input_ids, replacement=None, stop_at_hook=False):
        act, logits = real(model, envoy, site, input_ids, replacement, stop_at_hook)
        seen.append(("reference" if stop_at_hook else "clean" if replacement is None else "patched",
                     input_ids, act if replacement is None else replacement))  # fmt: skip
        return act, logits

    monkeypatch.setattr(ev, "traced_forward", spy)
    r = ev.evaluate(random_sae(), tiny_model, LAYER, "resid_post", TEXTS, prepend_bos=True, **KW)
    tok = tiny_model.tokenizer
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert r["prepend_bos"] is True and r["massive_tokens"]["dropped"] == 0
    assert all((ids[:, 0] == bos).all() for kind, ids, _ in seen if kind != "patched")
    ordinary = lambda kind: sum(int(((ids != bos) & (ids != eos)).sum()) for k, ids, _ in seen if k == kind)
    assert r["n_tokens"] == ordinary("clean") and r["mean_ablation"]["n_tokens"] == ordinary("reference")
    clean = [(ids, act) for kind, ids, act in seen if kind == "clean"]
    patched = [rep for kind, _, rep in seen if kind == "patched"]
    assert len(patched) == 3 * len(clean)
    for i, (ids, act) in enumerate(clean):
        for rep in patched[3 * i : 3 * i + 3]:
            assert torch.equal(rep[ids == bos], act[ids == bos])  # BOS is never patched


def test_results_do_not_depend_on_batch_size(tiny_model):
    sae = random_sae()
    runs = [
        ev.evaluate(sae, tiny_model, LAYER, "resid_post", TEXTS, **{**KW, "lm_batch_size": b})
        for b in (1, 3, 8)
    ]
    for other in runs[1:]:
        assert_same_metrics(other, runs[0], rel=1e-5, abs_=1e-7)


def test_evaluate_many_equals_evaluating_each_alone(tiny_model, monkeypatch):
    """Sharing the clean / ablation passes changes nothing per SAE, and really shares them."""
    a, b, c = random_sae(seed=0), random_sae(m=3 * D, seed=5), identity_sae()
    alone = [
        ev.evaluate(s, tiny_model, LAYER, "resid_post", TEXTS, return_counts=True, **KW) for s in (a, b, c)
    ]
    assert alone[0][0]["frac_variance_explained"] != alone[1][0]["frac_variance_explained"]  # distinct SAEs
    assert alone[0][0]["loss_reconstructed"] != alone[1][0]["loss_reconstructed"]

    calls = []
    real = ev.traced_forward

    def spy(model, envoy, site, input_ids, replacement=None, stop_at_hook=False):
        calls.append("reference" if stop_at_hook else "clean" if replacement is None else "patched")
        return real(model, envoy, site, input_ids, replacement, stop_at_hook)

    monkeypatch.setattr(ev, "traced_forward", spy)
    ev.evaluate(a, tiny_model, LAYER, "resid_post", TEXTS, **KW)
    n_reference = calls.count("reference")
    calls.clear()
    together = ev.evaluate_many([a, b, c], tiny_model, LAYER, "resid_post", TEXTS, return_counts=True, **KW)
    assert len(together) == 3
    for (got, got_counts), (want, want_counts) in zip(together, alone):
        assert got == want  # bitwise: same passes, same float64 sums
        assert torch.equal(got_counts, want_counts)
    n_batches = calls.count("clean")
    assert n_batches == math.ceil(together[0][0]["n_contexts"] / KW["lm_batch_size"])
    assert calls.count("reference") == n_reference > 0  # the reference pass runs once for all SAEs
    assert calls.count("patched") == (3 + 2) * n_batches  # one splice per SAE + zero + mean, per batch


def test_evaluate_many_bad_input(tiny_model):
    with pytest.raises(ValueError, match="no SAEs"):
        ev.evaluate_many([], tiny_model, LAYER, "resid_post", TEXTS, **KW)
    with pytest.raises(ValueError, match="SAE #1 activation_dim"):
        ev.evaluate_many([random_sae(), random_sae(D + 1)], tiny_model, LAYER, "resid_post", TEXTS, **KW)


def test_our_saelens_and_gemma_scope_files_give_identical_metrics(tiny_model, tmp_path):
    sae = random_sae()
    ours = sae.save(tmp_path / "ours", {"model": "tiny", "layer": LAYER, "site": "resid_post"})
    saelens = sae.save(tmp_path / "saelens")
    (saelens / "config.json").unlink()  # SAELens layout: cfg.json + sae_weights.safetensors only
    npz = sae.export_gemma_scope(tmp_path / "gs" / "params.npz")
    results = [
        ev.evaluate(eval_report.load_sae(str(p)), tiny_model, LAYER, "resid_post", TEXTS, **KW)
        for p in (ours, saelens, npz)
    ]
    direct = ev.evaluate(sae, tiny_model, LAYER, "resid_post", TEXTS, **KW)
    for r in results:
        assert_same_metrics(r, direct, rel=1e-12)


def test_bad_arguments_get_clear_errors(tiny_model):
    with pytest.raises(ValueError, match="texts"):
        ev.evaluate(identity_sae(), tiny_model, LAYER, "resid_post", [], **KW)
    with pytest.raises(ValueError, match="activation_dim"):
        ev.evaluate(identity_sae(D + 1), tiny_model, LAYER, "resid_post", TEXTS, **KW)
    with pytest.raises(ValueError, match="layer"):
        ev.evaluate(identity_sae(), tiny_model, 7, "resid_post", TEXTS, **KW)


# ---------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory):
    """A two-trainer sweep folder written by training.trainSAE (random data: only the files matter)."""
    from dictionary_learning.config import TrainerConfig
    from dictionary_learning.training import trainSAE

    root = tmp_path_factory.mktemp("cli")
    texts_file = root / "texts.txt"
    texts_file.write_text("\n".join(TEXTS) + "\n")
    g = torch.Generator().manual_seed(0)
    data = iter([torch.randn(64, D, generator=g) for _ in range(20)])
    configs = [
        TrainerConfig(
            activation_dim=D,
            dict_size=w,
            target_l0=t,
            lr=1e-3,
            warmup_steps=2,
            sparsity_warmup_steps=5,
            device="cpu",
        )
        for w, t in ((64, 8), (128, 16))
    ]
    run_meta = {
        "model": str(tiny_model_dir),
        "layer": LAYER,
        "site": "resid_post",
        "hook": "blocks.1.hook_resid_post",
        "dataset": str(texts_file),
        "buffer": {"ctx_len": 32},
        "seed": 0,
        "validation_fraction": 0.1,
    }
    dirs = trainSAE(
        data,
        configs,
        steps=20,
        save_dir=root / "runs",
        run_meta=run_meta,
        log_every=5,
        checkpoint_every=10,
        norm_batches=2,
        progress=False,
    )
    return root, [Path(d) for d in dirs]


def test_cli_evaluates_a_sweep_and_writes_reports(trained_run, monkeypatch):
    import dataset
    from dictionary_learning import eval_report, utils

    root, dirs = trained_run
    splits, loads = [], []
    real_load_texts, real_load_model = dataset.load_texts, utils.load_language_model
    monkeypatch.setattr(
        dataset, "load_texts", lambda *a, **k: splits.append(k.get("split")) or real_load_texts(*a, **k)
    )
    monkeypatch.setattr(
        utils, "load_language_model", lambda *a, **k: loads.append(a) or real_load_model(*a, **k)
    )

    groups = []
    real_many = eval_report.evaluate_many
    monkeypatch.setattr(
        eval_report,
        "evaluate_many",
        lambda saes, *a, **k: groups.append(len(saes)) or real_many(saes, *a, **k),
    )

    run_dir = root / "runs"
    assert eval_report.main([str(run_dir), "--n-tokens", "300", "--lm-batch-size", "4", "--no-progress"]) == 0
    # held-out text scored; the train split only for the reference tokens (mean ablation, median norm)
    assert splits == ["validation", "train"] and len(loads) == 1  # the model loaded once
    assert groups == [2]  # same model, hook and data: both SAEs share one evaluation

    rows = list(csv.DictReader(open(run_dir / "eval_summary.csv")))
    assert len(rows) == 2
    for d, row in zip(sorted(dirs), rows):
        res = json.loads((d / "eval_results.json").read_text())
        assert res["eval"]["split"] == "validation" and res["n_tokens"] >= 300 and res["ctx_len"] == 32
        assert row["trainer"].endswith(d.name)
        assert float(row["frac_variance_explained"]) == res["frac_variance_explained"]
        assert float(row["l0"]) == res["l0"] and int(row["dict_size"]) == res["dict_size"]
        from safetensors.torch import load_file

        assert load_file(d / "sparsity.safetensors")["sparsity"].shape == (res["dict_size"],)
        assert_png(d / "feature_density.png")
    md = (run_dir / "eval_summary.md").read_text().splitlines()
    assert len(md) == 6 and md[0].startswith("| trainer |") and md[4] == ""
    assert "FVE (standard)" in md[0] and "FVE (centred)" in md[0] and "loss rec. (mean abl.)" in md[0]
    assert "SAELens, SAEBench" in md[5] and "dictionary_learning" in md[5]  # the definitions are named
    assert all(d.name in "".join(md) for d in dirs)
    for d, line in zip(sorted(dirs), md[2:4]):  # metric [95% interval] cells, from eval_results.json
        res = json.loads((d / "eval_results.json").read_text())
        lo, hi = res["frac_variance_explained_ci"]
        assert lo <= res["frac_variance_explained"] <= hi
        assert f"{res['frac_variance_explained']:.4f} [{lo:.4f}, {hi:.4f}]" in line
    row = rows[0]
    assert float(row["frac_variance_explained_lo"]) <= float(row["frac_variance_explained"])
    for name in ("frontier_fve.png", "frontier_loss_recovered.png", "training_curves.png"):
        assert_png(run_dir / name)

    # the CLI's numbers are evaluate()'s on the same validation texts
    texts = real_load_texts(str(root / "texts.txt"), split="validation", seed=0, validation_fraction=0.1)
    train = real_load_texts(str(root / "texts.txt"), split="train", seed=0, validation_fraction=0.1)
    res = json.loads((dirs[0] / "eval_results.json").read_text())
    from dictionary_learning.utils import load_language_model

    direct = ev.evaluate(
        eval_report.load_sae(str(dirs[0])),
        load_language_model(res["eval"]["model"], device="cpu"),
        LAYER,
        "resid_post",
        texts,
        mean_texts=train,
        n_tokens=300,
        lm_batch_size=2,
        ctx_len=32,
        progress=False,
    )
    assert_same_metrics({k: res[k] for k in direct}, direct, rel=1e-5, abs_=1e-7)


def test_cli_evaluates_an_external_npz_by_the_same_procedure(trained_run, tmp_path):
    from dictionary_learning import eval_report

    root, dirs = trained_run
    npz = eval_report.load_sae(str(dirs[0])).export_gemma_scope(tmp_path / "params.npz")
    args = ["--n-tokens", "300", "--lm-batch-size", "3", "--no-progress"]
    ours = eval_report.main([str(dirs[0]), *args])
    ext = eval_report.main(
        [
            str(npz),
            "--model",
            json.loads((dirs[0] / "config.json").read_text())["model_name"],
            "--layer",
            str(LAYER),
            "--site",
            "resid_post",
            "--dataset",
            str(root / "texts.txt"),
            "--ctx-len",
            "32",
            "--no-prepend-bos",  # a params.npz defaults to Gemma Scope's protocol: BOS first
            *args,
        ]
    )
    assert ours == ext == 0
    a = json.loads((dirs[0] / "eval_results.json").read_text())
    b = json.loads((tmp_path / "eval_results.json").read_text())
    metrics = [k for k in a if k != "eval"]
    assert_same_metrics({k: b[k] for k in metrics}, {k: a[k] for k in metrics}, rel=1e-12)
    assert (tmp_path / "eval_summary.md").exists() and (tmp_path / "sparsity.safetensors").exists()


def test_eval_groups_share_model_hook_and_data_only():
    from dictionary_learning import eval_report

    base = dict(model="m", layer=1, site="resid_post", dataset="d", seed=0, validation_fraction=0.1)
    base.update(ctx_len=32, exclude_first_k=0, prepend_bos=False, max_norm_multiple=10.0)
    settings = [
        base,
        {**base, "layer": 2},
        {**base, "model": "a"},  # another model: its group comes first (models sorted)
        dict(base),
        {**base, "ctx_len": 64},
        {**base, "exclude_first_k": 1},
        {**base, "seed": 1},  # another validation split
        dict(base),
        {**base, "prepend_bos": True},
        {**base, "max_norm_multiple": None},
    ]
    assert eval_report.eval_groups(settings, 16) == [[2], [0, 3, 7], [1], [4], [5], [6], [8], [9]]
    assert eval_report.eval_groups(settings, 2) == [[2], [0, 3], [7], [1], [4], [5], [6], [8], [9]]


def test_cli_bad_run_dir_exits_2_with_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "missing", tmp_path / "empty"):
        r = subprocess.run(
            [sys.executable, "-m", "dictionary_learning.eval_report", str(target)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 2
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and str(target) in lines[0]


def test_external_sae_without_model_field_names_the_flag(tmp_path):
    from dictionary_learning import eval_report

    npz = random_sae().export_gemma_scope(tmp_path / "params.npz")
    with pytest.raises(ValueError, match="--model"):
        eval_report.run_settings(npz, eval_report.parse_args([str(npz)]))


def test_external_sae_scored_on_its_own_training_data_is_flagged(tmp_path, caplog):
    """A SAELens folder names its training data set; splitting it here cannot exclude the texts the SAE
    was trained on, so the CLI warns and records it, unless --dataset names other text."""
    from dictionary_learning import eval_report

    folder = tmp_path / "saelens"
    folder.mkdir()
    meta = {"model_name": "m", "hook_name": "blocks.1.hook_resid_post", "dataset_path": "org/their-data"}
    (folder / "cfg.json").write_text(
        json.dumps({"architecture": "jumprelu", "d_in": 8, "d_sae": 16, "metadata": meta})
    )
    with caplog.at_level("WARNING"):
        s = eval_report.run_settings(folder, eval_report.parse_args([str(folder)]))
    assert s["dataset"] == "org/their-data" and "may overlap" in s["dataset_from"]
    assert "own training data" in caplog.text and "--dataset" in caplog.text
    s = eval_report.run_settings(folder, eval_report.parse_args([str(folder), "--dataset", "sample"]))
    assert s["dataset"] == "sample" and "dataset_from" not in s


def assert_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path


def test_find_saes_skips_checkpoints_and_needs_a_config(tmp_path):
    from dictionary_learning.eval_summary import find_saes

    sae = random_sae()
    for sub in ("a", "b", "a/checkpoints/step_00000064"):
        sae.save(tmp_path / sub, {"model": "m", "layer": 1, "site": "resid_post"})
    (tmp_path / "b" / "config.json").unlink()
    (tmp_path / "b" / "cfg.json").unlink()  # weights alone are not an SAE folder
    assert find_saes(tmp_path) == [tmp_path / "a"]
    assert find_saes(tmp_path / "a") == [tmp_path / "a"]
    with pytest.raises(FileNotFoundError, match="no SAE found"):
        find_saes(tmp_path / "b")
