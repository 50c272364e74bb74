"""Concurrent spoken answers: first audio packet and real-time factor at concurrency 1, 2, 4, 6, 8 (the paper's
Table 2 has 1, 4 and 6), batched (``OmniModel.speech_engine``: every thinker step, talker frame and Code2Wav push
shared) against the same requests served one after another by the single-request pipeline (``OmniModel.stream``).

    python bench/concurrent_speech.py [--device cuda --dtype bfloat16 --full-size] [--concurrency 1,2,4,6,8]
                                      [--arrival-ms 0] [--long-prompt-tokens 0] [--prefill-tokens 4096]
                                      [--fixed-chunks] [--audio-seconds 0]

Request i arrives at i x ``--arrival-ms`` (default 0: all at once); each has its own prompt (40 user tokens,
different words; ``--long-prompt-tokens``: the last one that many; ``--audio-seconds``: the last one is that much
audio instead, noise, which its encoder runs on at admission). The batched server submits each request when it
arrives (``--prefill-tokens``: its largest prefill chunk; ``--fixed-chunks``: every tick may prefill that much,
without the pacer, for encoders too); the sequential one starts it when it has arrived and the previous one is done.
Greedy thinker and talker, ``--answer-tokens`` text tokens and ``--talker-tokens`` talker steps each, so every
answer speaks the same number of frames. Per concurrency: first text token and first audio packet (median and worst
request, from its arrival), wall time, RTF (the worst request's time from arrival to its last sample over its audio
seconds), audio seconds made per wall second, and the worst stall: the longest a client that plays each answer from
its first packet on waits in all for packets that come late. Batched answers are checked equal to the sequential
ones (text and codes). Model flags as in e2e_latency.py. Writes
bench/results/concurrent_speech[_full][_arrival<ms>][_long<tokens>][_audio<s>][_prefill<tokens>][_fixed]_<device>.json.
"""
from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from common import environment, save
from e2e_latency import IM_END, build_ours, prompt_ids, speech_parser

from omni_runtime import SamplingParams
from omni_runtime.engine.prefill_pacer import PrefillPacer
from omni_runtime.pipeline import StageTimer

GREEDY_TALKER = SamplingParams(temperature=0.0, repetition_penalty=1.05)


def parse_args():
    p = speech_parser(__doc__)
    p.add_argument("--concurrency", default="1,2,4,6,8")
    p.add_argument("--arrival-ms", type=float, default=0.0, help="time between two requests' arrivals")
    p.add_argument("--long-prompt-tokens", type=int, default=0,
                   help="the last request's prompt: this many user tokens instead of 40")
    p.add_argument("--prefill-tokens", type=int, default=None,
                   help="the engine's prefill chunk (speech_engine(prefill_tokens)); default: the runner's 4096")
    p.add_argument("--audio-seconds", type=float, default=0.0,
                   help="the last request's prompt: this much audio (a user turn of noise) instead of text")
    p.add_argument("--fixed-chunks", action="store_true",
                   help="no pacing: every tick may prefill --prefill-tokens (the baseline of the engine's pacer)")
    return p.parse_args()


def request_kwargs(args) -> dict:
    return dict(max_new_tokens=args.answer_tokens, eos_token_id=IM_END, talker_max_new_tokens=args.talker_tokens,
                talker_sampling=GREEDY_TALKER)


