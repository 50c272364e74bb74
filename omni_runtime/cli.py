"""Command line: omni-runtime generate. Without --model it runs the built-in small random model."""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from omni_runtime.api import DEFAULT_TALKER_SAMPLING, DTYPES, SAMPLE_RATE, OmniModel
from omni_runtime.demo import demo_checkpoint
from omni_runtime.engine.lease import RunnerBusyError
from omni_runtime.pipeline import TALKER_STAGES, StageTimer
from omni_runtime.sampling import SamplingParams


def token_ids(value: str) -> list[int]:
    """``--ids``: comma-separated integers."""
    try:
        return [int(i) for i in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integer token ids, got {value!r}") from None


def audio_path(value: str) -> Path:
    """``--out``: a file in an existing folder, with an extension soundfile writes (checked before any work)."""
    import soundfile

    path, formats = Path(value), soundfile.available_formats()
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{path}: the folder {path.parent} does not exist")
    if path.suffix[1:].upper() not in formats:
        raise argparse.ArgumentTypeError(f"{path}: not an audio file extension soundfile writes "
                                         f"({', '.join('.' + f.lower() for f in formats)})")
    return path


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default in its help, unless it is None, False or empty."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default in (None, False, []) else super()._get_help_string(action)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="omni-runtime", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="answer one prompt, in text and (with --out) speech",
                              description="Answer one prompt, in text and (with --out) speech.",
                              formatter_class=HelpFormatter)
    gen.add_argument("--model", type=Path, help="checkpoint folder (default: the built-in small random model)")
    source = gen.add_mutually_exclusive_group()
    source.add_argument("--text", default="Hello! Who are you?", help="the user message, in the chat template; "
                        "needs the checkpoint's tokenizer.json (the built-in model takes its UTF-8 bytes as ids)")
    source.add_argument("--ids", type=token_ids,
                        help="comma-separated prompt token ids, used as given (no chat template): for speech they "
                        "must open the assistant turn, <|im_start|>assistant\\n, as --text's prompt does")
    gen.add_argument("--audio", type=Path, action="append", default=[], help="an audio file to hear (repeatable)")
    gen.add_argument("--image", type=Path, action="append", default=[], help="an image file to see (repeatable)")
    gen.add_argument("--out", type=audio_path,
                     help="write the spoken answer to this audio file (.wav, .flac, ...); without it, text only")
    gen.add_argument("--speaker", default="ethan", help="the voice: one of the checkpoint's speakers")
    gen.add_argument("--stream", action="store_true", help="print the text as it streams")
    gen.add_argument("--max-new-tokens", type=int, default=32, help="most text tokens to generate")
    gen.add_argument("--talker-max-new-tokens", type=int, default=512, help="most speech frames (12.5 per second)")
    gen.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 ...")
    gen.add_argument("--dtype", choices=DTYPES, default="float32", help="weight and activation dtype")
    gen.add_argument("--temperature", type=float, default=0.0, help="thinker temperature (0 = greedy)")
    gen.add_argument("--top-k", type=int, default=0, help="thinker top-k sampling (0 = off)")
    gen.add_argument("--top-p", type=float, default=1.0, help="thinker top-p sampling (1 = off)")
    gen.add_argument("--seed", type=int,
                     help="seeds the thinker's and the talker's draws (answer i: seed + i; default: unseeded)")
    gen.add_argument("--concurrency", type=int, default=1,
                     help="speak N answers to the prompt at once (batched; --out x.wav writes x-0.wav ...)")
    args = parser.parse_args(argv)
    if args.ids is not None and (args.audio or args.image):
        gen.error("--audio and --image need --text: --ids is the whole prompt, used as given")
    if args.concurrency < 1:
        gen.error(f"--concurrency must be >= 1, got {args.concurrency}")
    if args.concurrency > 1 and args.stream:
        gen.error("--stream prints one answer as it streams: with --concurrency the answers print when they end")
    return args


