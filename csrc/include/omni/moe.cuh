// Fused mixture-of-experts feed-forward (routing, expert SwiGLU MLPs, weighted combine), header-only; knows nothing
// of torch.
//
//   p        = softmax(logits[t, :]) in fp32, w, ids = top-k of p (ties: lowest expert id), w /= sum w if asked
//   h[q]     = silu(x[t] . Wgu[e, n]) * (x[t] . Wgu[e, I + n])       for pair q = t * K + k routed to e = ids[q]
//   rows[q]  = w[q] * (h[q] . Wd[e, :])                              (P = T * K pair rows, in (token, slot) order)
//   out[t]   = sum_k rows[t * K + k]                                 in fp32, in rank order, rounded once
//
// Rounding follows the reference (omni_kernels/moe.py, torch semantics on the model dtype): gate and up are each
// rounded to T, silu runs in fp32 on the rounded gate and is rounded, the product is rounded; the down output y is
// rounded, then y * w is rounded; the combine sums the rounded rows in fp32 and rounds once. With T = float every
// rounding is the identity and all arithmetic is fp32 (no TF32).
//
// Kernels, all launched on one stream with no host synchronisation (CUDA-graph capturable):
//  1. MoeRouteKernel: one warp per token; the fp32 probabilities live in shared memory (E <= kMoeMaxExperts).
//  2. Decode (T <= kMoeDecodeMaxTokens), no sort: MoeGemvKernel, one CTA per (pair, tile of output columns). The
//     first pair of each expert gathers every pair routed to that expert (at most T: a token picks an expert once)
//     and computes all their rows, so each selected weight row is read from HBM once; later pairs of the same
//     expert exit at once. Each warp streams 4 weight rows with 16-byte loads, 2 chunks deep (8 loads in flight a
//     lane), dots them with every gathered activation row (L1/L2-resident) in fp32, and reduces across lanes.
//  3. Prefill: MoeAlignKernel sorts the pairs by expert (stable) into runs padded to kMoeBlockM rows, all on the
//     device; buffers are sized by MoeMaxBlocks (an upper bound), blocks past the used count exit. Then two grouped
//     GEMMs over (block of 64 sorted pairs, tile of 64 output columns): MoeTcGemmKernel on tensor cores for
//     half/bf16 (WMMA 16x16x16, fp32 accumulate, cp.async double buffering), MoeSimtGemmKernel with fp32 FMAs for
//     float and for layouts the 16-byte loads cannot take. gate_up computes the gate and the up tile in one CTA.
//  4. MoeCombineKernel: out[t] = sum over the K rows of token t.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <omni/cp_async.cuh>
#include <omni/dtype.cuh>

#include <climits>
#include <cstdint>
#include <type_traits>

