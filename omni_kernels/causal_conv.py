"""Causal 1-D convolutions that stream: Code2Wav's convs, transposed convs and the SnakeBeta activation before them.

``causal_conv1d`` (stride 1) left-pads ``(K - 1) * dilation`` zeros. Streamed, that pad becomes the previous chunk's
last ``(K - 1) * dilation`` input samples (the carried ``state``); zeros at the start of the stream are the pad.

``causal_conv_transpose1d`` (kernel ``K = m * stride``) is ``ConvTranspose1d`` with ``K - stride`` samples trimmed
from both ends, the reference's "causal" transposed conv. Full output sample ``n`` sums ``x[i] w[n - i * stride]``
over ``i * stride <= n < i * stride + K``; after the trim, output ``j`` reads inputs ``j // stride`` ..
``j // stride + m - 1``: ``m - 1`` samples of lookahead (one for the decoder's ``K = 2 * stride``). An offline call
on ``L`` inputs yields ``(L + 1 - m) * stride`` samples, exactly those whose inputs all exist, so nothing is held
back at the end: a stream carries the last ``m - 1`` inputs and, given ``n`` new ones, convolves the ``n + m - 1``
window with the same trim, giving the next ``n * stride`` samples. Pushes concatenate to the offline output and
need no flush.

Shape legend: B batch, C channels, L samples, K kernel taps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from omni_kernels._extension import cuda_runs
from omni_kernels._triton import INTERPRET, tl, triton, triton_runs
from omni_kernels.dispatch import REGISTRY, everywhere


def causal_conv1d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    dilation: int = 1,
    groups: int = 1,
    state: torch.Tensor | None = None,
    snake: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (B, C_in, L), weight: (C_out, C_in // groups, K), bias: (C_out,) or None,
    state: (B, C_in, (K - 1) * dilation) or None (zeros, the start of a stream),
    snake: (alpha, beta) each (C_in,) or None: the conv reads ``snake_beta_ref(x, alpha, beta)`` instead of x
    -> y: (B, C_out, L), new state: the last (K - 1) * dilation samples of ``cat(state, x)`` (x after the snake)."""
    if snake is not None:
        x = snake_beta_ref(x, *snake)
    context = (weight.shape[-1] - 1) * dilation
    padded = F.pad(x, (context, 0)) if state is None else torch.cat((state, x), dim=-1)   # [B, C_in, context + L]
    if x.shape[-1] == 0:
        y = x.new_empty(x.shape[0], weight.shape[0], 0)
    else:
        y = F.conv1d(padded, weight, bias, dilation=dilation, groups=groups).contiguous()
    return y, padded[..., padded.shape[-1] - context:].clone()


def causal_conv_transpose1d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int,
    state: torch.Tensor | None = None,
    snake: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (B, C_in, L), weight: (C_in, C_out, K) with K = m * stride, bias: (C_out,) or None,
    state: (B, C_in, <= m - 1) the previous inputs (None at the start of a stream),
    snake: (alpha, beta) each (C_in,) or None: the conv reads ``snake_beta_ref(x, alpha, beta)`` instead of x
    -> y: (B, C_out, n * stride) with n the samples of ``cat(state, x)`` minus m - 1 (never negative),
       new state: the last min(m - 1, available) samples of ``cat(state, x)`` (x after the snake)."""
    if snake is not None:
        x = snake_beta_ref(x, *snake)
    kernel = weight.shape[-1]
    trim, lookahead = kernel - stride, kernel // stride - 1
    window = x if state is None else torch.cat((state, x), dim=-1)                        # [B, C_in, W]
    if window.shape[-1] == 0:
        y = x.new_empty(x.shape[0], weight.shape[1], 0)
    else:
        y = F.conv_transpose1d(window, weight, bias, stride=stride)                     # [B, C_out, (W-1)s + K]
        y = y[..., trim:y.shape[-1] - trim].contiguous()
    return y, window[..., window.shape[-1] - min(lookahead, window.shape[-1]):].clone()


def snake_beta_ref(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """x: (B, C, L), alpha/beta: (C,) stored as logs -> x + sin(x * e^alpha)^2 / (e^beta + 1e-9), in x's dtype
    with the reference's op order."""
    alpha = torch.exp(alpha.unsqueeze(0).unsqueeze(-1))   # [1, C, 1]
    beta = torch.exp(beta.unsqueeze(0).unsqueeze(-1))
    return x + (1.0 / (beta + 1e-9)) * torch.pow(torch.sin(x * alpha), 2)


