// RMSNorm over the last dimension, header-only; knows nothing about torch.
//
//   y[r, :] = w * to_T(x32[r, :] * rsqrt(mean(x32[r, :]^2) + eps))
//
// This matches the Hugging Face Qwen3 RMSNorm bit for bit in the elementwise part: statistics in fp32, the
// normalised row rounded to T *before* the weight multiply, and the multiply rounded once to T. Computing
// w * xn in fp32 and rounding once is exactly a T multiply (a product of two fp16 or bf16 values is exact in
// fp32), which is also what torch's eager `weight * x` does. Only the sum-of-squares order differs from torch.
//
// AddRMSNorm first adds a residual: s = to_T(x32 + r32) is written out (the residual stream after the add, rounded
// as torch's `x + r`) and normalised as above, so (s, y) equal the add followed by RMSNorm on s bit for bit when both
// take the same vector width: one kernel and one pass over the row fewer than the two.
//
// Layout: `rows` rows of `hidden` contiguous elements; row r of x starts at x + r * x_row_stride (in elements),
// of y at y + r * y_row_stride (likewise residual and s). y may be x (in place) in RMSNorm; partial overlap is not
// supported (nor is any between AddRMSNorm's outputs and inputs: the launcher refuses it).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <omni/dtype.cuh>

#include <climits>
#include <cstdint>

