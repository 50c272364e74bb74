"""Fused q/k/v and gate/up projections (the GPU runtime's) against the separate ones, run on CPU."""
import torch

import omni_kernels as ok
from omni_runtime import OmniModel, SamplingParams
from omni_runtime.layers import fuse_projections


def test_fused_projections_keep_the_weights_and_the_answer(reference_checkpoint):
    from test_speech import GREEDY_TALKER
    from test_thinker_parity import IM_END, chat_prompt, teacher_forced_logits

    folder, _ = reference_checkpoint()
    separate, fused = OmniModel.from_pretrained(folder), OmniModel.from_pretrained(folder)
    before = {name: p.clone() for name, p in fused.talker.state_dict().items()}
    fuse_projections(fused.thinker)
    fuse_projections(fused.talker)
    attn, mlp = fused.talker.code_predictor.model.layers[0].self_attn, fused.talker.code_predictor.model.layers[0].mlp
    assert attn.q_proj.weight.data_ptr() == attn.qkv_weight.data_ptr()            # views of the fused weight
    assert mlp.up_proj.weight.data_ptr() == mlp.gate_up_weight[mlp.gate_proj.out_features:].data_ptr()
    moe = fused.talker.model.layers[0].mlp                                        # the shared expert's three inputs
    assert moe.shared_expert_gate.weight.data_ptr() == moe.shared_input_weight[-1:].data_ptr()
    assert moe.shared_expert.gate_up_weight.data_ptr() == moe.shared_input_weight.data_ptr()
    after = fused.talker.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())

    prompt = chat_prompt(0)
    # the module paths, not the CPU twins (they hold the weights as they were at load)
    with ok.use_backend("torch", op="decoder_step"), ok.use_backend("torch", op="code_predictor_frame"):
        outs = [m.generate(prompt, max_new_tokens=6, eos_token_id=IM_END, return_audio=True, speaker="ethan",
                           talker_max_new_tokens=12, thinker_sampling=SamplingParams(temperature=0.0),
                           talker_sampling=GREEDY_TALKER) for m in (separate, fused)]
        logits = [teacher_forced_logits(m, prompt, outs[0].text_ids) for m in (separate, fused)]
    assert outs[0].text_ids == outs[1].text_ids and torch.equal(outs[0].codes, outs[1].codes)
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[1].audio, outs[0].audio, atol=1e-5, rtol=0)


def test_fused_shared_expert_through_the_gpu_moe_path(reference_checkpoint):
    # On CPU the model's fused_moe is the reference, which reads the separate weights; the Triton path (what a GPU
    # runs, here in the interpreter) reads the fused one
    import pytest

    from omni_kernels._triton import HAS_TRITON
    if not HAS_TRITON:
        pytest.skip("needs triton")
    folder, _ = reference_checkpoint()
    separate, fused = OmniModel.from_pretrained(folder), OmniModel.from_pretrained(folder)
    fuse_projections(fused.talker)
    x = torch.randn(1, 3, separate.config.talker.text.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), ok.use_backend("triton", op="fused_moe"):
        blocks = [m.talker.model.layers[0].mlp for m in (separate, fused)]
        assert blocks[0].shared_input_weight is None and blocks[1].shared_input_weight is not None
        torch.testing.assert_close(blocks[1](x), blocks[0](x), atol=1e-6, rtol=1e-5)
        fuse_projections(fused.talker)   # twice: the views are remade, the answer stays
        torch.testing.assert_close(blocks[1](x), blocks[0](x), atol=1e-6, rtol=1e-5)
