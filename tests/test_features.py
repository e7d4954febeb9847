"""Feature browser: streaming statistics against brute force, the logit lens against the model's own
modules, the built data against a direct forward pass, the CLI's one-line errors, and the page in a
real headless Chromium (skipped, naming the reason, where Chromium or Playwright is missing).

The language model is test_evaluation.py's tiny random Llama with a word-level tokenizer.
"""

import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from test_evaluation import TEXTS, planted_model, tiny_model_dir  # noqa: F401  (fixtures reused)

from dictionary_learning import features as fe
from dictionary_learning.dictionary import JumpReluAutoEncoder
from dictionary_learning.feature_stats import LatentStats, RunningTopK, logit_lens, round_sig, similar_latents

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
D, M, LAYER, CTX = 32, 48, 1, 32


def sparse_acts(n=600, m=30, density=0.08, seed=0):
    """Random non-negative activations [n, m], mostly zero; latent 0 never fires, latent 1 fires twice."""
    g = torch.Generator().manual_seed(seed)
    f = torch.rand(n, m, generator=g) * (torch.rand(n, m, generator=g) < density) * 5
    f[:, 0] = 0
    f[:, 1] = 0
    f[[3, 400], 1] = torch.tensor([1.5, 2.5])
    return f


def stream(stats, f, pos, sizes=(1, 7, 64, 5, 200)):
    i, j = 0, 0
    while i < len(f):
        b = sizes[j % len(sizes)]
        stats.update(f[i : i + b], pos[i : i + b])
        i, j = i + b, j + 1


# ---------------------------------------------------------------------------- streaming statistics


def test_streaming_top_k_equals_brute_force():
    f = sparse_acts()
    pos = torch.randperm(10_000, generator=torch.Generator().manual_seed(1))[: len(f)]  # any positions
    k = 6
    stats = LatentStats(f.shape[1], k)
    stream(stats, f, pos)
    for j in range(f.shape[1]):
        col = f[:, j]
        nz = col.nonzero().flatten().tolist()
        want = sorted(nz, key=lambda t: -col[t].item())[:k]  # brute force: sort every firing token
        got_v, got_p = stats.top.values[j], stats.top.positions[j]
        assert got_p[: len(want)].tolist() == [pos[t].item() for t in want], j
        assert got_v[: len(want)].tolist() == [col[t].item() for t in want], j
        assert (got_p[len(want) :] == -1).all() and torch.isinf(got_v[len(want) :]).all()
        assert stats.fires[j] == len(nz)
        if nz:
            assert stats.max[j] == max(col[t] for t in nz) and stats.min[j] == min(col[t] for t in nz)
    assert stats.n_tokens == len(f)


def test_running_top_k_keeps_the_largest_across_batches():
    t = RunningTopK(rows=2, k=2)
    t.update(torch.tensor([0, 0, 1]), torch.tensor([1.0, 3.0, 2.0]), torch.tensor([10, 11, 12]))
    t.update(torch.tensor([0, 1, 1]), torch.tensor([2.0, 5.0, 1.0]), torch.tensor([13, 14, 15]))
    assert t.values.tolist() == [[3.0, 2.0], [5.0, 2.0]]
    assert t.positions.tolist() == [[11, 13], [14, 12]]


def brute_range(vmax: float) -> float:
    """The histogram range by hand: the power of two just above the max."""
    return 2.0 ** (math.floor(math.log2(vmax)) + 1)


@pytest.mark.parametrize("order", ["random", "growing"])
def test_histogram_counts_sum_to_firing_counts_and_match_numpy(order):
    """Growing: activations scaled up over the stream, so each latent's range doubles many times."""
    import numpy as np

    f = sparse_acts(seed=3)
    if order == "growing":
        f = f * torch.logspace(-3, 2, len(f))[:, None]
    s = LatentStats(f.shape[1], k=4, n_bins=16)
    stream(s, f, torch.arange(len(f)))
    fires = (f != 0).sum(0)
    assert torch.equal(s.hist.sum(1), fires)
    for j in range(f.shape[1]):
        v = f[:, j][f[:, j] != 0]
        if len(v):
            want, _ = np.histogram(v.numpy(), bins=16, range=(0.0, brute_range(v.max().item())))
            assert s.hist[j].tolist() == want.tolist(), j


