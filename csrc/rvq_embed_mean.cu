// Torch launcher for omni::RvqEmbedMean: checks every argument and passes strides (no copies), on the current
// stream so CUDA-graph capture sees the kernel.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <omni/rvq_embed_mean.cuh>
#include "launch_check.h"

namespace {

template <typename T, typename Code>
void Launch(at::Tensor const& codes, at::Tensor const& table, int64_t codebook_size, at::Tensor& out) {
  cudaError_t const err = omni::RvqEmbedMean<T, Code>(
      codes.const_data_ptr<Code>(), reinterpret_cast<T const*>(table.const_data_ptr()),
      reinterpret_cast<T*>(out.mutable_data_ptr()), codes.size(0), codes.size(1), codes.size(2), table.size(1),
      codebook_size, codes.stride(0), codes.stride(1), codes.stride(2), table.stride(0), table.stride(1),
      out.stride(0), out.stride(1), out.stride(2), c10::cuda::getCurrentCUDAStream().stream());
  omni::CheckLaunch(err, "omni::rvq_embed_mean: ");
}

template <typename T>
void LaunchCodes(at::Tensor const& codes, at::Tensor const& table, int64_t codebook_size, at::Tensor& out) {
  if (codes.scalar_type() == at::kLong) return Launch<T, int64_t>(codes, table, codebook_size, out);
  return Launch<T, int32_t>(codes, table, codebook_size, out);
}

}  // namespace

// codes: (B, Q, T) int64/int32 ids in [0, codebook_size), table: (Q * codebook_size, H), out: (B, T, H) like table.
// Ids are not range-checked on the host (a device sync); an out-of-range id makes its (b, t) row NaN.
void rvq_embed_mean(at::Tensor const& codes, at::Tensor const& table, int64_t codebook_size, at::Tensor& out) {
  TORCH_CHECK(codes.is_cuda(), "omni::rvq_embed_mean: codes must be a CUDA tensor, got ", codes.device());
  TORCH_CHECK(table.device() == codes.device() && out.device() == codes.device(),
              "omni::rvq_embed_mean: codes, table and out must be on one device, got ", codes.device(), ", ",
              table.device(), ", ", out.device());
  TORCH_CHECK(codes.dim() == 3, "omni::rvq_embed_mean: codes must be (B, Q, T), got shape ", codes.sizes());
  TORCH_CHECK(codes.scalar_type() == at::kLong || codes.scalar_type() == at::kInt,
              "omni::rvq_embed_mean: codes must be int64 or int32, got ", codes.scalar_type());
  TORCH_CHECK(codebook_size > 0, "omni::rvq_embed_mean: codebook_size must be positive, got ", codebook_size);
  int64_t const B = codes.size(0), Q = codes.size(1), T = codes.size(2);
  TORCH_CHECK(table.dim() == 2 && table.size(0) == Q * codebook_size, "omni::rvq_embed_mean: table must be (", Q,
              " * ", codebook_size, ", H), got shape ", table.sizes());
  int64_t const H = table.size(1);
  TORCH_CHECK(out.scalar_type() == table.scalar_type(), "omni::rvq_embed_mean: out must have the table's dtype ",
              table.scalar_type(), ", got ", out.scalar_type());
  TORCH_CHECK(out.dim() == 3 && out.size(0) == B && out.size(1) == T && out.size(2) == H,
              "omni::rvq_embed_mean: out must be (", B, ", ", T, ", ", H, "), got shape ", out.sizes());
  TORCH_CHECK(B * T <= INT32_MAX && H <= omni::kRvqMaxHidden,
              "omni::rvq_embed_mean: B * T must be <= 2^31 - 1 and H <= ", omni::kRvqMaxHidden,
              " (65535 blocks of 128 columns), got B * T = ", B * T, ", H = ", H);
  if (out.numel() == 0) return;
  omni::CheckNoOverlap("omni::rvq_embed_mean: ", out, "out", table, "table");
  omni::CheckNoOverlap("omni::rvq_embed_mean: ", out, "out", codes, "codes");

  c10::cuda::CUDAGuard const guard(codes.device());
  switch (table.scalar_type()) {
    case at::kFloat: return LaunchCodes<float>(codes, table, codebook_size, out);
    case at::kHalf: return LaunchCodes<__half>(codes, table, codebook_size, out);
    case at::kBFloat16: return LaunchCodes<__nv_bfloat16>(codes, table, codebook_size, out);
    default:
      TORCH_CHECK(false, "omni::rvq_embed_mean: table dtype must be float32, float16 or bfloat16, got ",
                  table.scalar_type());
  }
}
