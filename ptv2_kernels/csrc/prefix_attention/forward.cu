// Forward kernel: one block per (query tile, batch row, head). Online softmax over the prefix tiles (read
// from the compact [T, H, P, D] buffer at task_ids[b]), then over the sequence tiles; stores out and the
// base-2 log-sum-exp. Matches prefix_attention_fwd_kernel of kernels/prefix_attention_triton.py.
#include "common.cuh"

namespace ptv2 {
namespace {

// Shared memory of the forward kernel (kBlock = Tile::kBlock).
template <typename T, int kHeadDim>
struct ForwardSmem {
  using Tl = Tile<T, kHeadDim>;
  T* q;       // [kBlock][kLdT] query tile
  T* k;       // [kBlock][kLdT] key tile (prefix or sequence)
  T* v;       // [kBlock][kLdT] value tile
  float* s;   // [kBlock][kLdS] scores of the tile
  T* p;       // [kBlock][kLdP] (dropped-out) unnormalised probabilities
  float* o;   // [kBlock][kLdAcc] output accumulator
  bool* col_ok;  // [kBlock] column visible
  size_t bytes;

  __host__ __device__ explicit ForwardSmem(uintptr_t base) {
    SmemCarver carve(base);
    q = carve.take<T>(Tl::kBlock * Tl::kLdT);
    k = carve.take<T>(Tl::kBlock * Tl::kLdT);
    v = carve.take<T>(Tl::kBlock * Tl::kLdT);
    s = carve.take<float>(Tl::kBlock * Tl::kLdS);
    p = carve.take<T>(Tl::kBlock * Tl::kLdP);
    o = carve.take<float>(Tl::kBlock * Tl::kLdAcc);
    col_ok = carve.take<bool>(Tl::kBlock);
    bytes = carve.bytes();
  }
};

// Running softmax state of one query row, replicated in every thread of its row group.
struct RowState {
  float max = -INFINITY;  // running max of the base-2 scores
  float sum = 0.f;        // running sum of exp2(score - max), before dropout
};

// One online-softmax step over the loaded key/value tile whose first attention column is col_base.
template <typename T, int kHeadDim>
__device__ __forceinline__ void forward_step(const ForwardSmem<T, kHeadDim>& sm, const PrefixAttentionParams& p,
                                             int bh, int row0, int col_base, RowState& state) {
  using Tl = Tile<T, kHeadDim>;
  constexpr int kBlock = Tl::kBlock, kGroup = Tl::kThreadsPerRow;
  __syncthreads();  // q/k/v/col_ok loaded
  block_gemm<T, kBlock, kBlock, kHeadDim, true, false>(sm.q, Tl::kLdT, sm.k, Tl::kLdT, sm.s, Tl::kLdS);
  __syncthreads();

  const int r = threadIdx.x / kGroup, part = threadIdx.x % kGroup;
  float* s_row = sm.s + r * Tl::kLdS;
  float tile_max = -INFINITY;
  for (int c = part; c < kBlock; c += kGroup) {
    const float s = sm.col_ok[c] ? s_row[c] * p.scale_log2 : -INFINITY;
    s_row[c] = s;
    tile_max = fmaxf(tile_max, s);
  }
  const float new_max = fmaxf(state.max, group_max<kGroup>(tile_max));
  const float use_max = new_max == -INFINITY ? 0.f : new_max;  // no visible column yet: keep exp2 finite
  const float alpha = exp2f(state.max - use_max);
  float tile_sum = 0.f;
  for (int c = part; c < kBlock; c += kGroup) {
    float prob = exp2f(s_row[c] - use_max);
    tile_sum += prob;
    if (p.attn_dropout) {
      const bool keep = dropout_keep(p.seed, p.attn_threshold, col_base + c, row0 + r, bh, kAttnStream);
      prob = keep ? prob * p.attn_keep_scale : 0.f;
    }
    sm.p[r * Tl::kLdP + c] = from_float<T>(prob);
  }
  state.sum = state.sum * alpha + group_sum<kGroup>(tile_sum);
  state.max = new_max;
  for (int d = part; d < kHeadDim; d += kGroup) sm.o[r * Tl::kLdAcc + d] *= alpha;
  __syncthreads();
  block_gemm<T, kBlock, kHeadDim, kBlock, false, true>(sm.p, Tl::kLdP, sm.v, Tl::kLdT, sm.o, Tl::kLdAcc);
  __syncthreads();  // before the next tile overwrites k/v
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kThreads) forward_kernel(const PrefixAttentionParams p) {
  using Tl = Tile<T, kHeadDim>;
  constexpr int kBlock = Tl::kBlock, kGroup = Tl::kThreadsPerRow;
  extern __shared__ __align__(128) unsigned char smem[];
  const ForwardSmem<T, kHeadDim> sm(reinterpret_cast<uintptr_t>(smem));
  const int bh = blockIdx.x, b = bh / p.heads, h = bh % p.heads;
  const int row0 = blockIdx.y * kBlock;
  const int task = task_of(p, b);

  load_rows<T, kBlock, kHeadDim>(sm.q, Tl::kLdT, p.q, b, h, row0, p.seq_len, p.head_dim);
  for (int idx = threadIdx.x; idx < kBlock * Tl::kLdAcc; idx += kThreads) sm.o[idx] = 0.f;
  RowState state;
  for (int col0 = 0; col0 < p.prefix_len; col0 += kBlock) {
    load_prefix_rows<T, kBlock, kHeadDim>(sm.k, Tl::kLdT, p.prefix_k, kPrefixKStream, p, task, h, bh, col0);
    load_prefix_rows<T, kBlock, kHeadDim>(sm.v, Tl::kLdT, p.prefix_v, kPrefixVStream, p, task, h, bh, col0);
    load_column_mask<kBlock>(sm.col_ok, p, b, col0, true);
    forward_step(sm, p, bh, row0, col0, state);
  }
  for (int col0 = 0; col0 < p.seq_len; col0 += kBlock) {
    load_rows<T, kBlock, kHeadDim>(sm.k, Tl::kLdT, p.k, b, h, col0, p.seq_len, p.head_dim);
    load_rows<T, kBlock, kHeadDim>(sm.v, Tl::kLdT, p.v, b, h, col0, p.seq_len, p.head_dim);
    load_column_mask<kBlock>(sm.col_ok, p, b, col0, false);
    forward_step(sm, p, bh, row0, p.prefix_len + col0, state);
  }

  // Normalise; a row with no visible column outputs 0 and gets lse = +inf.
  const int r = threadIdx.x / kGroup, part = threadIdx.x % kGroup, row = row0 + r;
  if (row >= p.seq_len) return;
  const bool empty = state.sum == 0.f;
  const float inv_sum = empty ? 0.f : 1.f / state.sum;
  T* out = static_cast<T*>(p.out.data) + b * p.out.stride_b + h * p.out.stride_h + row * p.out.stride_n;
  for (int d = part; d < p.head_dim; d += kGroup) out[d] = from_float<T>(sm.o[r * Tl::kLdAcc + d] * inv_sum);
  if (part == 0) p.lse[int64_t(bh) * p.seq_len + row] = empty ? INFINITY : state.max + log2f(state.sum);
}

}  // namespace

cudaError_t prefix_attention_forward(const PrefixAttentionParams& params, cudaStream_t stream) {
  return dispatch_dtype_head_dim(params, [&](auto type_tag, auto dim_tag) {
    using T = decltype(type_tag);
    constexpr int kHeadDim = decltype(dim_tag)::value;
    const int row_tiles = (params.seq_len + Tile<T, kHeadDim>::kBlock - 1) / Tile<T, kHeadDim>::kBlock;
    const dim3 grid(params.batch * params.heads, row_tiles);
    return launch(forward_kernel<T, kHeadDim>, grid, ForwardSmem<T, kHeadDim>(0).bytes, stream, params);
  });
}

}  // namespace ptv2
