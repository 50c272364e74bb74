// Checks every launcher shares: outputs that must not share memory with inputs, and the launch itself.
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

// A failed cudaLaunchKernel (or cudaFuncSetAttribute) also records its error as the host thread's last CUDA error.
// Clear it before throwing, or the next C10_CUDA_KERNEL_LAUNCH_CHECK (in torch's own ops) would report this launch's
// failure against an unrelated kernel.
inline void CheckLaunch(cudaError_t err, char const* op) {
  if (err == cudaSuccess) return;
  (void)cudaGetLastError();
  TORCH_CHECK(false, op, "kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace omni
