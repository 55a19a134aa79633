"""Save a model with random weights in the shape of a real one, for timings where the real weights
cannot go (a GPU machine they are too large to copy to). Speed does not depend on the weights' values.

    python benchmarks/random_model.py --like DIR --out OUT [--arch same|gpt2] [--seed 0]

DIR is a Hugging Face directory (config.json and tokenizer), e.g. a packaged model's cache entry; with
`--arch gpt2` the weights take GPT-2 small's shape (12 x 12 heads, d_model 768) over DIR's tokenizer.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--like", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--arch", default="same", choices=["same", "gpt2"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.like)
    if args.arch == "gpt2":
        config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id)
        model = GPT2LMHeadModel(config)
    else:
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.like))
    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(args.out)
    print(f"saved {type(model).__name__} with {sum(p.numel() for p in model.parameters()):,} random weights to {args.out}")


if __name__ == "__main__":
    main()