def test_band_samples_lie_in_their_band_and_are_uniform():
    f = sparse_acts(n=3000, density=0.2, seed=5)
    f = f * torch.linspace(0.1, 1, len(f))[:, None]  # growing: bins merge as the stream goes
    s = LatentStats(f.shape[1], k=4, n_bins=32, per_bin=3)
    stream(s, f, torch.arange(len(f)))
    counts, samples = s.bands()
    for j in range(2, f.shape[1]):
        v = f[:, j]
        vmax = v.max().item()
        R = brute_range(vmax)
        edge = torch.floor(v / R * 32) * R / 32  # lower edge of each token's bin
        for b, (lo, hi) in enumerate(((0.0, 0.25), (0.25, 0.5), (0.5, 0.75))):
            members = set(((v > 0) & (edge >= lo * vmax) & (edge < hi * vmax)).nonzero().flatten().tolist())
            got = [p for p in samples[j, b].tolist() if p >= 0]
            assert counts[j, b] == len(members)
            assert len(got) == min(3, len(members)) and len(set(got)) == len(got)
            assert set(got) <= members, (j, b)
    # over many seeds each token of a band is sampled about equally often, bins merged or not
    col = torch.cat([torch.linspace(0.01, 0.24, 40), torch.ones(1)])[:, None]  # 40 in [0, 1/4) of max 1
    hits = torch.zeros(41)
    for seed in range(300):
        s = LatentStats(1, k=1, n_bins=64, per_bin=3, seed=seed)
        stream(s, col, torch.arange(41), sizes=(9,))
        hits[s.bands()[1][0, 0]] += 1
    assert hits.sum() == 900 and hits[40] == 0 and hits[:40].min() > 5 and hits[:40].max() < 45  # 22.5 each


def test_round_sig_and_similar_latents():
    assert round_sig(torch.tensor([12.345, 0.0012345, 98765.0, 0.0, -3.14159, float("nan")])) == [
        12.3, 0.00123, 98800.0, 0, -3.14, None,
    ]  # fmt: skip
    w = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    ids, cos = similar_latents(w, torch.tensor([0, 7, 49]), k=5, chunk=2)
    unit = w / w.norm(dim=1, keepdim=True)
    for r, latent in enumerate([0, 7, 49]):
        brute = sorted(((unit[latent] @ unit[j]).item(), j) for j in range(50) if j != latent)[::-1][:5]
        assert ids[r].tolist() == [j for _, j in brute]
        assert cos[r].tolist() == pytest.approx([c for c, _ in brute], abs=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
def test_logit_lens_equals_the_models_own_norm_and_unembedding(arch):
    """W_U·(g ⊙ v) equals lm_head(final_norm(v)) times the norm's 1/rms (1/std for LayerNorm) factor,
    computed here by the model's own modules; Gemma-2's RMSNorm scales by (1 + weight)."""
    import transformers as tr

    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    if arch == "gpt2":
        model = tr.GPT2LMHeadModel(tr.GPT2Config(vocab_size=97, n_embd=16, n_layer=1, n_head=2))
        norm = model.transformer.ln_f
    else:
        cls = {
            "llama": (tr.LlamaConfig, tr.LlamaForCausalLM),
            "gemma2": (tr.Gemma2Config, tr.Gemma2ForCausalLM),
        }
        cfg = cls[arch][0](**common, intermediate_size=32, num_key_value_heads=1, head_dim=8)
        model = cls[arch][1](cfg)
        norm = model.model.norm
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))  # a gain far from 1 (and from 0 for Gemma's 1 + w)
        if getattr(norm, "bias", None) is not None:
            norm.bias.zero_()
    W_dec = torch.randn(12, 16)
    top_i, top_v, bot_i, bot_v, info = logit_lens(model, W_dec, k=10, chunk=5)
    with torch.no_grad():
        logits = model.lm_head(norm(W_dec))  # the model's path
        if arch == "gpt2":
            c = W_dec - W_dec.mean(-1, keepdim=True)
            scale = torch.sqrt(c.pow(2).mean(-1, keepdim=True) + norm.eps)
        else:
            eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
            scale = torch.sqrt(W_dec.pow(2).mean(-1, keepdim=True) + eps)
        want = logits * scale
    assert torch.equal(top_i, want.topk(10, dim=1).indices)
    assert torch.equal(bot_i, want.topk(10, dim=1, largest=False).indices)
    assert top_v == pytest.approx(want.topk(10, dim=1).values, rel=1e-4, abs=1e-5)
    assert bot_v == pytest.approx(want.topk(10, dim=1, largest=False).values, rel=1e-4, abs=1e-5)
    assert info["gain"] == {"llama": "weight", "gemma2": "1 + weight", "gpt2": "weight"}[arch]


