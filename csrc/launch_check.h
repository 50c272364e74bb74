// Checks every launcher shares: outputs that must not share memory with inputs, row views, and the launch itself.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

namespace omni {

// ``out`` shares no memory with ``in``: torch's range test, which passes what it cannot judge (non-dense views),
// as torch's own out= ops do.
inline void CheckNoOverlap(char const* op, at::TensorBase const& out, char const* out_name, at::TensorBase const& in,
                           char const* in_name) {
  at::MemOverlapStatus const s = at::get_overlap_status(out, in);
  TORCH_CHECK(s != at::MemOverlapStatus::Full && s != at::MemOverlapStatus::Partial, op, out_name,
              " must not overlap ", in_name);
}

// Row stride (in elements) of `t` seen as [rows, hidden], or -1 when its leading dims do not collapse into one
// strided dim. Size-1 dims place no constraint; a tensor whose leading dims are all 1 has one row.
inline int64_t RowStride(at::TensorBase const& t) {
  int64_t stride = -1;  // stride of the innermost leading dim of size > 1
  int64_t span = 1;     // product of the sizes of the leading dims inside the current one
  for (int64_t i = t.dim() - 2; i >= 0; --i) {
    if (t.size(i) == 1) continue;
    if (stride < 0) {
      stride = t.stride(i);
    } else if (t.stride(i) != stride * span) {
      return -1;
    }
    span *= t.size(i);
  }
  return stride < 0 ? t.size(-1) : stride;
}

// The rows of a written tensor (row stride ``stride``, as RowStride gives it) do not overlap one another.
inline void CheckRowsApart(char const* op, at::TensorBase const& t, char const* name, int64_t stride) {
  int64_t const hidden = t.size(-1);
  TORCH_CHECK(t.numel() == hidden || stride >= hidden, op, "rows of ", name, " overlap (row stride ", stride,
              " < hidden ", hidden, ")");
}

// A failed cudaLaunchKernel (or cudaFuncSetAttribute) also records its error as the host thread's last CUDA error.
// Clear it before throwing, or the next C10_CUDA_KERNEL_LAUNCH_CHECK (in torch's own ops) would report this launch's
// failure against an unrelated kernel.
inline void CheckLaunch(cudaError_t err, char const* op) {
  if (err == cudaSuccess) return;
  (void)cudaGetLastError();
  TORCH_CHECK(false, op, "kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace omni
