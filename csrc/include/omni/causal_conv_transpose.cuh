// Streaming causal transposed 1-D convolution (Code2Wav's upsampling convs) with an optional fused SnakeBeta,
// header-only; knows nothing about torch.
//
//   window[c, p] = p < S ? state[c, p] : act(x[c, p - S]),   W = S + L samples, S <= m - 1
//   y[co, q * s + r] = to_T( bias[co] + sum_t sum_ci w[ci, co, (m - 1 - t) * s + r] * window[ci, q + t] )
//   for q < n = max(W - (m - 1), 0), r < s, t < m;   new_state[c, i] = window[c, W - keep + i], keep = min(m - 1, W)
//
// That is ConvTranspose1d (kernel K = m * s, stride s) on the window with K - s samples trimmed from both ends: output
// j = q * s + r reads the m inputs q .. q + m - 1 through taps of phase r. act and the roundings are causal_conv.cuh's
// (SnakeBeta rounded op by op as snake_beta_ref, here also in fp32 with no FMA contraction; fp32 sums over every tap
// and channel, the bias, one rounding, as the Triton kernel, oneDNN and cuDNN). This header must not be built with
// --use_fast_math.
//
// One kernel, SIMT fp32 FMAs, one CTA per (output phase r, frame tile, C_out tile, b): phase is the fastest grid
// axis, so a CTA reads 1/s of its C_out tile's weights (decode reads every weight for a handful of frames: spreading
// the weights over s times more CTAs is what matters) and the s CTAs of one tile, launched together, share the same
// weight and input sectors in L2. The C_in loop runs in chunks of kCi channels: the CTA stages the chunk's window
// [kCi][TQ + m - 1] (state/x/snake resolved once per sample) and its phase's weights [kCi][m][TCO] in shared memory,
// then each thread accumulates its MCO x MQ register tile over the chunk's channels and the m taps. A warp
// reads consecutive shared words (frames) and broadcast weights; its stores are s samples apart.
// The new state is written by a second, tiny kernel launched after the conv, one thread per (b, c) row walking it
// forward: new_state may be the very tensor passed as state (an in-place streaming update, what a CUDA graph wants),
// as every read of window[W - keep + i] (index >= i) comes before the write of state[i] in that thread.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <omni/causal_conv.cuh>
#include <omni/dtype.cuh>

#include <climits>
#include <cstdint>

