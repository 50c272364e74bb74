// Torch launcher for omni::SiluMul: checks every argument, views x (..., 2I) and out (..., I) as rows through their
// strides (no copies), and launches on the current stream so CUDA-graph capture sees the kernel.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <omni/silu_mul.cuh>
#include "launch_check.h"

namespace {

template <typename T>
void Launch(at::Tensor const& x, at::Tensor& out, int64_t rows, int64_t cols, int64_t x_stride, int64_t out_stride) {
  cudaError_t const err = omni::SiluMul<T>(reinterpret_cast<T const*>(x.const_data_ptr()),
                                           reinterpret_cast<T*>(out.mutable_data_ptr()), rows, cols, x_stride,
                                           out_stride, c10::cuda::getCurrentCUDAStream().stream());
  omni::CheckLaunch(err, "omni::silu_mul: ");
}

}  // namespace

// x: (..., 2I), gate then up; out: (..., I) = silu(gate) * up. out overlaps nothing.
void silu_mul(at::Tensor const& x, at::Tensor& out) {
  char const* op = "omni::silu_mul: ";
  TORCH_CHECK(x.is_cuda(), op, "x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) % 2 == 0, op, "x must end in a dim of gate and up halves, got shape ",
              x.sizes());
  int64_t const cols = x.size(-1) / 2;
  auto expected = x.sizes().vec();
  expected.back() = cols;
  TORCH_CHECK(out.sizes() == at::IntArrayRef(expected), op, "out must have shape ", at::IntArrayRef(expected),
              ", got ", out.sizes());
  TORCH_CHECK(out.device() == x.device(), op, "out must be on x's device ", x.device(), ", got ", out.device());
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), op, "out must have x's dtype ", x.scalar_type(), ", got ",
              out.scalar_type());
  TORCH_CHECK(x.stride(-1) == 1 || x.size(-1) <= 1, op, "x must be contiguous in its last dim, got strides ",
              x.strides());
  TORCH_CHECK(out.stride(-1) == 1 || cols <= 1, op, "out must be contiguous in its last dim, got strides ",
              out.strides());
  if (out.numel() == 0) return;
  int64_t const rows = out.numel() / cols;
  int64_t const x_stride = x.dim() >= 2 ? omni::RowStride(x) : x.size(-1);
  int64_t const out_stride = out.dim() >= 2 ? omni::RowStride(out) : cols;
  TORCH_CHECK(x_stride >= 0 && out_stride >= 0, op, "the leading dims of x and out (strides ", x.strides(), ", ",
              out.strides(), ") must each view as one row dim; pass them reshaped to (-1, last)");
  omni::CheckRowsApart(op, out, "out", out_stride);
  omni::CheckNoOverlap(op, out, "out", x, "x");

  c10::cuda::CUDAGuard const guard(x.device());
  switch (x.scalar_type()) {
    case at::kFloat: return Launch<float>(x, out, rows, cols, x_stride, out_stride);
    case at::kHalf: return Launch<__half>(x, out, rows, cols, x_stride, out_stride);
    case at::kBFloat16: return Launch<__nv_bfloat16>(x, out, rows, cols, x_stride, out_stride);
    default: TORCH_CHECK(false, op, "dtype must be float32, float16 or bfloat16, got ", x.scalar_type());
  }
}
