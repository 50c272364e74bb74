// Per-head q/k RMSNorm + rotate-half RoPE + KV-cache write, header-only; knows nothing about torch.
//
// For token (b, t), query head h and key head g (x is a row of head_dim D, H = D / 2, d < H):
//   xn      = T(w * T(x32 * rstd)),   rstd = 1 / sqrt(sum(x32^2) / D + eps)      (skipped without a norm weight)
//   out[d]     = T( T(xn[d]     * cos[d])     - T(xn[d + H] * sin[d])     )
//   out[d + H] = T( T(xn[d + H] * cos[d + H]) + T(xn[d]     * sin[d + H]) )
//   q_out[b, h, t] = out(q[b, t, h]);   k_cache[b, g, slot] = out(k[b, t, g]);   v_cache[b, g, slot] = v[b, t, g]
// with slot = cache_positions[t]. T(.) is one rounding to the storage type, so every product and the sum are
// rounded as the eager reference rounds them (a product of two fp16/bf16 values is exact in fp32, so "fp32 multiply,
// round once" is the fp16/bf16 multiply). The fp32 intrinsics (__fmul_rn, __fadd_rn, ...) forbid FMA contraction,
// which would skip the roundings for T = float; 1/sqrt is __fsqrt_rn then __frcp_rn, both correctly rounded, as
// torch's CPU rsqrt and the Triton kernel. Only the order of the sum of squares differs from torch.
//
// Work split: a "head" is any of the Hq query heads or Hkv key heads (a key head also copies its value row).
// `lanes` consecutive threads (a power of two <= 32) own one head; thread `sub` of them owns the element pairs
// (d, d + H) for d in the VEC-wide chunks sub, sub + lanes, ...: each thread holds both rotate-half partners, so
// the rotation needs no shuffles, and the sum of squares is a shuffle-xor reduction inside the lane group.
// Block = (token, group of heads). The row is read twice when normed (statistics, then output); the second read
// hits L1. Cache slots outside [0, cache_len) are not written (the reference would raise; a kernel cannot).
//
// Layout: every tensor contiguous in its last dim; other strides in elements. cos/sin are (B, T, D) through
// strides (batch stride 0 to share a table). q_out must not overlap q, k or v.
#pragma once

#include <omni/dtype.cuh>

#include <climits>
#include <cstdint>

