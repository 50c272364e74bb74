"""omni_kernels: the op layer of omni-runtime.

Every op has a pure-torch reference (``<op>_ref``, the spec and the CPU fallback) and a public entry point
(``<op>``) that dispatches per device to the CUDA extension, a Triton kernel or the reference (see ``dispatch``).
"""
from omni_kernels.add_rms_norm import add_rms_norm, add_rms_norm_ref
from omni_kernels.attention import attention, attention_ref, decode_attention, decode_attention_ref
from omni_kernels.causal_conv import (causal_conv1d, causal_conv1d_ref, causal_conv_transpose1d,
                                      causal_conv_transpose1d_ref, snake_beta, snake_beta_ref)
from omni_kernels.code_predictor_frame import PredictorWeights, code_predictor_frame, code_predictor_frame_ref
from omni_kernels.decoder_step import DecoderLayerWeights, DecoderWeights, decoder_step, decoder_step_ref
from omni_kernels.dispatch import BACKENDS, selected_backend, set_backend, use_backend
from omni_kernels.moe import SharedExpert, fused_moe, fused_moe_ref, moe_experts_ref, moe_route_ref
from omni_kernels.moe_combine import moe_combine, moe_combine_ref
from omni_kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_ref
from omni_kernels.rms_norm import rms_norm, rms_norm_ref
from omni_kernels.rope import apply_rope_ref, mrope_cos_sin_ref, rope_inv_freq
from omni_kernels.rvq_lookup import rvq_embed_mean, rvq_embed_mean_ref
from omni_kernels.silu_mul import silu_mul, silu_mul_ref

__all__ = [
    "add_rms_norm", "add_rms_norm_ref", "apply_rope_ref", "attention", "attention_ref", "BACKENDS", "causal_conv1d",
    "causal_conv1d_ref", "causal_conv_transpose1d", "causal_conv_transpose1d_ref", "code_predictor_frame",
    "code_predictor_frame_ref", "decode_attention", "decode_attention_ref", "decoder_step", "decoder_step_ref",
    "DecoderLayerWeights", "DecoderWeights", "fused_moe", "fused_moe_ref", "moe_combine", "moe_combine_ref",
    "moe_experts_ref", "moe_route_ref", "mrope_cos_sin_ref", "PredictorWeights", "qk_norm_rope", "qk_norm_rope_ref",
    "rms_norm", "rms_norm_ref", "rope_inv_freq", "rvq_embed_mean", "rvq_embed_mean_ref", "selected_backend",
    "set_backend", "SharedExpert", "silu_mul", "silu_mul_ref", "snake_beta", "snake_beta_ref", "use_backend",
]