class Answers:
    """Per request: arrival, first text token, first audio packet and last sample (seconds from the run's start),
    samples, codes, and the playback stall of a client that starts playing at the first packet."""

    def __init__(self, count: int, arrival_s: float):
        self.arrival = [i * arrival_s for i in range(count)]
        self.first_token, self.first_packet, self.done = [None] * count, [None] * count, [None] * count
        self.samples, self.codes = [0] * count, [[] for _ in range(count)]
        self.played_until, self.stall = [0.0] * count, [0.0] * count

    def record(self, index: int, event, clock) -> None:
        """``clock()``: seconds since the run's start, read once the event's audio exists (on a GPU the host runs
        ahead of the kernels: copying it to the host waits for them)."""
        if event.audio is not None:
            event.audio.cpu()
        now = clock()
        if event.text_ids and self.first_token[index] is None:
            self.first_token[index] = now
        if event.audio is not None:
            self.first_packet[index] = self.first_packet[index] or now
            self.done[index] = now
            self.samples[index] += event.audio.numel()
            # the player runs dry when a packet comes after the audio before it has played; it resumes with it
            late = now - self.played_until[index] if self.played_until[index] else 0.0
            self.stall[index] += max(late, 0.0)
            self.played_until[index] = max(now, self.played_until[index]) + event.audio.numel() / 24000
        if event.codes is not None:
            self.codes[index].append(event.codes)

    def summary(self, wall: float) -> tuple[dict, list[torch.Tensor]]:
        since = lambda times: [t - a for t, a in zip(times, self.arrival)]  # noqa: E731
        audio_s = [s / 24000 for s in self.samples]
        tokens, packets = since(self.first_token), since(self.first_packet)
        row = {"first_token_ms_median": 1e3 * statistics.median(tokens),
               "first_packet_ms_median": 1e3 * statistics.median(packets),
               "first_packet_ms_max": 1e3 * max(packets), "wall_ms": 1e3 * wall,
               "rtf": max(d / a for d, a in zip(since(self.done), audio_s)), "audio_s_per_s": sum(audio_s) / wall,
               "stall_ms_max": 1e3 * max(self.stall)}
        return row, [torch.cat(c, dim=1) for c in self.codes]


class FixedChunks(PrefillPacer):
    """A pacer that always allows the whole ``prefill_tokens``."""

    def budget(self, slacks, max_tokens, ticks_to_packet, spent=0.0, prefix=0):
        return max_tokens

    def admits_encoders(self, *args) -> bool:
        return True


def audio_prompt(model, seconds: float, seed: int) -> dict:
    """A user turn of ``seconds`` of 16 kHz noise, as ``OmniModel.prepare`` builds it (placeholders and log-mel)."""
    wave = np.random.default_rng(seed).standard_normal(int(16000 * seconds)).astype(np.float32) * 0.1
    return model.prepare([{"role": "user", "content": [{"type": "audio", "audio": wave, "sample_rate": 16000}]}])


def wait_until(start: float, moment: float) -> None:
    time.sleep(max(0.0, start + moment - time.perf_counter()))


def run_batched(model, prompts, args, pacer: PrefillPacer | None = None) -> tuple[dict, list]:
    """``pacer``: the engine's, carried over from earlier runs (what a long-running server has measured). The
    stage times are host times: a timer that synchronised the GPU around every stage would slow this side alone."""
    timer = StageTimer()
    answers = Answers(len(prompts), args.arrival_ms / 1e3)
    engine = model.speech_engine(max_batch=len(prompts), timer=timer, prefill_tokens=args.prefill_tokens)
    if pacer is not None:
        engine.pacer = pacer
    ids = {}
    start = time.perf_counter()
    while len(ids) < len(prompts) or engine.busy:
        if not engine.busy:   # idle until the next request arrives
            wait_until(start, answers.arrival[len(ids)])
        while len(ids) < len(prompts) and time.perf_counter() - start >= answers.arrival[len(ids)]:
            ids[engine.submit(prompts[len(ids)], **request_kwargs(args))] = len(ids)
        for request, event in engine.step():
            answers.record(ids[request], event, lambda: time.perf_counter() - start)
    row, codes = answers.summary(time.perf_counter() - start)
    row["stages_ms"] = {k: 1e3 * v for k, v in timer.seconds.items()}
    row["stage_calls"] = dict(timer.calls)
    return row, codes


def run_sequential(model, prompts, args) -> tuple[dict, list]:
    answers = Answers(len(prompts), args.arrival_ms / 1e3)
    start = time.perf_counter()
    for index, prompt in enumerate(prompts):
        wait_until(start, answers.arrival[index])
        inputs = prompt if isinstance(prompt, dict) else {"input_ids": prompt}
        for event in model.stream(**inputs, **request_kwargs(args)):
            answers.record(index, event, lambda: time.perf_counter() - start)
    return answers.summary(time.perf_counter() - start)


