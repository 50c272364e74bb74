// Decode attention over a KV cache with grouped-query heads (flash-decoding), header-only; knows nothing of torch.
//
//   out[b, h, i, :] = sum_j softmax_j(scale * q[b, h, i, :] . k[b, h / groups, j, :]) v[b, h / groups, j, :]
//
// over the keys j visible to query i of row b: the Tq queries are the last of seq_lens[b] tokens, so query i sits
// at pos = seq_lens[b] - Tq + i and sees keys j <= pos, and j > pos - window with a sliding window.
//
// Phase 1 (DecodeSplitKernel): one CTA per (batch x KV head, split of the key axis). The CTA holds all
// rows = groups x Tq query rows of its KV head, so every K/V tile is read from HBM once for the whole group. Tiles
// of BN keys are streamed into shared memory with 128-bit cp.async (the next tile loads while this one computes),
// scores and the online softmax run in fp32 in log2 units (scale * log2 e folded in, exp2), and the CTA writes its
// normalised partial output and log2-sum-exp (fp32). Phase 2 (DecodeMergeKernel) weights the splits by
// exp2(lse_s - max lse) and divides by the weight sum, as the Triton reduce does. With one split, phase 1 writes
// the output directly. The split count comes from the workspace shape, never from seq_lens, and the lengths are
// read on the device, so a captured CUDA graph replays with new lengths; splits past a row's length do no work
// and write lse = -inf. Slots at or past seq_lens[b] are never read (cp.async with src-size 0 zero-fills).
//
// Limits: head_dim <= 256 and a multiple of 16 / sizeof(T) (whole 128-bit chunks); rows <= 32; K/V rows 16-byte
// aligned. q and out are read/written element by element through arbitrary strides (they are tiny).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <omni/cp_async.cuh>
#include <omni/dtype.cuh>

#include <climits>
#include <cstdint>

