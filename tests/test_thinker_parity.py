"""Greedy thinker tokens and logits equal to transformers' Qwen3-Omni on the same random checkpoint."""
import pytest
import torch

from omni_runtime import OmniModel, SamplingParams

IM_START, IM_END, NEWLINE, SYSTEM, USER, ASSISTANT = 151644, 151645, 198, 8948, 872, 77091

CONFIGS = {
    "base": dict(),
    "gqa6-hd32-top4-no-renorm-dense0": dict(hidden=96, layers=3, heads=6, kv_heads=1, head_dim=32, experts=16,
                                            top_k=4, norm_topk_prob=False, mrope_section=(6, 5, 5),
                                            mlp_only_layers=[0]),
    "mha-odd-experts-top1": dict(hidden=80, layers=2, heads=5, kv_heads=5, head_dim=24, experts=7, top_k=1,
                                 moe_intermediate=40, mrope_section=(4, 4, 4)),
    "wide-top8": dict(hidden=128, layers=2, heads=8, kv_heads=2, head_dim=16, experts=32, top_k=8,
                      moe_intermediate=24),
}
# (logits atol, rtol): fp32 differs only by GEMM blocking (~5e-7 seen); bf16 repeats the reference's roundings
# op for op, so its decode logits are bit-identical.
TOLERANCES = {torch.float32: (5e-6, 5e-6), torch.bfloat16: (0.0, 0.0)}
# The prefill's logits: the reference runs the LM head over every prompt position and keeps the last; we run it on
# the last alone (a long prompt's full [T, V] logits are gigabytes). Where a bf16 GEMM's bits depend on its row count
# (AVX-512 CPUs; not AVX2) that row can differ by one bf16 rounding: (atol, rtol) for it.
PREFILL_BF16_TOLERANCE = (1e-5, 2.0**-7)


def assert_logits_match(ours: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, floor: float = 0.0):
    """ours/expected: [steps, V], the prefill's row first."""
    atol, rtol = (max(t, floor) for t in TOLERANCES[dtype])
    torch.testing.assert_close(ours[1:], expected[1:], atol=atol, rtol=rtol)
    if dtype == torch.bfloat16:
        atol, rtol = (max(t, p) for t, p in zip((atol, rtol), PREFILL_BF16_TOLERANCE))
    torch.testing.assert_close(ours[:1], expected[:1], atol=atol, rtol=rtol)


def chat_prompt(seed: int, user_len: int = 19) -> torch.Tensor:
    words = torch.randint(1000, 150000, (user_len + 5,), generator=torch.Generator().manual_seed(seed)).tolist()
    ids = [IM_START, SYSTEM, NEWLINE, *words[:5], IM_END, NEWLINE, IM_START, USER, NEWLINE, *words[5:], IM_END,
           NEWLINE, IM_START, ASSISTANT, NEWLINE]
    return torch.tensor([ids])


def reference_generate(hf_model, prompt, max_new_tokens, eos):
    with torch.no_grad():
        out = hf_model.thinker.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                                        output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, prompt.shape[1]:].tolist(), torch.cat(out.logits).float()


def teacher_forced_logits(model: OmniModel, prompt, tokens, **media):
    from omni_runtime.multimodal import MediaInputs, build_prompt
    runner = model.thinker_runner
    inputs = build_prompt(prompt.view(-1), MediaInputs(**media), model.config, model.thinker.model.embed_tokens,
                          model.audio_encoder, model.vision_encoder)
    logits = [runner.prefill(inputs)[0]]
    for token in tokens[:-1]:
        logits.append(runner.decode(torch.tensor([[token]])))
    return torch.cat(logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_tokens_and_logits_match_reference(reference_checkpoint, name, dtype):
    folder, _ = reference_checkpoint(**CONFIGS[name])
    from transformers import Qwen3OmniMoeForConditionalGeneration

    hf_model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(folder, dtype=dtype).eval()
    model = OmniModel.from_pretrained(folder, dtype=dtype)
    for seed in (0, 1):
        prompt = chat_prompt(seed)
        expected, expected_logits = reference_generate(hf_model, prompt, 16, IM_END)
        out = model.generate(prompt, max_new_tokens=16, thinker_sampling=SamplingParams(temperature=0.0))
        assert out.text_ids == expected
        assert_logits_match(teacher_forced_logits(model, prompt, expected), expected_logits, dtype)


def test_generation_stops_at_eos_and_includes_it(reference_checkpoint):
    folder, hf_model = reference_checkpoint()
    model = OmniModel.from_pretrained(folder)
    prompt = chat_prompt(3)
    free_run, _ = reference_generate(hf_model, prompt, 8, IM_END)
    eos = free_run[3]                      # pretend the 4th token is the end of turn
    expected, _ = reference_generate(hf_model, prompt, 8, eos)
    out = model.generate(prompt, max_new_tokens=8, eos_token_id=eos)
    assert out.text_ids == expected == free_run[:free_run.index(eos) + 1]
    assert out.finish_reason == "eos"
    assert model.generate(prompt, max_new_tokens=8, eos_token_id=[12345, eos]).text_ids == expected


def test_default_eos_is_the_checkpoint_end_of_turn(reference_checkpoint):
    folder, _ = reference_checkpoint()
    model = OmniModel.from_pretrained(folder)
    assert model.config.eos_token_ids == (IM_END,)


def test_prompt_forms_agree_and_repeat_runs_are_identical(reference_checkpoint):
    folder, _ = reference_checkpoint()
    model = OmniModel.from_pretrained(folder)
    prompt = chat_prompt(5)
    runs = [model.generate(p, max_new_tokens=6).text_ids for p in (prompt, prompt[0], prompt[0].tolist(), prompt)]
    assert all(run == runs[0] for run in runs)
    assert len(runs[0]) == 6


def test_sharded_and_single_file_checkpoints_load_the_same(reference_checkpoint):
    single, _ = reference_checkpoint(seed=7)
    sharded, _ = reference_checkpoint(seed=7, max_shard_size="10MB")
    assert len(list(sharded.glob("*.safetensors"))) > 1
    a, b = OmniModel.from_pretrained(single), OmniModel.from_pretrained(sharded)
    for (name, x), (_, y) in zip(a.thinker.state_dict().items(), b.thinker.state_dict().items()):
        assert torch.equal(x, y), name
    prompt = chat_prompt(0)
    assert a.generate(prompt, max_new_tokens=5).text_ids == b.generate(prompt, max_new_tokens=5).text_ids