namespace omni {
namespace detail {




// Sum over the block. blockDim.x must be a multiple of 32 (full-mask shuffles). After one barrier every warp
// reduces the per-warp partials itself, so all threads get the total without a second barrier.
__device__ __forceinline__ float BlockSum(float v) {
  __shared__ float warp_sums[32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  int const lane = threadIdx.x & 31;
  if (lane == 0) warp_sums[threadIdx.x >> 5] = v;
  __syncthreads();
  v = lane < (blockDim.x >> 5) ? warp_sums[lane] : 0.f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The rows an RMSNorm kernel reads and writes. kResidual: x + residual is the row normalised (and written to sum).
template <typename T>
struct NormRows {
  T const* x;
  T const* residual;  // kResidual only
  T* sum;             // kResidual only: x + residual, rounded to T
  T const* w;
  T* y;
  int64_t x_row_stride, residual_row_stride, sum_row_stride, y_row_stride;
};

// One block per row. Elements [0, hidden / VEC * VEC) move as VEC-wide vectors, the rest (< VEC) one by one.
// The second pass re-reads the normalised row (x, or the sum this thread wrote); a row (a few KiB) is still in
// L1/L2 by then. Each thread reads back only the elements it wrote, so the sum needs no barrier.
template <typename T, int VEC, bool kResidual>
__global__ void RMSNormKernel(NormRows<T> const p, int hidden, float eps) {
  using V = Vec<T, VEC>;
  int64_t const row = blockIdx.x;
  T const* xr = p.x + row * p.x_row_stride;
  T const* rr = kResidual ? p.residual + row * p.residual_row_stride : nullptr;
  T* sr = kResidual ? p.sum + row * p.sum_row_stride : nullptr;
  T* yr = p.y + row * p.y_row_stride;
  int const nvec = hidden / VEC;

  float ss = 0.f;
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
    V xv = reinterpret_cast<V const*>(xr)[i];
    if (kResidual) {
      V const rv = reinterpret_cast<V const*>(rr)[i];
#pragma unroll
      for (int k = 0; k < VEC; ++k) xv.v[k] = FromFloat<T>(ToFloat(xv.v[k]) + ToFloat(rv.v[k]));
      reinterpret_cast<V*>(sr)[i] = xv;
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      float const f = ToFloat(xv.v[k]);
      ss += f * f;
    }
  }
  for (int i = nvec * VEC + threadIdx.x; i < hidden; i += blockDim.x) {
    T xv = xr[i];
    if (kResidual) {
      xv = FromFloat<T>(ToFloat(xv) + ToFloat(rr[i]));
      sr[i] = xv;
    }
    float const f = ToFloat(xv);
    ss += f * f;
  }
  if (kResidual) xr = sr;  // the second pass normalises the sum
  T const* w = p.w;
  float const inv_rms = rsqrtf(BlockSum(ss) / static_cast<float>(hidden) + eps);

  for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
    V const xv = reinterpret_cast<V const*>(xr)[i];
    V const wv = reinterpret_cast<V const*>(w)[i];
    V yv;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      T const xn = FromFloat<T>(ToFloat(xv.v[k]) * inv_rms);  // round to T before the weight, as the reference
      yv.v[k] = FromFloat<T>(ToFloat(wv.v[k]) * ToFloat(xn));
    }
    reinterpret_cast<V*>(yr)[i] = yv;
  }
  for (int i = nvec * VEC + threadIdx.x; i < hidden; i += blockDim.x) {
    T const xn = FromFloat<T>(ToFloat(xr[i]) * inv_rms);
    yr[i] = FromFloat<T>(ToFloat(w[i]) * ToFloat(xn));
  }
}

template <typename T, int VEC, bool kResidual>
cudaError_t LaunchRMSNorm(NormRows<T> const& p, int rows, int hidden, float eps, cudaStream_t stream) {
  // Enough warps to give each thread about one vector, within [1 warp, 1024 threads].
  int const vectors = (hidden + VEC - 1) / VEC;
  int const threads = vectors >= 1024 ? 1024 : ((vectors + 31) / 32) * 32;
  NormRows<T> rows_arg = p;
  void* args[] = {&rows_arg, &hidden, &eps};
  // cudaLaunchKernel returns the launch error (it also stays the thread's last error: the launcher clears it).
  return cudaLaunchKernel(reinterpret_cast<void const*>(&RMSNormKernel<T, VEC, kResidual>), dim3(rows),
                          dim3(threads), args, 0, stream);
}

// 128-bit access needs every row start and the weight on a 16-byte boundary.
template <typename T>
bool Vectorisable(NormRows<T> const& p, bool residual) {
  constexpr int kVec = 16 / sizeof(T);
  bool ok = Aligned16(p.x) && Aligned16(p.w) && Aligned16(p.y) && p.x_row_stride % kVec == 0 &&
            p.y_row_stride % kVec == 0;
  if (residual) {
    ok = ok && Aligned16(p.residual) && Aligned16(p.sum) && p.residual_row_stride % kVec == 0 &&
         p.sum_row_stride % kVec == 0;
  }
  return ok;
}

template <typename T, bool kResidual>
cudaError_t LaunchNorm(NormRows<T> const& p, int64_t rows, int64_t hidden, float eps, cudaStream_t stream) {
  if (rows == 0 || hidden == 0) return cudaSuccess;
  if (rows < 0 || hidden < 0 || rows > INT_MAX || hidden > INT_MAX) return cudaErrorInvalidValue;
  constexpr int kVec = 16 / sizeof(T);
  auto const launch = Vectorisable(p, kResidual) ? LaunchRMSNorm<T, kVec, kResidual> : LaunchRMSNorm<T, 1, kResidual>;
  return launch(p, static_cast<int>(rows), static_cast<int>(hidden), eps, stream);
}

}  // namespace detail

// T is float, __half or __nv_bfloat16; the weight has the same type as x and y.
// Strides are in elements. Returns cudaErrorInvalidValue for sizes the kernel cannot index.
template <typename T>
cudaError_t RMSNorm(T const* x, T const* w, T* y, int64_t rows, int64_t hidden, int64_t x_row_stride,
                    int64_t y_row_stride, float eps, cudaStream_t stream) {
  detail::NormRows<T> const p{x, nullptr, nullptr, w, y, x_row_stride, 0, 0, y_row_stride};
  return detail::LaunchNorm<T, false>(p, rows, hidden, eps, stream);
}

// sum = x + residual (rounded to T), y = RMSNorm(sum); strides as RMSNorm's, one per tensor.
template <typename T>
cudaError_t AddRMSNorm(T const* x, T const* residual, T const* w, T* sum, T* y, int64_t rows, int64_t hidden,
                       int64_t x_row_stride, int64_t residual_row_stride, int64_t sum_row_stride,
                       int64_t y_row_stride, float eps, cudaStream_t stream) {
  detail::NormRows<T> const p{x, residual, sum, w, y, x_row_stride, residual_row_stride, sum_row_stride,
                              y_row_stride};
  return detail::LaunchNorm<T, true>(p, rows, hidden, eps, stream);
}

}  // namespace omni
