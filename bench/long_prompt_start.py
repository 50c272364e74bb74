"""A long audio prompt through the speech engine, alone: the ticks of its chunked prefill and the tick its speech
starts, where its talker prefill sits on the first packet's path.

    python bench/long_prompt_start.py [--audio-seconds 240] [--prefill-tokens 512] [--repeats 3]
                                      [--device cuda --dtype bfloat16 --full-size]

The engine prefills the prompt in ``--prefill-tokens`` chunks (nobody speaks, so the pacer allows each whole); the
talker's user-turn rows follow each chunk, so the tick that starts the speech prefills only the last chunk's rows and
the 9 assistant rows. Per repeat (after one warm-up): each tick's ms, the start tick's ms and its talker prefill's,
and the first packet (the sum). Model flags as in e2e_latency.py (default: the CPU benchmark model; a talker of
``--talker-hidden`` 256, 3 layers, 16 experts is about the released talker's share of the work). Writes
bench/results/long_prompt_start[_full]_audio<s>_<device>.json.
"""
from __future__ import annotations

import statistics
import time

from common import environment, save
from concurrent_speech import audio_prompt, request_kwargs
from e2e_latency import build_ours, speech_parser

from omni_runtime.pipeline import StageTimer


def parse_args():
    p = speech_parser(__doc__)
    p.add_argument("--audio-seconds", type=float, default=240.0)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.set_defaults(talker_hidden=256, talker_layers=3, talker_experts=16, answer_tokens=4, talker_tokens=6)
    return p.parse_args()


def run(model, prompt, args) -> dict:
    timer = StageTimer(model.device)
    engine = model.speech_engine(max_batch=1, timer=timer, prefill_tokens=args.prefill_tokens)
    engine.submit(prompt, **request_kwargs(args))
    ticks, start_tick = [], None
    try:
        while start_tick is None:
            talker_before = timer.seconds.get("talker prefill", 0.0)
            began = time.perf_counter()
            events = engine.step()
            ticks.append(time.perf_counter() - began)
            if any(event.audio is not None for _, event in events):
                start_tick = timer.seconds.get("talker prefill", 0.0) - talker_before
    finally:
        engine.close()
    return {"ticks_ms": [round(1e3 * t, 1) for t in ticks], "start_tick_ms": 1e3 * ticks[-1],
            "start_tick_talker_prefill_ms": 1e3 * start_tick, "first_packet_ms": 1e3 * sum(ticks)}


def main():
    args = parse_args()
    device, config, model = build_ours(args)
    prompt = audio_prompt(model, args.audio_seconds, seed=1)
    run(model, prompt, args)                                          # warm up
    runs = [run(model, prompt, args) for _ in range(args.repeats)]
    median = {k: statistics.median(r[k] for r in runs)
              for k in ("start_tick_ms", "start_tick_talker_prefill_ms", "first_packet_ms")}
    tokens = int(prompt["input_ids"].numel())
    print(f"{environment(device)['device']}, {args.dtype}: {args.audio_seconds:g} s of audio ({tokens} prompt tokens) "
          f"in chunks of {args.prefill_tokens}")
    print(f"ticks (ms): {runs[0]['ticks_ms']}")
    print(f"start tick {median['start_tick_ms']:.0f} ms, of which talker prefill "
          f"{median['start_tick_talker_prefill_ms']:.0f} ms; first packet {median['first_packet_ms']:.0f} ms")
    name = "long_prompt_start" + ("_full" if args.full_size else "") + f"_audio{args.audio_seconds:g}"
    path = save(name, {"bench": "long_prompt_start", "env": environment(device), "dtype": args.dtype,
                       "model": config, "audio_seconds": args.audio_seconds, "prompt_tokens": tokens,
                       "prefill_tokens": args.prefill_tokens, "median": median, "runs": runs})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
