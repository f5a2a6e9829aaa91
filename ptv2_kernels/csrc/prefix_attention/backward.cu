// Backward kernels, matching the Triton backward of kernels/prefix_attention_triton.py:
// 1. preprocess: delta = rowsum(out * d_out);
// 2. dq: one block per (query tile, batch row, head), over the prefix tiles then the sequence tiles;
// 3. dk/dv: one block per (column tile, batch row, head). Sequence tiles write dk/dv; prefix tiles add
//    their gradient (masked by the row's prefix dropout) into the float32 [T, H, P, D] d_prefix buffers
//    with atomicAdd, or, deterministic, one block per (prefix tile, head) sums the batch rows in order.
// Scores are recomputed from lse; attention dropout masks are regenerated from the seed.
#include "common.cuh"

namespace ptv2 {
namespace {

constexpr int kPreprocessRows = kThreads / 32;  // one warp per row

template <typename T>
__global__ void __launch_bounds__(kThreads) preprocess_kernel(const PrefixAttentionParams p) {
  const int bh = blockIdx.x, b = bh / p.heads, h = bh % p.heads;
  const int row = blockIdx.y * kPreprocessRows + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= p.seq_len) return;
  const T* o = static_cast<const T*>(p.out.data) + b * p.out.stride_b + h * p.out.stride_h + row * p.out.stride_n;
  const T* g = static_cast<const T*>(p.d_out.data) + b * p.d_out.stride_b + h * p.d_out.stride_h +
               row * p.d_out.stride_n;
  float acc = 0.f;
  for (int d = lane; d < p.head_dim; d += 32) acc += to_float(o[d]) * to_float(g[d]);
  acc = group_sum<32>(acc);
  if (lane == 0) p.delta[int64_t(bh) * p.seq_len + row] = acc;
}

// Shared memory of the dq and dk/dv kernels. "rows" are query rows, "cols" attention columns; in the
// dk/dv kernel the score-shaped tiles are transposed ([col][row]).
template <typename T, int kHeadDim>
struct BackwardSmem {
  using Tl = Tile<T, kHeadDim>;
  T* q;        // [kBlock][kLdT] queries
  T* d_out;    // [kBlock][kLdT] output gradient
  T* k;        // [kBlock][kLdT] keys (prefix or sequence)
  T* v;        // [kBlock][kLdT] values
  float* s;    // [kBlock][kLdS] scores
  float* dp;   // [kBlock][kLdS] d(probabilities) = d_out . v
  T* ds;       // [kBlock][kLdP] d(scores), unscaled
  T* pd;       // [kBlock][kLdP] dropped-out probabilities (dk/dv kernel)
  float* acc_a;  // [kBlock][kLdAcc] dq (dq kernel) or dk (dk/dv kernel)
  float* acc_b;  // [kBlock][kLdAcc] dv (dk/dv kernel)
  float* lse;    // [kBlock] per query row
  float* delta;  // [kBlock] per query row
  bool* col_ok;  // [kBlock] column visible
  size_t bytes;

