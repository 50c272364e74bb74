"""Command line: ``omni-runtime generate``. Without ``--model`` it runs the built-in small random model."""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from omni_runtime.api import DEFAULT_TALKER_SAMPLING, SAMPLE_RATE, OmniModel
from omni_runtime.demo import demo_checkpoint
from omni_runtime.pipeline import TALKER_STAGES, StageTimer
from omni_runtime.sampling import SamplingParams

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="omni-runtime", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="answer one prompt, in text and (with --out) speech")
    gen.add_argument("--model", type=Path, help="checkpoint folder (default: the built-in small random model)")
    source = gen.add_mutually_exclusive_group()
    source.add_argument("--text", default="Hello! Who are you?",
                        help="user message; without a tokenizer.json its UTF-8 bytes become the token ids")
    source.add_argument("--ids", help="comma-separated prompt token ids, used as they are")
    gen.add_argument("--audio", type=Path, action="append", default=[], help="an audio file to hear (repeatable)")
    gen.add_argument("--image", type=Path, action="append", default=[], help="an image file to see (repeatable)")
    gen.add_argument("--out", type=Path, help="write the spoken answer to this wav file")
    gen.add_argument("--speaker", default="ethan")
    gen.add_argument("--stream", action="store_true", help="print the text as it streams")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--talker-max-new-tokens", type=int, default=512)
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--dtype", choices=DTYPES, default="float32")
    gen.add_argument("--temperature", type=float, default=0.0, help="thinker temperature (0 = greedy)")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, help="seeds the thinker's and the talker's draws (answer i: seed + i)")
    gen.add_argument("--concurrency", type=int, default=1,
                     help="speak N answers to the prompt at once (batched; --out x.wav writes x-0.wav ...)")
    return parser.parse_args(argv)


def prompt_inputs(model: OmniModel, args: argparse.Namespace) -> dict:
    """The user turn (media first, then the text) as generate's keyword arguments."""
    if args.ids:
        return {"input_ids": [int(i) for i in args.ids.split(",")]}
    parts = [{"type": "audio", "audio": path} for path in args.audio]
    parts += [{"type": "image", "image": path} for path in args.image]
    if model.tokenizer is not None:
        parts.append({"type": "text", "text": args.text})
    else:  # the built-in model has no tokenizer: its "text" is the message's UTF-8 bytes
        parts.append({"type": "text_ids", "ids": list(args.text.encode("utf-8"))})
    return model.prepare([{"role": "user", "content": parts}])


def latency_table(start: float, first_text: float | None, first_audio: float | None, end: float, tokens: int,
                  frames: int, samples: int, timer: StageTimer) -> str:
    ms = lambda t: "-" if t is None else f"{1e3 * (t - start):.1f} ms"  # noqa: E731
    audio_seconds = samples / SAMPLE_RATE
    speech_time = sum(timer.seconds[s] for s in (*TALKER_STAGES, "code2wav"))
    thinker_time = timer.seconds["thinker prefill"] + timer.seconds["thinker decode"]
    rows = [
        ("time to first token", ms(first_text)),
        ("first audio packet", ms(first_audio)),
        ("total", ms(end)),
        ("thinker tokens/s", f"{tokens / thinker_time:.1f}" if thinker_time else "-"),
        ("talker frames/s", f"{frames / speech_time:.1f}" if speech_time and frames else "-"),
        ("real-time factor", f"{(end - start) / audio_seconds:.3f}" if samples else "-"),
    ]
    rows += [(f"  {stage}", f"{1e3 * seconds:.1f} ms / {timer.calls[stage]} calls")
             for stage, seconds in timer.seconds.items()]
    return "\n".join(f"{name:22} {value}" for name, value in rows)


