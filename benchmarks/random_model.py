"""Write a language model with random weights and a real architecture, for throughput benchmarks on a
machine that cannot reach the Hub (harvest speed depends on the shapes, not on the weights).

    python benchmarks/random_model.py smollm2 OUT_DIR --tokenizer DIR   # SmolLM2-135M's config.json from DIR
    python benchmarks/random_model.py gemma-2-2b OUT_DIR --tokenizer DIR  # Gemma-2-2B's shapes

The tokenizer files are copied from --tokenizer (the embedded SmolLM2's folder will do for either:
token ids below 49,152 are valid for Gemma's 256,000-entry vocabulary too).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

# google/gemma-2-2b's config.json (Gemma Team 2024, table 1), written out: the Hub is out of reach.
GEMMA_2_2B = dict(
    vocab_size=256_000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
    query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=30.0,
    attn_logit_softcapping=50.0, hidden_activation="gelu_pytorch_tanh",
)  # fmt: skip
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("arch", choices=["smollm2", "gemma-2-2b"])
    p.add_argument("out", type=Path)
    p.add_argument(
        "--tokenizer", type=Path, required=True, help="folder with tokenizer.json (and config.json)"
    )
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    from transformers import AutoConfig, AutoModelForCausalLM, Gemma2Config

    if args.arch == "smollm2":
        config = AutoConfig.from_pretrained(args.tokenizer)
    else:
        tok_cfg = AutoConfig.from_pretrained(args.tokenizer)
        config = Gemma2Config(**GEMMA_2_2B, bos_token_id=tok_cfg.bos_token_id, eos_token_id=tok_cfg.eos_token_id,
                              pad_token_id=tok_cfg.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(args.device):  # initialise where the benchmark runs: seconds, not minutes
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    model.save_pretrained(args.out)
    for name in TOKENIZER_FILES:
        if (args.tokenizer / name).exists():
            shutil.copy(args.tokenizer / name, args.out / name)
    n = sum(t.numel() for t in model.parameters())
    print(f"{args.arch}: {n / 1e6:.0f}M random parameters ({args.dtype}) -> {args.out}")


if __name__ == "__main__":
    main()