def test_parse_latents():
    assert fe.parse_latents("all", 5).tolist() == [0, 1, 2, 3, 4]
    assert fe.parse_latents("3", 5).tolist() == [0, 1, 2]
    assert fe.parse_latents("4,1,1", 5).tolist() == [1, 4]
    assert fe.parse_latents("2,", 5).tolist() == [2]
    for bad in ("6", "0", "1,5", "-1,2"):
        with pytest.raises(ValueError, match="out of range"):
            fe.parse_latents(bad, 5)
    with pytest.raises(ValueError, match="expected 'all'"):
        fe.parse_latents("some", 5)


# ---------------------------------------------------------------------------- a real build


def make_sae(folder: Path, model_dir, dataset, d=D, m=M, **extra) -> Path:
    """A random JumpReLU SAE whose config names the tiny model; latents 0 and 1 can never fire."""
    sae = JumpReluAutoEncoder(d, m, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.threshold.copy_(torch.rand(m, generator=torch.Generator().manual_seed(1)) * 0.3)
        sae.threshold[:2] = 1e6
    cfg = {"model": str(model_dir), "layer": LAYER, "site": "resid_post", "dataset": str(dataset),
           "ctx_len": CTX, "exclude_first_k": 1, "run_meta": {"data_seed": 0, "validation_fraction": 0.5}}  # fmt: skip
    sae.save(folder, {**cfg, **extra})
    return folder


@pytest.fixture(scope="module")
def built(tiny_model_dir, tmp_path_factory):  # noqa: F811
    """The browser of a random SAE on the tiny model, and a brute-force harvest of the same windows."""
    from dataset import load_texts
    from dictionary_learning.evaluation import select_contexts
    from dictionary_learning.utils import load_language_model

    tmp = tmp_path_factory.mktemp("features")
    data = tmp / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    sae_dir = make_sae(tmp / "sae", tiny_model_dir, data)
    rc = fe.main([str(sae_dir), "--n-tokens", "1500", "--no-progress", "--device", "cpu"])
    assert rc == 0
    out = sae_dir / "features"
    # brute force: every window through the plain HF model, every latent on every scored token
    model = load_language_model(str(tiny_model_dir), device="cpu")
    texts = load_texts(str(data), split="validation", seed=0, validation_fraction=0.5)
    ids, keep = select_contexts(texts, model.tokenizer, CTX, 1500, 1)
    hf, got = model._module, {}
    h = hf.model.layers[LAYER].register_forward_hook(
        lambda mod, i, o: got.update(x=o[0] if isinstance(o, tuple) else o)
    )
    with torch.no_grad():
        hf(input_ids=ids)
        f = JumpReluAutoEncoder.from_pretrained(sae_dir).encode(got["x"])  # [N, T, m]
    h.remove()
    f[~keep] = float("nan")
    return {"out": out, "ids": ids, "keep": keep, "f": f, "tok": model.tokenizer, "sae_dir": sae_dir}


def test_massive_tokens_are_shown_but_never_scored(planted_model):  # noqa: F811
    """The evaluation's massive-token rule: the planted "fever" activations (1000x) are no latent's
    top context and are counted in the data's meta."""
    model, _, target = planted_model
    sae = JumpReluAutoEncoder(D, M, generator=torch.Generator().manual_seed(0))
    data = fe.collect(sae, model, LAYER, "resid_post", TEXTS, CTX, cfg=fe.BrowserConfig(n_tokens=800, min_tokens=10),
                      device="cpu", progress=False)  # fmt: skip
    windows, vocab_ids = data["index"]["windows"], data["index"]["vocab_ids"]
    n_fever = sum(vocab_ids[t] == target for w in windows for t in w)
    assert data["index"]["meta"]["massive_tokens"]["dropped"] == n_fever > 0
    centres = [(c[0], c[2]) for r in data["latents"] for c in r["top"]]
    assert centres and all(vocab_ids[windows[w][p]] != target for w, p in centres)
    with_them = fe.collect(sae, model, LAYER, "resid_post", TEXTS, CTX, cfg=fe.BrowserConfig(n_tokens=800, min_tokens=10),
                           device="cpu", progress=False, max_norm_multiple=None)  # fmt: skip
    centres = [(c[0], c[2]) for r in with_them["latents"] for c in r["top"]]
    assert any(vocab_ids[windows[w][p]] == target for w, p in centres)  # the control: they would dominate


def load_js(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    return json.loads(text[text.index("]=") + 2 : text.rstrip().rindex(";")])


def test_built_data_matches_a_direct_forward_pass(built):
    out, f, ids = built["out"], built["f"], built["ids"]
    index = load_js(out / "data" / "index.js")
    assert index == json.loads((out / "data" / "index.json").read_text())
    assert index["schema_version"] == 1 and index["meta"]["n_tokens"] == int(built["keep"].sum())
    assert index["latents"]["id"] == list(range(M))
    vocab = index["vocab"]
    assert [[vocab[t] for t in w] for w in index["windows"]] == [
        built["tok"].batch_decode([[i] for i in row]) for row in ids.tolist()
    ]
    recs = {r["id"]: r for name in index["files"] for r in load_js(out / "data" / f"{name}.js")["latents"]}
    flat = f.reshape(-1, M)
    for j in range(M):
        col = flat[:, j].nan_to_num(0.0)
        fires = int((col > 0).sum())
        r = recs[j]
        assert r["fires"] == fires == index["latents"]["fires"][j]
        assert sum(r["hist"]["counts"]) == fires
        if fires == 0:
            assert j in (0, 1) and r["top"] == [] and r["density_log10"] == -10
            continue
        assert r["density_log10"] == pytest.approx(math.log10(fires / index["meta"]["n_tokens"]), abs=1e-3)
        best = col.topk(min(20, fires))
        assert len(r["top"]) == len(best.values)
        assert len({(w, c) for w, _, c, _ in r["top"]}) == len(r["top"])  # distinct tokens
        for (w, s, c, vals), v in zip(r["top"], best.values.tolist()):  # ties may pick either token
            assert f[w, c, j].item() == pytest.approx(v, rel=1e-5) and vals[c - s] == pytest.approx(
                v, rel=5e-3
            )
            assert s == max(0, c - 10) and len(vals) == min(CTX, c + 11) - s
            want = f[w, s : s + len(vals), j].tolist()  # neighbours, NaN where not scored
            assert [x is None for x in vals] == [math.isnan(x) for x in want]
            assert [x for x in vals if x is not None] == pytest.approx(
                [x for x in want if not math.isnan(x)], rel=5e-3, abs=1e-6
            )
        vmax = col.max().item()
        R = brute_range(vmax)
        for b in r["bands"]:  # the band of a token: the lower edge of its histogram bin (64 bins)
            for w, _, c, _ in b["samples"]:
                edge = math.floor(f[w, c, j].item() / R * 64) * R / 64
                assert b["lo"] * vmax <= edge < b["hi"] * vmax
        assert len(r["logits"]["promoted"]) == 10 and len(r["similar"]) == 5


def test_rebuild_into_our_folder_works_and_a_failure_leaves_no_folder(built, monkeypatch, capsys):
    sae_dir, out = built["sae_dir"], built["sae_dir"] / "rebuilt"
    args = [str(sae_dir), "--n-tokens", "1200", "--latents", "8", "--no-progress", "--out", str(out)]
    assert fe.main(args) == 0
    assert fe.main(args) == 0  # our own folder (marker file) is replaced
    assert len(load_js(out / "data" / "index.js")["latents"]["id"]) == 8

    def boom(data, folder):
        (Path(folder) / "half.js").write_text("x")
        raise OSError("disk full")

    monkeypatch.setattr(fe, "write_browser", boom)
    fresh = sae_dir / "fresh"
    assert fe.main([*args[:-1], str(fresh)]) == 2
    assert "disk full" in capsys.readouterr().err
    leftovers = [p.name for p in sae_dir.iterdir() if p.name.startswith("fresh")]
    assert leftovers == []


def test_demo_builds_the_middle_target_l0(tmp_path, monkeypatch):
    folders = []
    for t in (80, 20, 40, 160):
        (tmp_path / f"tl0-{t}").mkdir()
        trainer = {"sparsity_mode": "target_l0", "target_l0": t}
        (tmp_path / f"tl0-{t}" / "config.json").write_text(json.dumps({"trainer": trainer}))
        folders.append(tmp_path / f"tl0-{t}")
    built_for = []
    monkeypatch.setattr(fe, "build", lambda args, models: built_for.append(Path(args.sae_path).name))
    fe.build_for_run(folders, "middle", ["--device", "cpu"])
    assert built_for == ["tl0-40"]  # sorted 20, 40, 80, 160: the lower middle
    fe.build_for_run(folders, "all")
    assert built_for[1:] == ["tl0-20", "tl0-40", "tl0-80", "tl0-160"]


def test_demo_builds_the_middle_measured_l0_without_a_target(tmp_path, monkeypatch):
    """An 'l0' (or 'tanh') sweep: target_l0 keeps its unused default (64) in every config, so the pick is
    by the measured L0 of eval_results.json (names sort the other way round)."""
    folders = []
    for name, l0 in (("a", 90.0), ("b", 30.0), ("c", 10.0)):
        (tmp_path / name).mkdir()
        trainer = {"sparsity_mode": "l0", "target_l0": 64.0, "sparsity_coeff": 1.0}
        (tmp_path / name / "config.json").write_text(json.dumps({"trainer": trainer}))
        (tmp_path / name / "eval_results.json").write_text(json.dumps({"l0": l0}))
        folders.append(tmp_path / name)
    built_for = []
    monkeypatch.setattr(fe, "build", lambda args, models: built_for.append(Path(args.sae_path).name))
    fe.build_for_run(folders, "all")
    assert built_for == ["c", "b", "a"]


@pytest.mark.parametrize(
    "case, words",
    [
        ("width", ["SAE width 16", "width 32", "blocks.1.hook_resid_post"]),
        ("latents", ["--latents 49", "out of range", "48 latents"]),
        ("latents_list", ["--latents 3,99", "out of range", "0..47"]),
        ("out_not_ours", ["--out", "not written by this command", "--overwrite"]),
        ("empty", ["validation split", "no text"]),
        ("small", ["--dataset", "only", "real tokens", "--min-tokens"]),
    ],
)
def test_bad_input_one_line_errors(case, words, tiny_model_dir, tmp_path, capsys):  # noqa: F811
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    args = ["--no-progress", "--device", "cpu", "--n-tokens", "1200"]
    sae = make_sae(tmp_path / "sae", tiny_model_dir, data)
    if case == "width":
        sae = make_sae(tmp_path / "narrow", tiny_model_dir, data, d=16)
    elif case == "latents":
        args += ["--latents", "49"]
    elif case == "latents_list":
        args += ["--latents", "3,99"]
    elif case == "out_not_ours":
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "notes.txt").write_text("keep me")
        args += ["--out", str(tmp_path / "mine")]
    elif case == "empty":
        (tmp_path / "blank.txt").write_text("\n \n")
        args += ["--dataset", str(tmp_path / "blank.txt")]
    elif case == "small":
        (tmp_path / "few.txt").write_text("Patient 1 presented with fever.\nThe nurse ordered an ECG.\n")
        args += ["--dataset", str(tmp_path / "few.txt")]
    capsys.readouterr()
    assert fe.main([str(sae), *args]) == 2
    stderr = capsys.readouterr().err  # may also hold transformers' loading bars
    err = [ln for ln in stderr.splitlines() if ln.startswith("error")]
    assert len(err) == 1 and "Traceback" not in stderr, stderr
    for w in words:
        assert w in err[0], err[0]
    if case == "out_not_ours":
        assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
        assert fe.main([str(sae), *args, "--overwrite"]) == 0
        assert (tmp_path / "mine" / "index.html").exists() and not (tmp_path / "mine" / "notes.txt").exists()


# ---------------------------------------------------------------------------- the page in Chromium

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


def chromium_path() -> str | None:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def browser():
    # CI (.ci/run) sets SAE_REQUIRE_BROWSER=1: there a missing browser fails instead of skipping
    missing = pytest.fail if os.environ.get("SAE_REQUIRE_BROWSER") else pytest.skip
    exe = chromium_path()
    if exe is None:
        missing("Chromium not found (apt-get install chromium; or set $CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed (pip install -r requirements-dev.txt)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        yield b
        b.close()


def open_page(browser, index_html: Path):
    page = browser.new_page()
    problems = []
    page.on(
        "console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None
    )
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("request", lambda r: None if r.url.startswith("file://") else problems.append(f"request {r.url}"))
    t0 = time.perf_counter()
    page.goto(index_html.as_uri())
    page.wait_for_selector("body[data-ready='1']", timeout=10_000)
    return page, problems, time.perf_counter() - t0


def test_page_in_headless_chromium(built, browser):
    f, ids, tok = built["f"], built["ids"], built["tok"]
    page, problems, wall = open_page(browser, built["out"] / "index.html")
    ready_ms = page.evaluate("FB.readyMs")
    assert ready_ms < 2000 and wall < 5, (ready_ms, wall)

    # the table lists every latent; the ones that never fire are marked dead
    rows = page.locator("#latents tbody tr")
    assert rows.count() == M
    assert sorted(int(x) for x in rows.evaluate_all("rs => rs.map(r => r.dataset.id)")) == list(range(M))
    flat = f.reshape(-1, M).nan_to_num(0.0)
    fires = (flat > 0).sum(0)
    dead = page.locator("#latents tbody tr.dead").evaluate_all("rs => rs.map(r => Number(r.dataset.id))")
    assert sorted(dead) == (fires == 0).nonzero().flatten().tolist() == [0, 1]
    assert page.locator("#latents tbody tr[data-id='0'] td").nth(1).inner_text() == "dead"

    # clicking a latent shows its top contexts, coloured by activation, the value on hover
    j = int(fires.argmax())
    page.click(f"#latents tbody tr[data-id='{j}']")
    page.wait_for_selector(".card .top .ctx")
    assert page.locator(".card h2").inner_text().startswith(f"Latent {j}")
    assert page.locator(".card .top .ctx").count() == min(20, int(fires[j]))
    coloured = page.locator(".card .top .tok.on")
    assert coloured.count() >= min(20, int(fires[j]))
    assert coloured.first.evaluate("e => getComputedStyle(e).backgroundColor").startswith("rgba(255, 102, 0")
    best = flat[:, j].max().item()
    first_val = float(page.locator(".card .top .ctx .tok.center").first.get_attribute("title"))
    assert first_val == pytest.approx(best, rel=5e-3)

    # sorting by max activation puts the latent with the largest activation first
    page.click("#latents th[data-key='max']")
    top_row = int(page.locator("#latents tbody tr").first.get_attribute("data-id"))
    assert top_row == int(flat.max(0).values.argmax())

    # search by a token a latent fires on (its strongest token, found by brute force) finds it
    k = int(fires.argsort(descending=True)[1])
    p = int(flat[:, k].argmax())
    word = tok.decode([ids.flatten()[p].item()]).strip()
    assert re.fullmatch(r"\w+", word), word
    page.fill("#search", word)
    visible = page.locator("#latents tbody tr:not([hidden])").evaluate_all(
        "rs => rs.map(r => Number(r.dataset.id))"
    )
    assert k in visible and len(visible) < M
    page.fill("#search", str(k))
    visible = page.locator("#latents tbody tr:not([hidden])").evaluate_all(
        "rs => rs.map(r => Number(r.dataset.id))"
    )
    assert visible == [k]

    # a dead latent's card says so; similar-latent links open their card
    page.fill("#search", "")
    page.click("#latents tbody tr[data-id='0']")
    page.wait_for_selector(".card.dead")
    assert "Never fired" in page.locator(".card .stats").inner_text()
    link = page.locator(".card .similar a").first
    target = int(link.inner_text().split()[-1])
    link.click()
    page.wait_for_function(f"document.querySelector('.card h2').textContent.startsWith('Latent {target}')")
    assert problems == []
    page.close()


def test_notebook_card_renders_in_chromium(built, browser):
    """features_html.card_html (the notebook's cell) is self-contained and draws the same card."""
    from dictionary_learning.features_html import card_html

    out, f = built["out"], built["f"]
    index = load_js(out / "data" / "index.js")
    records = [r for name in index["files"] for r in load_js(out / "data" / f"{name}.js")["latents"]]
    fires = (f.reshape(-1, M).nan_to_num(0.0) > 0).sum(0)
    j = int(fires.argmax())
    snippet = card_html({"index": index, "latents": records}, j)
    assert "<script src" not in snippet and snippet.count("</script>") == 1  # one inline script, no files
    page = browser.new_page()
    problems = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.set_content(f"<!doctype html><html><body>{snippet}</body></html>")
    page.wait_for_selector(".card .top .ctx")
    assert page.locator(".card h2").inner_text().startswith(f"Latent {j}")
    assert page.locator(".card .top .ctx").count() == min(20, int(fires[j]))
    assert page.locator(".card .top .tok.on").count() >= min(20, int(fires[j]))
    assert problems == []
    page.close()


def test_benchmark_sae_fires_at_the_calibrated_l0():
    """benchmarks/bench_features.py's data-initialised SAE: each threshold is the (1 - density) quantile
    of its latent's pre-activation on the calibration rows, so its L0 there is the asked-for one."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_features.py"
    spec = importlib.util.spec_from_file_location("bench_features", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    x = torch.randn(4000, 16, generator=torch.Generator().manual_seed(0)) + 3.0
    sae = bench.calibrated_sae(x, 1024, l0=20.0)
    with torch.no_grad():
        z = x @ sae.W_enc + sae.b_enc  # computed here, not by the SAE
        l0 = float((z > sae.threshold).sum(1).float().mean())
        assert torch.equal(sae.encode(x) != 0, z > sae.threshold)
    assert l0 == pytest.approx(20.0, rel=0.05)