namespace omni {

template <typename T>
struct QKNormRopeParams {
  T const* q;         // (B, T, Hq, D)
  T const* k;         // (B, T, Hkv, D)
  T const* v;         // (B, T, Hkv, D)
  T const* q_weight;  // (D,) or null: no norm (then k_weight is ignored)
  T const* k_weight;  // (D,)
  T const* cos;       // (B, T, D)
  T const* sin;       // (B, T, D)
  void const* cache_positions;  // (T,) or (B, T) int64, or int32 when positions_int32
  int64_t pos_sb;               // positions' batch stride: 0 when (T,), shared by the batch
  T* k_cache;         // (B, Hkv, S, D)
  T* v_cache;         // (B, Hkv, S, D)
  T* q_out;           // (B, Hq, T, D)
  int64_t q_sb, q_st, q_sh, k_sb, k_st, k_sh, v_sb, v_st, v_sh;
  int64_t cos_sb, cos_st, sin_sb, sin_st;
  int64_t kc_sb, kc_sh, kc_ss, vc_sb, vc_sh, vc_ss;
  int64_t qo_sb, qo_sh, qo_st;
  int64_t batch, seq_len, q_heads, kv_heads, head_dim, cache_len;
  float eps;
  bool positions_int32;
};

namespace detail {

template <typename T>
__device__ __forceinline__ float Round(float v) {
  return ToFloat(FromFloat<T>(v));  // a no-op for float
}

template <typename T, int VEC>
__global__ void QKNormRopeKernel(QKNormRopeParams<T> const p, int const lanes, int const heads_per_block) {
  using V = Vec<T, VEC>;
  int const tok = blockIdx.x;
  int64_t const b = tok / static_cast<int>(p.seq_len);
  int64_t const t = tok % static_cast<int>(p.seq_len);
  int const sub = threadIdx.x & (lanes - 1);
  int const h_local = threadIdx.x / lanes;  // the last warp may overhang the block's heads: those idle
  int const h = blockIdx.y * heads_per_block + h_local;
  int const q_heads = static_cast<int>(p.q_heads);
  bool const active = h_local < heads_per_block && h < q_heads + static_cast<int>(p.kv_heads);
  bool const is_q = h < q_heads;
  int64_t const g = h - q_heads;  // key head when !is_q
  int const half = static_cast<int>(p.head_dim) / 2;
  int const chunks = half / VEC;
  bool const has_norm = p.q_weight != nullptr;

  T const* x = is_q ? p.q + b * p.q_sb + t * p.q_st + h * p.q_sh : p.k + b * p.k_sb + t * p.k_st + g * p.k_sh;
  T const* w = is_q ? p.q_weight : p.k_weight;

  float rstd = 1.f;
  if (has_norm) {  // uniform over the grid, so every lane reaches the shuffles
    float ss = 0.f;
    if (active) {
      for (int i = sub; i < chunks; i += lanes) {
        V const lo = reinterpret_cast<V const*>(x)[i];
        V const hi = reinterpret_cast<V const*>(x + half)[i];
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          float const a = ToFloat(lo.v[e]), c = ToFloat(hi.v[e]);
          ss += a * a + c * c;
        }
      }
    }
    // xor offsets below `lanes` stay inside the lane group; all 32 lanes of the warp take part
    for (int o = lanes >> 1; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    rstd = __frcp_rn(__fsqrt_rn(__fadd_rn(__fdiv_rn(ss, static_cast<float>(p.head_dim)), p.eps)));
  }
  if (!active) return;

  T* y;
  if (is_q) {
    y = p.q_out + b * p.qo_sb + h * p.qo_sh + t * p.qo_st;
  } else {
    int64_t const i = b * p.pos_sb + t;
    int64_t const slot = p.positions_int32 ? static_cast<int64_t>(static_cast<int32_t const*>(p.cache_positions)[i])
                                           : static_cast<int64_t const*>(p.cache_positions)[i];
    if (slot < 0 || slot >= p.cache_len) return;
    y = p.k_cache + b * p.kc_sb + g * p.kc_sh + slot * p.kc_ss;
    // the value row is a plain copy: 2 * chunks vectors
    T const* vr = p.v + b * p.v_sb + t * p.v_st + g * p.v_sh;
    T* vc = p.v_cache + b * p.vc_sb + g * p.vc_sh + slot * p.vc_ss;
    for (int i = sub; i < 2 * chunks; i += lanes) reinterpret_cast<V*>(vc)[i] = reinterpret_cast<V const*>(vr)[i];
  }
  T const* cs = p.cos + b * p.cos_sb + t * p.cos_st;
  T const* sn = p.sin + b * p.sin_sb + t * p.sin_st;

  for (int i = sub; i < chunks; i += lanes) {
    V const x_lo = reinterpret_cast<V const*>(x)[i], x_hi = reinterpret_cast<V const*>(x + half)[i];
    V const c_lo = reinterpret_cast<V const*>(cs)[i], c_hi = reinterpret_cast<V const*>(cs + half)[i];
    V const s_lo = reinterpret_cast<V const*>(sn)[i], s_hi = reinterpret_cast<V const*>(sn + half)[i];
    V w_lo, w_hi;
    if (has_norm) w_lo = reinterpret_cast<V const*>(w)[i], w_hi = reinterpret_cast<V const*>(w + half)[i];
    V y_lo, y_hi;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      float a = ToFloat(x_lo.v[e]), c = ToFloat(x_hi.v[e]);
      if (has_norm) {  // round the normalised value to T before the weight, then the product
        a = Round<T>(__fmul_rn(ToFloat(w_lo.v[e]), Round<T>(__fmul_rn(a, rstd))));
        c = Round<T>(__fmul_rn(ToFloat(w_hi.v[e]), Round<T>(__fmul_rn(c, rstd))));
      }
      // rotate_half(x) = (-x_hi, x_lo); (-c) * s == -(c * s) exactly, so the subtraction is the reference's sum
      y_lo.v[e] = FromFloat<T>(__fsub_rn(Round<T>(__fmul_rn(a, ToFloat(c_lo.v[e]))),
                                         Round<T>(__fmul_rn(c, ToFloat(s_lo.v[e])))));
      y_hi.v[e] = FromFloat<T>(__fadd_rn(Round<T>(__fmul_rn(c, ToFloat(c_hi.v[e]))),
                                         Round<T>(__fmul_rn(a, ToFloat(s_hi.v[e])))));
    }
    reinterpret_cast<V*>(y)[i] = y_lo;
    reinterpret_cast<V*>(y + half)[i] = y_hi;
  }
}

template <typename T, int VEC>
cudaError_t LaunchQKNormRope(QKNormRopeParams<T> const& p, cudaStream_t stream) {
  int const chunks = static_cast<int>(p.head_dim / 2 / VEC);
  int lanes = 1;
  while (lanes < chunks && lanes < 32) lanes <<= 1;
  // Up to 256 threads a block; the heads are spread evenly over the blocks of one token.
  int const heads = static_cast<int>(p.q_heads + p.kv_heads);
  int const blocks_y = (heads * lanes + 255) / 256;
  int const heads_per_block = (heads + blocks_y - 1) / blocks_y;
  int const threads = (heads_per_block * lanes + 31) / 32 * 32;  // whole warps: full-mask shuffles
  dim3 const grid(static_cast<unsigned>(p.batch * p.seq_len), static_cast<unsigned>(blocks_y));
  QKNormRopeParams<T> params = p;
  int heads_per_block_arg = heads_per_block;
  void* args[] = {&params, &lanes, &heads_per_block_arg};
  // cudaLaunchKernel returns the launch error (it also stays the thread's last error: the launcher clears it).
  return cudaLaunchKernel(reinterpret_cast<void const*>(&QKNormRopeKernel<T, VEC>), grid, dim3(threads), args, 0,
                          stream);
}

}  // namespace detail