namespace omni {

template <typename T>
struct DecodeAttentionParams {
  T const* q;                 // [B, Hq, Tq, D] through q_stride
  T const* k;                 // [B, Hkv, S, D] through k_stride (b, h, s); D contiguous
  T const* v;                 // like k, through v_stride
  void const* seq_lens;       // [B], int32 or int64 (lens64)
  T* out;                     // [B, Hq, Tq, D] through out_stride
  float* partial_out;         // [B * Hkv, splits, rows, D] fp32, contiguous
  float* partial_lse;         // [B * Hkv, splits, rows] fp32, log2 units
  int64_t q_stride[4];
  int64_t k_stride[3];
  int64_t v_stride[3];
  int64_t out_stride[4];
  int batch, kv_heads, q_len, groups, cache_len, head_dim;
  int num_splits;             // 1 .. kDecodeMaxSplits
  int window;                 // <= 0: no window
  bool lens64;
  float qk_scale_log2;        // scale * log2(e)
};

constexpr int kDecodeThreads = 128;
constexpr int kDecodeMaxRows = 32;
constexpr int kDecodeMaxHeadDim = 256;
constexpr int kDecodeMaxSplits = 128;

namespace decode_detail {



// One 16-byte chunk of T, read from shared memory with one ld.shared.v4 and widened to fp32.
template <typename T>
struct alignas(16) Chunk {
  T v[16 / sizeof(T)];
};
template <typename T>
__device__ __forceinline__ void LoadChunk(T const* src, float (&f)[16 / sizeof(T)]) {
  Chunk<T> const c = *reinterpret_cast<Chunk<T> const*>(src);
#pragma unroll
  for (int e = 0; e < 16 / static_cast<int>(sizeof(T)); ++e) f[e] = ToFloat(c.v[e]);
}

// Running max starts finite (as the Triton kernel): alpha = exp2(m_old - m_new) never sees -inf - -inf.
constexpr float kMinusBig = -1.0e30f;

// Tile geometry for element type T and head-dim bucket DMAX (64, 128 or 256).
template <typename T, int DMAX>
struct Geometry {
  static constexpr int kVec = 16 / sizeof(T);                       // elements per 128-bit chunk
  static constexpr int kChunks = DMAX / kVec;                       // chunks per key row
  static constexpr int kBN = DMAX * sizeof(T) <= 256 ? 32 : 16;     // keys per tile (smem budget)
  static constexpr int kPitch = DMAX + kVec;                        // smem row pitch: +16 B moves consecutive
                                                                    // rows to the next 16 B bank group, so 8 lanes
                                                                    // reading one chunk of 8 rows are conflict-free
  static constexpr int kDParts = kDecodeThreads / kBN;              // scores: threads sharing one key (split of D)
  static constexpr int kGroups = kDecodeThreads / kChunks;          // P.V: threads sharing one chunk of D
  static_assert(kChunks % kDParts == 0 && kChunks <= kDecodeThreads, "tile geometry");
};

template <typename T, int DMAX, int ROWS>
constexpr size_t SplitSmemBytes() {
  using G = Geometry<T, DMAX>;
  return 4 * G::kBN * G::kPitch * sizeof(T)                         // 2 stages x (K, V) tiles
         + sizeof(float) * (ROWS * DMAX                             // q rows, fp32
                            + kDecodeThreads * ROWS                 // partial scores [kDParts][ROWS][BN]
                            + ROWS * G::kBN                         // probabilities [ROWS][BN]
                            + 2 * ROWS                              // per-tile rescale, final sum
                            + kDecodeThreads * G::kVec);            // key-split accumulators to combine
}

// Thread roles (128 threads, 4 warps), per tile of BN keys:
//  scores:  thread (key n = tid % BN, part dp = tid / BN) dots chunks dp, dp + kDParts, ... of key n with all ROWS
//           query rows (q broadcast from smem), then the kDParts partial dots are summed through smem;
//  softmax: warp w owns rows w, w + 4, ...: lane n holds the score of key n, online max/sum by shuffles;
//  P.V:     thread (chunk c = tid % kChunks, group g = tid / kChunks) accumulates chunk c of RPT rows over the
//           keys n = kq, kq + KS, ... (rows split RS ways, keys KS ways across the groups; key splits are summed
//           at the end, valid because all threads rescale by the same per-row alpha).
template <typename T, int DMAX, int ROWS>
__global__ void __launch_bounds__(kDecodeThreads) DecodeSplitKernel(DecodeAttentionParams<T> const p) {
  using G = Geometry<T, DMAX>;
  constexpr int VEC = G::kVec, CH = G::kChunks, BN = G::kBN, PITCH = G::kPitch, NDP = G::kDParts;
  constexpr int RS = G::kGroups < ROWS ? G::kGroups : ROWS;
  constexpr int KS = G::kGroups / RS;
  constexpr int RPT = ROWS / RS;
  constexpr int RPW = (ROWS + 3) / 4;
  static_assert(BN % KS == 0 && (KS == 1 || RPT == 1), "P.V split");

  extern __shared__ float4 smem4[];
  T* const kv_s = reinterpret_cast<T*>(smem4);                          // [2][2][BN][PITCH]
  float* const q_s = reinterpret_cast<float*>(kv_s + 4 * BN * PITCH);  // [ROWS][DMAX]
  float* const sp_s = q_s + ROWS * DMAX;                                // [NDP][ROWS][BN]
  float* const p_s = sp_s + NDP * ROWS * BN;                            // [ROWS][BN]
  float* const alpha_s = p_s + ROWS * BN;                               // [ROWS]
  float* const l_s = alpha_s + ROWS;                                    // [ROWS]
  float* const red_s = l_s + ROWS;                                      // [kDecodeThreads][VEC]

  int const tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  int const bh = blockIdx.x, split = blockIdx.y;
  int const b = bh / p.kv_heads, hk = bh % p.kv_heads;
  int const q_len = p.q_len, rows = p.groups * q_len, head_dim = p.head_dim;
  int const seq_len = p.lens64 ? static_cast<int>(static_cast<int64_t const*>(p.seq_lens)[b])
                               : static_cast<int32_t const*>(p.seq_lens)[b];

  // Keys of this CTA: the union of the rows' ranges (query 0 has the lowest start, query Tq-1 the highest end),
  // cut to this split. Splits are whole multiples of 32 keys, so tiles start aligned to BN within the split.
  int const split_len = ((p.cache_len + p.num_splits - 1) / p.num_splits + 31) / 32 * 32;
  int const kb = max(split * split_len, p.window > 0 ? seq_len - q_len - p.window + 1 : 0);
  int const ke = min(min(seq_len, p.cache_len), split * split_len + split_len);
  int const num_tiles = ke > kb ? (ke - kb + BN - 1) / BN : 0;

  T const* const k_head = p.k + b * p.k_stride[0] + hk * p.k_stride[1];
  T const* const v_head = p.v + b * p.v_stride[0] + hk * p.v_stride[1];
  auto load_tile = [&](int t) {
    int const key0 = kb + t * BN;
    T* const ks = kv_s + (t & 1) * 2 * BN * PITCH;
    T* const vs = ks + BN * PITCH;
    for (int i = tid; i < BN * CH; i += kDecodeThreads) {  // consecutive threads: consecutive 16 B of one row
      int const n = i / CH, c = i % CH;
      bool const ok = key0 + n < ke && c * VEC < head_dim;
      int64_t const key = ok ? key0 + n : 0;
      int const col = ok ? c * VEC : 0;
      CpAsync16(ks + n * PITCH + c * VEC, k_head + key * p.k_stride[2] + col, ok);
      CpAsync16(vs + n * PITCH + c * VEC, v_head + key * p.v_stride[2] + col, ok);
    }
    CpAsyncCommit();
  };
  if (num_tiles > 0) load_tile(0);

  // Query rows in fp32; rows past `rows` and columns past head_dim are zero. Row r is query r % Tq of head
  // hk * groups + r / Tq.
  for (int i = tid; i < ROWS * DMAX; i += kDecodeThreads) {
    int const r = i / DMAX, d = i % DMAX;
    float x = 0.f;
    if (r < rows && d < head_dim) {
      int const h = hk * p.groups + r / q_len, qi = r % q_len;
      x = ToFloat(p.q[b * p.q_stride[0] + h * p.q_stride[1] + qi * p.q_stride[2] + d * p.q_stride[3]]);
    }
    q_s[i] = x;
  }

  float m_run[RPW], l_run[RPW];
#pragma unroll
  for (int i = 0; i < RPW; ++i) m_run[i] = kMinusBig, l_run[i] = 0.f;
  float acc[RPT][VEC];
#pragma unroll
  for (int i = 0; i < RPT; ++i)
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[i][e] = 0.f;

  int const pv_c = tid % CH, pv_g = tid / CH, pv_rs = pv_g % RS, pv_kq = pv_g / RS;

  for (int t = 0; t < num_tiles; ++t) {
    CpAsyncWaitAll();
    __syncthreads();  // tile t is in smem for everyone, and everyone is done with tile t-1's buffers
    if (t + 1 < num_tiles) load_tile(t + 1);
    T const* const ks = kv_s + (t & 1) * 2 * BN * PITCH;
    T const* const vs = ks + BN * PITCH;

    {  // partial scores over this thread's chunks of key n
      int const n = tid % BN, dp = tid / BN;
      float s[ROWS];
#pragma unroll
      for (int r = 0; r < ROWS; ++r) s[r] = 0.f;
#pragma unroll
      for (int j = 0; j < CH / NDP; ++j) {
        int const c = dp + j * NDP;
        float kf[VEC];
        LoadChunk(ks + n * PITCH + c * VEC, kf);
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          float4 const* qv = reinterpret_cast<float4 const*>(q_s + r * DMAX + c * VEC);
#pragma unroll
          for (int e = 0; e < VEC / 4; ++e) {
            float4 const qq = qv[e];
            s[r] = fmaf(qq.x, kf[4 * e], s[r]);
            s[r] = fmaf(qq.y, kf[4 * e + 1], s[r]);
            s[r] = fmaf(qq.z, kf[4 * e + 2], s[r]);
            s[r] = fmaf(qq.w, kf[4 * e + 3], s[r]);
          }
        }
      }
#pragma unroll
      for (int r = 0; r < ROWS; ++r) sp_s[(dp * ROWS + r) * BN + n] = s[r];
    }
    __syncthreads();

    {  // online softmax, one warp per row; padding rows get p = 0, alpha = 1
      int const key = kb + t * BN + lane;
#pragma unroll
      for (int i = 0; i < RPW; ++i) {
        int const r = warp + 4 * i;
        if (r < ROWS) {  // warp-uniform
          float sc = -INFINITY;
          if (lane < BN && r < rows) {
            int const pos = seq_len - q_len + r % q_len;
            bool const visible = key < ke && key <= pos && (p.window <= 0 || key > pos - p.window);
            float dot = 0.f;
#pragma unroll
            for (int dp = 0; dp < NDP; ++dp) dot += sp_s[(dp * ROWS + r) * BN + lane];
            if (visible) sc = dot * p.qk_scale_log2;
          }
          float const m_new = fmaxf(m_run[i], WarpMax(sc));
          float const pr = exp2f(sc - m_new);
          float const alpha = exp2f(m_run[i] - m_new);
          l_run[i] = l_run[i] * alpha + WarpSum(pr);
          m_run[i] = m_new;
          if (lane < BN) p_s[r * BN + lane] = pr;
          if (lane == 0) alpha_s[r] = alpha;
        }
      }
    }
    __syncthreads();

    {  // acc = alpha * acc + P V for this thread's rows and keys
#pragma unroll
      for (int i = 0; i < RPT; ++i) {
        float const a = alpha_s[pv_rs + i * RS];
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[i][e] *= a;
      }
#pragma unroll 4
      for (int j = 0; j < BN / KS; ++j) {
        int const n = pv_kq + j * KS;
        float vf[VEC];
        LoadChunk(vs + n * PITCH + pv_c * VEC, vf);
#pragma unroll
        for (int i = 0; i < RPT; ++i) {
          float const pr = p_s[(pv_rs + i * RS) * BN + n];
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[i][e] = fmaf(pr, vf[e], acc[i][e]);
        }
      }
    }
  }

