#!/usr/bin/env python3
"""Three random-weight LLaMA folders of the bench family's shapes, with the built-in family's tokenizer, in seconds.

For scripts/gpu_suite.sh's crash matrix: an illegal memory access does not need trained weights, only the same
shapes, dtype and code paths as the bench family (which is trained later, in part 2). Outputs of random models are
near-ties everywhere, so differences between methods here say nothing; crashes and errors do.

    python scripts/make_random_family.py OUT [--sizes 256,2,4,768/384,6,6,1024/512,16,8,1408]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ASSETS = Path(__file__).resolve().parent.parent / "pipespec" / "assets" / "family" / "target"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--sizes", default="256,2,4,768/384,6,6,1024/512,16,8,1408",
                   help="HIDDEN,LAYERS,HEADS,FFN per model, smallest first, separated by /")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    base = json.loads((ASSETS / "config.json").read_text())
    out = Path(args.out)
    for i, (name, size) in enumerate(zip(("draft", "middle", "target"), args.sizes.split("/"))):
        hidden, layers, heads, ffn = (int(x) for x in size.split(","))
        cfg = LlamaConfig(vocab_size=base["vocab_size"], hidden_size=hidden, intermediate_size=ffn,
                          num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                          max_position_embeddings=base.get("max_position_embeddings", 2048),
                          tie_word_embeddings=True, initializer_range=0.1, bos_token_id=base.get("bos_token_id"),
                          eos_token_id=base.get("eos_token_id"), pad_token_id=base.get("pad_token_id"))
        torch.manual_seed(args.seed + i)
        model = LlamaForCausalLM(cfg).to(torch.float16).eval()
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder)
        for f in TOKENIZER_FILES:
            if (ASSETS / f).exists():
                shutil.copy(ASSETS / f, folder / f)
        print(f"{folder}: {sum(p.numel() for p in model.parameters()):,} parameters", flush=True)


if __name__ == "__main__":
    main()
