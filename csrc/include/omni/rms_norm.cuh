// RMSNorm over the last dimension, header-only; knows nothing about torch.
//
//   y[r, :] = w * to_T(x32[r, :] * rsqrt(mean(x32[r, :]^2) + eps))
//
// This matches the Hugging Face Qwen3 RMSNorm bit for bit in the elementwise part: statistics in fp32, the
// normalised row rounded to T *before* the weight multiply, and the multiply rounded once to T. Computing
// w * xn in fp32 and rounding once is exactly a T multiply (a product of two fp16 or bf16 values is exact in
// fp32), which is also what torch's eager `weight * x` does. Only the sum-of-squares order differs from torch.
//
// Layout: `rows` rows of `hidden` contiguous elements; row r of x starts at x + r * x_row_stride (in elements),
// of y at y + r * y_row_stride. y may be x (in place); partial overlap is not supported.
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

// One block per row. Elements [0, hidden / VEC * VEC) move as VEC-wide vectors, the rest (< VEC) one by one.
// The second pass re-reads x; a row (a few KiB) is still in L1/L2 by then.
template <typename T, int VEC>
__global__ void RMSNormKernel(T const* x, T const* w, T* y, int hidden, int64_t x_row_stride,
                              int64_t y_row_stride, float eps) {
  using V = Vec<T, VEC>;
  T const* xr = x + static_cast<int64_t>(blockIdx.x) * x_row_stride;
  T* yr = y + static_cast<int64_t>(blockIdx.x) * y_row_stride;
  int const nvec = hidden / VEC;

  float ss = 0.f;
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
    V const xv = reinterpret_cast<V const*>(xr)[i];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      float const f = ToFloat(xv.v[k]);
      ss += f * f;
    }
  }
  for (int i = nvec * VEC + threadIdx.x; i < hidden; i += blockDim.x) {
    float const f = ToFloat(xr[i]);
    ss += f * f;
  }
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

template <typename T, int VEC>
cudaError_t LaunchRMSNorm(T const* x, T const* w, T* y, int rows, int hidden, int64_t x_row_stride,
                          int64_t y_row_stride, float eps, cudaStream_t stream) {
  // Enough warps to give each thread about one vector, within [1 warp, 1024 threads].
  int const vectors = (hidden + VEC - 1) / VEC;
  int const threads = vectors >= 1024 ? 1024 : ((vectors + 31) / 32) * 32;
  void* args[] = {&x, &w, &y, &hidden, &x_row_stride, &y_row_stride, &eps};
  // cudaLaunchKernel returns the launch error (it also stays the thread's last error: the launcher clears it).
  return cudaLaunchKernel(reinterpret_cast<void const*>(&RMSNormKernel<T, VEC>), dim3(rows), dim3(threads),
                          args, 0, stream);
}

template <typename T>
bool Aligned16(T const* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

}  // namespace detail

// T is float, __half or __nv_bfloat16; the weight has the same type as x and y.
// Strides are in elements. Returns cudaErrorInvalidValue for sizes the kernel cannot index.
template <typename T>
cudaError_t RMSNorm(T const* x, T const* w, T* y, int64_t rows, int64_t hidden, int64_t x_row_stride,
                    int64_t y_row_stride, float eps, cudaStream_t stream) {
  if (rows == 0 || hidden == 0) return cudaSuccess;
  if (rows < 0 || hidden < 0 || rows > INT_MAX || hidden > INT_MAX) return cudaErrorInvalidValue;
  constexpr int kVec = 16 / sizeof(T);
  // 128-bit access needs every row start of x and y, and w, on a 16-byte boundary.
  bool const vectorised = detail::Aligned16(x) && detail::Aligned16(w) && detail::Aligned16(y) &&
                          x_row_stride % kVec == 0 && y_row_stride % kVec == 0;
  auto const launch = vectorised ? detail::LaunchRMSNorm<T, kVec> : detail::LaunchRMSNorm<T, 1>;
  return launch(x, w, y, static_cast<int>(rows), static_cast<int>(hidden), x_row_stride, y_row_stride, eps,
                stream);
}

}  // namespace omni