namespace omni {

constexpr int kMoeMaxExperts = 1024;      // routing and align keep one fp32 / int per expert in shared memory
constexpr int kMoeDecodeMaxTokens = 16;   // up to this many tokens: the decode (GEMV) path
constexpr int kMoeBlockM = 64;            // prefill: sorted pair rows per tile (each expert's run is padded to it)

template <typename T>
struct MoeRouteParams {
  T const* logits;            // [T, E] through logits_stride
  T* weights;                 // [T, K] contiguous
  int32_t* ids;               // [T, K] contiguous
  int64_t logits_stride[2];
  int num_tokens, num_experts, top_k;
  bool renormalize;
};

template <typename T>
struct MoeParams {
  T const* x;                 // [T, H] through x_stride
  T const* logits;            // [T, E] through logits_stride
  T const* w_gate_up;         // [E, 2I, H] through w_gate_up_stride, gate rows first
  T const* w_down;            // [E, H, I] through w_down_stride
  T* out;                     // [T, H] through out_stride
  int64_t x_stride[2];
  int64_t logits_stride[2];
  int64_t w_gate_up_stride[3];
  int64_t w_down_stride[3];
  int64_t out_stride[2];
  // Workspaces (contiguous), P = T * K:
  T* weights;                 // [P] router weight of each pair
  int32_t* ids;               // [P] expert of each pair
  T* h;                       // [P, I] silu(gate) * up; 16-byte aligned
  T* rows;                    // [P, H] weighted down rows
  int32_t* sorted_pairs;      // prefill: [MoeMaxBlocks * kMoeBlockM] pair of each sorted slot, P for padding
  int32_t* block_expert;      // prefill: [MoeMaxBlocks] expert of each block
  int32_t* num_padded;        // prefill: [1] sorted slots in use
  int num_tokens, num_experts, top_k, hidden, inter;
  bool renormalize;
};

// Upper bound on the number of kMoeBlockM-row blocks the align kernel uses for P pairs over E experts: the n <=
// min(E, P) experts in use hold sum_e ceil(c_e / BM) <= (P + n (BM - 1)) / BM blocks, and every block holds a pair.
inline int64_t MoeMaxBlocks(int64_t num_pairs, int64_t num_experts) {
  int64_t const used = num_experts < num_pairs ? num_experts : num_pairs;
  int64_t const bound = (num_pairs + used * (kMoeBlockM - 1)) / kMoeBlockM;
  return bound < num_pairs ? bound : num_pairs;
}

// Whether the prefill path runs (the align workspaces are needed).
inline bool MoeUsesPrefill(int num_tokens) { return num_tokens > kMoeDecodeMaxTokens; }

namespace moe_detail {

// The reference's epilogues, in its rounding order (see the file comment).
template <typename T>
__device__ __forceinline__ T SiluMul(float gate, float up) {
  float const g = ToFloat(FromFloat<T>(gate));
  float const u = ToFloat(FromFloat<T>(up));
  float const act = ToFloat(FromFloat<T>(g / (1.0f + expf(-g))));
  return FromFloat<T>(act * u);
}
template <typename T>
__device__ __forceinline__ T Weighted(float y, T w) {
  return FromFloat<T>(ToFloat(FromFloat<T>(y)) * ToFloat(w));
}

// ------------------------------------------------------------------------------------------------------ routing
constexpr int kRouteWarps = 4;

// Warp per token. Lane l owns experts l, l + 32, ...: softmax and each top-k step scan only the lane's own
// probabilities, then a butterfly argmax (larger value, then lower id) leaves the winner in every lane. A picked
// expert is marked -1 so it cannot win again; NaN probabilities rank as -0.5, below every real one and above the
// marks, so the K ids are always distinct and in range.
template <typename T>
__global__ void __launch_bounds__(kRouteWarps * 32) MoeRouteKernel(MoeRouteParams<T> const p) {
  __shared__ float probs_s[kRouteWarps][kMoeMaxExperts];
  __shared__ float picked_s[kRouteWarps][kMoeMaxExperts];
  int const warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int64_t const t = static_cast<int64_t>(blockIdx.x) * kRouteWarps + warp;
  if (t >= p.num_tokens) return;  // warp-uniform; only warp-level syncs follow
  int const num_experts = p.num_experts, top_k = p.top_k;
  float* const probs = probs_s[warp];
  float* const picked = picked_s[warp];
  T const* const row = p.logits + t * p.logits_stride[0];

  float m = -INFINITY;
  for (int e = lane; e < num_experts; e += 32) {
    float const v = ToFloat(row[e * p.logits_stride[1]]);
    probs[e] = v;
    m = fmaxf(m, v);
  }
  m = WarpMax(m);
  float s = 0.f;
  for (int e = lane; e < num_experts; e += 32) {
    float const v = expf(probs[e] - m);
    probs[e] = v;
    s += v;
  }
  s = WarpSum(s);
  for (int e = lane; e < num_experts; e += 32) probs[e] = probs[e] / s;

  float sum = 0.f;  // lane 0: the picked probabilities summed in rank order (renormalisation)
  for (int k = 0; k < top_k; ++k) {
    float best = -2.f;
    int best_id = INT_MAX;
    for (int e = lane; e < num_experts; e += 32) {  // ascending ids: strict > keeps the lowest id of a tie
      float v = probs[e];
      v = v != v ? -0.5f : v;
      if (v > best) best = v, best_id = e;
    }
    for (int o = 16; o > 0; o >>= 1) {
      float const ov = __shfl_xor_sync(0xffffffffu, best, o);
      int const oi = __shfl_xor_sync(0xffffffffu, best_id, o);
      if (ov > best || (ov == best && oi < best_id)) best = ov, best_id = oi;
    }
    if ((best_id & 31) == lane) probs[best_id] = -1.f;  // the owner marks it
    if (lane == 0) {
      float const w = best < 0.f ? NAN : best;
      picked[k] = w;
      sum += w;
      p.ids[t * top_k + k] = best_id;
    }
  }
  sum = __shfl_sync(0xffffffffu, sum, 0);
  __syncwarp();  // lane 0's picked[] is visible to the warp
  for (int k = lane; k < top_k; k += 32)
    p.weights[t * top_k + k] = FromFloat<T>(p.renormalize ? picked[k] / sum : picked[k]);
}

// ------------------------------------------------------------------------------------------------ decode (GEMV)
constexpr int kGemvThreads = 128;
constexpr int kGemvWarps = kGemvThreads / 32;
constexpr int kGemvWeightRows = 4;  // weight rows per warp: 2 gate + 2 up columns, or 4 down columns
constexpr int kGemvDepth = 2;       // 16-byte chunks per weight row in flight per lane

template <bool GATE_UP>
__host__ __device__ constexpr int GemvColumnsPerCta() {
  return kGemvWarps * (GATE_UP ? kGemvWeightRows / 2 : kGemvWeightRows);
}

// Gathers, in warp 0, the pairs routed to this CTA's expert into pairs_s (in pair order) and returns their count to
// every thread, or 0 when an earlier pair has the same expert (that pair's CTA computes these rows). Whole-CTA call.
__device__ __forceinline__ int GatherExpertPairs(int32_t const* ids, int num_pairs, int pair, int expert,
                                                 int* pairs_s, int* count_s) {
  int const lane = threadIdx.x & 31;
  if (threadIdx.x < 32) {
    int count = 0;
    bool leader = true;
    for (int base = 0; base < num_pairs && leader; base += 32) {  // `leader` is warp-uniform
      int const i = base + lane;
      bool const match = i < num_pairs && ids[i] == expert;
      unsigned const mask = __ballot_sync(0xffffffffu, match);
      if (__ballot_sync(0xffffffffu, match && i < pair)) leader = false;
      int const pos = count + __popc(mask & ((1u << lane) - 1u));
      if (match && pos < kMoeDecodeMaxTokens) pairs_s[pos] = i;
      count += __popc(mask);
    }
    if (lane == 0) *count_s = leader ? (count < kMoeDecodeMaxTokens ? count : kMoeDecodeMaxTokens) : 0;
  }
  __syncthreads();
  return *count_s;
}

// GATE_UP: output column n of the CTA's tile is h[q, n] for each gathered pair q (weight rows n and I + n of
// Wgu[e], activation x[q / K]); otherwise rows[q, n] (weight row n of Wd[e], activation h[q]). Warp w takes output
// columns tile * BN + w * C + [0, C) with C = 2 (gate_up) or 4 (down). Lane l reads chunks l, l + 32, ... of VEC
// elements of each weight row; VEC = 16 / sizeof(T) needs unit stride along the reduction, 16-byte aligned rows and
// a depth that is a multiple of VEC (checked by the launcher), VEC = 1 takes any strides. ROWS >= the number of
// gathered pairs (<= T <= kMoeDecodeMaxTokens).
template <typename T, int VEC, int ROWS, bool GATE_UP>
__global__ void __launch_bounds__(kGemvThreads) MoeGemvKernel(MoeParams<T> const p) {
  constexpr int NW = kGemvWeightRows, U = kGemvDepth;
  constexpr int C = GATE_UP ? NW / 2 : NW;
  constexpr int BN = GemvColumnsPerCta<GATE_UP>();
  __shared__ int pairs_s[kMoeDecodeMaxTokens];
  __shared__ int count_s;
  int const warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int const num_pairs = p.num_tokens * p.top_k;
  int const n_out = GATE_UP ? p.inter : p.hidden;
  int const depth = GATE_UP ? p.hidden : p.inter;
  int const tiles = (n_out + BN - 1) / BN;
  int const pair = static_cast<int>(blockIdx.x / tiles), tile = static_cast<int>(blockIdx.x % tiles);
  int const expert = p.ids[pair];
  int rows = GatherExpertPairs(p.ids, num_pairs, pair, expert, pairs_s, &count_s);
  if (rows == 0) return;  // CTA-uniform
  rows = rows < ROWS ? rows : ROWS;  // <= T <= ROWS already: the router's ids of a token are distinct

  int64_t const* const ws = GATE_UP ? p.w_gate_up_stride : p.w_down_stride;
  T const* const w_expert = (GATE_UP ? p.w_gate_up : p.w_down) + expert * ws[0];
  int const col0 = tile * BN + warp * C;
  T const* w_row[NW];
  bool w_ok[NW];
#pragma unroll
  for (int j = 0; j < NW; ++j) {
    int const c = col0 + j % C;
    w_ok[j] = c < n_out;
    int64_t const wr = !w_ok[j] ? 0 : (GATE_UP && j >= C ? p.inter + c : c);
    w_row[j] = w_expert + wr * ws[1];
  }
  T const* a_row[ROWS];
  int64_t a_step;  // element stride along the reduction (1 for VEC > 1)
  if constexpr (GATE_UP) {
    a_step = p.x_stride[1];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) a_row[r] = p.x + (pairs_s[r < rows ? r : 0] / p.top_k) * p.x_stride[0];
  } else {
    a_step = 1;
#pragma unroll
    for (int r = 0; r < ROWS; ++r) a_row[r] = p.h + static_cast<int64_t>(pairs_s[r < rows ? r : 0]) * p.inter;
  }
  int64_t const w_step = ws[2];