def best_of(fn, repeats: int):
    runs = [fn() for _ in range(repeats)]
    return sorted(runs, key=lambda r: r[0]["wall_ms"])[len(runs) // 2]


def main():
    args = parse_args()
    device, config, model = build_ours(args)
    levels = [int(c) for c in args.concurrency.split(",")]
    prompts = [prompt_ids(seed=seed).to(device) for seed in range(max(levels))]
    rows = []
    for count in levels:
        batch = prompts[:count]
        if args.long_prompt_tokens:
            batch[-1] = prompt_ids(args.long_prompt_tokens, seed=count).to(device)
        if args.audio_seconds:
            batch[-1] = audio_prompt(model, args.audio_seconds, seed=count)
        # one pacer for all runs, as one server engine would keep: the warm-up run measures the costs it paces by
        pacer = FixedChunks() if args.fixed_chunks else PrefillPacer()
        run_batched(model, batch, args, pacer)                       # warm up (and capture the buckets' graphs)
        run_sequential(model, batch, args)   # every prompt: a long one's first single-runner prefill too
        batched, batched_codes = best_of(lambda: run_batched(model, batch, args, pacer), args.repeats)
        sequential, sequential_codes = best_of(lambda: run_sequential(model, batch, args), args.repeats)
        same = all(torch.equal(a, b) for a, b in zip(batched_codes, sequential_codes))
        rows.append({"concurrency": count, "batched": batched, "sequential": sequential, "same_codes": same})
    result = {"bench": "concurrent_speech", "env": environment(device), "dtype": args.dtype, "model": config,
              "answer_tokens": args.answer_tokens, "talker_max_new_tokens": args.talker_tokens,
              "arrival_ms": args.arrival_ms, "results": rows,
              "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
    name = "concurrent_speech" + ("_full" if args.full_size else "")
    name += f"_arrival{args.arrival_ms:g}" if args.arrival_ms else ""
    name += f"_long{args.long_prompt_tokens}" if args.long_prompt_tokens else ""
    name += f"_audio{args.audio_seconds:g}" if args.audio_seconds else ""
    name += f"_prefill{args.prefill_tokens}" if args.prefill_tokens else ""
    name += "_fixed" if args.fixed_chunks else ""
    result |= {"long_prompt_tokens": args.long_prompt_tokens, "audio_seconds": args.audio_seconds,
               "prefill_tokens": args.prefill_tokens,
               "fixed_chunks": args.fixed_chunks}
    path = save(name, result)
    print(f"{result['env']['device']}, {args.dtype}: {args.answer_tokens} text tokens, {args.talker_tokens - 1} "
          f"frames per answer, a request every {args.arrival_ms:g} ms"
          + (f", the last with {args.long_prompt_tokens} prompt tokens" if args.long_prompt_tokens else "")
          + (f", the last {args.audio_seconds:g} s of audio" if args.audio_seconds else "")
          + (f", prefill chunks of {args.prefill_tokens}" if args.prefill_tokens else "")
          + (", no pacing" if args.fixed_chunks else ""))
    print(f"{'':>4} {'':10} {'first token p50':>16} {'first packet p50':>17} {'max':>9} {'wall':>9} {'RTF':>7} "
          f"{'audio s/s':>10} {'stall':>9}")
    for r in rows:
        for name in ("batched", "sequential"):
            m = r[name]
            print(f"{r['concurrency']:4d} {name:10} {m['first_token_ms_median']:13.1f} ms "
                  f"{m['first_packet_ms_median']:14.1f} ms {m['first_packet_ms_max']:6.1f} ms {m['wall_ms']:6.0f} ms "
                  f"{m['rtf']:7.3f} {m['audio_s_per_s']:10.2f} {m['stall_ms_max']:6.1f} ms")
        print(f"{'':4} same codes: {r['same_codes']}")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
