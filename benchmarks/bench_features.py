"""Feature-browser build time against a bare harvest of the same tokens, folder size, page speed.

    python benchmarks/bench_features.py --json        # prints ONE JSON object

Setting (issue 15): embedded SmolLM2-135M, layer 15 resid_post, fp32 CPU, ctx 128, exclude_first_k 1,
4608 latents, 50k held-out tokens of PubMedQA (../shared/data/pubmedqa/ori_pqal_800.json: the 800
expert-labelled records, text = question + contexts; records 0-699 are browsed, 700-799 calibrate the
SAE). Without that file the benchmark prints {"skipped": reason}. Its text never enters the repo.

The SAE is data-initialised, not trained (training one takes minutes): W_dec rows are the centred
activations of 4608 random calibration tokens, unit norm; W_enc = W_decᵀ, b_enc = -mean·W_enc,
b_dec = mean; each latent's threshold is set on the calibration tokens so that the densities are
log-uniform in [1e-4, 3e-2], scaled to L0 = 40. So latents fire on specific contexts, with a
realistic spread of densities, and L0 near 40 on the browsed text.

Measured in one process: the build (features.collect + writing the folder: the CLI minus loading
model, SAE and text) and the bare harvest of the same windows (the HF module stopped by a hook
raising after layer 15: no nnsight, no SAE), interleaved batch by batch: after each of the build's
forward passes the bare one runs on the same windows, timed apart and taken out of the build's time
(`PairedBare`), so a change of load from other processes on a shared machine hits both alike.
ratio = build / bare harvest in wall time; ratio_cpu the same in process CPU time; the folder's
size; and in
headless Chromium (Debian's, through Playwright) the time from navigation to the populated table
(FB.readyMs, the page's performance.now()), the wall time of page.goto until then, and the time to
open one latent's card. Chromium or Playwright missing: those fields are null, with the reason.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dictionary_learning import features  # noqa: E402
from dictionary_learning.dictionary import JumpReluAutoEncoder  # noqa: E402
from dictionary_learning.evaluation import select_contexts  # noqa: E402
from dictionary_learning.features_html import write_browser  # noqa: E402
from dictionary_learning.hooks import get_layers  # noqa: E402
from dictionary_learning.utils import load_language_model, write_dir_atomic  # noqa: E402

PUBMEDQA = REPO.parent / "shared" / "data" / "pubmedqa" / "ori_pqal_800.json"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


def pubmedqa_texts(path: Path) -> list[str]:
    records = json.loads(path.read_text())
    return [r["QUESTION"] + " " + " ".join(r["CONTEXTS"]) for r in records.values()]


class _Stop(Exception):
    pass


class PairedBare:
    """Wraps features.traced_forward: after each of the build's forward passes, the bare forward runs
    on the same windows (the HF module stopped by a hook raising after `layer`: no nnsight, no SAE)
    and its wall and CPU seconds are summed apart, to be taken out of the build's time."""

    def __init__(self, hf, layer: int, traced_forward):
        self.hf, self.layer, self.traced = hf, layer, traced_forward
        self.wall = self.cpu = 0.0

    @torch.no_grad()
    def bare(self, ids: torch.Tensor) -> None:
        def stop(*_):
            raise _Stop

        h = get_layers(self.hf)[self.layer].register_forward_hook(stop)
        try:
            self.hf(input_ids=ids, use_cache=False)
        except _Stop:
            pass
        finally:
            h.remove()

    def __call__(self, model, envoy, site, ids, **kw):
        out = self.traced(model, envoy, site, ids, **kw)
        t0, c0 = time.perf_counter(), time.process_time()
        self.bare(ids)
        self.wall += time.perf_counter() - t0
        self.cpu += time.process_time() - c0
        return out


@torch.no_grad()
def calibrated_sae(x: torch.Tensor, m: int, l0: float, seed: int = 0) -> JumpReluAutoEncoder:
    """The data-initialised SAE of the module docstring from calibration activations x [n, d]."""
    g = torch.Generator().manual_seed(seed)
    mean = x.mean(0)
    rows = x[torch.randperm(len(x), generator=g)[:m]] - mean
    w = rows / rows.norm(dim=1, keepdim=True)
    sae = JumpReluAutoEncoder(x.shape[1], m, init=False)
    sae.W_dec.copy_(w)
    sae.W_enc.copy_(w.T)
    sae.b_enc.copy_(-(mean @ w.T))
    sae.b_dec.copy_(mean)
    dens = torch.exp(torch.empty(m).uniform_(math.log(1e-4), math.log(3e-2), generator=g))
    dens = (dens * l0 / dens.sum()).clamp(max=0.5)
    for i in range(0, m, 512):  # threshold = the (1 - density) quantile of each latent's pre-activation
        pre = (x @ sae.W_enc[:, i : i + 512] + sae.b_enc[i : i + 512]).sort(0).values  # z, 512 latents
        k = ((1 - dens[i : i + 512]) * (len(x) - 1)).long()
        sae.threshold[i : i + 512] = pre.gather(0, k[None]).squeeze(0).clamp_min(0)
    return sae