  float acc[ROWS][NW];
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
#pragma unroll
    for (int j = 0; j < NW; ++j) acc[r][j] = 0.f;

  for (int k0 = lane * VEC; k0 < depth; k0 += 32 * VEC * U) {
    Vec<T, VEC> wv[U][NW];
#pragma unroll
    for (int u = 0; u < U; ++u) {  // every weight load of this step first: U * NW loads in flight
      int const k = k0 + u * 32 * VEC;
#pragma unroll
      for (int j = 0; j < NW; ++j) {
        if (w_ok[j] && k < depth) {
          if constexpr (VEC > 1) {
            wv[u][j] = *reinterpret_cast<Vec<T, VEC> const*>(w_row[j] + k);
          } else {
            wv[u][j].v[0] = w_row[j][k * w_step];
          }
        } else {
#pragma unroll
          for (int e = 0; e < VEC; ++e) wv[u][j].v[e] = FromFloat<T>(0.f);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      int const k = k0 + u * 32 * VEC;
      if (k >= depth) break;
      float wf[NW][VEC];
#pragma unroll
      for (int j = 0; j < NW; ++j)
#pragma unroll
        for (int e = 0; e < VEC; ++e) wf[j][e] = ToFloat(wv[u][j].v[e]);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        if (r < rows) {
          Vec<T, VEC> av;
          if constexpr (VEC > 1) {
            av = *reinterpret_cast<Vec<T, VEC> const*>(a_row[r] + k);
          } else {
            av.v[0] = a_row[r][k * a_step];
          }
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            float const a = ToFloat(av.v[e]);
#pragma unroll
            for (int j = 0; j < NW; ++j) acc[r][j] = fmaf(a, wf[j][e], acc[r][j]);
          }
        }
      }
    }
  }

