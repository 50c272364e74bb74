"""How well the speech engine's pacer predicts a long prompt's chunk costs: a prompt prefilled in chunks of varied
sizes, the pacer's cost model fitted on its first chunks, then asked for the later ones (longer prefixes).

    python bench/prefill_cost_fit.py [--prompt-tokens 3900] [--train-chunks 5]
                                     [--device cuda --dtype bfloat16 --full-size]

Two models: seconds ~ fixed + n * per_token (``LinearCost``, what the pacer fitted before) and ``PrefillCost``'s
fixed + n * per_token + pairs * per_pair (the causal attention's query-key pairs, ``attention_pairs``). Prints each
chunk (tokens, prefix, ms) and both models' errors on the later chunks; writes
bench/results/prefill_cost_fit[_full]_<device>.json. Model flags as in e2e_latency.py.
"""
from __future__ import annotations

import statistics

from common import environment, save
from e2e_latency import build_ours, prompt_ids, speech_parser

from omni_runtime.engine.prefill_pacer import LinearCost, PrefillCost, PrefillPacer, attention_pairs

CHUNKS = [256, 512, 128, 384, 320, 448, 512, 256, 384, 512, 192]


def parse_args():
    p = speech_parser(__doc__)
    p.add_argument("--prompt-tokens", type=int, default=3900)
    p.add_argument("--train-chunks", type=int, default=5)
    args = p.parse_args()
    trained = sum(CHUNKS[:args.train_chunks])
    if not 1 <= args.train_chunks < len(CHUNKS) or args.prompt_tokens <= trained:
        p.error(f"--train-chunks {args.train_chunks} must lie in [1, {len(CHUNKS) - 1}] and --prompt-tokens exceed "
                f"the {trained} tokens its chunks prefill (the later chunks are what the fit predicts)")
    return args


class ScriptedChunks(PrefillPacer):
    """Chunk sizes from ``CHUNKS`` (then all that is left); keeps every prefill's (tokens, prefix, seconds)."""

    def __init__(self):
        super().__init__()
        self.script, self.chunks, self.prefix = list(CHUNKS), [], 0

    def budget(self, slacks, max_tokens, ticks_to_packet, spent=0.0, prefix=0):
        self.prefix = prefix
        return self.script.pop(0) if self.script else max_tokens

    def record_prefill(self, tokens, seconds, pairs=None):
        if tokens:
            self.chunks.append((tokens, self.prefix, seconds))


def chunk_costs(model, prompt) -> list[tuple[int, int, float]]:
    engine = model.speech_engine(max_batch=1, prefill_tokens=max(CHUNKS))
    engine.pacer = pacer = ScriptedChunks()
    engine.submit(prompt, max_new_tokens=1, eos_token_id=None, talker_max_new_tokens=1)
    try:
        while engine.busy:
            engine.step()
    finally:
        engine.close()
    return pacer.chunks


def main():
    args = parse_args()
    device, config, model = build_ours(args)
    prompt = prompt_ids(args.prompt_tokens, seed=3).to(device)
    chunk_costs(model, prompt)                                    # warm up
    chunks = chunk_costs(model, prompt)
    train, test = chunks[:args.train_chunks], chunks[args.train_chunks:]
    linear, with_pairs = LinearCost(), PrefillCost()
    for n, prefix, seconds in train:
        linear.record(n, seconds)
        with_pairs.record(n, attention_pairs(n, prefix), seconds)
    errors = {"linear": [100 * (linear.seconds(n) - t) / t for n, _, t in test],
              "with_pairs": [100 * (with_pairs.seconds(n, p) - t) / t for n, p, t in test]}
    print(f"{environment(device)['device']}, {args.dtype}: a {prompt.numel()}-token prompt in chunks")
    print("chunks (tokens, prefix, ms):", [(n, p, round(1e3 * t, 1)) for n, p, t in chunks])
    for name, errs in errors.items():
        print(f"{name:>10}: error on the later chunks {[round(e) for e in errs]} %, "
              f"mean abs {statistics.mean(abs(e) for e in errs):.1f} %")
    name = "prefill_cost_fit" + ("_full" if args.full_size else "")
    path = save(name, {"bench": "prefill_cost_fit", "env": environment(device), "dtype": args.dtype,
                       "model": config, "prompt_tokens": prompt.numel(), "train_chunks": args.train_chunks,
                       "chunks": [{"tokens": n, "prefix": p, "ms": 1e3 * t} for n, p, t in chunks],
                       "fit_with_pairs": with_pairs.fit, "fit_linear": linear.fit, "errors_pct": errors})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
