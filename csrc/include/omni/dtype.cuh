// Element types the kernels take (float, __half, __nv_bfloat16): widening to fp32, rounding back to nearest even,
// N elements moved as one vector, and warp-wide reductions. Shared by every header in this folder; knows nothing
// about torch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace omni {

template <typename T>
__device__ __forceinline__ float ToFloat(T v);
template <>
__device__ __forceinline__ float ToFloat(float v) { return v; }
template <>
__device__ __forceinline__ float ToFloat(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float ToFloat(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T FromFloat(float v);
template <>
__device__ __forceinline__ float FromFloat(float v) { return v; }
template <>
__device__ __forceinline__ __half FromFloat(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat(float v) { return __float2bfloat16_rn(v); }

// 16-byte vector loads and stores need 16-byte aligned addresses.
__host__ __device__ __forceinline__ bool Aligned16(void const* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// N elements moved as one load/store; with sizeof(T) * N == 16 the compiler emits 128-bit ld/st.global.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Butterfly reductions over a full warp: every lane ends with the result.
__device__ __forceinline__ float WarpMax(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float WarpSum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

}  // namespace omni