  __host__ __device__ BackwardSmem(uintptr_t base, bool with_dkdv) {
    SmemCarver carve(base);
    q = carve.take<T>(Tl::kBlock * Tl::kLdT);
    d_out = carve.take<T>(Tl::kBlock * Tl::kLdT);
    k = carve.take<T>(Tl::kBlock * Tl::kLdT);
    v = carve.take<T>(Tl::kBlock * Tl::kLdT);
    s = carve.take<float>(Tl::kBlock * Tl::kLdS);
    dp = carve.take<float>(Tl::kBlock * Tl::kLdS);
    ds = carve.take<T>(Tl::kBlock * Tl::kLdP);
    acc_a = carve.take<float>(Tl::kBlock * Tl::kLdAcc);
    pd = with_dkdv ? carve.take<T>(Tl::kBlock * Tl::kLdP) : nullptr;
    acc_b = with_dkdv ? carve.take<float>(Tl::kBlock * Tl::kLdAcc) : nullptr;
    lse = carve.take<float>(Tl::kBlock);
    delta = carve.take<float>(Tl::kBlock);
    col_ok = carve.take<bool>(Tl::kBlock);
    bytes = carve.bytes();
  }
};

// Query-side tiles of rows [row0, row0 + kBlock): q, d_out, lse (+inf beyond N), delta.
template <typename T, int kHeadDim>
__device__ __forceinline__ void load_query_side(const BackwardSmem<T, kHeadDim>& sm, const PrefixAttentionParams& p,
                                                int b, int h, int bh, int row0) {
  using Tl = Tile<T, kHeadDim>;
  load_rows<T, Tl::kBlock, kHeadDim>(sm.q, Tl::kLdT, p.q, b, h, row0, p.seq_len, p.head_dim);
  load_rows<T, Tl::kBlock, kHeadDim>(sm.d_out, Tl::kLdT, p.d_out, b, h, row0, p.seq_len, p.head_dim);
  for (int r = threadIdx.x; r < Tl::kBlock; r += kThreads) {
    const int row = row0 + r;
    sm.lse[r] = row < p.seq_len ? p.lse[int64_t(bh) * p.seq_len + row] : INFINITY;
    sm.delta[r] = row < p.seq_len ? p.delta[int64_t(bh) * p.seq_len + row] : 0.f;
  }
}

// Key/value tile of columns [col0, col0 + kBlock) of the prefix (with row bh's prefix dropout) or the sequence.
template <typename T, int kHeadDim>
__device__ __forceinline__ void load_key_side(const BackwardSmem<T, kHeadDim>& sm, const PrefixAttentionParams& p,
                                              int b, int h, int bh, int col0, bool is_prefix) {
  using Tl = Tile<T, kHeadDim>;
  if (is_prefix) {
    const int task = task_of(p, b);
    load_prefix_rows<T, Tl::kBlock, kHeadDim>(sm.k, Tl::kLdT, p.prefix_k, kPrefixKStream, p, task, h, bh, col0);
    load_prefix_rows<T, Tl::kBlock, kHeadDim>(sm.v, Tl::kLdT, p.prefix_v, kPrefixVStream, p, task, h, bh, col0);
  } else {
    load_rows<T, Tl::kBlock, kHeadDim>(sm.k, Tl::kLdT, p.k, b, h, col0, p.seq_len, p.head_dim);
    load_rows<T, Tl::kBlock, kHeadDim>(sm.v, Tl::kLdT, p.v, b, h, col0, p.seq_len, p.head_dim);
  }
  load_column_mask<Tl::kBlock>(sm.col_ok, p, b, col0, is_prefix);
}

// Probability, dropped-out probability and d(score) of one (query row r, column c) entry from the score
// s and dp = d_out . v; col is the attention column (the dropout counter).
struct ScoreGrads {
  float prob, dropped_prob, d_score;
};
__device__ __forceinline__ ScoreGrads score_grads(const PrefixAttentionParams& p, float s, float dp, float lse,
                                                  float delta, bool col_ok, int row, int col, int bh) {
  const float prob = col_ok ? exp2f(s * p.scale_log2 - lse) : 0.f;
  float dropped_prob = prob;
  if (p.attn_dropout) {
    const bool keep = dropout_keep(p.seed, p.attn_threshold, col, row, bh, kAttnStream);
    dropped_prob = keep ? prob * p.attn_keep_scale : 0.f;
    dp = keep ? dp * p.attn_keep_scale : 0.f;
  }
  return {prob, dropped_prob, prob * (dp - delta)};
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kThreads) dq_kernel(const PrefixAttentionParams p) {
  using Tl = Tile<T, kHeadDim>;
  constexpr int kBlock = Tl::kBlock;
  extern __shared__ __align__(128) unsigned char smem[];
  const BackwardSmem<T, kHeadDim> sm(reinterpret_cast<uintptr_t>(smem), false);
  const int bh = blockIdx.x, b = bh / p.heads, h = bh % p.heads;
  const int row0 = blockIdx.y * kBlock;

  load_query_side(sm, p, b, h, bh, row0);
  for (int idx = threadIdx.x; idx < kBlock * Tl::kLdAcc; idx += kThreads) sm.acc_a[idx] = 0.f;
  const int prefix_tiles = (p.prefix_len + kBlock - 1) / kBlock;
  const int tiles = prefix_tiles + (p.seq_len + kBlock - 1) / kBlock;
  for (int tile = 0; tile < tiles; ++tile) {
    const bool is_prefix = tile < prefix_tiles;
    const int col0 = (is_prefix ? tile : tile - prefix_tiles) * kBlock;
    const int col_base = is_prefix ? col0 : p.prefix_len + col0;
    load_key_side(sm, p, b, h, bh, col0, is_prefix);
    __syncthreads();
    block_gemm<T, kBlock, kBlock, kHeadDim, true, false>(sm.q, Tl::kLdT, sm.k, Tl::kLdT, sm.s, Tl::kLdS);
    block_gemm<T, kBlock, kBlock, kHeadDim, true, false>(sm.d_out, Tl::kLdT, sm.v, Tl::kLdT, sm.dp, Tl::kLdS);
    __syncthreads();
    for (int idx = threadIdx.x; idx < kBlock * kBlock; idx += kThreads) {
      const int r = idx / kBlock, c = idx % kBlock;
      const ScoreGrads g = score_grads(p, sm.s[r * Tl::kLdS + c], sm.dp[r * Tl::kLdS + c], sm.lse[r], sm.delta[r],
                                       sm.col_ok[c], row0 + r, col_base + c, bh);
      sm.ds[r * Tl::kLdP + c] = from_float<T>(g.d_score);
    }
    __syncthreads();
    block_gemm<T, kBlock, kHeadDim, kBlock, false, true>(sm.ds, Tl::kLdP, sm.k, Tl::kLdT, sm.acc_a, Tl::kLdAcc);
    __syncthreads();
  }

  T* dq = static_cast<T*>(p.dq.data) + b * p.dq.stride_b + h * p.dq.stride_h;
  for (int idx = threadIdx.x; idx < kBlock * kHeadDim; idx += kThreads) {
    const int r = idx / kHeadDim, d = idx % kHeadDim, row = row0 + r;
    if (row < p.seq_len && d < p.head_dim) dq[row * p.dq.stride_n + d] = from_float<T>(sm.acc_a[r * Tl::kLdAcc + d] * p.scale);
  }
}

// dk (unscaled) into acc_a and dv into acc_b for the loaded key/value tile of batch row b, summed over all
// query tiles. Score-shaped tiles are transposed: entry [c][r] is column c, query row r.
template <typename T, int kHeadDim>
__device__ void accumulate_dkdv(const BackwardSmem<T, kHeadDim>& sm, const PrefixAttentionParams& p, int b, int h,
                                int bh, int col_base) {
  using Tl = Tile<T, kHeadDim>;
  constexpr int kBlock = Tl::kBlock;
  for (int idx = threadIdx.x; idx < kBlock * Tl::kLdAcc; idx += kThreads) sm.acc_a[idx] = sm.acc_b[idx] = 0.f;
  for (int row0 = 0; row0 < p.seq_len; row0 += kBlock) {
    load_query_side(sm, p, b, h, bh, row0);
    __syncthreads();
    block_gemm<T, kBlock, kBlock, kHeadDim, true, false>(sm.k, Tl::kLdT, sm.q, Tl::kLdT, sm.s, Tl::kLdS);
    block_gemm<T, kBlock, kBlock, kHeadDim, true, false>(sm.v, Tl::kLdT, sm.d_out, Tl::kLdT, sm.dp, Tl::kLdS);
    __syncthreads();
    for (int idx = threadIdx.x; idx < kBlock * kBlock; idx += kThreads) {
      const int c = idx / kBlock, r = idx % kBlock;
      const ScoreGrads g = score_grads(p, sm.s[c * Tl::kLdS + r], sm.dp[c * Tl::kLdS + r], sm.lse[r], sm.delta[r],
                                       sm.col_ok[c], row0 + r, col_base + c, bh);
      sm.pd[c * Tl::kLdP + r] = from_float<T>(g.dropped_prob);
      sm.ds[c * Tl::kLdP + r] = from_float<T>(g.d_score);
    }
    __syncthreads();
    block_gemm<T, kBlock, kHeadDim, kBlock, false, true>(sm.ds, Tl::kLdP, sm.q, Tl::kLdT, sm.acc_a, Tl::kLdAcc);
    block_gemm<T, kBlock, kHeadDim, kBlock, false, true>(sm.pd, Tl::kLdP, sm.d_out, Tl::kLdT, sm.acc_b, Tl::kLdAcc);
    __syncthreads();
  }
}

// Grid (batch*heads, prefix_tiles + seq_tiles) or, deterministic, (heads, prefix_tiles) with
// prefix_tiles = all y-blocks. Block y < prefix_tiles handles a prefix tile, the rest sequence tiles.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kThreads) dkdv_kernel(const PrefixAttentionParams p, int prefix_tiles,
                                                        bool deterministic) {
  using Tl = Tile<T, kHeadDim>;
  constexpr int kBlock = Tl::kBlock;
  extern __shared__ __align__(128) unsigned char smem[];
  const BackwardSmem<T, kHeadDim> sm(reinterpret_cast<uintptr_t>(smem), true);
  const bool is_prefix = int(blockIdx.y) < prefix_tiles;
  const int col0 = (is_prefix ? blockIdx.y : blockIdx.y - prefix_tiles) * kBlock;

  if (!is_prefix) {
    const int bh = blockIdx.x, b = bh / p.heads, h = bh % p.heads;
    load_key_side(sm, p, b, h, bh, col0, false);
    accumulate_dkdv(sm, p, b, h, bh, p.prefix_len + col0);
    T* dk = static_cast<T*>(p.dk.data) + b * p.dk.stride_b + h * p.dk.stride_h;
    T* dv = static_cast<T*>(p.dv.data) + b * p.dv.stride_b + h * p.dv.stride_h;
    for (int idx = threadIdx.x; idx < kBlock * kHeadDim; idx += kThreads) {
      const int c = idx / kHeadDim, d = idx % kHeadDim, col = col0 + c;
      if (col >= p.seq_len || d >= p.head_dim) continue;
      dk[col * p.dk.stride_n + d] = from_float<T>(sm.acc_a[c * Tl::kLdAcc + d] * p.scale);
      dv[col * p.dv.stride_n + d] = from_float<T>(sm.acc_b[c * Tl::kLdAcc + d]);
    }
    return;
  }

  const int h = deterministic ? blockIdx.x : blockIdx.x % p.heads;
  const int b_first = deterministic ? 0 : blockIdx.x / p.heads;
  const int b_last = deterministic ? p.batch : b_first + 1;
  for (int b = b_first; b < b_last; ++b) {
    const int bh = b * p.heads + h;
    load_key_side(sm, p, b, h, bh, col0, true);
    accumulate_dkdv(sm, p, b, h, bh, col0);
    const int64_t base = (int64_t(task_of(p, b)) * p.heads + h) * p.prefix_len * p.head_dim;
    for (int idx = threadIdx.x; idx < kBlock * kHeadDim; idx += kThreads) {
      const int c = idx / kHeadDim, d = idx % kHeadDim, j = col0 + c;
      if (j >= p.prefix_len || d >= p.head_dim) continue;
      float dk = sm.acc_a[c * Tl::kLdAcc + d] * p.scale;
      float dv = sm.acc_b[c * Tl::kLdAcc + d];
      if (p.prefix_dropout) {  // d(prefix) = d(dropped prefix) * keep / (1 - p)
        dk = dropout_keep(p.seed, p.prefix_threshold, d, j, bh, kPrefixKStream) ? dk * p.prefix_keep_scale : 0.f;
        dv = dropout_keep(p.seed, p.prefix_threshold, d, j, bh, kPrefixVStream) ? dv * p.prefix_keep_scale : 0.f;
      }
      const int64_t offset = base + int64_t(j) * p.head_dim + d;
      if (deterministic) {  // this block alone owns (prefix tile, head) of every task
        p.d_prefix_k[offset] += dk;
        p.d_prefix_v[offset] += dv;
      } else {
        atomicAdd(p.d_prefix_k + offset, dk);
        atomicAdd(p.d_prefix_v + offset, dv);
      }
    }
    __syncthreads();  // before the next row's tiles overwrite shared memory
  }
}

}  // namespace

