// The MoE block's combine, header-only; knows nothing about torch.
//
//   s[t, h]   = to_T( sum_k rows[t, k, h] )                       fp32, k = 0, 1, ... (rank order), rounded once
//   out[t, h] = s                                                 routed experts only (the thinker)
//   out[t, h] = to_T( s + to_T( to_T(1 / (1 + exp(-g_t))) * y[t, h] ) )      with the talker's shared expert:
//               g_t its gate logit, y its output
//
// the reference's rows.sum(1) + torch.sigmoid(gate) * shared, four kernels, in one: the sigmoid as torch's CUDA
// kernel computes it (fp32, the same expf and an IEEE division: this header must not be built with --use_fast_math),
// every product and sum in fp32 rounded to T where torch rounds.
//
// Layout: rows[t, k, h] at rows + t * rows_t + k * rows_k + h (unit stride along h), gate[t] at gate + t * gate_t,
// y[t, h] at y + t * y_t + h, out[t, h] at out + t * hidden + h. One thread per VEC outputs of a row.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <omni/dtype.cuh>

#include <climits>
#include <cstdint>

namespace omni {

template <typename T>
struct MoeCombineArgs {
  T const* rows;
  T const* gate;    // nullptr: no shared expert
  T const* shared;  // nullptr iff gate is
  T* out;
  int64_t tokens;
  int top_k;
  int hidden;
  int64_t rows_t, rows_k, gate_t, shared_t;  // strides in elements
};

namespace combine_detail {

template <typename T, int VEC>
__global__ void MoeCombineKernel(MoeCombineArgs<T> const a) {
  using V = Vec<T, VEC>;
  int64_t const per_row = a.hidden / VEC;  // VEC divides hidden (the launcher's condition for VEC > 1)
  int64_t const i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= a.tokens * per_row) return;
  int64_t const t = i / per_row;
  int64_t const h = (i - t * per_row) * VEC;
  float acc[VEC] = {};
  T const* row = a.rows + t * a.rows_t + h;
  // unrolled so that the K row loads are in flight together (the adds stay in rank order): at decode this kernel
  // is one load latency, not K
#pragma unroll 8
  for (int k = 0; k < a.top_k; ++k, row += a.rows_k) {
    V const r = *reinterpret_cast<V const*>(row);
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[j] += ToFloat(r.v[j]);
  }
  V o;
  if (a.gate == nullptr) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) o.v[j] = FromFloat<T>(acc[j]);
  } else {
    float const g = ToFloat(a.gate[t * a.gate_t]);
    float const gate = ToFloat(FromFloat<T>(__fdiv_rn(1.f, 1.f + expf(-g))));
    V const y = *reinterpret_cast<V const*>(a.shared + t * a.shared_t + h);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      // _rn intrinsics: never contracted into an FMA (fp32 rounds the product before the add, as torch does)
      float const scaled = ToFloat(FromFloat<T>(__fmul_rn(gate, ToFloat(y.v[j]))));
      o.v[j] = FromFloat<T>(__fadd_rn(ToFloat(FromFloat<T>(acc[j])), scaled));
    }
  }
  *reinterpret_cast<V*>(a.out + t * a.hidden + h) = o;
}

template <typename T, int VEC>
cudaError_t Launch(MoeCombineArgs<T> const& a, cudaStream_t stream) {
  constexpr int kThreads = 256;
  int64_t const blocks = (a.tokens * (a.hidden / VEC) + kThreads - 1) / kThreads;
  if (blocks > INT_MAX) return cudaErrorInvalidValue;
  void* args[] = {const_cast<MoeCombineArgs<T>*>(&a)};
  return cudaLaunchKernel(reinterpret_cast<void const*>(&MoeCombineKernel<T, VEC>),
                          dim3(static_cast<unsigned>(blocks)), dim3(kThreads), args, 0, stream);
}

}  // namespace combine_detail

// T is float, __half or __nv_bfloat16. Returns cudaErrorInvalidValue for sizes the kernel cannot index.
template <typename T>
cudaError_t MoeCombine(MoeCombineArgs<T> const& a, cudaStream_t stream) {
  if (a.tokens == 0 || a.hidden == 0) return cudaSuccess;
  if (a.tokens < 0 || a.hidden < 0 || a.top_k < 0 || (a.gate == nullptr) != (a.shared == nullptr)) {
    return cudaErrorInvalidValue;
  }
  constexpr int kVec = 16 / sizeof(T);
  // 128-bit access: every row of rows, shared and out on a 16-byte boundary
  bool const vectorised = Aligned16(a.rows) && Aligned16(a.out) && a.hidden % kVec == 0 && a.rows_t % kVec == 0 &&
                          a.rows_k % kVec == 0 &&
                          (a.shared == nullptr || (Aligned16(a.shared) && a.shared_t % kVec == 0));
  return vectorised ? combine_detail::Launch<T, kVec>(a, stream) : combine_detail::Launch<T, 1>(a, stream);
}

}  // namespace omni