  // Sum the key-split accumulators into the kq == 0 threads; publish the row sums; write lse.
  if constexpr (KS > 1) {
    if (pv_kq > 0) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) red_s[tid * VEC + e] = acc[0][e];
    }
  }
  bool const single = p.num_splits == 1;
  int64_t const part_row0 = (static_cast<int64_t>(bh) * p.num_splits + split) * rows;
#pragma unroll
  for (int i = 0; i < RPW; ++i) {
    int const r = warp + 4 * i;
    if (r < ROWS && lane == 0) {
      l_s[r] = l_run[i];
      if (!single && r < rows)
        p.partial_lse[part_row0 + r] = l_run[i] > 0.f ? m_run[i] + log2f(l_run[i]) : -INFINITY;
    }
  }
  __syncthreads();
  if (pv_kq != 0) return;
  if constexpr (KS > 1) {
#pragma unroll
    for (int k2 = 1; k2 < KS; ++k2)
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[0][e] += red_s[(pv_c + CH * (pv_rs + RS * k2)) * VEC + e];
  }
  int const d0 = pv_c * VEC;
  if (d0 >= head_dim) return;  // head_dim is a multiple of VEC: a chunk is wholly in or out
#pragma unroll
  for (int i = 0; i < RPT; ++i) {
    int const r = pv_rs + i * RS;
    if (r >= rows) continue;
    float const l = l_s[r] > 0.f ? l_s[r] : 1.f;  // a row with no keys in this split: zeros, lse = -inf
    if (single) {
      int const h = hk * p.groups + r / q_len, qi = r % q_len;
      T* const o = p.out + b * p.out_stride[0] + h * p.out_stride[1] + qi * p.out_stride[2];
#pragma unroll
      for (int e = 0; e < VEC; ++e) o[(d0 + e) * p.out_stride[3]] = FromFloat<T>(acc[i][e] / l);
    } else {
      float4* const o = reinterpret_cast<float4*>(p.partial_out + (part_row0 + r) * head_dim + d0);
#pragma unroll
      for (int e = 0; e < VEC / 4; ++e)
        o[e] = make_float4(acc[i][4 * e] / l, acc[i][4 * e + 1] / l, acc[i][4 * e + 2] / l, acc[i][4 * e + 3] / l);
    }
  }
}