REGISTRY.register("causal_conv1d", "torch", everywhere)(causal_conv1d_ref)
REGISTRY.register("causal_conv_transpose1d", "torch", everywhere)(causal_conv_transpose1d_ref)
REGISTRY.register("snake_beta", "torch", everywhere)(snake_beta_ref)


def _check_conv_args(name: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     in_channels: int, out_channels: int) -> None:
    if x.dim() != 3 or weight.dim() != 3:
        raise ValueError(f"{name}: expected x (B, C, L) and a 3-D weight, got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(f"{name}: x has {x.shape[1]} channels, the weight {tuple(weight.shape)} takes {in_channels}")
    if bias is not None and tuple(bias.shape) != (out_channels,):
        raise ValueError(f"{name}: bias {tuple(bias.shape)} does not match {out_channels} output channels")


def _check_state(name: str, x: torch.Tensor, state: torch.Tensor | None, max_len: int, exact: bool) -> None:
    if state is None:
        return
    ok_len = state.dim() == 3 and (state.shape[-1] == max_len if exact else state.shape[-1] <= max_len)
    if not ok_len or state.shape[:2] != x.shape[:2]:
        want = f"(B, C, {max_len})" if exact else f"(B, C, <= {max_len})"
        raise ValueError(f"{name}: state {tuple(state.shape)} does not fit x {tuple(x.shape)}: expected {want}")
    if state.dtype != x.dtype or state.device != x.device:
        raise ValueError(f"{name}: state is {state.dtype} on {state.device}, x is {x.dtype} on {x.device}")


def _check_snake(name: str, x: torch.Tensor, snake) -> None:
    if len(snake) != 2 or any(p.shape != (x.shape[1],) for p in snake):
        raise ValueError(f"{name}: snake must be (alpha, beta), each of shape ({x.shape[1]},), got "
                         f"{[tuple(p.shape) for p in snake]}")


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    dilation: int = 1,
    groups: int = 1,
    state: torch.Tensor | None = None,
    snake: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`causal_conv1d_ref`."""
    if dilation < 1 or groups < 1 or weight.dim() != 3 or weight.shape[0] % groups:
        raise ValueError(f"causal_conv1d: dilation {dilation}, groups {groups} do not fit weight "
                         f"{tuple(weight.shape)}")
    _check_conv_args("causal_conv1d", x, weight, bias, weight.shape[1] * groups, weight.shape[0])
    _check_state("causal_conv1d", x, state, (weight.shape[-1] - 1) * dilation, exact=True)
    fn = REGISTRY.select("causal_conv1d", x.device).fn
    if snake is None:
        return fn(x, weight, bias, dilation, groups, state)
    _check_snake("causal_conv1d", x, snake)
    return fn(x, weight, bias, dilation, groups, state, snake=snake)


def causal_conv_transpose1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int,
    state: torch.Tensor | None = None,
    snake: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`causal_conv_transpose1d_ref`."""
    if stride < 1 or weight.dim() != 3 or weight.shape[-1] % stride:
        raise ValueError(f"causal_conv_transpose1d: kernel of weight {tuple(weight.shape)} is not a multiple of "
                         f"stride {stride}")
    _check_conv_args("causal_conv_transpose1d", x, weight, bias, weight.shape[0], weight.shape[1])
    _check_state("causal_conv_transpose1d", x, state, weight.shape[-1] // stride - 1, exact=False)
    fn = REGISTRY.select("causal_conv_transpose1d", x.device).fn
    if snake is None:
        return fn(x, weight, bias, stride, state)
    _check_snake("causal_conv_transpose1d", x, snake)
    return fn(x, weight, bias, stride, state, snake=snake)


def snake_beta(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """See :func:`snake_beta_ref`."""
    if x.dim() != 3 or alpha.shape != (x.shape[1],) or beta.shape != (x.shape[1],):
        raise ValueError(f"snake_beta: alpha {tuple(alpha.shape)} / beta {tuple(beta.shape)} do not match the "
                         f"channels of x {tuple(x.shape)}")
    return REGISTRY.select("snake_beta", x.device).fn(x, alpha, beta)


# ============================================================================================================ Triton
# Both convs read the virtual window ``cat(state, act(x))`` (act = SnakeBeta when fused, else identity) straight from
# x and state through their strides: no pad, no cat, no activation tensor. Position p of the window is state[p] for
# p < S and act(x[p - S]) after; with no state the first S positions are the causal zeros.
#   causal_conv1d:  y[co, l] = b[co] + sum_{ci, k} w[co, ci, k] window[ci, l + k * dilation], S = (K - 1) * dilation.
#                   groups == 1: one program per (b, C_out block, L block), tl.dot over (C_in block) per tap;
#                   groups > 1 (depthwise ConvNeXt): per-channel FMAs over the group's inputs and the taps.
#   transposed:     output j = q * stride + r reads window[q + t] through tap (m - 1 - t) * stride + r, t < m: per
#                   phase r a GEMM over (C_in, t). The phase is a grid axis, so each program reads 1/stride of the
#                   weights (decode reads all weights for a handful of samples: spreading them is what matters).
#   new state:      a small kernel copies the window's last samples (after the snake) into a fresh tensor.
# Grid: the convs fold (b, C_out block, length block) onto axis 0, length blocks fastest (neighbours share weights
# and adjacent inputs): CUDA allows 2^31 - 1 programs there but 65535 on axes 1 and 2, which long audio's length
# blocks alone pass (65535 x 64 = 4.2M samples). Element offsets are int64: one tensor's C x L passes 2^31 (96
# channels x 22.4M samples).
# Rounding: both convs accumulate in fp32 over every tap and channel and round once after the bias, as oneDNN (torch's
# CPU conv wherever the CPU has bf16 instructions) and cuDNN do. torch's fallback CPU transposed conv (im2col GEMM +
# col2im, on CPUs without them) rounds each tap's GEMM to fp16/bf16 and adds the taps in the dtype: 1.6-2x the error
# of one rounding (measured against fp64), so the kernels do not repeat it. The fused SnakeBeta repeats
# snake_beta_ref's roundings (exp, x * alpha, sin, square, 1 / (beta + 1e-9), product, sum, each in the dtype).
# In the interpreter fp32 -> bf16/fp16 casts truncate (one ulp per rounding) and bf16 products run in fp32 (UPCAST).

@triton.jit
def _round(x, DTYPE: tl.constexpr):
    # one rounding to the activation dtype, kept in fp32 (a no-op for fp32)
    return x.to(DTYPE).to(tl.float32)


@triton.jit
def _snake_params(alpha_ptr, beta_ptr, c, c_ok, DTYPE: tl.constexpr):
    # c: channel indices of any shape -> (e^alpha, 1 / (e^beta + 1e-9)) rounded like snake_beta_ref, fp32
    a = _round(tl.exp(tl.load(alpha_ptr + c, mask=c_ok, other=0.0).to(tl.float32)), DTYPE)
    eb = _round(_round(tl.exp(tl.load(beta_ptr + c, mask=c_ok, other=0.0).to(tl.float32)), DTYPE) + 1e-9, DTYPE)
    inv = _round(tl.div_rn(tl.full(eb.shape, 1.0, tl.float32), eb), DTYPE)
    return a, inv


@triton.jit
def _window(x_ptr, state_ptr, c, c_ok, p, sxc, sxl, ssc, ssl, state_len, length, a, inv,
            HAS_STATE: tl.constexpr, SNAKE: tl.constexpr, DTYPE: tl.constexpr):
    # cat(state, act(x)) at channels c [C, 1] and window positions p [1, N] -> fp32 [C, N]; x_ptr/state_ptr point
    # at the batch row already. Positions outside [0, state_len + length) read 0.
    in_x = (p >= state_len) & (p < state_len + length)
    c, p = c.to(tl.int64), p.to(tl.int64)
    v = tl.load(x_ptr + c * sxc + (p - state_len) * sxl, mask=c_ok & in_x, other=0.0).to(tl.float32)
    if SNAKE:  # act(0) = 0, so masked samples stay 0
        s = _round(tl.sin(_round(v * a, DTYPE)), DTYPE)
        v = _round(v + _round(inv * _round(s * s, DTYPE), DTYPE), DTYPE)
    if HAS_STATE:
        in_s = (p >= 0) & (p < state_len)
        v = tl.where(in_s, tl.load(state_ptr + c * ssc + p * ssl, mask=c_ok & in_s, other=0.0).to(tl.float32), v)
    return v


@triton.jit
def _causal_conv1d_kernel(
    x_ptr, state_ptr, alpha_ptr, beta_ptr, w_ptr, bias_ptr, y_ptr,
    c_in, c_out, length, dilation, context, ci_per_group, co_per_group,
    sxb, sxc, sxl, ssb, ssc, ssl, swo, swi, swk, syb, syc, syl,
    K: tl.constexpr, GROUPED: tl.constexpr, HAS_STATE: tl.constexpr, HAS_BIAS: tl.constexpr, SNAKE: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_CI: tl.constexpr,
):
    pid, n_l, n_co = tl.program_id(0), tl.cdiv(length, BLOCK_L), tl.cdiv(c_out, BLOCK_CO)
    b = (pid // (n_l * n_co)).to(tl.int64)
    co = ((pid // n_l % n_co * BLOCK_CO + tl.arange(0, BLOCK_CO)).to(tl.int64))[:, None]   # [BCO, 1]
    j = (pid % n_l * BLOCK_L + tl.arange(0, BLOCK_L))[None, :]                            # [1, BL] outputs
    co_ok = co < c_out
    DTYPE: tl.constexpr = y_ptr.dtype.element_ty
    x_row, s_row = x_ptr + b * sxb, state_ptr + b * ssb
    acc = tl.zeros((BLOCK_CO, BLOCK_L), tl.float32)
    if GROUPED:
        # each output channel reads its group's ci_per_group inputs: per-row gathers, FMAs (depthwise: one input)
        first = (co // co_per_group) * ci_per_group
        for ci in range(ci_per_group):
            c = first + ci
            a, inv = _snake_params(alpha_ptr, beta_ptr, c, co_ok, DTYPE) if SNAKE else (0.0, 0.0)
            for k in tl.static_range(K):
                v = _window(x_row, s_row, c, co_ok, j + k * dilation, sxc, sxl, ssc, ssl, context, length, a, inv,
                            HAS_STATE, SNAKE, DTYPE)
                w = tl.load(w_ptr + co * swo + ci * swi + k * swk, mask=co_ok, other=0.0).to(tl.float32)
                acc += w * v
    else:
        for ci0 in range(0, c_in, BLOCK_CI):
            ci = ci0 + tl.arange(0, BLOCK_CI)
            ci_ok = ci < c_in
            a, inv = _snake_params(alpha_ptr, beta_ptr, ci[:, None], ci_ok[:, None], DTYPE) if SNAKE else (0.0, 0.0)
            for k in tl.static_range(K):
                v = _window(x_row, s_row, ci[:, None], ci_ok[:, None], j + k * dilation, sxc, sxl, ssc, ssl, context,
                            length, a, inv, HAS_STATE, SNAKE, DTYPE)                          # [BCI, BL]
                w = tl.load(w_ptr + co * swo + ci[None, :] * swi + k * swk, mask=co_ok & ci_ok[None, :],
                            other=0.0)                                                        # [BCO, BCI]
                if UPCAST:  # the interpreter multiplies bf16 bit patterns (triton#11584): products in fp32
                    acc += tl.dot(w.to(tl.float32), v, input_precision=PRECISION)
                else:
                    acc += tl.dot(w, v.to(w.dtype), input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + co, mask=co_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + b * syb + co * syc + j.to(tl.int64) * syl, acc.to(DTYPE), mask=co_ok & (j < length))


@triton.jit
def _causal_conv_transpose1d_kernel(
    x_ptr, state_ptr, alpha_ptr, beta_ptr, w_ptr, bias_ptr, y_ptr,
    c_in, c_out, length, state_len, n_out, stride,
    sxb, sxc, sxl, ssb, ssc, ssl, swi, swo, swk, syb, syc, syl,
    TAPS: tl.constexpr, HAS_STATE: tl.constexpr, HAS_BIAS: tl.constexpr, SNAKE: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_CI: tl.constexpr,
):
    r, tile = tl.program_id(0) % stride, tl.program_id(0) // stride     # output phase (fastest), (b, co, q) block
    n_q, n_co = tl.cdiv(n_out, BLOCK_Q), tl.cdiv(c_out, BLOCK_CO)
    b = (tile // (n_q * n_co)).to(tl.int64)
    co = ((tile // n_q % n_co * BLOCK_CO + tl.arange(0, BLOCK_CO)).to(tl.int64))[:, None]  # [BCO, 1]
    q = (tile % n_q * BLOCK_Q + tl.arange(0, BLOCK_Q))[None, :]                           # [1, BQ] input frames
    co_ok = co < c_out
    DTYPE: tl.constexpr = y_ptr.dtype.element_ty
    x_row, s_row = x_ptr + b * sxb, state_ptr + b * ssb
    y = tl.zeros((BLOCK_CO, BLOCK_Q), tl.float32)   # every tap's sum over C_in, in fp32
    for t in tl.static_range(TAPS):
        k = (TAPS - 1 - t) * stride + r
        for ci0 in range(0, c_in, BLOCK_CI):
            ci = ci0 + tl.arange(0, BLOCK_CI)
            ci_ok = ci < c_in
            a, inv = _snake_params(alpha_ptr, beta_ptr, ci[:, None], ci_ok[:, None], DTYPE) if SNAKE else (0.0, 0.0)
            v = _window(x_row, s_row, ci[:, None], ci_ok[:, None], q + t, sxc, sxl, ssc, ssl, state_len, length,
                        a, inv, HAS_STATE, SNAKE, DTYPE)                                      # [BCI, BQ]
            w = tl.load(w_ptr + co * swo + ci[None, :] * swi + k * swk, mask=co_ok & ci_ok[None, :], other=0.0)
            if UPCAST:
                y += tl.dot(w.to(tl.float32), v, input_precision=PRECISION)
            else:
                y += tl.dot(w, v.to(w.dtype), input_precision=PRECISION)
    if HAS_BIAS:
        y += tl.load(bias_ptr + co, mask=co_ok, other=0.0).to(tl.float32)
    j = (q * stride + r).to(tl.int64)
    tl.store(y_ptr + b * syb + co * syc + j * syl, y.to(DTYPE), mask=co_ok & (q < n_out))


@triton.jit
def _window_tail_kernel(
    x_ptr, state_ptr, alpha_ptr, beta_ptr, out_ptr, channels, length, state_len, keep,
    sxb, sxc, sxl, ssb, ssc, ssl, sob, soc, sol,
    HAS_STATE: tl.constexpr, SNAKE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # out[b, c, i] = cat(state, act(x))[b, c, state_len + length - keep + i], i < keep: the carried state
    b = tl.program_id(0).to(tl.int64)
    c = ((tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64))[:, None]
    c_ok = c < channels
    DTYPE: tl.constexpr = out_ptr.dtype.element_ty
    a, inv = _snake_params(alpha_ptr, beta_ptr, c, c_ok, DTYPE) if SNAKE else (0.0, 0.0)
    for i0 in range(0, keep, BLOCK_S):  # a long context ((K - 1) * dilation) takes several blocks
        i = i0 + tl.arange(0, BLOCK_S)[None, :]
        v = _window(x_ptr + b * sxb, state_ptr + b * ssb, c, c_ok, state_len + length - keep + i, sxc, sxl, ssc,
                    ssl, state_len, length, a, inv, HAS_STATE, SNAKE, DTYPE)
        tl.store(out_ptr + b * sob + c * soc + i.to(tl.int64) * sol, v.to(DTYPE), mask=c_ok & (i < keep))


# -------------------------------------------------------------------------------------------------------- launchers
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _upcast(dtype: torch.dtype) -> bool:
    return INTERPRET and dtype == torch.bfloat16


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 stays fp32 (no TF32); 16-bit ignores it


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def _conv_config(c_in: int, c_out: int, length: int, grouped: bool) -> tuple[int, int, int, int]:
    """(BLOCK_CO, BLOCK_L, BLOCK_CI, num_warps). GPU: 32-64 outputs x 64 samples, or 16 output channels when the
    sequence is short (decode), so that the weight reads spread over more programs. Interpreter: few, large tiles.
    The launches use num_stages=1: the K taps are unrolled, so every tap's operand tiles are live in shared memory
    at once (fp32, K=7: 7 x 16 KB), and software pipelining would triple that past the 227 KB an H100 SM has."""
    if INTERPRET:
        block_co = _pow2(c_out, 16, 256)
        block_ci = 16 if grouped else _pow2(c_in, 16, 256)
        block_l = _pow2(length, 16, max(16, 65536 // max(block_co, block_ci)))
        return block_co, block_l, block_ci, 4
    if grouped:
        return _pow2(c_out, 16, 64), _pow2(length, 16, 128), 16, 4
    block_l = _pow2(length, 16, 64)
    block_co = 16 if length <= 32 else 64
    return block_co, block_l, 32, 4


_CONFIG_KEYS = ("BLOCK_CO", "BLOCK_L", "BLOCK_CI", "num_warps", "BLOCK_C", "BLOCK_S")


def _config_ints(config: dict | None) -> list[int] | None:
    """A launcher's ``config`` as the custom ops take it: ints in _CONFIG_KEYS order, 0 where the default stays."""
    if config is None:
        return None
    if set(config) - set(_CONFIG_KEYS):
        raise ValueError(f"config: unknown keys {sorted(set(config) - set(_CONFIG_KEYS))}, expected {_CONFIG_KEYS}")
    return [int(config.get(key, 0)) for key in _CONFIG_KEYS]


def _override(default: tuple[int, ...], config: list[int] | None) -> tuple[int, ...]:
    return default if config is None else tuple(c or d for c, d in zip(config, default))


def _dummy(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return like if t is None else t


def _window_tail(x, state, snake, state_len, out, config) -> None:
    """Fill out (B, C, keep) with the last keep samples of cat(state, act(x)), state of length state_len."""
    B, C, L = x.shape
    keep = out.shape[-1]
    if keep == 0 or B == 0 or C == 0:
        return
    block_c, block_s = config[4:] if config is not None else (0, 0)
    block_c = block_c or _pow2(C, 1, 1024 if INTERPRET else 64)
    # at most 8K samples a block (2^20 in the interpreter, where large tiles are cheap); longer states loop
    block_s = block_s or _pow2(keep, 1, max(1, (1 << 20 if INTERPRET else 1 << 13) // block_c))
    alpha, beta = snake if snake is not None else (x, x)
    _window_tail_kernel[(B, triton.cdiv(C, block_c))](   # channel blocks < 65535 on axis 1: C < 4M on a GPU
        x, _dummy(state, x), alpha, beta, out, C, L, state_len, keep, *x.stride(),
        *(state.stride() if state is not None else (0, 0, 0)), *out.stride(),
        HAS_STATE=state is not None, SNAKE=snake is not None, BLOCK_C=block_c, BLOCK_S=block_s)


@torch.library.custom_op("omni::causal_conv1d_triton", mutates_args=("y", "new_state"))
def _causal_conv1d_triton_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilation: int, groups: int,
    state: torch.Tensor | None, alpha: torch.Tensor | None, beta: torch.Tensor | None,
    y: torch.Tensor, new_state: torch.Tensor, config: list[int] | None = None,
) -> None:
    B, C_in, L = x.shape
    C_out, ci_per_group, K = weight.shape
    context = (K - 1) * dilation
    snake = None if alpha is None else (alpha, beta)
    _window_tail(x, state, snake, context, new_state, config)
    if L == 0 or B == 0 or C_out == 0:
        return
    grouped = groups > 1
    block_co, block_l, block_ci, num_warps = _override(_conv_config(C_in, C_out, L, grouped), config)
    grid = (B * triton.cdiv(C_out, block_co) * triton.cdiv(L, block_l),)
    _causal_conv1d_kernel[grid](
        x, _dummy(state, x), _dummy(alpha, x), _dummy(beta, x), weight, _dummy(bias, weight), y,
        C_in, C_out, L, dilation, context, ci_per_group, C_out // groups,
        *x.stride(), *(state.stride() if state is not None else (0, 0, 0)), *weight.stride(), *y.stride(),
        K=K, GROUPED=grouped, HAS_STATE=state is not None, HAS_BIAS=bias is not None, SNAKE=alpha is not None,
        UPCAST=_upcast(x.dtype), PRECISION=_precision(x.dtype),
        BLOCK_CO=block_co, BLOCK_L=block_l, BLOCK_CI=block_ci, num_warps=num_warps, num_stages=1)


@_causal_conv1d_triton_op.register_fake
def _(x, weight, bias, dilation, groups, state, alpha, beta, y, new_state, config=None):
    return None


@torch.library.custom_op("omni::causal_conv_transpose1d_triton", mutates_args=("y", "new_state"))
def _causal_conv_transpose1d_triton_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, state: torch.Tensor | None,
    alpha: torch.Tensor | None, beta: torch.Tensor | None, y: torch.Tensor, new_state: torch.Tensor,
    config: list[int] | None = None,
) -> None:
    B, C_in, L = x.shape
    C_out, K = weight.shape[1], weight.shape[2]
    state_len = 0 if state is None else state.shape[-1]
    snake = None if alpha is None else (alpha, beta)
    _window_tail(x, state, snake, state_len, new_state, config)
    n_out = y.shape[-1] // stride
    if n_out == 0 or B == 0 or C_out == 0:
        return
    block_co, block_q, block_ci, num_warps = _override(_conv_config(C_in, C_out, n_out, grouped=False), config)
    grid = (B * triton.cdiv(C_out, block_co) * triton.cdiv(n_out, block_q) * stride,)
    _causal_conv_transpose1d_kernel[grid](
        x, _dummy(state, x), _dummy(alpha, x), _dummy(beta, x), weight, _dummy(bias, weight), y,
        C_in, C_out, L, state_len, n_out, stride,
        *x.stride(), *(state.stride() if state is not None else (0, 0, 0)), *weight.stride(), *y.stride(),
        TAPS=K // stride, HAS_STATE=state is not None, HAS_BIAS=bias is not None, SNAKE=alpha is not None,
        UPCAST=_upcast(x.dtype), PRECISION=_precision(x.dtype),
        BLOCK_CO=block_co, BLOCK_Q=block_q, BLOCK_CI=block_ci, num_warps=num_warps, num_stages=1)


@_causal_conv_transpose1d_triton_op.register_fake
def _(x, weight, bias, stride, state, alpha, beta, y, new_state, config=None):
    return None


def triton_supports(x: torch.Tensor, *tensors: torch.Tensor | None) -> bool:
    """The kernels round in one dtype: weights, bias, state and snake parameters must share x's dtype and device."""
    return x.dtype in _TRITON_DTYPES and all(t.dtype == x.dtype and t.device == x.device
                                             for t in tensors if t is not None)


def causal_conv1d_triton(x, weight, bias, dilation=1, groups=1, state=None, snake=None, *, config=None):
    """Triton launcher; see :func:`causal_conv1d_ref` (same arguments, same results). Any strides. ``config``
    overrides any of the launch config's powers of two: BLOCK_CO, BLOCK_L, BLOCK_CI (each >= 16 on a GPU, tl.dot's
    least), num_warps, and the new-state copy's BLOCK_C, BLOCK_S."""
    alpha, beta = snake if snake is not None else (None, None)
    if not triton_supports(x, weight, bias, state, alpha, beta):
        raise ValueError(f"causal_conv1d (triton): x, weight, bias, state and snake must share one dtype "
                         f"(fp32/fp16/bf16), got x {x.dtype}, weight {weight.dtype}")
    B, _, L = x.shape
    context = (weight.shape[-1] - 1) * dilation
    y = torch.empty(B, weight.shape[0], L, dtype=x.dtype, device=x.device)
    new_state = torch.empty(B, x.shape[1], context, dtype=x.dtype, device=x.device)
    _causal_conv1d_triton_op(x, weight, bias, dilation, groups, state, alpha, beta, y, new_state,
                             _config_ints(config))
    return y, new_state


def causal_conv_transpose1d_triton(x, weight, bias, stride, state=None, snake=None, *, config=None):
    """Triton launcher; see :func:`causal_conv_transpose1d_ref` (same arguments, same results). Any strides.
    ``config``: as for :func:`causal_conv1d_triton`, BLOCK_L counting input frames per phase."""
    alpha, beta = snake if snake is not None else (None, None)
    if not triton_supports(x, weight, bias, state, alpha, beta):
        raise ValueError(f"causal_conv_transpose1d (triton): x, weight, bias, state and snake must share one dtype "
                         f"(fp32/fp16/bf16), got x {x.dtype}, weight {weight.dtype}")
    B, _, L = x.shape
    lookahead = weight.shape[-1] // stride - 1
    window = L + (0 if state is None else state.shape[-1])
    y = torch.empty(B, weight.shape[1], max(window - lookahead, 0) * stride, dtype=x.dtype, device=x.device)
    new_state = torch.empty(B, x.shape[1], min(lookahead, window), dtype=x.dtype, device=x.device)
    _causal_conv_transpose1d_triton_op(x, weight, bias, stride, state, alpha, beta, y, new_state,
                                       _config_ints(config))
    return y, new_state


@REGISTRY.register("causal_conv1d", "triton", triton_runs)
def _causal_conv1d_triton_or_ref(x, weight, bias, dilation=1, groups=1, state=None, snake=None):
    # mixed dtypes (the kernel rounds in one) fall back to the reference
    if not triton_supports(x, weight, bias, state, *(snake or ())):
        return causal_conv1d_ref(x, weight, bias, dilation, groups, state, snake=snake)
    return causal_conv1d_triton(x, weight, bias, dilation, groups, state, snake=snake)


@REGISTRY.register("causal_conv_transpose1d", "triton", triton_runs)
def _causal_conv_transpose1d_triton_or_ref(x, weight, bias, stride, state=None, snake=None):
    if not triton_supports(x, weight, bias, state, *(snake or ())):
        return causal_conv_transpose1d_ref(x, weight, bias, stride, state, snake=snake)
    return causal_conv_transpose1d_triton(x, weight, bias, stride, state, snake=snake)


# ============================================================================================================== CUDA
# omni::causal_conv1d (csrc/include/omni/causal_conv.cuh): groups 1 or C_in, the Triton kernel's roundings (fused
# snake rounded op by op, fp32 sum, bias, one rounding), new state from a second tiny kernel.
# omni::causal_conv_transpose1d (csrc/include/omni/causal_conv_transpose.cuh): K = m * stride with m <= 4, one CTA
# per (phase, frame tile, C_out tile, b) like the Triton kernel, its roundings (fp32 over all taps, one rounding), new
# state from a second tiny kernel. Calls the kernels do not take (other groups, mixed dtypes, a context too long for
# 48 KiB of shared memory, m > 4, sizes past the grid) go to Triton, else the reference.

def _cuda_conv_fits(x: torch.Tensor, weight: torch.Tensor, dilation: int, groups: int) -> bool:
    """Mirrors the launcher's checks: the staged window of one CTA, in fp32 words, fits 48 KiB (causal_conv.cuh)."""
    c_in, length, taps = x.shape[1], x.shape[2], weight.shape[-1]
    context = (taps - 1) * dilation
    if groups == c_in and c_in > 1:
        words = 8 * ((32 if length <= 32 else 128) + context)
    elif groups == 1:
        tile = 16 if length <= 16 else 64
        words = 16 * (tile + context) + 16 * taps * (tile + 1)
    else:
        return False
    return 4 * words <= 48 * 1024 - 256 and length <= 2_000_000 and weight.shape[0] <= 500_000


@REGISTRY.register("causal_conv1d", "cuda", cuda_runs("causal_conv1d"))
def _causal_conv1d_cuda(x, weight, bias, dilation=1, groups=1, state=None, snake=None):
    alpha, beta = snake if snake is not None else (None, None)
    if not (triton_supports(x, weight, bias, state, alpha, beta) and _cuda_conv_fits(x, weight, dilation, groups)):
        if triton_runs(x.device):
            return _causal_conv1d_triton_or_ref(x, weight, bias, dilation, groups, state, snake=snake)
        return causal_conv1d_ref(x, weight, bias, dilation, groups, state, snake=snake)
    B, C_in, L = x.shape
    context = (weight.shape[-1] - 1) * dilation
    y = torch.empty(B, weight.shape[0], L, dtype=x.dtype, device=x.device)
    new_state = torch.empty(B, C_in, context, dtype=x.dtype, device=x.device)
    torch.ops.omni.causal_conv1d(x, weight, bias, dilation, groups, state, alpha, beta, y, new_state)
    return y, new_state


_CUDA_CONV_TRANSPOSE_MAX_TAPS = 4   # kCausalConvTranspose1dMaxTaps in causal_conv_transpose.cuh


def _cuda_conv_transpose_fits(x: torch.Tensor, weight: torch.Tensor, stride: int, state: torch.Tensor | None) -> bool:
    """Mirrors the launcher's checks: 1 <= m = K / stride <= 4 taps per phase, B and C_out within the grid, int
    indexing (causal_conv_transpose.cuh)."""
    B, c_in, length = x.shape
    window = length + (0 if state is None else state.shape[-1])
    return (1 <= weight.shape[-1] // stride <= _CUDA_CONV_TRANSPOSE_MAX_TAPS and B <= 65535
            and weight.shape[1] <= 500_000 and stride < 2**31 and window * stride < 2**31 and B * c_in < 2**31)


# opt-in until a GPU session has run and timed it (it was written and checked without one)
@REGISTRY.register("causal_conv_transpose1d", "cuda", cuda_runs("causal_conv_transpose1d"), opt_in=True)
def _causal_conv_transpose1d_cuda(x, weight, bias, stride, state=None, snake=None):
    alpha, beta = snake if snake is not None else (None, None)
    fits = _cuda_conv_transpose_fits(x, weight, stride, state)
    if not (triton_supports(x, weight, bias, state, alpha, beta) and fits):
        if triton_runs(x.device):
            return _causal_conv_transpose1d_triton_or_ref(x, weight, bias, stride, state, snake=snake)
        return causal_conv_transpose1d_ref(x, weight, bias, stride, state, snake=snake)
    B, C_in, L = x.shape
    lookahead = weight.shape[-1] // stride - 1
    window = L + (0 if state is None else state.shape[-1])
    y = torch.empty(B, weight.shape[1], max(window - lookahead, 0) * stride, dtype=x.dtype, device=x.device)
    new_state = torch.empty(B, C_in, min(lookahead, window), dtype=x.dtype, device=x.device)
    torch.ops.omni.causal_conv_transpose1d(x, weight, bias, stride, state, alpha, beta, y, new_state)
    return y, new_state
