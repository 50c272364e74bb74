"""Command line: ``omni-runtime generate``. Without ``--model`` it runs the built-in small random model."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from omni_runtime.api import OmniModel
from omni_runtime.config import SpecialTokens
from omni_runtime.demo import demo_checkpoint
from omni_runtime.sampling import SamplingParams

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NEWLINE_ID = 198


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="omni-runtime", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="answer one prompt")
    gen.add_argument("--model", type=Path, help="checkpoint folder (default: the built-in small random model)")
    source = gen.add_mutually_exclusive_group()
    source.add_argument("--text", default="Hello! Who are you?",
                        help="user message; without a tokenizer.json its UTF-8 bytes become the token ids")
    source.add_argument("--ids", help="comma-separated prompt token ids, used as they are")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--dtype", choices=DTYPES, default="float32")
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int)
    return parser.parse_args(argv)


def load_tokenizer(folder: Path):
    if not (folder / "tokenizer.json").is_file():
        return None
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(folder / "tokenizer.json"))


def chat_prompt(text: str, tokens: SpecialTokens, tokenizer) -> list[int]:
    body = tokenizer.encode(text).ids if tokenizer else list(text.encode("utf-8"))
    return [tokens.im_start, tokens.user, NEWLINE_ID, *body, tokens.im_end, NEWLINE_ID,
            tokens.im_start, tokens.assistant, NEWLINE_ID]


def generate(args: argparse.Namespace) -> None:
    folder = args.model or demo_checkpoint()
    start = time.perf_counter()
    model = OmniModel.from_pretrained(folder, device=args.device, dtype=DTYPES[args.dtype])
    loaded = time.perf_counter()
    tokenizer = load_tokenizer(folder)
    prompt = [int(i) for i in args.ids.split(",")] if args.ids else chat_prompt(args.text, model.config.tokens,
                                                                              tokenizer)
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    out = model.generate(prompt, max_new_tokens=args.max_new_tokens, thinker_sampling=sampling)
    done = time.perf_counter()
    print(f"model: {folder}" + ("" if args.model else " (built-in random model: its answer is random tokens)"))
    print(f"prompt: {len(prompt)} tokens")
    print(f"answer ids: {out.text_ids}")
    if tokenizer:
        print(f"answer: {tokenizer.decode(out.text_ids)}")
    seconds = done - loaded
    print(f"load {loaded - start:.2f} s | {len(out.text_ids)} tokens in {seconds:.3f} s "
          f"({len(out.text_ids) / seconds:.1f} tokens/s) | finish: {out.finish_reason}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        generate(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"omni-runtime: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
