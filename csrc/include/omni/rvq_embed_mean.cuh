// Residual-VQ embedding mean (Code2Wav's input layer), header-only; knows nothing about torch.
//
//   out[b, t, h] = to_T( (sum_q table[codes[b, q, t] + q * codebook_size, h]) / Q )
//
// The sum runs in fp32 in quantizer order, the division is correctly rounded (`__fdiv_rn`, not a multiply by 1/Q)
// and the result is rounded once to T: the same value as the Triton kernel and torch's CPU mean (see rvq_lookup.py).
// Q == 0 gives 0 / 0 = NaN, the reference's mean of nothing. An id outside [0, codebook_size) is not read (that
// would be an illegal address that kills the CUDA context); it turns its row of the output into NaN instead.
//
// Layout: strides in elements. codes (B, Q, T) any strides; table (Q * codebook_size, H) and out (B, T, H) any row
// strides; their last-dim strides are 1 on the vectorised path, `tab_h` / `out_h` otherwise.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <omni/dtype.cuh>

#include <climits>
#include <cstdint>

namespace omni {
namespace rvq_detail {




constexpr int kThreads = 128;
constexpr int kMaxGridY = 65535;  // CUDA's gridDim.y limit: ceil(H / (kThreads * VEC)) blocks along the hidden dim

// grid (B * T, ceil(H / (kThreads * VEC))). Each thread owns VEC adjacent columns of one (b, t) row. Every thread of
// the block reads the same code per quantizer (one broadcast transaction, L1-resident after the first block), then
// one VEC-wide row segment of the table: a warp reads 32 * 16 contiguous bytes per quantizer when VEC * sizeof(T)
// is 16. The loop over q is unrolled so several independent gathers are in flight.
template <typename T, typename Code, int VEC>
__global__ void __launch_bounds__(kThreads)
    RvqEmbedMeanKernel(Code const* codes, T const* table, T* out, int frames, int hidden, int quantizers,
                       int64_t codebook_size, int64_t scb, int64_t scq, int64_t sct, int64_t tab_row, int64_t tab_h,
                       int64_t out_b, int64_t out_t, int64_t out_h) {
  using V = Vec<T, VEC>;
  int64_t const b = blockIdx.x / frames;
  int const t = blockIdx.x - static_cast<int>(b) * frames;
  int const h0 = (blockIdx.y * kThreads + threadIdx.x) * VEC;
  if (h0 >= hidden) return;
  Code const* code_row = codes + b * scb + t * sct;

  float acc[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) acc[k] = 0.f;
  bool bad = false;
#pragma unroll 4
  for (int q = 0; q < quantizers; ++q) {
    int64_t const code = static_cast<int64_t>(code_row[q * scq]);
    bad |= code < 0 || code >= codebook_size;
    int64_t const row = (code < 0 || code >= codebook_size ? 0 : code) + q * codebook_size;
    T const* src = table + row * tab_row;
    if (VEC > 1 && h0 + VEC <= hidden) {  // full vector (VEC > 1 implies tab_h == 1)
      V const v = *reinterpret_cast<V const*>(src + h0);
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] += ToFloat(v.v[k]);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k)
        if (h0 + k < hidden) acc[k] += ToFloat(src[(h0 + k) * tab_h]);
    }
  }
  float const nq = static_cast<float>(quantizers);
  T* dst = out + b * out_b + t * out_t;
  if (VEC > 1 && h0 + VEC <= hidden) {
    V o;
#pragma unroll
    for (int k = 0; k < VEC; ++k) o.v[k] = FromFloat<T>(bad ? __int_as_float(0x7fffffff) : __fdiv_rn(acc[k], nq));
    *reinterpret_cast<V*>(dst + h0) = o;
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k)
      if (h0 + k < hidden)
        dst[(h0 + k) * out_h] = FromFloat<T>(bad ? __int_as_float(0x7fffffff) : __fdiv_rn(acc[k], nq));
  }
}

template <typename T, typename Code, int VEC>
cudaError_t LaunchRvqEmbedMean(Code const* codes, T const* table, T* out, int batch, int frames, int hidden,
                               int quantizers, int64_t codebook_size, int64_t scb, int64_t scq, int64_t sct,
                               int64_t tab_row, int64_t tab_h, int64_t out_b, int64_t out_t, int64_t out_h,
                               cudaStream_t stream) {
  int const blocks_h = (hidden + kThreads * VEC - 1) / (kThreads * VEC);
  if (blocks_h > kMaxGridY) return cudaErrorInvalidValue;
  dim3 const grid(static_cast<unsigned>(batch) * frames, blocks_h);
  void* args[] = {&codes, &table, &out, &frames, &hidden, &quantizers, &codebook_size, &scb, &scq,
                  &sct,   &tab_row, &tab_h, &out_b, &out_t, &out_h};
  return cudaLaunchKernel(reinterpret_cast<void const*>(&RvqEmbedMeanKernel<T, Code, VEC>), grid, dim3(kThreads),
                          args, 0, stream);
}

}  // namespace rvq_detail

// Largest hidden size every path takes: the scalar one (VEC 1) needs ceil(H / kThreads) <= 65535 blocks along y.
constexpr int64_t kRvqMaxHidden = int64_t{rvq_detail::kMaxGridY} * rvq_detail::kThreads;

// T: float, __half or __nv_bfloat16 (table and out); Code: int32_t or int64_t. Strides in elements, in the order
// codes (b, q, t), table (row, h), out (b, t, h). Returns cudaErrorInvalidValue for sizes the grid cannot hold
// (B * T > 2^31 - 1, or H > kRvqMaxHidden on the scalar path, H > kRvqMaxHidden * 16 / sizeof(T) vectorised).
template <typename T, typename Code>
cudaError_t RvqEmbedMean(Code const* codes, T const* table, T* out, int64_t batch, int64_t quantizers,
                         int64_t frames, int64_t hidden, int64_t codebook_size, int64_t scb, int64_t scq,
                         int64_t sct, int64_t tab_row, int64_t tab_h, int64_t out_b, int64_t out_t, int64_t out_h,
                         cudaStream_t stream) {
  if (batch == 0 || frames == 0 || hidden == 0) return cudaSuccess;
  if (batch < 0 || frames < 0 || hidden < 0 || quantizers < 0 || quantizers > INT_MAX || hidden > INT_MAX ||
      batch * frames > INT_MAX)
    return cudaErrorInvalidValue;
  constexpr int kVec = 16 / sizeof(T);
  bool const vectorised = tab_h == 1 && out_h == 1 && Aligned16(table) && Aligned16(out) && tab_row % kVec == 0 &&
                          out_b % kVec == 0 && out_t % kVec == 0;
  auto const launch = vectorised ? rvq_detail::LaunchRvqEmbedMean<T, Code, kVec>
                                 : rvq_detail::LaunchRvqEmbedMean<T, Code, 1>;
  return launch(codes, table, out, static_cast<int>(batch), static_cast<int>(frames), static_cast<int>(hidden),
                static_cast<int>(quantizers), codebook_size, scb, scq, sct, tab_row, tab_h, out_b, out_t, out_h,
                stream);
}

}  // namespace omni
