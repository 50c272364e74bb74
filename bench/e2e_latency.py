"""End-to-end speech latency: omni-runtime (streamed) against transformers' generate, same weights and device.

    python bench/e2e_latency.py [--device cpu] [--dtype float32] [--answer-tokens 16] [--talker-tokens 48]

Both run greedy (the reference's talker_do_sample=False) on one random checkpoint, so they produce the same text,
codes and waveform (checked). ``--full-size --device cuda`` runs ours alone at the released model's sizes with
random weights (``--thinker-layers 24`` or so on an 80 GB H100), with the time of each stage and peak memory.
The reference is sequential (thinker to the end, then talker, then Code2Wav), so its first audio packet comes at
its total time. Prints a table and writes bench/results/e2e_latency[_full|_ours]_<device>.json.
"""
from __future__ import annotations

import copy
import statistics
import time

import torch
from common import DTYPES, apply_threads, environment, model_config, model_parser, save, scratch_dir

from omni_runtime import OmniModel, SamplingParams
from omni_runtime.demo import RELEASED_CONFIG
from omni_runtime.pipeline import TALKER_STAGES, StageTimer

IM_START, IM_END, NEWLINE, USER, ASSISTANT = 151644, 151645, 198, 872, 77091


def parse_args():
    return speech_parser(__doc__).parse_args()


def speech_parser(doc: str):
    """The flags of a speech benchmark: thinker size (``model_parser``), talker size, answer lengths, full size."""
    p = model_parser(doc)
    p.add_argument("--talker-hidden", type=int, default=48, help="talker and code predictor width")
    p.add_argument("--talker-layers", type=int, default=2)
    p.add_argument("--talker-experts", type=int, default=8)
    p.add_argument("--answer-tokens", type=int, default=16)
    p.add_argument("--talker-tokens", type=int, default=48, help="talker_max_new_tokens (frames + 1)")
    p.add_argument("--ours-only", action="store_true", help="skip the transformers reference")
    p.add_argument("--full-size", action="store_true",
                   help="the released model's sizes with random weights built on the device (ours only; GPU)")
    p.add_argument("--thinker-layers", type=int, default=48,
                   help="with --full-size: thinker layers (fewer fit an 80 GB H100 beside the talker)")
    return p


