// SiLU-times-up on a fused gate/up projection, header-only; knows nothing about torch.
//
//   out[r, c] = to_T( to_T(g / (1 + exp(-g))) * u ),   g = x[r, c], u = x[r, I + c], c < I
//
// exactly torch's F.silu(gate) * up on a GPU: SiLU in fp32 with the same expf and an IEEE division (this header must
// not be built with --use_fast_math), rounded to T as F.silu's output, the product in fp32 rounded once (torch's
// fp16/bf16 multiply). One kernel instead of those two.
//
// Layout: `rows` rows; row r of x (2I elements, gate then up) starts at x + r * x_row_stride, of out (I elements)
// at out + r * out_row_stride. One thread per VEC outputs, rows after one another.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <omni/dtype.cuh>

#include <climits>
#include <cstdint>

namespace omni {
namespace silu_detail {

template <typename T, int VEC>
__global__ void SiluMulKernel(T const* x, T* out, int64_t rows, int cols, int64_t x_row_stride,
                              int64_t out_row_stride) {
  using V = Vec<T, VEC>;
  int64_t const per_row = cols / VEC;  // VEC divides cols (the launcher's condition for VEC > 1)
  int64_t const i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * per_row) return;
  int64_t const r = i / per_row;
  int64_t const c = (i - r * per_row) * VEC;
  T const* xr = x + r * x_row_stride;
  V const g = *reinterpret_cast<V const*>(xr + c);
  V const u = *reinterpret_cast<V const*>(xr + cols + c);
  V o;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    float const gf = ToFloat(g.v[k]);
    T const silu = FromFloat<T>(__fdiv_rn(gf, 1.f + expf(-gf)));
    o.v[k] = FromFloat<T>(ToFloat(silu) * ToFloat(u.v[k]));
  }
  *reinterpret_cast<V*>(out + r * out_row_stride + c) = o;
}

template <typename T, int VEC>
cudaError_t Launch(T const* x, T* out, int64_t rows, int cols, int64_t x_row_stride, int64_t out_row_stride,
                   cudaStream_t stream) {
  constexpr int kThreads = 256;
  int64_t const blocks = (rows * (cols / VEC) + kThreads - 1) / kThreads;
  if (blocks > INT_MAX) return cudaErrorInvalidValue;
  void* args[] = {&x, &out, &rows, &cols, &x_row_stride, &out_row_stride};
  return cudaLaunchKernel(reinterpret_cast<void const*>(&SiluMulKernel<T, VEC>), dim3(static_cast<unsigned>(blocks)),
                          dim3(kThreads), args, 0, stream);
}

}  // namespace silu_detail

// T is float, __half or __nv_bfloat16. cols = I (half of x's row). Strides are in elements. Returns
// cudaErrorInvalidValue for sizes the kernel cannot index.
template <typename T>
cudaError_t SiluMul(T const* x, T* out, int64_t rows, int64_t cols, int64_t x_row_stride, int64_t out_row_stride,
                    cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  if (rows < 0 || cols < 0 || cols > INT_MAX / 2) return cudaErrorInvalidValue;
  constexpr int kVec = 16 / sizeof(T);
  // 128-bit access: both halves of every row and every output row on a 16-byte boundary
  bool const vectorised = Aligned16(x) && Aligned16(out) && cols % kVec == 0 && x_row_stride % kVec == 0 &&
                          out_row_stride % kVec == 0;
  auto const launch = vectorised ? silu_detail::Launch<T, kVec> : silu_detail::Launch<T, 1>;
  return launch(x, out, rows, static_cast<int>(cols), x_row_stride, out_row_stride, stream);
}

}  // namespace omni
