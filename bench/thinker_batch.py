"""Batched thinker decode: ms per step and tokens/s at each batch size, against the single-sequence runner.

    python bench/thinker_batch.py [--device cuda --dtype bfloat16 --full-size] [--batches 1,2,4,8,16] [--steps 32]

Random weights (a small thinker, or with ``--full-size`` the released one, ``--thinker-layers`` of its 48 layers),
``--prompt`` tokens prefilled per sequence, then ``--steps`` decode steps of every sequence together
(``BatchedThinkerRunner``: one CUDA graph per batch bucket on a GPU). The single runner's decode step (batch 1, its own
graph on a GPU, its C++ twin on a CPU in fp32) is the baseline. MoE decode reads more experts as the batch grows
(see ../shared/anchors.md: ~29 of 128 per layer at batch 4, ~52 at 8), so tokens/s grows less than the batch.
Writes bench/results/thinker_batch[_full]_<device>.json.
"""
from __future__ import annotations

import copy

import torch
from common import DTYPES, apply_threads, environment, model_config, model_parser, save, timed

from omni_runtime import OmniModel
from omni_runtime.demo import RELEASED_CONFIG
from omni_runtime.engine.thinker_batch import BatchedThinkerRunner
from omni_runtime.multimodal import MediaInputs, build_prompt


def parse_args():
    p = model_parser(__doc__)
    p.add_argument("--batches", default="1,2,4,8")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--full-size", action="store_true", help="the released thinker, random weights (GPU)")
    p.add_argument("--thinker-layers", type=int, default=48)
    return p.parse_args()


def build(args, device, dtype) -> OmniModel:
    if args.full_size:
        config = copy.deepcopy(RELEASED_CONFIG)
        config["thinker_config"]["text_config"]["num_hidden_layers"] = args.thinker_layers
        config.pop("talker_config", None)
        config["enable_audio_output"] = False
    else:
        from hf_checkpoints import omni_config_dict
        config = omni_config_dict(**model_config(args))
        config.pop("talker_config", None)
        config["enable_audio_output"] = False
    return OmniModel.random(config, device=device, dtype=dtype, max_seq_len=args.prompt + 4 * args.steps + 8)


def main():
    args = parse_args()
    apply_threads(args)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    model = build(args, device, dtype)
    batches = [int(b) for b in args.batches.split(",")]
    generator = torch.Generator().manual_seed(0)
    prompts = [build_prompt(torch.randint(1000, 150000, (args.prompt,), generator=generator).to(device),
                            MediaInputs(), model.config, model.thinker.model.embed_tokens, None, None)
               for _ in range(max(batches))]
    rows = []
    with torch.inference_mode():
        single = model.thinker_runner
        single.prefill(prompts[0])
        token = torch.tensor([[7]], device=device)
        for _ in range(3):
            single.decode(token)
        base_ms = 1e3 * sorted(timed(lambda: single.decode(token), device) for _ in range(args.steps))[args.steps // 2]
        rows.append({"runner": "single", "batch": 1, "ms_per_step": base_ms, "tokens_per_s": 1e3 / base_ms})
        runner = BatchedThinkerRunner(model.thinker, model.config.thinker_text, max(batches), single.max_len, device,
                                      dtype)
        for batch in batches:
            live = [runner.acquire() for _ in range(batch)]
            for row, prompt in zip(live, prompts):
                runner.prefill(row, prompt)
            tokens = torch.full((batch,), 7, device=device)
            for _ in range(3):   # warm up (and capture the bucket's graph)
                runner.decode(live, tokens)
            times = sorted(timed(lambda: runner.decode(live, tokens), device) for _ in range(args.steps))
            ms = 1e3 * times[len(times) // 2]
            rows.append({"runner": "batched", "batch": batch, "ms_per_step": ms, "tokens_per_s": 1e3 * batch / ms,
                         "vs_single_tokens_per_s": base_ms * batch / ms})
            for row in live:
                runner.release(row)
    result = {"bench": "thinker_batch", "env": environment(device), "dtype": args.dtype,
              "model": "released" if args.full_size else model_config(args),
              "thinker_layers": args.thinker_layers if args.full_size else args.layers,
              "prompt_tokens": args.prompt, "results": rows}
    path = save("thinker_batch" + ("_full" if args.full_size else ""), result)
    print(f"{result['env']['device']}, {args.dtype}, {'released' if args.full_size else 'small'} thinker, "
          f"prompt {args.prompt}")
    print(f"{'runner':8} {'batch':>5} {'ms/step':>9} {'tokens/s':>9} {'x single':>9}")
    for r in rows:
        print(f"{r['runner']:8} {r['batch']:5d} {r['ms_per_step']:9.2f} {r['tokens_per_s']:9.1f} "
              f"{r.get('vs_single_tokens_per_s', 1.0):9.2f}")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
