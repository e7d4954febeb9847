"""Harvest throughput: ActivationBuffer vs a plain transformers forward stopped after the same layer.

    python benchmarks/bench_harvest.py --json        # prints ONE JSON object

Three pipelines run in this process on the same texts, taking turns one LM batch at a time (so a
burst of load from other processes on a shared machine hits them alike):
  buffer  ActivationBuffer: packed windows, nnsight trace with early stop, keep-mask, shuffling
  limit   the same packed windows through the bare HF module under inference_mode, use_cache=False,
          stopped by a forward hook raising after layer L (no nnsight, no tokenization, no shuffle)
  padded  ActivationBuffer(pack=False): one left-padded row per text (the original pipeline's way)
buffer/limit count LM positions computed per second (ratio = buffer / limit); padded counts real
(non-pad) tokens per second; yielded_tokens_per_s = buffer_tokens_per_s x the fraction of packed
positions that are yielded (EOS separators are not).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dictionary_learning.buffer import ActivationBuffer  # noqa: E402
from dictionary_learning.hooks import get_layers  # noqa: E402
from dictionary_learning.tokens import pack_texts  # noqa: E402
from dictionary_learning.utils import DataExhausted, load_language_model  # noqa: E402

FALLBACK_TEXTS = [
    "The patient presented with chest pain radiating to the left arm and diaphoresis.",
    "Metformin lowers hepatic glucose production and is first-line therapy for type 2 diabetes.",
    "Which of the following is the most likely diagnosis in a child with a barking cough?",
] * 200


def load_sample_texts() -> tuple[list[str], str]:
    try:
        from dataset import load_texts

        return load_texts("sample"), "dataset.load_texts('sample')"
    except Exception as e:  # noqa: BLE001 - the benchmark still runs, and says which texts it used
        print(f"dataset.load_texts unavailable ({e}); using the built-in texts", file=sys.stderr)
        return FALLBACK_TEXTS, "built-in fallback texts"


class _Stop(Exception):
    pass


class Limit:
    """The bare HF module on packed windows [N, T], stopped by a forward hook raising after `layer`;
    step() runs the next LM batch (cycling) and returns the positions it computed."""

    def __init__(self, hf, layer: int, windows: torch.Tensor, batch: int):
        self.hf, self.layer, self.windows, self.batch, self.i = hf, layer, windows, batch, 0

    def step(self) -> int:
        def stop(*_):
            raise _Stop

        x = self.windows[self.i : self.i + self.batch]
        self.i = (self.i + self.batch) % len(self.windows)
        h = get_layers(self.hf)[self.layer].register_forward_hook(stop)
        try:
            with torch.inference_mode():
                self.hf(input_ids=x, use_cache=False)
        except _Stop:
            pass
        finally:
            h.remove()
        return x.numel()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--ctx-len", type=int, default=256)
    p.add_argument("--positions", type=int, default=12288, help="LM positions per pipeline (buffer, limit)")
    p.add_argument("--lm-batch", type=int, default=8, help="contexts per forward pass")
    p.add_argument("--padded-texts", type=int, default=32, help="texts for the per-text padding pipeline")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="float32", help="language-model dtype (bfloat16 on a GPU)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    model = load_language_model(args.model, device=args.device, dtype=args.dtype)
    hf, tok = model._module, model.tokenizer
    texts, source = load_sample_texts()
    windows, keep = pack_texts(texts, tok, args.ctx_len, drop_last=True)
    kept_fraction = keep.float().mean().item()  # positions that are yielded (not EOS separators)
    windows = windows.to(model.device)
    pad_texts_ = texts[: args.padded_texts]
    real_padded = sum(min(len(tok(t)["input_ids"]), args.ctx_len) for t in pad_texts_ if t)
    # One refill per LM batch, so the three pipelines can take turns at LM-batch granularity.
    common = dict(
        ctx_len=args.ctx_len,
        lm_batch_size=args.lm_batch,
        n_ctxs=2 * args.lm_batch,
        batch_size=args.lm_batch * args.ctx_len // 2,
        device=str(model.device),
    )
    buf = ActivationBuffer(texts, model, args.layer, epochs=None, **common)
    pad = ActivationBuffer(pad_texts_, model, args.layer, pack=False, epochs=1, **common)
    limit = Limit(hf, args.layer, windows, args.lm_batch)
    limit.step()  # warm-up
    next(ActivationBuffer(texts[:8], model, args.layer, **{**common, "n_ctxs": 2}))

    def sync():  # GPU work is asynchronous: time it to completion
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)

    secs = {"buffer": 0.0, "limit": 0.0, "padded": 0.0}
    limit_pos, pad_done = 0, False
    while (
        not pad_done or limit_pos < args.positions or buf.counters["contexts"] * args.ctx_len < args.positions
    ):
        # Round robin, one LM batch each, so a burst of load from other processes hits all alike.
        if buf.counters["contexts"] * args.ctx_len < args.positions:
            sync()
            t0 = time.perf_counter()
            next(buf)
            sync()
            secs["buffer"] += time.perf_counter() - t0
        if limit_pos < args.positions:
            sync()
            t0 = time.perf_counter()
            limit_pos += limit.step()
            sync()
            secs["limit"] += time.perf_counter() - t0
        if not pad_done:
            sync()
            t0 = time.perf_counter()
            try:
                next(pad)
            except DataExhausted:
                pad_done = True
            sync()
            secs["padded"] += time.perf_counter() - t0
    buffer_pos = buf.counters["contexts"] * args.ctx_len
    out = {
        "buffer_tokens_per_s": round(buffer_pos / secs["buffer"], 1),
        "limit_tokens_per_s": round(limit_pos / secs["limit"], 1),
        "ratio": round((buffer_pos / secs["buffer"]) / (limit_pos / secs["limit"]), 3),
        "padded_tokens_per_s": round(real_padded / secs["padded"], 1),
        "yielded_tokens_per_s": round(kept_fraction * buffer_pos / secs["buffer"], 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "model": args.model,
        "layer": args.layer,
        "ctx_len": args.ctx_len,
        "lm_batch": args.lm_batch,
        "buffer_positions": buffer_pos,
        "limit_positions": limit_pos,
        "padded_real_tokens": real_padded,
        "padded_texts": pad.counters["contexts"],
        "text_source": source,
        "threads": args.threads,
        "device": str(model.device),
        "dtype": args.dtype,
        "seconds": {k: round(v, 1) for k, v in secs.items()},
    }
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:>24}: {v}")


if __name__ == "__main__":
    main()