  // Butterfly sums leave every total in every lane; lane r % 32 writes row r.
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    if (r < rows) {
      float tot[NW];
#pragma unroll
      for (int j = 0; j < NW; ++j) tot[j] = WarpSum(acc[r][j]);
      if (lane == (r & 31)) {
        int64_t const q = pairs_s[r];
#pragma unroll
        for (int c = 0; c < C; ++c) {
          if (!w_ok[c]) continue;
          if constexpr (GATE_UP) {
            p.h[q * p.inter + col0 + c] = SiluMul<T>(tot[c], tot[C + c]);
          } else {
            p.rows[q * p.hidden + col0 + c] = Weighted<T>(tot[c], p.weights[q]);
          }
        }
      }
    }
  }
}

// --------------------------------------------------------------------------------------------- prefill: align
constexpr int kAlignThreads = 1024;  // one thread per expert in the scan (E <= kMoeMaxExperts)
constexpr int kAlignChunk = 4096;    // ids staged in shared memory per scatter round (16 KiB)

// One CTA. (1) per-expert counts with shared atomics; (2) block-wide exclusive scan of the counts rounded up to
// kMoeBlockM: expert e owns slots [start_e, end_e) and blocks [start_e, end_e) / BM; (3) every slot is set to P
// (padding: no pair), then warp 0 walks the pairs 32 at a time in pair order and writes each to cursor[e] + its rank
// among the lanes of the same expert (__match_any_sync), so each expert's run keeps pair order (stable) and the
// sorted order does not depend on scheduling. The walk is serial in steps of 32 pairs (~40 cycles each: ~20 us for
// 4096 tokens x top-8), small next to the GEMMs at those sizes.
template <int BM>  // kMoeBlockM; a template, so that files including this header do not each define it
__global__ void __launch_bounds__(kAlignThreads) MoeAlignKernel(int32_t const* ids, int num_pairs, int num_experts,
                                                                int max_blocks, int32_t* sorted_pairs,
                                                                int32_t* block_expert, int32_t* num_padded) {
  __shared__ int count_s[kMoeMaxExperts];
  __shared__ int cursor_s[kMoeMaxExperts];
  __shared__ int warp_s[kAlignThreads / 32];
  __shared__ int ids_s[kAlignChunk];
  int const tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  count_s[tid] = 0;
  int64_t const slots = static_cast<int64_t>(max_blocks) * BM;
  for (int64_t i = tid; i < slots; i += kAlignThreads) sorted_pairs[i] = num_pairs;
  __syncthreads();
  for (int i = tid; i < num_pairs; i += kAlignThreads) atomicAdd(&count_s[ids[i]], 1);
  __syncthreads();

  int const padded = tid < num_experts ? (count_s[tid] + BM - 1) / BM * BM : 0;
  int v = padded;  // inclusive scan within the warp, then over the warp totals
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    int const n = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += n;
  }
  if (lane == 31) warp_s[warp] = v;
  __syncthreads();
  if (warp == 0) {
    int w = warp_s[lane];
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      int const n = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += n;
    }
    warp_s[lane] = w;
  }
  __syncthreads();
  int const end = v + (warp > 0 ? warp_s[warp - 1] : 0);
  int const start = end - padded;
  int const total = warp_s[kAlignThreads / 32 - 1];
  if (tid < num_experts) {
    cursor_s[tid] = start;
    for (int b = start / BM; b < end / BM; ++b) block_expert[b] = tid;
  }
  for (int b = total / BM + tid; b < max_blocks; b += kAlignThreads) block_expert[b] = 0;  // unused
  if (tid == 0) *num_padded = total;
  __syncthreads();

  // Stable scatter, in chunks of kAlignChunk ids staged in shared memory by the whole CTA (warp 0 then walks them
  // at shared-memory latency instead of one dependent global load per 32 pairs).
  for (int chunk0 = 0; chunk0 < num_pairs; chunk0 += kAlignChunk) {  // CTA-uniform
    int const n = num_pairs - chunk0 < kAlignChunk ? num_pairs - chunk0 : kAlignChunk;
    for (int i = tid; i < n; i += kAlignThreads) ids_s[i] = ids[chunk0 + i];
    __syncthreads();
    if (warp == 0) {
      for (int base = 0; base < n; base += 32) {
        int const i = base + lane;
        bool const valid = i < n;
        unsigned const active = __ballot_sync(0xffffffffu, valid);
        int e = 0, add = 0;
        if (valid) {
          e = ids_s[i];
          unsigned const same = __match_any_sync(active, e);
          int const rank = __popc(same & ((1u << lane) - 1u));
          sorted_pairs[cursor_s[e] + rank] = chunk0 + i;
          add = rank == 0 ? __popc(same) : 0;
        }
        __syncwarp();  // every lane has read cursor_s before the run leaders advance it
        if (add) cursor_s[e] += add;
        __syncwarp();
      }
    }
    __syncthreads();  // warp 0 is done with ids_s before the next chunk overwrites it
  }
}