def page_speed(index_html: Path, repeats: int = 3) -> dict:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        return {"page": "skipped: Chromium not found (apt-get install chromium)"}
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return {"page": "skipped: playwright not installed"}
    ready, wall, card = [], [], []
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        for _ in range(repeats):
            page = b.new_page()
            errors = []
            page.on("console", lambda m, e=errors: e.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda x, e=errors: e.append(str(x)))
            t0 = time.perf_counter()
            page.goto(index_html.as_uri())
            page.wait_for_selector("body[data-ready='1']", timeout=60_000)
            wall.append(1000 * (time.perf_counter() - t0))
            ready.append(page.evaluate("FB.readyMs"))
            t0 = time.perf_counter()
            page.click("#latents tbody tr:nth-child(3)")
            page.wait_for_selector(".card h2", timeout=60_000)
            card.append(1000 * (time.perf_counter() - t0))
            page.close()
        b.close()
    return {
        "tti_ms": round(statistics.median(ready), 1),
        "tti_ms_runs": [round(v, 1) for v in ready],
        "tti_wall_ms": round(statistics.median(wall), 1),
        "card_open_ms": round(statistics.median(card), 1),
        "console_errors": errors,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--n-tokens", type=int, default=50_000)
    p.add_argument("--dict-size", type=int, default=4608)
    p.add_argument("--l0", type=float, default=40.0)
    p.add_argument("--calib-tokens", type=int, default=16_384)
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--ctx-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=8, help="windows per forward pass")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", default=str(PUBMEDQA))
    p.add_argument("--keep", help="keep the built folder here (default: a temporary folder, removed)")
    args = p.parse_args()
    emit = lambda o: print(json.dumps(o) if args.json else json.dumps(o, indent=2))
    if not Path(args.data).exists():
        emit({"skipped": f"{args.data} not found (PubMedQA records from ../shared/data)"})
        return
    torch.set_num_threads(args.threads)
    texts = pubmedqa_texts(Path(args.data))
    browse, calib = texts[:700], texts[700:]
    model = load_language_model("smollm2-135m", device="cpu", dtype="float32")
    tok, hf = model.tokenizer, model._module

    x_cal, _ = features.harvest(model, args.layer, "resid_post", *select_contexts(
        calib, tok, args.ctx_len, args.calib_tokens, 1), args.batch, 576, "cpu", False)  # fmt: skip
    sae = calibrated_sae(x_cal, args.dict_size, args.l0)
    del x_cal
    windows, keep = select_contexts(browse, tok, args.ctx_len, args.n_tokens, 1)

    paired = PairedBare(hf, args.layer, features.traced_forward)
    paired.bare(windows[:8])  # warm-up
    features.traced_forward = paired  # the build's harvest calls it once per batch
    tmp = Path(tempfile.mkdtemp(prefix="bench_features_"))
    out = Path(args.keep) if args.keep else tmp / "features"
    timings: dict = {}
    t0, c0 = time.perf_counter(), time.process_time()
    data = features.collect(sae, model, args.layer, "resid_post", browse, args.ctx_len, 1, None,
                            features.BrowserConfig(n_tokens=args.n_tokens, lm_batch_size=args.batch),
                            device="cpu", progress=False, meta={"model": "smollm2-135m", "sae": "bench",
                            "dataset": "PubMedQA ori_pqal_800 records 0-699"}, timings=timings)  # fmt: skip
    sizes = {}
    t1 = time.perf_counter()
    write_dir_atomic(out, lambda d: sizes.update(write_browser(data, d)))
    timings["write"] = round(time.perf_counter() - t1, 3)
    build = time.perf_counter() - t0 - paired.wall
    build_cpu = time.process_time() - c0 - paired.cpu
    timings["harvest"] = round(timings["harvest"] - paired.wall, 3)  # the build's own harvest
    folder_bytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    fires = torch.tensor(data["index"]["latents"]["fires"])
    result = {
        "build_s": round(build, 1),
        "bare_harvest_s": round(paired.wall, 1),
        "ratio": round(build / paired.wall, 3),
        "build_cpu_s": round(build_cpu, 1),
        "bare_harvest_cpu_s": round(paired.cpu, 1),
        "ratio_cpu": round(build_cpu / paired.cpu, 3),
        "folder_mb": round(folder_bytes / 1e6, 2),
        "json_copies": sizes["json_copies"],
        **page_speed(out / "index.html"),
        "phases_s": timings,
        "n_tokens": data["index"]["meta"]["n_tokens"],
        "n_windows": data["index"]["meta"]["n_windows"],
        "dict_size": args.dict_size,
        "l0": round(fires.sum().item() / data["index"]["meta"]["n_tokens"], 1),
        "dead": int((fires == 0).sum()),
        "model": "smollm2-135m",
        "layer": args.layer,
        "ctx_len": args.ctx_len,
        "threads": args.threads,
        "sae": f"data-initialised JumpReLU, thresholds calibrated to L0 {args.l0} on {args.calib_tokens} "
        "tokens of records 700-799",
    }
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    emit(result)


if __name__ == "__main__":
    main()
