"""Where a talker frame's time goes: the talker decode step and the code predictor's 15 steps, against the floor of
reading their weights once, and kernel by kernel.

    python bench/profile_talker_frame.py [--device cuda --dtype bfloat16 --full-size] [--frames 20]

Random weights (the released sizes with ``--full-size``; the thinker is cut to 2 layers since only the talker runs),
a short talker prefill, then greedy frames stage by stage (talker step, then predictor frame; each a captured CUDA
graph on a GPU): per-stage milliseconds, the bandwidth floor of each stage (weights it must read / ``--peak-gbs``)
and the ops or kernels that take the most time. Then whole frames as the pipeline runs them (``TalkerRunner.frame``:
one graph for step, codebook-0 draw and predictor), greedy and with the product's sampling, and on a GPU again with
each opt-in kernel the frame can run forced (``frame_variants``), which says whether each should be the default.
Writes bench/results/talker_frame[_full]_<device>.json.
"""
from __future__ import annotations

import argparse
import contextlib
import copy

import torch
from common import DTYPES, PEAK_BYTES_PER_S, environment, peak, save, timed

from omni_runtime import OmniModel
from omni_runtime.demo import DEMO_CONFIG, RELEASED_CONFIG
from omni_runtime.sampling import Sampler, SamplingParams


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--full-size", action="store_true", help="the released talker and code predictor")
    p.add_argument("--frames", type=int, default=20)
    p.add_argument("--peak-gbs", type=float, default=None,
                   help="device memory bandwidth for the floor (GB/s; default: the H100's 3350 or the H200's 4800 "
                        "by the device's name, else 3350)")
    p.add_argument("--top", type=int, default=25, help="rows of the op/kernel table")
    return p.parse_args()


def weight_bytes_per_frame(model: OmniModel) -> dict[str, int]:
    """Bytes of weights one frame must read: the talker step reads its dense weights, top-k of E experts per MoE
    layer and the codec head; each predictor step reads the predictor's layers, one codebook's head and embedding."""
    talker, cfg = model.talker, model.config.talker
    dense = sum(p.numel() * p.element_size() for n, p in talker.model.named_parameters()
                if "experts." not in n and "codec_embedding" not in n)
    experts = sum(p.numel() * p.element_size() for n, p in talker.model.named_parameters() if "experts." in n)
    talker_step = (dense + experts * cfg.text.num_experts_per_tok // max(cfg.text.num_experts, 1)
                   + talker.codec_head.weight.numel() * talker.codec_head.weight.element_size())
    predictor = talker.code_predictor
    layers = sum(p.numel() * p.element_size() for n, p in predictor.model.named_parameters()
                 if "codec_embedding" not in n)
    head = predictor.lm_head[0].weight
    steps = cfg.num_code_groups - 1
    return {"talker decode": talker_step, "code predictor": steps * (layers + head.numel() * head.element_size())}


# Opt-in kernels a frame can run (omni_kernels' dispatch selects them only when forced), timed at their use site:
# each variant is a frame graph of its own, captured with these backends forced.
OPT_IN = {"Triton add_rms_norm": {"add_rms_norm": "triton"}, "Triton silu_mul": {"silu_mul": "triton"},
          "CUDA fused_moe": {"fused_moe": "cuda"}}
FUSED_DRAW = {"sample_draw": "triton"}


def frame_variants() -> dict[str, tuple[str, dict[str, str]]]:
    """name -> (sampling, {op: forced backend}): the defaults greedy and sampled, each opt-in kernel alone, the
    fused draw (sampled frames only), and all of them."""
    every = {op: b for forced in (*OPT_IN.values(), FUSED_DRAW) for op, b in forced.items()}
    return {"greedy": ("greedy", {}), **{f"greedy, {k}": ("greedy", v) for k, v in OPT_IN.items()},
            "sampled": ("sampled", {}), "sampled, fused draw": ("sampled", FUSED_DRAW),
            "sampled, all opt-in kernels": ("sampled", every)}


def whole_frames(runner, frame_embed: torch.Tensor, device: torch.device, frames: int) -> dict[str, float]:
    """Median ms of ``runner.frame`` per variant (``frame_variants``; the product's sampling from omni_runtime.api).
    Variants that force a backend run on a GPU only (Triton on a CPU is the interpreter)."""
    from omni_runtime.api import DEFAULT_PREDICTOR_SAMPLING, DEFAULT_TALKER_SAMPLING
    sampling = {"greedy": (SamplingParams(temperature=0.0, repetition_penalty=1.05), SamplingParams(temperature=0.0)),
                "sampled": (DEFAULT_TALKER_SAMPLING, DEFAULT_PREDICTOR_SAMPLING)}
    text_row = torch.zeros_like(frame_embed)
    result = {}
    for name, (setting, forced) in frame_variants().items():
        if forced and device.type != "cuda":
            continue
        runner.frame_graphs.clear()   # captured with the kernels selected at capture
        result[name] = _frame_ms(runner, frame_embed, text_row, *sampling[setting], forced, device, frames)
    runner.frame_graphs.clear()
    return result


