// Torch launchers for omni::RMSNorm and omni::AddRMSNorm: check every argument, view the tensors as [rows, hidden]
// through their strides (no copies), and launch on the current stream so CUDA-graph capture sees the kernel.
// The c10/cuda headers give the same CUDAGuard and getCurrentCUDAStream as at::cuda:: without ATen/cuda's
// cuBLAS/cuSPARSE includes, which cost compile time and are absent from a bare CUDA toolkit.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <omni/rms_norm.cuh>
#include "launch_check.h"

namespace {

// The row stride of a tensor the kernel reads or writes as [rows, hidden]: contiguous in its last dim, leading
// dims that collapse into one, on x's device with x's dtype and shape.
int64_t CheckedRowStride(char const* op, at::Tensor const& t, char const* name, at::Tensor const& x) {
  TORCH_CHECK(t.device() == x.device(), op, name, " must be on x's device ", x.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, name, " must have x's dtype ", x.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == x.sizes(), op, name, " must have the shape of x ", x.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.stride(-1) == 1 || x.size(-1) == 1, op, name, " must be contiguous in its last dim, got strides ",
              t.strides());
  int64_t const stride = omni::RowStride(t);
  TORCH_CHECK(stride >= 0, op, "the leading dims of ", name, " (shape ", t.sizes(), ", strides ", t.strides(),
              ") cannot be viewed as one row dim; pass it reshaped to (-1, hidden)");
  return stride;
}

void CheckWeight(char const* op, at::Tensor const& weight, at::Tensor const& x) {
  int64_t const hidden = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == hidden, op, "weight must have shape (", hidden, ",), got ",
              weight.sizes());
  TORCH_CHECK(weight.stride(0) == 1 || hidden == 1, op, "weight must be contiguous");
  TORCH_CHECK(weight.device() == x.device(), op, "weight must be on x's device ", x.device(), ", got ",
              weight.device());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, "weight must have x's dtype ", x.scalar_type(), ", got ",
              weight.scalar_type());
}

template <typename T>
T const* In(at::Tensor const& t) {
  return reinterpret_cast<T const*>(t.const_data_ptr());
}

template <typename T>
T* Out(at::Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr());
}

template <typename T>
void Launch(at::Tensor const& x, at::Tensor const& weight, at::Tensor& out, int64_t rows, int64_t hidden,
            int64_t x_stride, int64_t out_stride, double eps) {
  cudaError_t const err = omni::RMSNorm<T>(In<T>(x), In<T>(weight), Out<T>(out), rows, hidden, x_stride, out_stride,
                                           static_cast<float>(eps), c10::cuda::getCurrentCUDAStream().stream());
  omni::CheckLaunch(err, "omni::rms_norm: ");
}

template <typename T>
void LaunchAdd(at::Tensor const& x, at::Tensor const& residual, at::Tensor const& weight, at::Tensor& sum,
               at::Tensor& out, int64_t rows, int64_t hidden, int64_t const* strides, double eps) {
  cudaError_t const err = omni::AddRMSNorm<T>(In<T>(x), In<T>(residual), In<T>(weight), Out<T>(sum), Out<T>(out),
                                              rows, hidden, strides[0], strides[1], strides[2], strides[3],
                                              static_cast<float>(eps), c10::cuda::getCurrentCUDAStream().stream());
  omni::CheckLaunch(err, "omni::add_rms_norm: ");
}

}  // namespace

