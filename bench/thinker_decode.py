"""Thinker prefill time and decode ms/token: omni-runtime against transformers' generate, same weights and device.

    python bench/thinker_decode.py [--device cpu] [--dtype float32] [--prompt 64] [--new-tokens 32]

Decode cost per token is (time for N new tokens - time for 1) / (N - 1), for both runtimes, so that prefill and
the first token are excluded the same way. Prints a table and writes bench/results/thinker_decode_<device>.json.
"""
from __future__ import annotations


import torch
from common import DTYPES, apply_threads, environment, median_of, model_config, model_parser, save, scratch_dir

from omni_runtime import OmniModel, SamplingParams

def parse_args():
    p = model_parser(__doc__)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    return p.parse_args()


def main():
    args = parse_args()
    apply_threads(args)
    from hf_checkpoints import omni_config_dict, save_reference_checkpoint
    from transformers import Qwen3OmniMoeForConditionalGeneration

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    config = model_config(args)
    folder = scratch_dir("omni-bench-")
    save_reference_checkpoint(folder, omni_config_dict(**config))
    reference = Qwen3OmniMoeForConditionalGeneration.from_pretrained(folder, dtype=dtype).to(device).eval()
    ours = OmniModel.from_pretrained(folder, device=device, dtype=dtype)
    prompt = torch.randint(1000, 150000, (1, args.prompt), generator=torch.Generator().manual_seed(0)).to(device)

    def run_reference(n):
        with torch.no_grad():
            return reference.thinker.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                              max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                              eos_token_id=151645)[0, args.prompt:].tolist()

    def run_ours(n):
        return ours.generate(prompt, max_new_tokens=n, eos_token_id=-1,
                             thinker_sampling=SamplingParams(temperature=0.0)).text_ids

    n = args.new_tokens
    same_tokens = run_reference(n) == run_ours(n)  # also warms both up
    rows = {}
    for name, run in (("transformers", run_reference), ("omni-runtime", run_ours)):
        first = median_of(lambda: run(1), device, args.repeats)
        full = median_of(lambda: run(n), device, args.repeats)
        rows[name] = {"prefill_and_first_token_ms": 1e3 * first, "decode_ms_per_token": 1e3 * (full - first) / (n - 1)}
    ratio = {k: rows["transformers"][k] / rows["omni-runtime"][k] for k in rows["omni-runtime"]}
    result = {"bench": "thinker_decode", "env": environment(device), "dtype": args.dtype, "model": config,
              "vocab": 152064, "prompt_tokens": args.prompt, "new_tokens": n, "greedy_tokens_equal": same_tokens,
              "results": rows, "speedup": ratio}
    path = save("thinker_decode", result)
    print(f"{result['env']['device']}, {args.dtype}, prompt {args.prompt}, {n} new tokens, "
          f"greedy tokens equal: {same_tokens}")
    print(f"{'':14} {'prefill+1st (ms)':>17} {'decode (ms/token)':>18}")
    for name, row in rows.items():
        print(f"{name:14} {row['prefill_and_first_token_ms']:17.1f} {row['decode_ms_per_token']:18.2f}")
    print(f"{'speedup':14} {ratio['prefill_and_first_token_ms']:16.2f}x {ratio['decode_ms_per_token']:17.2f}x")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