def prompt_inputs(model: OmniModel, args: argparse.Namespace) -> dict:
    """The user turn (media first, then the text) as generate's keyword arguments."""
    if args.ids is not None:
        return {"input_ids": args.ids}
    parts = [{"type": "audio", "audio": path} for path in args.audio]
    parts += [{"type": "image", "image": path} for path in args.image]
    if model.tokenizer is None and args.model is None:  # the built-in model's "text" is the message's UTF-8 bytes
        parts.append({"type": "text_ids", "ids": list(args.text.encode("utf-8"))})
    elif model.tokenizer is None:   # the prompt fails either way: bad media first, as prepare() reports them
        if parts:
            model.prepare([{"role": "user", "content": parts}])
        raise ValueError(f"--text needs the checkpoint's tokenizer.json and {args.model} has none: add it, or give "
                         "the prompt as --ids")
    else:
        parts.append({"type": "text", "text": args.text})
    return model.prepare([{"role": "user", "content": parts}])


def write_audio(path: Path, chunks: list[torch.Tensor]) -> None:
    import soundfile

    try:
        soundfile.write(path, torch.cat(chunks).cpu().numpy() if chunks else [], SAMPLE_RATE)
    except soundfile.SoundFileError as e:   # a RuntimeError, not an OSError
        raise OSError(f"--out: cannot write {path}: {e}") from None


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
    model = OmniModel.from_pretrained(folder, device=args.device, dtype=args.dtype)
    decode = model.decode if model.tokenizer else str
    inputs = prompt_inputs(model, args)
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    speak = args.out is not None
    print(f"model: {folder}" + ("" if args.model else " (built-in random model: random tokens, noise for speech)"))
    if args.concurrency != 1:
        if model.talker is None and not speak:   # a text-only checkpoint: N text answers at once
            return answer_concurrently(model, args, inputs, sampling)
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
        write_audio(args.out, audio)
        print(f"wrote {args.out}: {samples / SAMPLE_RATE:.2f} s of audio, {codes} frames")
    print(latency_table(start, first_text, first_audio, end, len(text), codes, samples, timer))


def talker_sampling(seed: int | None) -> SamplingParams:
    """The reference's speech sampling, seeded with ``--seed`` (the code predictor then with seed + 1)."""
    return replace(DEFAULT_TALKER_SAMPLING, seed=seed)


def generate_concurrently(model: OmniModel, args: argparse.Namespace, inputs: dict, sampling: SamplingParams) -> None:
    """``--concurrency N``: N spoken answers to the prompt at once (``stream_batch``), seeds ``seed + i``; prints each
    answer and the first packets, the real-time factor and the audio made per second."""
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
            path = args.out.with_name(f"{args.out.stem}-{index}{args.out.suffix}")
            write_audio(path, audio[index])
            print(f"wrote {path}: {seconds[index]:.2f} s of audio")
    packets = sorted(t for t in first_audio if t is not None)
    line = f"concurrency {count}: {1e3 * wall:.0f} ms in all"
    if packets:
        line += (f"; first audio packet median {1e3 * packets[len(packets) // 2]:.1f} ms, worst "
                 f"{1e3 * packets[-1]:.1f} ms; real-time factor {wall / max(seconds):.3f}; "
                 f"{sum(seconds) / wall:.2f} s of audio per second")
    print(line)


def answer_concurrently(model: OmniModel, args: argparse.Namespace, inputs: dict, sampling: SamplingParams) -> None:
    """``--concurrency N`` on a checkpoint without a talker: N text answers decoded together (``generate_batch``),
    seeds ``seed + i``; prints each answer and the tokens made per second."""
    count, decode = args.concurrency, model.decode if model.tokenizer else str
    samplings = [replace(sampling, seed=None if args.seed is None else args.seed + i) for i in range(count)]
    start = time.perf_counter()
    outputs = model.generate_batch([inputs] * count, max_new_tokens=args.max_new_tokens, thinker_sampling=samplings,
                                   max_batch=count)
    wall = time.perf_counter() - start
    tokens = [len(output.text_ids) for output in outputs]
    for index, output in enumerate(outputs):
        print(f"answer {index}: {decode(output.text_ids)}")
    print(f"concurrency {count}: {1e3 * wall:.0f} ms in all; {sum(tokens)} tokens, {sum(tokens) / wall:.1f} tokens/s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        generate(args)
    except (ValueError, OSError, RunnerBusyError) as e:
        print(f"omni-runtime: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
