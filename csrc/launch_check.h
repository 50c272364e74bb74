// The launchers' one check of a kernel launch: a failed cudaLaunchKernel (or cudaFuncSetAttribute) also records its
// error as the host thread's last CUDA error. Clear it before throwing, or the next C10_CUDA_KERNEL_LAUNCH_CHECK (in
// torch's own ops) would report this launch's failure against an unrelated kernel.
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime.h>

namespace omni {

inline void CheckLaunch(cudaError_t err, char const* op) {
  if (err == cudaSuccess) return;
  (void)cudaGetLastError();
  TORCH_CHECK(false, op, "kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace omni