// -------------------------------------------------------------------------------------- prefill: grouped GEMMs
// Both GEMM kernels: CTA (block m of sorted slots, tile n of output columns) computes a BM x BN tile of
// A[pairs of block m] . W[expert of block m][n-tile]^T over the reduction depth, then the epilogue writes each valid
// row at its pair's (unsorted) row of h or rows. Padding slots (pair == P) load zeros and are not written.
constexpr int kTcBM = kMoeBlockM, kTcBN = 64, kTcBK = 32, kTcThreads = 128;
constexpr int kTcVec = 8;                // 16-byte chunks of half/bf16
constexpr int kTcPitch = kTcBK + 8;      // smem row pitch (80 B): rows of a 16-row fragment fall in distinct bank
                                         // groups, and every fragment start stays 32-byte aligned as WMMA requires
constexpr int kTcCPitch = kTcBN + 4;     // fp32 epilogue pitch (272 B: 16-row fragment offsets stay 32 B aligned)

template <bool GATE_UP>
__host__ __device__ constexpr size_t TcSmemBytes() {
  constexpr int nb = GATE_UP ? 2 : 1;
  constexpr size_t pipe = 2 * static_cast<size_t>(kTcBM + nb * kTcBN) * kTcPitch * 2;  // 2 stages, 2-byte T
  constexpr size_t epi = static_cast<size_t>(nb) * kTcBM * kTcCPitch * sizeof(float);
  return pipe > epi ? pipe : epi;
}

// Tensor cores (T = half or bf16). 4 warps in a 2 x 2 grid, each a 32 x 32 sub-tile = 2 x 2 WMMA 16x16x16
// fragments per weight tile (gate_up: a gate and an up set, 8 accumulators). Per BK = 32 step a stage holds the
// A tile [BM][BK] and NB weight tiles [BN][BK] (k contiguous: a weight tile read as col-major B); 16-byte cp.async
// chunks (.cg: weights stream through L2, not L1) fill stage s + 1 while stage s computes. Chunks past the depth
// or the columns, and padding rows, are zero-filled (src-size 0) and read nothing. Needs 16-byte aligned rows with
// unit stride along the reduction and depth % 8 == 0 (launcher). The accumulators go through shared memory (reusing
// the stages) for the element-wise epilogue, written coalesced along the columns.
template <typename T, bool GATE_UP>
__global__ void __launch_bounds__(kTcThreads) MoeTcGemmKernel(MoeParams<T> const p) {
  using namespace nvcuda;
  static_assert(sizeof(T) == 2, "tensor-core path: half or bf16");
  constexpr int NB = GATE_UP ? 2 : 1;
  constexpr int BM = kTcBM, BN = kTcBN, BK = kTcBK, PITCH = kTcPitch, CPITCH = kTcCPitch;
  constexpr int STAGE = (BM + NB * BN) * PITCH;  // elements per stage
  constexpr int CPR = BK / kTcVec;               // 16-byte chunks per tile row
  __shared__ __align__(128) unsigned char smem[TcSmemBytes<GATE_UP>()];
  __shared__ int pairs_s[BM];

  int const tid = threadIdx.x, warp = tid >> 5;
  int const n_out = GATE_UP ? p.inter : p.hidden;
  int const depth = GATE_UP ? p.hidden : p.inter;
  int const n_tiles = (n_out + BN - 1) / BN;
  int const m_block = static_cast<int>(blockIdx.x / n_tiles), n_tile = static_cast<int>(blockIdx.x % n_tiles);
  if (m_block * BM >= *p.num_padded) return;  // CTA-uniform: a block past the used slots
  int const num_pairs = p.num_tokens * p.top_k;
  int const expert = p.block_expert[m_block];
  for (int i = tid; i < BM; i += kTcThreads) pairs_s[i] = p.sorted_pairs[static_cast<int64_t>(m_block) * BM + i];
  __syncthreads();

  int64_t const* const ws = GATE_UP ? p.w_gate_up_stride : p.w_down_stride;
  T const* const w_expert = (GATE_UP ? p.w_gate_up : p.w_down) + expert * ws[0];
  T const* const a_base = GATE_UP ? p.x : p.h;
  T* const stages = reinterpret_cast<T*>(smem);

  auto load_stage = [&](int kt) {
    int const k0 = kt * BK;
    T* const as = stages + (kt & 1) * STAGE;
    T* const bs = as + BM * PITCH;
    for (int c = tid; c < BM * CPR; c += kTcThreads) {  // A: gathered activation rows
      int const r = c / CPR, k = k0 + (c % CPR) * kTcVec;
      int const q = pairs_s[r];
      bool const ok = q < num_pairs && k < depth;
      T const* src = a_base;
      if (ok) src = GATE_UP ? p.x + (q / p.top_k) * p.x_stride[0] + k : p.h + static_cast<int64_t>(q) * p.inter + k;
      CpAsync16(as + r * PITCH + (c % CPR) * kTcVec, src, ok);
    }
    for (int c = tid; c < NB * BN * CPR; c += kTcThreads) {  // weight tiles (gate, then up)
      int const b = c / (BN * CPR), n = (c / CPR) % BN, k = k0 + (c % CPR) * kTcVec;
      int const col = n_tile * BN + n;
      bool const ok = col < n_out && k < depth;
      T const* src = w_expert;
      if (ok) src = w_expert + static_cast<int64_t>(b == 0 ? col : p.inter + col) * ws[1] + k;
      CpAsync16(bs + (b * BN + n) * PITCH + (c % CPR) * kTcVec, src, ok);
    }
    CpAsyncCommit();
  };

  int const wm = warp >> 1, wn = warp & 1;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[NB][2][2];
#pragma unroll
  for (int b = 0; b < NB; ++b)
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[b][i][j], 0.f);

  int const num_k = (depth + BK - 1) / BK;
  load_stage(0);
  for (int kt = 0; kt < num_k; ++kt) {
    CpAsyncWaitAll();
    __syncthreads();  // stage kt is in smem for everyone, and everyone is done computing on stage kt - 1
    if (kt + 1 < num_k) load_stage(kt + 1);
    T const* const as = stages + (kt & 1) * STAGE;
    T const* const bs = as + BM * PITCH;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], as + (wm * 32 + i * 16) * PITCH + kk, PITCH);
