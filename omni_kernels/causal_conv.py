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

from omni_kernels.dispatch import REGISTRY, everywhere


def causal_conv1d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    dilation: int = 1,
    groups: int = 1,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (B, C_in, L), weight: (C_out, C_in // groups, K), bias: (C_out,) or None,
    state: (B, C_in, (K - 1) * dilation) or None (zeros, the start of a stream)
    -> y: (B, C_out, L), new state: the last (K - 1) * dilation samples of ``cat(state, x)``."""
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (B, C_in, L), weight: (C_in, C_out, K) with K = m * stride, bias: (C_out,) or None,
    state: (B, C_in, <= m - 1) the previous inputs (None at the start of a stream)
    -> y: (B, C_out, n * stride) with n the samples of ``cat(state, x)`` minus m - 1 (never negative),
       new state: the last min(m - 1, available) samples of ``cat(state, x)``."""
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


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    dilation: int = 1,
    groups: int = 1,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`causal_conv1d_ref`."""
    if dilation < 1 or groups < 1 or weight.dim() != 3 or weight.shape[0] % groups:
        raise ValueError(f"causal_conv1d: dilation {dilation}, groups {groups} do not fit weight "
                         f"{tuple(weight.shape)}")
    _check_conv_args("causal_conv1d", x, weight, bias, weight.shape[1] * groups, weight.shape[0])
    _check_state("causal_conv1d", x, state, (weight.shape[-1] - 1) * dilation, exact=True)
    return REGISTRY.select("causal_conv1d", x.device).fn(x, weight, bias, dilation, groups, state)


def causal_conv_transpose1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`causal_conv_transpose1d_ref`."""
    if stride < 1 or weight.dim() != 3 or weight.shape[-1] % stride:
        raise ValueError(f"causal_conv_transpose1d: kernel of weight {tuple(weight.shape)} is not a multiple of "
                         f"stride {stride}")
    _check_conv_args("causal_conv_transpose1d", x, weight, bias, weight.shape[0], weight.shape[1])
    _check_state("causal_conv_transpose1d", x, state, weight.shape[-1] // stride - 1, exact=False)
    return REGISTRY.select("causal_conv_transpose1d", x.device).fn(x, weight, bias, stride, state)


def snake_beta(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """See :func:`snake_beta_ref`."""
    if x.dim() != 3 or alpha.shape != (x.shape[1],) or beta.shape != (x.shape[1],):
        raise ValueError(f"snake_beta: alpha {tuple(alpha.shape)} / beta {tuple(beta.shape)} do not match the "
                         f"channels of x {tuple(x.shape)}")
    return REGISTRY.select("snake_beta", x.device).fn(x, alpha, beta)