namespace omni {

// Strides in elements; pointers to T (float, __half or __nv_bfloat16). bias/state/alpha/beta may be null.
template <typename T>
struct CausalConvTranspose1dArgs {
  T const* x;  // (B, C_in, L)
  T const* weight;  // (C_in, C_out, K), K = taps * stride
  T const* bias;  // (C_out,)
  T const* state;  // (B, C_in, S), S = state_len <= taps - 1
  T const* alpha;  // (C_in,) log scale of SnakeBeta, or null for no activation
  T const* beta;  // (C_in,)
  T* y;  // (B, C_out, n * stride), n = max(S + L - (taps - 1), 0)
  T* new_state;  // (B, C_in, min(taps - 1, S + L))
  int batch, c_in, c_out, length, state_len, stride, taps;  // taps = m = K / stride
  int64_t sxb, sxc, sxl, swi, swo, swk, sb, ssb, ssc, ssl, syb, syc, syl, snb, snc, snl, sa, sbe;
};

// Taps per phase (m) the kernel is compiled for: the released model has m = 2 (decoder) and m = 1 (upsampler).
constexpr int kCausalConvTranspose1dMaxTaps = 4;

namespace convt_detail {

using conv_detail::Round;
using conv_detail::SnakeParams;

template <typename T>
__device__ __forceinline__ int Frames(CausalConvTranspose1dArgs<T> const& p) {
  int const n = p.state_len + p.length - (p.taps - 1);
  return n > 0 ? n : 0;
}

// window[c, pos] of batch row b, 0 <= pos < S + L (x/state pointers already at row b, channel c).
template <typename T, bool kSnake>
__device__ __forceinline__ float Window(CausalConvTranspose1dArgs<T> const& p, T const* xc, T const* sc, int pos,
                                        float a, float inv) {
  if (pos < p.state_len) return ToFloat(sc[pos * p.ssl]);
  float v = ToFloat(xc[(pos - p.state_len) * p.sxl]);
  if (kSnake) {  // _rn intrinsics: no FMA contraction in fp32, so every kernel computes the same bits
    float const s = Round<T>(sinf(Round<T>(__fmul_rn(v, a))));
    v = Round<T>(__fadd_rn(v, Round<T>(__fmul_rn(inv, Round<T>(__fmul_rn(s, s))))));
  }
  return v;
}

constexpr int kCi = 16;  // input channels staged per step

template <int TCO, int TQ, int MCO, int MQ>
struct Tile {
  static constexpr int kThreadsQ = TQ / MQ;
  static constexpr int kThreads = (TCO / MCO) * kThreadsQ;
  static_assert(TCO % MCO == 0 && TQ % MQ == 0 && kThreads % 32 == 0 && kThreads <= 1024, "bad tile");
};

// grid (s * ceil(n / TQ), ceil(C_out / TCO), B). Staged channels past C_in and samples past the window are zeros
// with zero weights, so the tails need no masks in the FMA loop.
template <typename T, int TCO, int TQ, int MCO, int MQ, int kTaps, bool kSnake>
__global__ void __launch_bounds__(Tile<TCO, TQ, MCO, MQ>::kThreads)
    CausalConvTranspose1dKernel(CausalConvTranspose1dArgs<T> const p) {
  using Tl = Tile<TCO, TQ, MCO, MQ>;
  constexpr int kWidth = TQ + kTaps - 1;  // window samples a tile reads
  __shared__ float s_x[kCi][kWidth];
  __shared__ float s_w[kCi][kTaps][TCO + 1];  // rows padded by one word: the staging writes spread over the banks
  __shared__ float s_snake[2][kCi];  // SnakeBeta (a, inv) of the staged channels

  int const phase = blockIdx.x % p.stride;
  int const q0 = (blockIdx.x / p.stride) * TQ;
  int const co0 = blockIdx.y * TCO;
  int const b = blockIdx.z;
  int const window = p.state_len + p.length;
  int const frames = Frames(p);
  // this thread's outputs: channels co0 + tc + i * TCO / MCO, frames q0 + tq + j * TQ / MQ
  int const tq = threadIdx.x % Tl::kThreadsQ;
  int const tc = threadIdx.x / Tl::kThreadsQ;
  T const* xb = p.x + b * p.sxb;
  T const* sb = p.state != nullptr ? p.state + b * p.ssb : nullptr;

  float acc[MCO][MQ];
#pragma unroll
  for (int i = 0; i < MCO; ++i)
#pragma unroll
    for (int j = 0; j < MQ; ++j) acc[i][j] = 0.f;

  for (int ci0 = 0; ci0 < p.c_in; ci0 += kCi) {
    __syncthreads();  // the previous chunk's reads are done
    if (kSnake) {
      if (threadIdx.x < kCi && ci0 + threadIdx.x < p.c_in)
        SnakeParams(p, ci0 + threadIdx.x, s_snake[0][threadIdx.x], s_snake[1][threadIdx.x]);
      __syncthreads();
    }
    for (int e = threadIdx.x; e < kCi * kWidth; e += Tl::kThreads) {
      int const r = e / kWidth, pos = q0 + e - r * kWidth;
      int const c = ci0 + r;
      float v = 0.f;
      if (c < p.c_in && pos < window)
        v = Window<T, kSnake>(p, xb + c * p.sxc, sb != nullptr ? sb + c * p.ssc : nullptr, pos,
                              kSnake ? s_snake[0][r] : 0.f, kSnake ? s_snake[1][r] : 0.f);
      s_x[r][e - r * kWidth] = v;
    }
    // The phase's taps, tap fastest then output channel (a (C_in, C_out, K) tensor's memory order).
    for (int e = threadIdx.x; e < kCi * TCO * kTaps; e += Tl::kThreads) {
      int const t = e % kTaps, co = (e / kTaps) % TCO, r = e / (kTaps * TCO);
      int const k = (kTaps - 1 - t) * p.stride + phase;
      float v = 0.f;
      if (co0 + co < p.c_out && ci0 + r < p.c_in)
        v = ToFloat(p.weight[(ci0 + r) * p.swi + (co0 + co) * p.swo + k * p.swk]);
      s_w[r][t][co] = v;
    }
    __syncthreads();

#pragma unroll 4
    for (int r = 0; r < kCi; ++r) {
#pragma unroll
      for (int t = 0; t < kTaps; ++t) {
        float w[MCO], v[MQ];
#pragma unroll
        for (int i = 0; i < MCO; ++i) w[i] = s_w[r][t][tc + i * (TCO / MCO)];
#pragma unroll
        for (int j = 0; j < MQ; ++j) v[j] = s_x[r][tq + j * Tl::kThreadsQ + t];
#pragma unroll
        for (int i = 0; i < MCO; ++i)
#pragma unroll
          for (int j = 0; j < MQ; ++j) acc[i][j] = fmaf(w[i], v[j], acc[i][j]);
      }
    }
  }

#pragma unroll
  for (int i = 0; i < MCO; ++i) {
    int const co = co0 + tc + i * (TCO / MCO);
    if (co >= p.c_out) continue;
    float const bias = p.bias != nullptr ? ToFloat(p.bias[co * p.sb]) : 0.f;
    T* yr = p.y + b * p.syb + co * p.syc;
#pragma unroll
    for (int j = 0; j < MQ; ++j) {
      int const q = q0 + tq + j * Tl::kThreadsQ;
      if (q >= frames) continue;
      yr[(static_cast<int64_t>(q) * p.stride + phase) * p.syl] = FromFloat<T>(acc[i][j] + bias);
    }
  }
}

// new_state[b, c, i] = window[b, c, W - keep + i] for i < keep; one thread per (b, c) row, i ascending (in-place
// safe: W - keep >= 0).
template <typename T, bool kSnake>
__global__ void CausalConvTranspose1dStateKernel(CausalConvTranspose1dArgs<T> const p) {
  int const row = blockIdx.x * blockDim.x + threadIdx.x;
  if (row >= p.batch * p.c_in) return;
  int const b = row / p.c_in, c = row - b * p.c_in;
  int const window = p.state_len + p.length;
  int const keep = p.taps - 1 < window ? p.taps - 1 : window;
  float a = 0.f, inv = 0.f;
  if (kSnake) SnakeParams(p, c, a, inv);
  T const* xc = p.x + b * p.sxb + c * p.sxc;
  T const* sc = p.state != nullptr ? p.state + b * p.ssb + c * p.ssc : nullptr;
  T* nc = p.new_state + b * p.snb + c * p.snc;
  for (int i = 0; i < keep; ++i)
    nc[i * p.snl] = FromFloat<T>(Window<T, kSnake>(p, xc, sc, window - keep + i, a, inv));
}

template <typename T, int TCO, int TQ, int MCO, int MQ, bool kSnake>
cudaError_t LaunchTile(CausalConvTranspose1dArgs<T>& p, int frames, cudaStream_t stream) {
  using Tl = Tile<TCO, TQ, MCO, MQ>;
  dim3 const grid(((frames + TQ - 1) / TQ) * p.stride, (p.c_out + TCO - 1) / TCO, p.batch);
  switch (p.taps) {
    case 1:
      return conv_detail::Launch(CausalConvTranspose1dKernel<T, TCO, TQ, MCO, MQ, 1, kSnake>, grid, Tl::kThreads, 0,
                                 &p, stream);
    case 2:
      return conv_detail::Launch(CausalConvTranspose1dKernel<T, TCO, TQ, MCO, MQ, 2, kSnake>, grid, Tl::kThreads, 0,
                                 &p, stream);
    case 3:
      return conv_detail::Launch(CausalConvTranspose1dKernel<T, TCO, TQ, MCO, MQ, 3, kSnake>, grid, Tl::kThreads, 0,
                                 &p, stream);
    default:
      return conv_detail::Launch(CausalConvTranspose1dKernel<T, TCO, TQ, MCO, MQ, 4, kSnake>, grid, Tl::kThreads, 0,
                                 &p, stream);
  }
}

// Tiles: long sequences 64 channels x 64 frames a CTA (256 threads, 4 x 4 each); decode (n <= 16 frames) 16 x 16
// (64 threads, 1 x 4 each) so that the weight reads of a short chunk spread over 4x more CTAs.
constexpr int kShortFrames = 16;

template <typename T, bool kSnake>
cudaError_t LaunchConv(CausalConvTranspose1dArgs<T>& p, int frames, cudaStream_t stream) {
  return frames <= kShortFrames ? LaunchTile<T, 16, 16, 1, 4, kSnake>(p, frames, stream)
                                : LaunchTile<T, 64, 64, 4, 4, kSnake>(p, frames, stream);
}

}  // namespace convt_detail

// Launches the conv (when B, C_out and the output frames are non-zero) and then the state update (when B, C_in and
// the kept samples are non-zero), both on `stream`. Returns cudaErrorInvalidValue for taps outside 1..4, a state
// longer than taps - 1, or sizes outside the grid (B <= 65535, C_out <= 500000) and int indexing ((S + L) * stride
// and B * C_in below 2^31).
template <typename T>
cudaError_t CausalConvTranspose1d(CausalConvTranspose1dArgs<T> p, cudaStream_t stream) {
  if (p.batch < 0 || p.batch > 65535 || p.c_in < 0 || p.c_out < 0 || p.c_out > 500000 || p.length < 0 ||
      p.stride < 1 || p.taps < 1 || p.taps > kCausalConvTranspose1dMaxTaps || p.state_len < 0 ||
      p.state_len > p.taps - 1 || (p.state_len > 0 && p.state == nullptr) ||
      (static_cast<int64_t>(p.state_len) + p.length) * p.stride > INT_MAX ||
      static_cast<int64_t>(p.batch) * p.c_in > INT_MAX)
    return cudaErrorInvalidValue;
  bool const snake = p.alpha != nullptr;
  int const window = p.state_len + p.length;
  int const frames = window > p.taps - 1 ? window - (p.taps - 1) : 0;
  if (p.batch > 0 && p.c_out > 0 && frames > 0) {
    cudaError_t const err = snake ? convt_detail::LaunchConv<T, true>(p, frames, stream)
                                  : convt_detail::LaunchConv<T, false>(p, frames, stream);
    if (err != cudaSuccess) return err;
  }
  int const rows = p.batch * p.c_in;
  if (rows == 0 || p.taps == 1 || window == 0) return cudaSuccess;
  auto const kernel = snake ? convt_detail::CausalConvTranspose1dStateKernel<T, true>
                            : convt_detail::CausalConvTranspose1dStateKernel<T, false>;
  return conv_detail::Launch(kernel, dim3((rows + 127) / 128), 128, 0, &p, stream);
}

}  // namespace omni
