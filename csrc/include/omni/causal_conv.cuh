// Streaming causal 1-D convolution with an optional fused SnakeBeta, header-only; knows nothing about torch.
//
//   window[c, p] = p < S ? state[c, p] (or 0 with no state) : act(x[c, p - S]),   S = (K - 1) * dilation
//   y[co, l]     = to_T( bias[co] + sum_{ci, k} w[co, ci, k] * window[ci, l + k * dilation] )
//   new_state[c, i] = window[c, L + i],  i < S
//
// act is the identity or SnakeBeta, x + 1 / (e^beta + 1e-9) * sin(x * e^alpha)^2, with every op rounded to T in
// the reference's order (snake_beta_ref): the window value is exact in fp32 once rounded, so the conv then sums
// fp32 products of T values in fp32, adds the bias and rounds once (the Triton kernel's order; cuDNN's up to the
// summation order). `sinf`/`expf` are the accurate ones: this header must not be built with --use_fast_math.
//
// Two kernels, SIMT fp32 FMAs (no tensor cores: fp32 must stay IEEE, and the 16-bit path keeps one code path):
// - dense (groups == 1): one CTA per (b, C_out tile, L tile). The C_in loop runs in chunks of kCi channels: the CTA
//   stages the chunk's input window [kCi][TL + S] (state/x/snake resolved, so each sample is activated once per
//   CTA instead of once per tap and output channel) and its weights [kCi][K][TCO] in shared memory, then each thread
//   accumulates an MCO x ML register tile. Threads own strided outputs (l = lane_l + j * TL / ML) so a warp reads
//   consecutive shared-memory words per tap (no bank conflicts) and stores coalesced rows of y.
// - depthwise (one input channel per group: groups == C_in, C_out = m * C_in): one CTA per (b, channel tile,
//   L tile); each output row stages its input channel's window once and each thread sums K taps.
// The new state is written by a third, tiny kernel launched after the conv, one thread per (b, c) row walking it
// forward: new_state may therefore be the very tensor passed as state (an in-place streaming update, what a CUDA
// graph wants), as every read of state[L + i] comes before the write of state[L + i] in that thread.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <omni/dtype.cuh>

#include <climits>
#include <cstdint>
#include <type_traits>