cudaError_t prefix_attention_backward(const PrefixAttentionParams& params, cudaStream_t stream) {
  return dispatch_dtype_head_dim(params, [&](auto type_tag, auto dim_tag) {
    using T = decltype(type_tag);
    constexpr int kHeadDim = decltype(dim_tag)::value;
    constexpr int kBlock = Tile<T, kHeadDim>::kBlock;
    const int batch_heads = params.batch * params.heads;
    const int seq_tiles = (params.seq_len + kBlock - 1) / kBlock;
    const int prefix_tiles = (params.prefix_len + kBlock - 1) / kBlock;

    const dim3 preprocess_grid(batch_heads, (params.seq_len + kPreprocessRows - 1) / kPreprocessRows);
    cudaError_t err = launch(preprocess_kernel<T>, preprocess_grid, 0, stream, params);
    if (err != cudaSuccess) return err;
    err = launch(dq_kernel<T, kHeadDim>, dim3(batch_heads, seq_tiles), BackwardSmem<T, kHeadDim>(0, false).bytes,
                 stream, params);
    if (err != cudaSuccess) return err;
    const size_t dkdv_smem = BackwardSmem<T, kHeadDim>(0, true).bytes;
    if (!params.deterministic) {
      return launch(dkdv_kernel<T, kHeadDim>, dim3(batch_heads, prefix_tiles + seq_tiles), dkdv_smem, stream, params,
                    prefix_tiles, false);
    }
    err = launch(dkdv_kernel<T, kHeadDim>, dim3(batch_heads, seq_tiles), dkdv_smem, stream, params, 0, false);
    if (err != cudaSuccess) return err;
    return launch(dkdv_kernel<T, kHeadDim>, dim3(params.heads, prefix_tiles), dkdv_smem, stream, params,
                  prefix_tiles, true);
  });
}

}  // namespace ptv2
