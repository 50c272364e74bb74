"""Concurrent spoken answers: first audio packet and real-time factor at concurrency 1, 2, 4, 6, 8 (the paper's
Table 2 has 1, 4 and 6), batched (``OmniModel.stream_batch``: every thinker step and talker frame shared) against the
same requests served one after another by the single-request pipeline (``OmniModel.stream``).

    python bench/concurrent_speech.py [--device cuda --dtype bfloat16 --full-size] [--concurrency 1,2,4,6,8]

All requests arrive at once; each has its own prompt (40 user tokens, different words). Greedy thinker and talker,
``--answer-tokens`` text tokens and ``--talker-tokens`` talker steps each, so every answer speaks the same number of
frames. Per concurrency: first text token and first audio packet (median and worst request, from the common start),
wall time, RTF (wall time
over one answer's audio seconds: 1.0 means every stream plays as fast as it is made) and audio seconds made per
wall second. Batched answers are checked equal to the sequential ones (text and codes). Model flags as in
e2e_latency.py. Writes bench/results/concurrent_speech[_full]_<device>.json.
"""
from __future__ import annotations

import statistics
import time

import torch
from common import DTYPES, apply_threads, environment, save
from e2e_latency import IM_END, build_models, prompt_ids, speech_parser

from omni_runtime import SamplingParams
from omni_runtime.pipeline import StageTimer

GREEDY_TALKER = SamplingParams(temperature=0.0, repetition_penalty=1.05)


def parse_args():
    p = speech_parser(__doc__)
    p.add_argument("--concurrency", default="1,2,4,6,8")
    return p.parse_args()


def request_kwargs(args) -> dict:
    return dict(max_new_tokens=args.answer_tokens, eos_token_id=IM_END, talker_max_new_tokens=args.talker_tokens,
                talker_sampling=GREEDY_TALKER)


def summary(first_tokens: list[float], first_packets: list[float], wall: float, audio_s: list[float]) -> dict:
    return {"first_token_ms_median": 1e3 * statistics.median(first_tokens),
            "first_packet_ms_median": 1e3 * statistics.median(first_packets),
            "first_packet_ms_max": 1e3 * max(first_packets), "wall_ms": 1e3 * wall,
            "rtf": wall / max(audio_s), "audio_s_per_s": sum(audio_s) / wall}


def run_batched(model, prompts, args) -> tuple[dict, list]:
    timer = StageTimer(model.device)
    count = len(prompts)
    first, tokens, samples, codes = [None] * count, [None] * count, [0] * count, [[] for _ in prompts]
    start = time.perf_counter()
    for index, event in model.stream_batch(prompts, max_batch=count, timer=timer, **request_kwargs(args)):
        if event.text_ids:
            tokens[index] = tokens[index] or time.perf_counter() - start
        if event.audio is not None:
            first[index] = first[index] or time.perf_counter() - start
            samples[index] += event.audio.numel()
        if event.codes is not None:
            codes[index].append(event.codes)
    wall = time.perf_counter() - start
    row = summary(tokens, first, wall, [s / 24000 for s in samples])
    row["stages_ms"] = {k: 1e3 * v for k, v in timer.seconds.items()}
    row["stage_calls"] = dict(timer.calls)
    return row, [torch.cat(c, dim=1) for c in codes]


def run_sequential(model, prompts, args) -> tuple[dict, list]:
    first, tokens, samples, codes = [], [], [], []
    start = time.perf_counter()
    for prompt in prompts:
        got_first, got_token, total, frames = None, None, 0, []
        for event in model.stream(prompt, **request_kwargs(args)):
            if event.text_ids:
                got_token = got_token or time.perf_counter() - start
            if event.audio is not None:
                got_first = got_first or time.perf_counter() - start
                total += event.audio.numel()
            if event.codes is not None:
                frames.append(event.codes)
        first.append(got_first)
        tokens.append(got_token)
        samples.append(total)
        codes.append(torch.cat(frames, dim=1))
    wall = time.perf_counter() - start
    return summary(tokens, first, wall, [s / 24000 for s in samples]), codes


def best_of(fn, repeats: int):
    runs = [fn() for _ in range(repeats)]
    return sorted(runs, key=lambda r: r[0]["wall_ms"])[len(runs) // 2]


def main():
    args = parse_args()
    args.ours_only = True
    apply_threads(args)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    config, model, _ = build_models(args, device, dtype)
    levels = [int(c) for c in args.concurrency.split(",")]
    prompts = [prompt_ids(seed=seed).to(device) for seed in range(max(levels))]
    rows = []
    for count in levels:
        batch = prompts[:count]
        run_batched(model, batch, args)                              # warm up (and capture the buckets' graphs)
        run_sequential(model, batch[:1], args)
        batched, batched_codes = best_of(lambda: run_batched(model, batch, args), args.repeats)
        sequential, sequential_codes = best_of(lambda: run_sequential(model, batch, args), args.repeats)
        same = all(torch.equal(a, b) for a, b in zip(batched_codes, sequential_codes))
        rows.append({"concurrency": count, "batched": batched, "sequential": sequential, "same_codes": same})
    result = {"bench": "concurrent_speech", "env": environment(device), "dtype": args.dtype, "model": config,
              "answer_tokens": args.answer_tokens, "talker_max_new_tokens": args.talker_tokens, "results": rows,
              "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
    path = save("concurrent_speech" + ("_full" if args.full_size else ""), result)
    print(f"{result['env']['device']}, {args.dtype}: {args.answer_tokens} text tokens, {args.talker_tokens - 1} "
          "frames per answer")
    print(f"{'':>4} {'':10} {'first token p50':>16} {'first packet p50':>17} {'max':>9} {'wall':>9} {'RTF':>7} "
          f"{'audio s/s':>10}")
    for r in rows:
        for name in ("batched", "sequential"):
            m = r[name]
            print(f"{r['concurrency']:4d} {name:10} {m['first_token_ms_median']:13.1f} ms "
                  f"{m['first_packet_ms_median']:14.1f} ms {m['first_packet_ms_max']:6.1f} ms {m['wall_ms']:6.0f} ms "
                  f"{m['rtf']:7.3f} {m['audio_s_per_s']:10.2f}")
        print(f"{'':4} same codes: {r['same_codes']}")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