namespace omni {

// Strides in elements; pointers to T (float, __half or __nv_bfloat16). bias/state/alpha/beta may be null.
template <typename T>
struct CausalConv1dArgs {
  T const* x;  // (B, C_in, L)
  T const* weight;  // (C_out, C_in / groups, K)
  T const* bias;  // (C_out,)
  T const* state;  // (B, C_in, S)
  T const* alpha;  // (C_in,) log scale of SnakeBeta, or null for no activation
  T const* beta;  // (C_in,)
  T* y;  // (B, C_out, L)
  T* new_state;  // (B, C_in, S)
  int batch, c_in, c_out, length, taps, dilation;
  bool depthwise;  // groups == c_in (weight (C_out, 1, K)); else groups == 1
  int64_t sxb, sxc, sxl, swo, swi, swk, sb, ssb, ssc, ssl, syb, syc, syl, snb, snc, snl, sa, sbe;
};

namespace conv_detail {



// One rounding to T, kept in fp32 (a no-op for float).
template <typename T>
__device__ __forceinline__ float Round(float v) {
  return ToFloat(FromFloat<T>(v));
}

// SnakeBeta constants of channel c, rounded as snake_beta_ref: a = e^alpha, inv = 1 / (e^beta + 1e-9). Args: any
// conv's argument struct with alpha, beta and their strides sa, sbe (causal_conv_transpose.cuh's too).
template <typename Args>
__device__ __forceinline__ void SnakeParams(Args const& p, int c, float& a, float& inv) {
  using T = std::remove_cv_t<std::remove_pointer_t<decltype(p.alpha)>>;
  a = Round<T>(expf(ToFloat(p.alpha[c * p.sa])));
  float const eb = Round<T>(Round<T>(expf(ToFloat(p.beta[c * p.sbe]))) + 1e-9f);
  inv = Round<T>(__fdiv_rn(1.f, eb));
}

// window[c, pos] of batch row b (x/state pointers already at row b, channel c). act(0) == 0, so the causal zeros need
// no activation.
template <typename T, bool kSnake>
__device__ __forceinline__ float Window(CausalConv1dArgs<T> const& p, T const* xc, T const* sc, int pos, int ctx,
                                        float a, float inv) {
  if (pos < ctx) return sc != nullptr ? ToFloat(sc[pos * p.ssl]) : 0.f;
  float v = ToFloat(xc[(pos - ctx) * p.sxl]);
  if (kSnake) {  // _rn intrinsics: no FMA contraction in fp32 (v + inv * s^2 rounds twice, like snake_beta_ref)
    float const s = Round<T>(sinf(Round<T>(__fmul_rn(v, a))));
    v = Round<T>(__fadd_rn(v, Round<T>(__fmul_rn(inv, Round<T>(__fmul_rn(s, s))))));
  }
  return v;
}

constexpr int kCi = 16;  // input channels staged per step of the dense kernel

template <int TCO, int TL, int MCO, int ML>
struct DenseTile {
  static constexpr int kThreadsL = TL / ML;
  static constexpr int kThreads = (TCO / MCO) * kThreadsL;
  static_assert(TCO % MCO == 0 && TL % ML == 0 && kThreads % 32 == 0 && kThreads <= 1024, "bad tile");
};

// Dynamic shared memory of the dense kernel: input window [kCi][TL + S] and weights [kCi][K][TCO + 1], fp32.
template <int TCO, int TL>
constexpr size_t DenseSmemBytes(int taps, int ctx) {
  return sizeof(float) * (static_cast<size_t>(kCi) * (TL + ctx) + static_cast<size_t>(kCi) * taps * (TCO + 1));
}

// kTaps > 0 fixes K at compile time (fully unrolled tap loop); 0 reads p.taps. Staged channels past C_in and
// samples past the input are zeros with zero weights, so the tails need no masks in the FMA loop.
template <typename T, int TCO, int TL, int MCO, int ML, int kTaps, bool kSnake>
__global__ void __launch_bounds__(DenseTile<TCO, TL, MCO, ML>::kThreads)
    CausalConv1dDenseKernel(CausalConv1dArgs<T> const p) {
  using Tile = DenseTile<TCO, TL, MCO, ML>;
  extern __shared__ float smem[];
  int const taps = kTaps > 0 ? kTaps : p.taps;
  int const ctx = (taps - 1) * p.dilation;
  int const width = TL + ctx;  // window samples a tile reads
  float* s_x = smem;  // [kCi][width]
  float* s_w = smem + kCi * width;  // [kCi][taps][TCO + 1]
  __shared__ float s_snake[2][kCi];  // SnakeBeta (a, inv) of the staged channels

  int const b = blockIdx.x;
  int const co0 = blockIdx.y * TCO;
  int const l0 = blockIdx.z * TL;
  // this thread's outputs: channels co0 + tc + i * TCO / MCO, samples l0 + tl + j * TL / ML
  int const tl = threadIdx.x % Tile::kThreadsL;
  int const tc = threadIdx.x / Tile::kThreadsL;
  T const* xb = p.x + b * p.sxb;
  T const* sb = p.state != nullptr ? p.state + b * p.ssb : nullptr;

  float acc[MCO][ML];
#pragma unroll
  for (int i = 0; i < MCO; ++i)
#pragma unroll
    for (int j = 0; j < ML; ++j) acc[i][j] = 0.f;

  for (int ci0 = 0; ci0 < p.c_in; ci0 += kCi) {
    __syncthreads();  // the previous chunk's reads are done
    if (kSnake) {
      if (threadIdx.x < kCi && ci0 + threadIdx.x < p.c_in)
        SnakeParams(p, ci0 + threadIdx.x, s_snake[0][threadIdx.x], s_snake[1][threadIdx.x]);
      __syncthreads();
    }
    // Window rows; channels past C_in stage zeros (their weights are zero too).
    for (int e = threadIdx.x; e < kCi * width; e += Tile::kThreads) {
      int const r = e / width, pos = l0 + e - r * width;
      int const c = ci0 + r;
      float v = 0.f;
      if (c < p.c_in && pos < ctx + p.length)
        v = Window<T, kSnake>(p, xb + c * p.sxc, sb != nullptr ? sb + c * p.ssc : nullptr, pos, ctx,
                              kSnake ? s_snake[0][r] : 0.f, kSnake ? s_snake[1][r] : 0.f);
      s_x[e] = v;
    }
    // Weights, read k fastest (contiguous in a (C_out, C_in, K) tensor), stored [ci][k][co].
    for (int e = threadIdx.x; e < kCi * taps * TCO; e += Tile::kThreads) {
      int const co = e / (kCi * taps), rem = e - co * (kCi * taps);
      int const r = rem / taps, k = rem - r * taps;
      float v = 0.f;
      if (co0 + co < p.c_out && ci0 + r < p.c_in)
        v = ToFloat(p.weight[(co0 + co) * p.swo + (ci0 + r) * p.swi + k * p.swk]);
      s_w[(r * taps + k) * (TCO + 1) + co] = v;  // rows padded by one word: these writes hit 32 banks
    }
    __syncthreads();

    for (int r = 0; r < kCi; ++r) {
      float const* xr = s_x + r * width + tl;
      float const* wr = s_w + r * taps * (TCO + 1) + tc;
#pragma unroll  // fully when K is a compile-time constant
      for (int k = 0; k < taps; ++k) {
        float w[MCO], v[ML];
#pragma unroll
        for (int i = 0; i < MCO; ++i) w[i] = wr[k * (TCO + 1) + i * (TCO / MCO)];
#pragma unroll
        for (int j = 0; j < ML; ++j) v[j] = xr[k * p.dilation + j * Tile::kThreadsL];
#pragma unroll
        for (int i = 0; i < MCO; ++i)
#pragma unroll
          for (int j = 0; j < ML; ++j) acc[i][j] = fmaf(w[i], v[j], acc[i][j]);
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
    for (int j = 0; j < ML; ++j) {
      int const l = l0 + tl + j * Tile::kThreadsL;
      if (l < p.length) yr[l * p.syl] = FromFloat<T>(acc[i][j] + bias);
    }
  }
}

constexpr int kDwRows = 8;  // output channels per depthwise CTA, one warp each

// Shared memory of the depthwise kernel: one window row [TL + S] per output channel, fp32.
template <int TL>
constexpr size_t DepthwiseSmemBytes(int ctx) {
  return sizeof(float) * static_cast<size_t>(kDwRows) * (TL + ctx);
}

// grid (B, ceil(C_out / kDwRows), ceil(L / TL)), kDwRows warps; warp r owns output channel co0 + r and TL / 32
// samples per lane (lane + 32 j: conflict-free shared reads, coalesced stores).
template <typename T, int TL, bool kSnake>
__global__ void __launch_bounds__(kDwRows * 32) CausalConv1dDepthwiseKernel(CausalConv1dArgs<T> const p) {
  extern __shared__ float smem[];
  int const ctx = (p.taps - 1) * p.dilation;
  int const width = TL + ctx;
  int const b = blockIdx.x;
  int const co0 = blockIdx.y * kDwRows;
  int const l0 = blockIdx.z * TL;
  int const mult = p.c_out / p.c_in;  // output channels per input channel
  T const* xb = p.x + b * p.sxb;
  T const* sb = p.state != nullptr ? p.state + b * p.ssb : nullptr;
  __shared__ float s_snake[2][kDwRows];
  if (kSnake) {
    if (threadIdx.x < kDwRows && co0 + threadIdx.x < p.c_out)
      SnakeParams(p, (co0 + threadIdx.x) / mult, s_snake[0][threadIdx.x], s_snake[1][threadIdx.x]);
    __syncthreads();
  }

  for (int e = threadIdx.x; e < kDwRows * width; e += kDwRows * 32) {
    int const r = e / width, pos = l0 + e - r * width;
    int const co = co0 + r;
    float v = 0.f;
    if (co < p.c_out && pos < ctx + p.length) {
      int const c = co / mult;
      v = Window<T, kSnake>(p, xb + c * p.sxc, sb != nullptr ? sb + c * p.ssc : nullptr, pos, ctx,
                            kSnake ? s_snake[0][r] : 0.f, kSnake ? s_snake[1][r] : 0.f);
    }
    smem[e] = v;
  }
  __syncthreads();

  int const r = threadIdx.x / 32, lane = threadIdx.x % 32;
  int const co = co0 + r;
  if (co >= p.c_out) return;
  float acc[TL / 32];
#pragma unroll
  for (int j = 0; j < TL / 32; ++j) acc[j] = 0.f;
  float const* xr = smem + r * width + lane;
  T const* wr = p.weight + co * p.swo;
  for (int k = 0; k < p.taps; ++k) {
    float const w = ToFloat(wr[k * p.swk]);
#pragma unroll
    for (int j = 0; j < TL / 32; ++j) acc[j] = fmaf(w, xr[k * p.dilation + 32 * j], acc[j]);
  }
  float const bias = p.bias != nullptr ? ToFloat(p.bias[co * p.sb]) : 0.f;
  T* yr = p.y + b * p.syb + co * p.syc;
#pragma unroll
  for (int j = 0; j < TL / 32; ++j) {
    int const l = l0 + lane + 32 * j;
    if (l < p.length) yr[l * p.syl] = FromFloat<T>(acc[j] + bias);
  }
}

// new_state[b, c, i] = window[b, c, L + i] for i < S; one thread per (b, c) row, i ascending (in-place safe).
template <typename T, bool kSnake>
__global__ void CausalConv1dStateKernel(CausalConv1dArgs<T> const p) {
  int const row = blockIdx.x * blockDim.x + threadIdx.x;
  if (row >= p.batch * p.c_in) return;
  int const b = row / p.c_in, c = row - b * p.c_in;
  int const ctx = (p.taps - 1) * p.dilation;
  float a = 0.f, inv = 0.f;
  if (kSnake) SnakeParams(p, c, a, inv);
  T const* xc = p.x + b * p.sxb + c * p.sxc;
  T const* sc = p.state != nullptr ? p.state + b * p.ssb + c * p.ssc : nullptr;
  T* nc = p.new_state + b * p.snb + c * p.snc;
  for (int i = 0; i < ctx; ++i) nc[i * p.snl] = FromFloat<T>(Window<T, kSnake>(p, xc, sc, p.length + i, ctx, a, inv));
}

template <typename Kernel>
cudaError_t Launch(Kernel kernel, dim3 grid, int threads, size_t smem, void* arg, cudaStream_t stream) {
  void* args[] = {arg};
  return cudaLaunchKernel(reinterpret_cast<void const*>(kernel), grid, dim3(threads), args, smem, stream);
}

template <typename T, int TCO, int TL, int MCO, int ML, bool kSnake>
cudaError_t LaunchDense(CausalConv1dArgs<T>& p, cudaStream_t stream) {
  using Tile = DenseTile<TCO, TL, MCO, ML>;
  dim3 const grid(p.batch, (p.c_out + TCO - 1) / TCO, (p.length + TL - 1) / TL);
  size_t const smem = DenseSmemBytes<TCO, TL>(p.taps, (p.taps - 1) * p.dilation);
  int const threads = Tile::kThreads;
  switch (p.taps) {  // Code2Wav's taps unrolled; anything else loops
    case 1: return Launch(CausalConv1dDenseKernel<T, TCO, TL, MCO, ML, 1, kSnake>, grid, threads, smem, &p, stream);
    case 7: return Launch(CausalConv1dDenseKernel<T, TCO, TL, MCO, ML, 7, kSnake>, grid, threads, smem, &p, stream);
    default: return Launch(CausalConv1dDenseKernel<T, TCO, TL, MCO, ML, 0, kSnake>, grid, threads, smem, &p, stream);
  }
}

template <typename T, int TL, bool kSnake>
cudaError_t LaunchDepthwise(CausalConv1dArgs<T>& p, cudaStream_t stream) {
  dim3 const grid(p.batch, (p.c_out + kDwRows - 1) / kDwRows, (p.length + TL - 1) / TL);
  return Launch(CausalConv1dDepthwiseKernel<T, TL, kSnake>, grid, kDwRows * 32,
                DepthwiseSmemBytes<TL>((p.taps - 1) * p.dilation), &p, stream);
}

// Tiles: long sequences 64 x 64 outputs a CTA (256 threads, 4 x 4 each); decode (L <= 16) 16 x 16 (64 threads,
// 1 x 4 each) so that the weight reads of a short chunk spread over 4x more CTAs.
constexpr int kShortL = 16;

template <typename T, bool kSnake>
cudaError_t LaunchConv(CausalConv1dArgs<T>& p, cudaStream_t stream) {
  if (p.depthwise)
    return p.length <= 32 ? LaunchDepthwise<T, 32, kSnake>(p, stream) : LaunchDepthwise<T, 128, kSnake>(p, stream);
  return p.length <= kShortL ? LaunchDense<T, 16, 16, 1, 4, kSnake>(p, stream)
                             : LaunchDense<T, 64, 64, 4, 4, kSnake>(p, stream);
}

}  // namespace conv_detail

// The most dynamic shared memory a launch may use without an opt-in (48 KiB per block, less the kernels' static
// 128 bytes of SnakeBeta constants), and what a call needs: the launcher rejects calls above the limit (long
// contexts: (K - 1) * dilation beyond ~1400 samples for the depthwise kernel, ~250 for the dense K = 7 one).
constexpr size_t kCausalConv1dSmemLimit = 48 * 1024 - 256;
inline size_t CausalConv1dSmemBytes(bool depthwise, int taps, int dilation, int length) {
  int const ctx = (taps - 1) * dilation;
  if (depthwise)
    return length <= 32 ? conv_detail::DepthwiseSmemBytes<32>(ctx) : conv_detail::DepthwiseSmemBytes<128>(ctx);
  return length <= conv_detail::kShortL ? conv_detail::DenseSmemBytes<16, 16>(taps, ctx)
                                        : conv_detail::DenseSmemBytes<64, 64>(taps, ctx);
}

// Launches the conv (when B, C_out and L are non-zero) and then the state update (when B, C_in and S are non-zero),
// both on `stream`. Returns cudaErrorInvalidValue for sizes outside the kernels' int indexing or shared memory.
template <typename T>
cudaError_t CausalConv1d(CausalConv1dArgs<T> p, cudaStream_t stream) {
  // grid.y = C_out / 8 at most (depthwise rows), grid.z = L / 32 at most; rows of the state kernel fit an int
  if (p.batch < 0 || p.c_in < 0 || p.c_out < 0 || p.length < 0 || p.taps < 1 || p.dilation < 1 ||
      static_cast<int64_t>(p.taps - 1) * p.dilation > (1 << 20) || (p.c_out + 7) / 8 > 65535 ||
      (p.length + 31) / 32 > 65535 || static_cast<int64_t>(p.batch) * p.c_in > INT_MAX ||
      (p.depthwise && (p.c_in == 0 || p.c_out % p.c_in != 0)))
    return cudaErrorInvalidValue;
  bool const snake = p.alpha != nullptr;
  if (p.batch > 0 && p.c_out > 0 && p.length > 0) {
    if (CausalConv1dSmemBytes(p.depthwise, p.taps, p.dilation, p.length) > kCausalConv1dSmemLimit)
      return cudaErrorInvalidValue;
    cudaError_t const err = snake ? conv_detail::LaunchConv<T, true>(p, stream)
                                  : conv_detail::LaunchConv<T, false>(p, stream);
    if (err != cudaSuccess) return err;
  }
  int const rows = p.batch * p.c_in;
  if (rows == 0 || p.taps == 1) return cudaSuccess;
  auto const kernel =
      snake ? conv_detail::CausalConv1dStateKernel<T, true> : conv_detail::CausalConv1dStateKernel<T, false>;
  return conv_detail::Launch(kernel, dim3((rows + 127) / 128), 128, 0, &p, stream);
}

}  // namespace omni
