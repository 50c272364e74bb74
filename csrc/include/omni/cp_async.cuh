// 16-byte global -> shared copies for double-buffered tiles (decode attention's K/V, the MoE GEMMs' operands).
// Knows nothing about torch.
#pragma once

#include <cuda_runtime.h>

namespace omni {

// Bypasses L1 (.cg: each tile is streamed once). src_size 0 reads nothing and zero-fills, so masked chunks cost no
// traffic and their source may hold garbage. cp.async needs sm_80; older archs get a plain synchronous 16-byte copy
// (same result, no overlap of load and compute), and commit/wait become no-ops.
__device__ __forceinline__ void CpAsync16(void* dst, void const* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  unsigned const s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(valid ? 16 : 0)
               : "memory");
#else
  *reinterpret_cast<int4*>(dst) = valid ? *reinterpret_cast<int4 const*>(src) : make_int4(0, 0, 0, 0);
#endif
}
__device__ __forceinline__ void CpAsyncCommit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void CpAsyncWaitAll() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
#endif
}

}  // namespace omni