def _frame_ms(runner, frame_embed, text_row, talker_params, predictor_params, forced, device, frames) -> float:
    import omni_kernels as ok
    with contextlib.ExitStack() as backends:
        for op, backend in forced.items():
            backends.enter_context(ok.use_backend(backend, op=op))
        talker = Sampler(talker_params, device, runner.code0_suppress)
        predictor = Sampler(predictor_params, device)
        runner.begin_answer(talker, predictor)
        state = {"frame": frame_embed}

        def step():
            state["frame"] = runner.frame(state["frame"], text_row, talker, predictor)[2]

        for _ in range(3):   # the first call captures the graph
            step()
        times = [timed(step, device) for _ in range(frames)]
    return 1e3 * sorted(times)[len(times) // 2]


def main():
    args = parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    config = copy.deepcopy(RELEASED_CONFIG if args.full_size else DEMO_CONFIG)
    config["thinker_config"]["text_config"]["num_hidden_layers"] = 2
    config["talker_config"]["accept_hidden_layer"] = 1
    model = OmniModel.random(config, device=device, dtype=dtype, max_seq_len=256)
    runner, greedy = model.talker_runner, Sampler(SamplingParams(temperature=0.0), device)
    hidden_size = runner.cfg.text.hidden_size

    with torch.inference_mode():
        prompt = 0.02 * torch.randn(1, 8, hidden_size, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        positions = torch.arange(8, device=device).view(1, 1, -1).expand(3, 1, -1)
        logits, hidden = runner.prefill(prompt, positions)
        state = {"hidden": hidden, "code0": greedy(logits)}
        stages = {"code predictor": [], "talker decode": []}

        def predict():
            state["frame"] = runner.predict_residuals(state["hidden"], state["code0"], greedy)[1]

        def decode():
            logits, state["hidden"] = runner.decode(state["frame"])
            state["code0"] = greedy(logits)

        def frame(record: bool):
            for name, fn in (("code predictor", predict), ("talker decode", decode)):
                seconds = timed(fn, device)
                if record:
                    stages[name].append(seconds)

        for _ in range(3):              # warm up: Triton compiles, graphs are captured
            frame(record=False)
        for _ in range(args.frames):
            frame(record=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(5):
                frame(record=False)
        whole = whole_frames(runner, state["frame"], device, args.frames)

    if args.peak_gbs is None:
        args.peak_gbs = (peak(PEAK_BYTES_PER_S, environment(device)["device"]) or 3.35e12) / 1e9
    floors = {k: v / (args.peak_gbs * 1e9) for k, v in weight_bytes_per_frame(model).items()}
    rows = []
    print(f"{environment(device)['device']}, {args.dtype}, {'released' if args.full_size else 'demo'} talker")
    print(f"{'stage':16s} {'ms/frame':>9s} {'floor ms':>9s} {'x floor':>8s}")
    for name, times in stages.items():
        ms = 1e3 * sorted(times)[len(times) // 2]
        floor_ms = 1e3 * floors[name]
        rows.append({"stage": name, "ms": ms, "floor_ms": floor_ms, "over_floor": ms / floor_ms})
        print(f"{name:16s} {ms:9.3f} {floor_ms:9.3f} {ms / floor_ms:8.1f}")
    total = sum(r["ms"] for r in rows)
    floor_total = sum(r["floor_ms"] for r in rows)
    print(f"{'frame':16s} {total:9.3f} {floor_total:9.3f} {total / floor_total:8.1f}")
    print(f"\n{'whole frame (one graph)':36s} {'ms/frame':>9s} {'x floor':>8s} {'against the default':>20s}")
    for name, ms in whole.items():
        default = "sampled" if name.startswith("sampled") else "greedy"
        change = f"{100 * (ms / whole[default] - 1):+19.1f}%" if name != default else ""
        print(f"{name:36s} {ms:9.3f} {ms / floor_total:8.1f} {change}")

    sort_key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    # kernels a frame launches: at decode each costs a few microseconds of launch and tail, whatever it computes
    launches = None
    if device.type == "cuda":   # kernels only: the graph replays' memcpy/memset events are not launches
        launches = sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA
                       and not e.key.lower().startswith(("memcpy", "memset"))) / 5
        print(f"kernels per frame (stage by stage): {launches:.0f}")
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, sort_key), reverse=True)[:args.top]
    ops = [{"name": e.key, "calls_per_frame": e.count / 5, "us_per_frame": getattr(e, sort_key) / 5} for e in events]
    print(f"\n{'op / kernel (5 frames profiled)':70s} {'calls/frame':>11s} {'us/frame':>9s}")
    for op in ops:
        print(f"{op['name'][:70]:70s} {op['calls_per_frame']:11.1f} {op['us_per_frame']:9.1f}")
    path = save("talker_frame" + ("_full" if args.full_size else ""),
                {"bench": "talker_frame", "env": environment(device), "dtype": args.dtype,
                 "full_size": args.full_size, "peak_gbs": args.peak_gbs, "stages": rows,
                 "frame_ms": total, "floor_ms": floor_total, "whole_frame_ms": whole, "launches_per_frame": launches,
                 "top_ops": ops})
    print("saved", path)


if __name__ == "__main__":
    main()