// T is float, __half or __nv_bfloat16 for every tensor. head_dim must be even. Returns cudaErrorInvalidValue for
// sizes the kernel cannot index (B * T tokens or head_dim beyond INT_MAX, more than 65535
// heads, an odd head_dim).
template <typename T>
cudaError_t QKNormRope(QKNormRopeParams<T> const& p, cudaStream_t stream) {
  int64_t const tokens = p.batch * p.seq_len;
  if (tokens == 0 || p.q_heads + p.kv_heads == 0) return cudaSuccess;
  if (p.head_dim <= 0 || p.head_dim % 2 != 0 || p.head_dim > INT_MAX || tokens > INT_MAX || p.q_heads < 0 ||
      p.kv_heads < 0 || p.q_heads + p.kv_heads > 65535)  // blocks of one token: grid.y <= 65535
    return cudaErrorInvalidValue;
  constexpr int kVec = 16 / sizeof(T);
  // 128-bit access needs every row start (and row + D/2) of every tensor on a 16-byte boundary.
  bool const aligned = Aligned16(p.q) && Aligned16(p.k) && Aligned16(p.v) && Aligned16(p.cos) && Aligned16(p.sin) &&
                       Aligned16(p.k_cache) && Aligned16(p.v_cache) && Aligned16(p.q_out) &&
                       (p.q_weight == nullptr || (Aligned16(p.q_weight) && Aligned16(p.k_weight)));
  int64_t const strides[] = {p.q_sb,   p.q_st,   p.q_sh,  p.k_sb,  p.k_st,  p.k_sh,  p.v_sb,  p.v_st,
                             p.v_sh,   p.cos_sb, p.cos_st, p.sin_sb, p.sin_st, p.kc_sb, p.kc_sh, p.kc_ss,
                             p.vc_sb,  p.vc_sh,  p.vc_ss, p.qo_sb, p.qo_sh, p.qo_st};
  bool strides_ok = (p.head_dim / 2) % kVec == 0;
  for (int64_t const s : strides) strides_ok = strides_ok && s % kVec == 0;
  return aligned && strides_ok ? detail::LaunchQKNormRope<T, kVec>(p, stream)
                               : detail::LaunchQKNormRope<T, 1>(p, stream);
}

}  // namespace omni