def prompt_ids(length: int = 40, seed: int = 0) -> torch.Tensor:
    words = torch.randint(1000, 150000, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
    return torch.tensor([[IM_START, USER, NEWLINE, *words, IM_END, NEWLINE, IM_START, ASSISTANT, NEWLINE]])


def run_reference(model, prompt, args):
    start = time.perf_counter()
    with torch.no_grad():
        sequences, wav = model.generate(prompt, thinker_max_new_tokens=args.answer_tokens, talker_do_sample=False,
                                        speaker="ethan", talker_max_new_tokens=args.talker_tokens)
    total = time.perf_counter() - start
    return {"total_s": total, "first_packet_s": total, "text": sequences[0, prompt.shape[1]:].tolist(),
            "samples": wav.numel()}


def run_ours(model, prompt, args, sync_stages: bool = False):
    """``sync_stages``: synchronise the GPU around every stage, so that each stage's time is its own (and the
    headline figures pay for the syncs)."""
    timer = StageTimer(model.device if sync_stages else None)
    start, first_packet, text, samples, frames = time.perf_counter(), None, [], 0, 0
    for event in model.stream(prompt, max_new_tokens=args.answer_tokens, eos_token_id=IM_END,
                              talker_max_new_tokens=args.talker_tokens, timer=timer,
                              talker_sampling=SamplingParams(temperature=0.0, repetition_penalty=1.05)):
        text += event.text_ids
        if event.audio is not None:
            first_packet = first_packet or time.perf_counter() - start
            samples += event.audio.numel()
            frames += 0 if event.codes is None else event.codes.shape[1]
    total = time.perf_counter() - start
    return {"total_s": total, "first_packet_s": first_packet, "text": text, "samples": samples, "frames": frames,
            "stages_ms": {k: 1e3 * v for k, v in timer.seconds.items()}, "stage_calls": dict(timer.calls)}


def median_run(fn, repeats):
    runs = [fn() for _ in range(repeats)]
    best = sorted(runs, key=lambda r: r["total_s"])[len(runs) // 2]
    return best | {"first_packet_s_median": statistics.median(r["first_packet_s"] for r in runs)}


def build_models(args, device, dtype):
    """(config description, ours, reference or None): a random checkpoint both load, or (``--full-size``) the
    released sizes with random weights built on the device for ours alone."""
    if args.full_size:
        config = copy.deepcopy(RELEASED_CONFIG)
        config["thinker_config"]["text_config"]["num_hidden_layers"] = args.thinker_layers
        config["talker_config"]["accept_hidden_layer"] = min(24, args.thinker_layers)
        encoders = getattr(args, "audio_seconds", 0) > 0   # concurrent_speech.py --audio-seconds
        return {"released": True, "thinker_layers": args.thinker_layers, "encoders": encoders}, OmniModel.random(
            config, device=device, dtype=dtype, max_seq_len=4096, encoders=encoders), None
    from hf_checkpoints import omni_config_dict, save_reference_checkpoint
    from transformers import Qwen3OmniMoeForConditionalGeneration

    config = model_config(args, talker_hidden=args.talker_hidden, talker_layers=args.talker_layers,
                          talker_experts=args.talker_experts)
    folder = scratch_dir("omni-bench-")
    save_reference_checkpoint(folder, omni_config_dict(**config))
    reference = None
    if not args.ours_only:
        reference = Qwen3OmniMoeForConditionalGeneration.from_pretrained(folder, dtype=dtype).to(device).eval()
    return config, OmniModel.from_pretrained(folder, device=device, dtype=dtype), reference


def build_ours(args) -> tuple[torch.device, dict, OmniModel]:
    """Ours alone (no reference) from a speech benchmark's flags -> (device, config description, model)."""
    args.ours_only = True
    apply_threads(args)
    device = torch.device(args.device)
    config, model, _ = build_models(args, device, DTYPES[args.dtype])
    return device, config, model


def main():
    args = parse_args()
    apply_threads(args)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    config, ours, reference = build_models(args, device, dtype)
    prompt = prompt_ids().to(device)
    run_ours(ours, prompt, args)                                                    # warm up (and capture graphs)
    mine = median_run(lambda: run_ours(ours, prompt, args), args.repeats)
    # first packet and total come from runs that never synchronise; on a GPU the split into stages comes from one
    # more run that synchronises at every stage boundary
    staged = run_ours(ours, prompt, args, sync_stages=True) if device.type == "cuda" else mine
    runs = [("omni-runtime (streamed)", mine)]
    ref = None
    if reference is not None:
        run_reference(reference, prompt, args)
        ref = median_run(lambda: run_reference(reference, prompt, args), args.repeats)
        runs.insert(0, ("transformers", ref))
    audio_s = mine["samples"] / 24000
    rows = {name: {"first_audio_packet_ms": 1e3 * r["first_packet_s"], "total_ms": 1e3 * r["total_s"],
                   "rtf": r["total_s"] / (r["samples"] / 24000)} for name, r in runs}
    stages = staged["stages_ms"]
    thinker_s = (stages.get("thinker prefill", 0) + stages.get("thinker decode", 0)) / 1e3
    talker_s = sum(stages.get(k, 0) for k in TALKER_STAGES) / 1e3
    result = {
        "bench": "e2e_latency", "env": environment(device), "dtype": args.dtype, "model": config,
        "answer_tokens": args.answer_tokens, "talker_max_new_tokens": args.talker_tokens,
        "audio_seconds": audio_s, "results": rows,
        "omni_runtime_rates": {"thinker_tokens_per_s": len(mine["text"]) / thinker_s if thinker_s else None,
                               "talker_frames_per_s": mine["frames"] / talker_s if talker_s else None},
        "omni_runtime_stages_ms": stages, "omni_runtime_stage_calls": staged["stage_calls"],
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    if ref is not None:
        result |= {"same_text": ref["text"] == mine["text"], "same_audio_length": ref["samples"] == mine["samples"],
                   "ratios": {"first_packet_vs_reference_total": mine["first_packet_s"] / ref["total_s"],
                              "total_vs_reference_total": mine["total_s"] / ref["total_s"]}}
    path = save("e2e_latency" + ("_full" if args.full_size else "_ours" if args.ours_only else ""), result)
    print(f"{result['env']['device']}, {args.dtype}: {len(mine['text'])} text tokens, {mine['frames']} frames "
          f"({audio_s:.2f} s audio)" + (f"; same text: {result['same_text']}, same length: "
                                        f"{result['same_audio_length']}" if ref is not None else ""))
    print(f"{'':26} {'first packet':>13} {'total':>10} {'RTF':>7}")
    for name, row in rows.items():
        print(f"{name:26} {row['first_audio_packet_ms']:10.1f} ms {row['total_ms']:7.0f} ms {row['rtf']:7.3f}")
    if ref is not None:
        print(f"first packet / reference total = {result['ratios']['first_packet_vs_reference_total']:.3f}, "
              f"total / reference total = {result['ratios']['total_vs_reference_total']:.3f}")
    calls = staged["stage_calls"]
    print("stages: " + ", ".join(f"{k} {v:.0f} ms / {calls[k]}" for k, v in stages.items()))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