// One warp per (batch x KV head, row): out = sum_s w_s o_s / sum_s w_s with w_s = exp2(lse_s - max lse), fp32.
template <typename T>
__global__ void __launch_bounds__(kDecodeThreads) DecodeMergeKernel(DecodeAttentionParams<T> const p) {
  __shared__ float w_s[kDecodeThreads / 32][kDecodeMaxSplits];
  int const warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int const rows = p.groups * p.q_len, splits = p.num_splits, head_dim = p.head_dim;
  int64_t const row = static_cast<int64_t>(blockIdx.x) * (kDecodeThreads / 32) + warp;
  if (row >= static_cast<int64_t>(p.batch) * p.kv_heads * rows) return;  // warp-uniform, no barrier follows
  int64_t const bh = row / rows;
  int const r = static_cast<int>(row % rows);
  float const* const lse = p.partial_lse + bh * splits * rows + r;  // split s at lse[s * rows]

  float m = -INFINITY;
  for (int s = lane; s < splits; s += 32) m = fmaxf(m, lse[s * rows]);
  m = WarpMax(m);
  if (m == -INFINITY) m = 0.f;  // no keys at all: all weights 0, output 0
  float sum = 0.f;
  for (int s = lane; s < splits; s += 32) {
    float const w = exp2f(lse[s * rows] - m);
    w_s[warp][s] = w;
    sum += w;
  }
  sum = WarpSum(sum);
  __syncwarp();
  float const denom = sum > 0.f ? sum : 1.f;

  int const b = static_cast<int>(bh / p.kv_heads), hk = static_cast<int>(bh % p.kv_heads);
  int const h = hk * p.groups + r / p.q_len, qi = r % p.q_len;
  T* const o = p.out + b * p.out_stride[0] + h * p.out_stride[1] + qi * p.out_stride[2];
  float const* const po = p.partial_out + (bh * splits * rows + r) * head_dim;  // split s at po[s * rows * D]
  for (int d0 = lane * 4; d0 < head_dim; d0 += 128) {  // head_dim is a multiple of 4
    float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int s = 0; s < splits; ++s) {
      float const w = w_s[warp][s];
      float4 const x = *reinterpret_cast<float4 const*>(po + static_cast<int64_t>(s) * rows * head_dim + d0);
      a.x = fmaf(w, x.x, a.x), a.y = fmaf(w, x.y, a.y), a.z = fmaf(w, x.z, a.z), a.w = fmaf(w, x.w, a.w);
    }
    o[(d0 + 0) * p.out_stride[3]] = FromFloat<T>(a.x / denom);
    o[(d0 + 1) * p.out_stride[3]] = FromFloat<T>(a.y / denom);
    o[(d0 + 2) * p.out_stride[3]] = FromFloat<T>(a.z / denom);
    o[(d0 + 3) * p.out_stride[3]] = FromFloat<T>(a.w / denom);
  }
}