#pragma unroll
      for (int b = 0; b < NB; ++b) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bf;
          wmma::load_matrix_sync(bf, bs + (b * BN + wn * 32 + j * 16) * PITCH + kk, PITCH);
#pragma unroll
          for (int i = 0; i < 2; ++i) wmma::mma_sync(acc[b][i][j], a[i], bf, acc[b][i][j]);
        }
      }
    }
  }
  __syncthreads();  // all warps are done with the stages: reuse them for the fp32 tiles

  float* const cs = reinterpret_cast<float*>(smem);  // [NB][BM][CPITCH]
#pragma unroll
  for (int b = 0; b < NB; ++b)
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(cs + (b * BM + wm * 32 + i * 16) * CPITCH + wn * 32 + j * 16, acc[b][i][j], CPITCH,
                                wmma::mem_row_major);
  __syncthreads();
  for (int i = tid; i < BM * BN; i += kTcThreads) {
    int const r = i / BN, c = i % BN;
    int const q = pairs_s[r], col = n_tile * BN + c;
    if (q >= num_pairs || col >= n_out) continue;
    if constexpr (GATE_UP) {
      p.h[static_cast<int64_t>(q) * p.inter + col] = SiluMul<T>(cs[r * CPITCH + c], cs[(BM + r) * CPITCH + c]);
    } else {
      p.rows[static_cast<int64_t>(q) * p.hidden + col] = Weighted<T>(cs[r * CPITCH + c], p.weights[q]);
    }
  }
}

// CUDA cores, any T and any strides (fp32 always: the reference computes fp32 in fp32). 256 threads as 16 x 16;
// thread (ty, tx) owns rows ty + 16 i and columns tx + 16 j (i, j < 4) of the 64 x 64 tile (per weight tile), so a
// warp reads 2 A values (broadcast) and 16 consecutive B values per k from shared memory. BK = 16, one stage.
constexpr int kSimtBM = kMoeBlockM, kSimtBN = 64, kSimtBK = 16, kSimtThreads = 256;