// x: (..., hidden), weight: (hidden,), out: like x. out may be x itself.
void rms_norm(at::Tensor const& x, at::Tensor const& weight, double eps, at::Tensor& out) {
  TORCH_CHECK(x.is_cuda(), "omni::rms_norm: x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() >= 2, "omni::rms_norm: x must have at least 2 dims (..., hidden), got shape ", x.sizes());
  int64_t const hidden = x.size(-1);
  TORCH_CHECK(x.stride(-1) == 1 || hidden == 1, "omni::rms_norm: x must be contiguous in its last dim, got strides ",
              x.strides());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == hidden, "omni::rms_norm: weight must have shape (", hidden,
              ",), got ", weight.sizes());
  TORCH_CHECK(weight.stride(0) == 1 || hidden == 1, "omni::rms_norm: weight must be contiguous");
  TORCH_CHECK(weight.device() == x.device() && out.device() == x.device(),
              "omni::rms_norm: x, weight and out must be on one device, got ", x.device(), ", ", weight.device(),
              ", ", out.device());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && out.scalar_type() == x.scalar_type(),
              "omni::rms_norm: x, weight and out must have one dtype, got ", x.scalar_type(), ", ",
              weight.scalar_type(), ", ", out.scalar_type());
  TORCH_CHECK(out.sizes() == x.sizes(), "omni::rms_norm: out must have the shape of x ", x.sizes(), ", got ",
              out.sizes());
  TORCH_CHECK(out.stride(-1) == 1 || hidden == 1, "omni::rms_norm: out must be contiguous in its last dim, got strides ",
              out.strides());
  if (x.numel() == 0) return;

  int64_t const rows = x.numel() / hidden;
  int64_t const x_stride = omni::RowStride(x);
  int64_t const out_stride = omni::RowStride(out);
  TORCH_CHECK(x_stride >= 0, "omni::rms_norm: the leading dims of x (shape ", x.sizes(), ", strides ", x.strides(),
              ") cannot be viewed as one row dim; pass x.reshape(-1, hidden)");
  TORCH_CHECK(out_stride >= 0, "omni::rms_norm: the leading dims of out (shape ", out.sizes(), ", strides ",
              out.strides(), ") cannot be viewed as one row dim");
  omni::CheckRowsApart("omni::rms_norm: ", out, "out", out_stride);
  // In place (out is x) is safe: a block reads its whole row before the reduction's barrier and writes only what its
  // own threads read. A partial overlap would let one block write a row another block still reads.
  TORCH_CHECK(at::get_overlap_status(out, x) != at::MemOverlapStatus::Partial,
              "omni::rms_norm: out must be x itself or not overlap it");
  omni::CheckNoOverlap("omni::rms_norm: ", out, "out", weight, "weight");

  c10::cuda::CUDAGuard const guard(x.device());
  switch (x.scalar_type()) {
    case at::kFloat: return Launch<float>(x, weight, out, rows, hidden, x_stride, out_stride, eps);
    case at::kHalf: return Launch<__half>(x, weight, out, rows, hidden, x_stride, out_stride, eps);
    case at::kBFloat16: return Launch<__nv_bfloat16>(x, weight, out, rows, hidden, x_stride, out_stride, eps);
    default: TORCH_CHECK(false, "omni::rms_norm: dtype must be float32, float16 or bfloat16, got ", x.scalar_type());
  }
}

// x, residual: (..., hidden), weight: (hidden,); sum = x + residual and out = rms_norm(sum), both like x. Neither
// output overlaps an input or the other (the schema declares x and residual read-only).
void add_rms_norm(at::Tensor const& x, at::Tensor const& residual, at::Tensor const& weight, double eps,
                  at::Tensor& sum, at::Tensor& out) {
  char const* op = "omni::add_rms_norm: ";
  TORCH_CHECK(x.is_cuda(), op, "x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() >= 2, op, "x must have at least 2 dims (..., hidden), got shape ", x.sizes());
  CheckWeight(op, weight, x);
  int64_t const strides[] = {CheckedRowStride(op, x, "x", x), CheckedRowStride(op, residual, "residual", x),
                             CheckedRowStride(op, sum, "sum", x), CheckedRowStride(op, out, "out", x)};
  if (x.numel() == 0) return;
  omni::CheckRowsApart(op, sum, "sum", strides[2]);
  omni::CheckRowsApart(op, out, "out", strides[3]);
  omni::CheckNoOverlap(op, sum, "sum", x, "x");
  omni::CheckNoOverlap(op, sum, "sum", residual, "residual");
  omni::CheckNoOverlap(op, sum, "sum", weight, "weight");
  omni::CheckNoOverlap(op, out, "out", x, "x");
  omni::CheckNoOverlap(op, out, "out", residual, "residual");
  omni::CheckNoOverlap(op, out, "out", sum, "sum");
  omni::CheckNoOverlap(op, out, "out", weight, "weight");

  int64_t const hidden = x.size(-1), rows = x.numel() / hidden;
  c10::cuda::CUDAGuard const guard(x.device());
  switch (x.scalar_type()) {
    case at::kFloat: return LaunchAdd<float>(x, residual, weight, sum, out, rows, hidden, strides, eps);
    case at::kHalf: return LaunchAdd<__half>(x, residual, weight, sum, out, rows, hidden, strides, eps);
    case at::kBFloat16: return LaunchAdd<__nv_bfloat16>(x, residual, weight, sum, out, rows, hidden, strides, eps);
    default: TORCH_CHECK(false, op, "dtype must be float32, float16 or bfloat16, got ", x.scalar_type());
  }
}