def generate(args: argparse.Namespace) -> None:
    folder = args.model or demo_checkpoint()
    model = OmniModel.from_pretrained(folder, device=args.device, dtype=DTYPES[args.dtype])
    decode = model.decode if model.tokenizer else str
    inputs = prompt_inputs(model, args)
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    speak = args.out is not None
    print(f"model: {folder}" + ("" if args.model else " (built-in random model: random tokens, noise for speech)"))
    if args.concurrency != 1:
        return generate_concurrently(model, args, inputs, sampling)
    timer = StageTimer(model.device)
    start = time.perf_counter()
    first_text = first_audio = None
    text, codes, audio = [], 0, []
    for event in model.stream(max_new_tokens=args.max_new_tokens, thinker_sampling=sampling, return_audio=speak,
                              speaker=args.speaker, talker_max_new_tokens=args.talker_max_new_tokens, timer=timer,
                              talker_sampling=talker_sampling(args.seed), **inputs):
        now = time.perf_counter()
        if event.text_ids:
            first_text = first_text or now
            text += event.text_ids
            if args.stream:
                print(event.text if model.tokenizer else decode(event.text_ids), end="" if model.tokenizer else " ",
                      flush=True)
        if event.audio is not None:
            first_audio = first_audio or now
            audio.append(event.audio)
        codes += 0 if event.codes is None else event.codes.shape[1]
    end = time.perf_counter()
    print(("\n" if args.stream else "") + f"answer: {decode(text)}")
    samples = sum(a.numel() for a in audio)
    if speak:
        import soundfile
        soundfile.write(args.out, torch.cat(audio).cpu().numpy() if audio else [], SAMPLE_RATE)
        print(f"wrote {args.out}: {samples / SAMPLE_RATE:.2f} s of audio, {codes} frames")
    print(latency_table(start, first_text, first_audio, end, len(text), codes, samples, timer))


def talker_sampling(seed: int | None) -> SamplingParams:
    """The reference's speech sampling, seeded with ``--seed`` (the code predictor then with seed + 1)."""
    return replace(DEFAULT_TALKER_SAMPLING, seed=seed)


def generate_concurrently(model: OmniModel, args: argparse.Namespace, inputs: dict, sampling: SamplingParams) -> None:
    """``--concurrency N``: N spoken answers to the prompt at once (``stream_batch``), seeds ``seed + i``; prints each
    answer and the first packets, the real-time factor and the audio made per second."""
    if args.concurrency < 1:
        raise ValueError(f"--concurrency must be >= 1, got {args.concurrency}")
    count, decode = args.concurrency, model.decode if model.tokenizer else str
    seeds = [None if args.seed is None else args.seed + i for i in range(count)]
    samplings = [replace(sampling, seed=seed) for seed in seeds]
    text, audio, first_audio = [[] for _ in range(count)], [[] for _ in range(count)], [None] * count
    start = time.perf_counter()
    for index, event in model.stream_batch([inputs] * count, max_new_tokens=args.max_new_tokens,
                                           thinker_sampling=samplings, max_batch=count, speaker=args.speaker,
                                           talker_max_new_tokens=args.talker_max_new_tokens,
                                           talker_sampling=[talker_sampling(seed) for seed in seeds]):
        text[index] += event.text_ids
        if event.audio is not None:
            first_audio[index] = first_audio[index] or time.perf_counter() - start
            audio[index].append(event.audio)
    wall = time.perf_counter() - start
    seconds = [sum(a.numel() for a in chunks) / SAMPLE_RATE for chunks in audio]
    for index in range(count):
        print(f"answer {index}: {decode(text[index])}")
        if args.out is not None:
            import soundfile
            path = args.out.with_name(f"{args.out.stem}-{index}{args.out.suffix}")
            soundfile.write(path, torch.cat(audio[index]).cpu().numpy() if audio[index] else [], SAMPLE_RATE)
            print(f"wrote {path}: {seconds[index]:.2f} s of audio")
    packets = sorted(t for t in first_audio if t is not None)
    line = f"concurrency {count}: {1e3 * wall:.0f} ms in all"
    if packets:
        line += (f"; first audio packet median {1e3 * packets[len(packets) // 2]:.1f} ms, worst "
                 f"{1e3 * packets[-1]:.1f} ms; real-time factor {wall / max(seconds):.3f}; "
                 f"{sum(seconds) / wall:.2f} s of audio per second")
    print(line)


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