template <typename T, bool GATE_UP>
__global__ void __launch_bounds__(kSimtThreads) MoeSimtGemmKernel(MoeParams<T> const p) {
  constexpr int NB = GATE_UP ? 2 : 1;
  constexpr int BM = kSimtBM, BN = kSimtBN, BK = kSimtBK;
  __shared__ float as[BK][BM + 1];      // [k][row]: +1 keeps the transposed stores conflict-free
  __shared__ float bs[NB][BK][BN + 1];  // [b][k][col]
  __shared__ int pairs_s[BM];

  int const tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  int const n_out = GATE_UP ? p.inter : p.hidden;
  int const depth = GATE_UP ? p.hidden : p.inter;
  int const n_tiles = (n_out + BN - 1) / BN;
  int const m_block = static_cast<int>(blockIdx.x / n_tiles), n_tile = static_cast<int>(blockIdx.x % n_tiles);
  if (m_block * BM >= *p.num_padded) return;  // CTA-uniform
  int const num_pairs = p.num_tokens * p.top_k;
  int const expert = p.block_expert[m_block];
  for (int i = tid; i < BM; i += kSimtThreads) pairs_s[i] = p.sorted_pairs[static_cast<int64_t>(m_block) * BM + i];
  __syncthreads();

  int64_t const* const ws = GATE_UP ? p.w_gate_up_stride : p.w_down_stride;
  T const* const w_expert = (GATE_UP ? p.w_gate_up : p.w_down) + expert * ws[0];
  float acc[NB][4][4];
#pragma unroll
  for (int b = 0; b < NB; ++b)
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[b][i][j] = 0.f;

  for (int k0 = 0; k0 < depth; k0 += BK) {
    for (int e = tid; e < BM * BK; e += kSimtThreads) {  // k fastest: consecutive threads, consecutive elements
      int const r = e / BK, k = k0 + e % BK;
      int const q = pairs_s[r];
      float v = 0.f;
      if (q < num_pairs && k < depth) {
        v = GATE_UP ? ToFloat(p.x[(q / p.top_k) * p.x_stride[0] + k * p.x_stride[1]])
                    : ToFloat(p.h[static_cast<int64_t>(q) * p.inter + k]);
      }
      as[e % BK][r] = v;
    }
    for (int e = tid; e < NB * BN * BK; e += kSimtThreads) {
      int const b = e / (BN * BK), n = (e / BK) % BN, k = k0 + e % BK;
      int const col = n_tile * BN + n;
      float v = 0.f;
      if (col < n_out && k < depth)
        v = ToFloat(w_expert[static_cast<int64_t>(b == 0 ? col : p.inter + col) * ws[1] + k * ws[2]]);
      bs[b][e % BK][n] = v;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < BK; ++k) {
      float a[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = as[k][ty + 16 * i];
#pragma unroll
      for (int b = 0; b < NB; ++b)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          float const w = bs[b][k][tx + 16 * j];
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[b][i][j] = fmaf(a[i], w, acc[b][i][j]);
        }
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    int const q = pairs_s[ty + 16 * i];
    if (q >= num_pairs) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      int const col = n_tile * BN + tx + 16 * j;
      if (col >= n_out) continue;
      if constexpr (GATE_UP) {
        p.h[static_cast<int64_t>(q) * p.inter + col] = SiluMul<T>(acc[0][i][j], acc[NB - 1][i][j]);
      } else {
        p.rows[static_cast<int64_t>(q) * p.hidden + col] = Weighted<T>(acc[0][i][j], p.weights[q]);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------------ combine
constexpr int kCombineThreads = 256;

// out[t, n] = sum_k rows[t * K + k, n]: fp32 from 0 in rank order, rounded once (torch's sum in the model dtype).
template <typename T>
__global__ void __launch_bounds__(kCombineThreads) MoeCombineKernel(MoeParams<T> const p) {
  int64_t const total = static_cast<int64_t>(p.num_tokens) * p.hidden;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kCombineThreads + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kCombineThreads) {
    int64_t const t = i / p.hidden, n = i % p.hidden;
    T const* const r = p.rows + t * p.top_k * p.hidden + n;
    float s = 0.f;
    for (int k = 0; k < p.top_k; ++k) s += ToFloat(r[static_cast<int64_t>(k) * p.hidden]);
    p.out[t * p.out_stride[0] + n * p.out_stride[1]] = FromFloat<T>(s);
  }
}

// ----------------------------------------------------------------------------------------------------- launch
// Whether rows of `len` elements at `base` + i * row strides can be read as whole 16-byte chunks.
template <typename T>
inline bool Rows16(T const* base, int64_t len, int64_t unit_stride, int64_t const* row_strides, int num_rows) {
  constexpr int64_t vec = 16 / sizeof(T);
  if (reinterpret_cast<uintptr_t>(base) % 16 != 0 || len % vec != 0 || (unit_stride != 1 && len > 1)) return false;
  for (int i = 0; i < num_rows; ++i)
    if (row_strides[i] % vec != 0) return false;
  return true;
}

template <typename K>
inline cudaError_t Launch(K kernel, int64_t grid, int threads, void* params, cudaStream_t stream) {
  void* args[] = {params};
  return cudaLaunchKernel(reinterpret_cast<void const*>(kernel), dim3(static_cast<unsigned>(grid)),
                          dim3(static_cast<unsigned>(threads)), args, 0, stream);
}

template <typename T, int VEC, bool GATE_UP>
cudaError_t LaunchGemv(MoeParams<T> const& p, cudaStream_t stream) {
  int const n_out = GATE_UP ? p.inter : p.hidden;
  int64_t const tiles = (n_out + GemvColumnsPerCta<GATE_UP>() - 1) / GemvColumnsPerCta<GATE_UP>();
  int64_t const grid = static_cast<int64_t>(p.num_tokens) * p.top_k * tiles;
  if (grid > INT_MAX) return cudaErrorInvalidValue;
  void* params = const_cast<MoeParams<T>*>(&p);
  if (p.num_tokens <= 1) return Launch(&MoeGemvKernel<T, VEC, 1, GATE_UP>, grid, kGemvThreads, params, stream);
  if (p.num_tokens <= 4) return Launch(&MoeGemvKernel<T, VEC, 4, GATE_UP>, grid, kGemvThreads, params, stream);
  return Launch(&MoeGemvKernel<T, VEC, kMoeDecodeMaxTokens, GATE_UP>, grid, kGemvThreads, params, stream);
}

template <typename T, bool GATE_UP>
cudaError_t LaunchGemm(MoeParams<T> const& p, bool vec16, cudaStream_t stream) {
  int const n_out = GATE_UP ? p.inter : p.hidden;
  int64_t const max_blocks = MoeMaxBlocks(static_cast<int64_t>(p.num_tokens) * p.top_k, p.num_experts);
  void* params = const_cast<MoeParams<T>*>(&p);
  if constexpr (sizeof(T) == 2) {
    if (vec16) {
      int64_t const grid = max_blocks * ((n_out + kTcBN - 1) / kTcBN);
      if (grid > INT_MAX) return cudaErrorInvalidValue;
      return Launch(&MoeTcGemmKernel<T, GATE_UP>, grid, kTcThreads, params, stream);
    }
  }
  int64_t const grid = max_blocks * ((n_out + kSimtBN - 1) / kSimtBN);
  if (grid > INT_MAX) return cudaErrorInvalidValue;
  return Launch(&MoeSimtGemmKernel<T, GATE_UP>, grid, kSimtThreads, params, stream);
}

}  // namespace moe_detail

// T is float, __half or __nv_bfloat16. Returns cudaErrorInvalidValue outside 1 <= top_k <= E <= kMoeMaxExperts.
template <typename T>
cudaError_t MoeRoute(MoeRouteParams<T> const& p, cudaStream_t stream) {
  if (p.num_experts < 1 || p.num_experts > kMoeMaxExperts || p.top_k < 1 || p.top_k > p.num_experts ||
      p.num_tokens < 0)
    return cudaErrorInvalidValue;
  if (p.num_tokens == 0) return cudaSuccess;
  unsigned const grid = static_cast<unsigned>((static_cast<int64_t>(p.num_tokens) + moe_detail::kRouteWarps - 1) /
                                              moe_detail::kRouteWarps);
  return moe_detail::Launch(&moe_detail::MoeRouteKernel<T>, grid, moe_detail::kRouteWarps * 32,
                            const_cast<MoeRouteParams<T>*>(&p), stream);
}

// The whole op: route, experts (decode or prefill path), combine. Workspaces as in MoeParams; the prefill ones
// (sorted_pairs, block_expert, num_padded) only when MoeUsesPrefill(num_tokens). Returns cudaErrorInvalidValue for
// shapes outside the limits (1 <= top_k <= E <= kMoeMaxExperts, hidden, inter >= 1, T * K * max(H, I) fits int64,
// T * K < 2^31).
template <typename T>
cudaError_t FusedMoe(MoeParams<T> const& p, cudaStream_t stream) {
  using namespace moe_detail;
  if (p.num_experts < 1 || p.num_experts > kMoeMaxExperts || p.top_k < 1 || p.top_k > p.num_experts ||
      p.num_tokens < 0 || p.hidden < 1 || p.inter < 1 || static_cast<int64_t>(p.num_tokens) * p.top_k > INT_MAX)
    return cudaErrorInvalidValue;
  if (p.num_tokens == 0) return cudaSuccess;
  MoeRouteParams<T> route{};
  route.logits = p.logits;
  route.weights = p.weights;
  route.ids = p.ids;
  route.logits_stride[0] = p.logits_stride[0];
  route.logits_stride[1] = p.logits_stride[1];
  route.num_tokens = p.num_tokens;
  route.num_experts = p.num_experts;
  route.top_k = p.top_k;
  route.renormalize = p.renormalize;
  cudaError_t err = MoeRoute<T>(route, stream);
  if (err != cudaSuccess) return err;

  // 16-byte loads: x and Wgu rows along H, h and Wd rows along I (h is the contiguous, aligned workspace).
  bool const gu16 = Rows16(p.x, p.hidden, p.x_stride[1], p.x_stride, 1) &&
                    Rows16(p.w_gate_up, p.hidden, p.w_gate_up_stride[2], p.w_gate_up_stride, 2);
  bool const dn16 = Rows16(p.h, p.inter, 1, nullptr, 0) &&
                    Rows16(p.w_down, p.inter, p.w_down_stride[2], p.w_down_stride, 2);
  constexpr int V = 16 / sizeof(T);
  if (!MoeUsesPrefill(p.num_tokens)) {
    err = gu16 ? LaunchGemv<T, V, true>(p, stream) : LaunchGemv<T, 1, true>(p, stream);
    if (err != cudaSuccess) return err;
    err = dn16 ? LaunchGemv<T, V, false>(p, stream) : LaunchGemv<T, 1, false>(p, stream);
  } else {
    int const num_pairs = p.num_tokens * p.top_k;
    int64_t const max_blocks = MoeMaxBlocks(num_pairs, p.num_experts);
    if (max_blocks * kMoeBlockM > INT_MAX) return cudaErrorInvalidValue;
    int32_t const* ids = p.ids;
    int num_experts = p.num_experts, max_blocks32 = static_cast<int>(max_blocks);
    int32_t* sorted_pairs = p.sorted_pairs;
    int32_t* block_expert = p.block_expert;
    int32_t* num_padded = p.num_padded;
    void* args[] = {&ids, const_cast<int*>(&num_pairs), &num_experts, &max_blocks32, &sorted_pairs, &block_expert,
                    &num_padded};
    err = cudaLaunchKernel(reinterpret_cast<void const*>(&MoeAlignKernel<kMoeBlockM>), dim3(1), dim3(kAlignThreads), args, 0,
                           stream);
    if (err != cudaSuccess) return err;
    err = LaunchGemm<T, true>(p, gu16, stream);
    if (err != cudaSuccess) return err;
    err = LaunchGemm<T, false>(p, dn16, stream);
  }
  if (err != cudaSuccess) return err;
  int64_t const total = static_cast<int64_t>(p.num_tokens) * p.hidden;
  int64_t blocks = (total + kCombineThreads - 1) / kCombineThreads;
  blocks = blocks < 65536 ? blocks : 65536;  // grid-stride beyond
  return Launch(&MoeCombineKernel<T>, static_cast<unsigned>(blocks), kCombineThreads,
                const_cast<MoeParams<T>*>(&p), stream);
}

}  // namespace omni