template <typename T, int DMAX, int ROWS>
cudaError_t LaunchDecode(DecodeAttentionParams<T> const& p, cudaStream_t stream) {
  auto const kernel = &DecodeSplitKernel<T, DMAX, ROWS>;
  constexpr size_t smem = SplitSmemBytes<T, DMAX, ROWS>();
  if (smem > 48 * 1024) {  // opt in to more than the default 48 KiB (a host-side attribute; fine under capture)
    cudaError_t const err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  void* args[] = {const_cast<DecodeAttentionParams<T>*>(&p)};
  dim3 const grid(static_cast<unsigned>(p.batch * p.kv_heads), static_cast<unsigned>(p.num_splits));
  cudaError_t err = cudaLaunchKernel(reinterpret_cast<void const*>(kernel), grid, dim3(kDecodeThreads), args,
                                     smem, stream);
  if (err != cudaSuccess || p.num_splits == 1) return err;
  int64_t const merge_rows = static_cast<int64_t>(p.batch) * p.kv_heads * p.groups * p.q_len;
  dim3 const merge_grid(static_cast<unsigned>((merge_rows + kDecodeThreads / 32 - 1) / (kDecodeThreads / 32)));
  return cudaLaunchKernel(reinterpret_cast<void const*>(&DecodeMergeKernel<T>), merge_grid, dim3(kDecodeThreads),
                          args, 0, stream);
}

template <typename T, int DMAX>
cudaError_t LaunchDecodeRows(DecodeAttentionParams<T> const& p, cudaStream_t stream) {
  int const rows = p.groups * p.q_len;
  if (rows <= 1) return LaunchDecode<T, DMAX, 1>(p, stream);
  if (rows <= 4) return LaunchDecode<T, DMAX, 4>(p, stream);
  if (rows <= 8) return LaunchDecode<T, DMAX, 8>(p, stream);
  if (rows <= 16) return LaunchDecode<T, DMAX, 16>(p, stream);
  return LaunchDecode<T, DMAX, 32>(p, stream);
}

}  // namespace decode_detail

// T is float, __half or __nv_bfloat16. Returns cudaErrorInvalidValue for shapes outside the limits above.
template <typename T>
cudaError_t DecodeAttention(DecodeAttentionParams<T> const& p, cudaStream_t stream) {
  int64_t const rows = static_cast<int64_t>(p.groups) * p.q_len;
  if (p.batch == 0 || p.kv_heads == 0 || rows == 0) return cudaSuccess;
  constexpr int vec = 16 / sizeof(T);
  if (p.batch < 0 || p.kv_heads < 0 || rows < 0 || rows > kDecodeMaxRows || p.head_dim <= 0 ||
      p.head_dim > kDecodeMaxHeadDim || p.head_dim % vec != 0 || p.num_splits < 1 ||
      p.num_splits > kDecodeMaxSplits || p.cache_len < 0 || static_cast<int64_t>(p.batch) * p.kv_heads > INT_MAX)
    return cudaErrorInvalidValue;
  if (p.head_dim <= 64) return decode_detail::LaunchDecodeRows<T, 64>(p, stream);
  if (p.head_dim <= 128) return decode_detail::LaunchDecodeRows<T, 128>(p, stream);
  return decode_detail::LaunchDecodeRows<T, 256>(p, stream);
}

}  // namespace omni
