// Arguments of the fused CPU prefix-attention kernels: raw pointers and element strides, filled by
// binding.cpp from validated tensors (ptv2_kernels/ops/cpu_backend.py). No torch headers here.
#pragma once

#include <cstdint>

namespace ptv2_cpu {

#ifndef PTV2_BLOCK_Q
#define PTV2_BLOCK_Q 64
#endif
#ifndef PTV2_CHUNK_K
#define PTV2_CHUNK_K 128
#endif
constexpr int64_t kBlockQ = PTV2_BLOCK_Q;  // query rows per block: the lanes of a score tile
constexpr int64_t kChunkK = PTV2_CHUNK_K;  // key rows per chunk of the online softmax

// q, k, v, the output and their gradients: padded [B, H, N, D] (any batch/head/row strides, unit last
// stride), or packed [total, H, D] where row b is tokens cu_seqlens[b] .. cu_seqlens[b + 1] - 1
// (batch_stride unused).
struct SeqTensor {
  void* data = nullptr;
  int64_t batch_stride = 0, head_stride = 0, row_stride = 0;
};

struct Params {
  int64_t batch = 0, heads = 0, seq = 0 /* N, or max_seqlen when packed */, prefix = 0, dim = 0, tasks = 1;
  SeqTensor q, k, v;
  // prefix bank [T, H, P, D] (unit last stride); row b reads task task_ids[b] (task 0 without task_ids)
  const void* prefix_k = nullptr;
  const void* prefix_v = nullptr;
  int64_t pk_task_stride = 0, pk_head_stride = 0, pk_row_stride = 0;
  int64_t pv_task_stride = 0, pv_head_stride = 0, pv_row_stride = 0;
  const int64_t* task_ids = nullptr;    // [B] or null
  const uint8_t* key_mask = nullptr;    // [B, N] contiguous, 1 = real token, or null
  const int64_t* cu_seqlens = nullptr;  // [B + 1] (packed rows) or null
  // bias on the sequence columns [B, H, N, N] in q's dtype, any strides (0 = broadcast), or null
  const void* bias = nullptr;
  int64_t bias_strides[4] = {0, 0, 0, 0};
  double scale = 1.0;
  // DeBERTa's c2p / p2c terms on the sequence columns (ops/disentangled.py) as tables over the distance
  // t = i - j + N - 1, gathered from the projected relative embeddings, float (double for double inputs),
  // rows of rel_stride >= 2N - 1 + kBlockQ elements (zero past 2N - 1): c2p_t [H, D, rel_stride] (not scaled:
  // the packed queries carry the scale), p2c_t [H, D, rel_stride] (times the scale), and for the backward
  // p2c_rows [H, rel_stride, D] (not scaled). Null without the term.
  const void* c2p_t = nullptr;
  const void* p2c_t = nullptr;
  const void* p2c_rows = nullptr;
  int64_t rel_stride = 0;
  // dropout, RNG contract v2 (philox.h)
  uint64_t seed = 0;
  bool attn_dropout = false, prefix_dropout = false;
  uint32_t attn_threshold = 0, prefix_threshold = 0;
  double attn_keep_scale = 1.0, prefix_keep_scale = 1.0;
};

struct ForwardOutputs {
  SeqTensor out;       // q's dtype
  void* lse = nullptr; // [B, H, seq] contiguous, float (double for double inputs); +inf: no visible column
};

struct BackwardArgs {
  SeqTensor d_out, out;  // q's dtype
  const void* lse = nullptr;
  SeqTensor dq, dk, dv;  // outputs, q's dtype
  // per-row prefix gradients [B, H, P, D] contiguous, float (double for double inputs), then reduced over
  // the batch in a fixed order into dprefix_k/dprefix_v [T, H, P, D] (same type)
  void* dprefix_k_rows = nullptr;
  void* dprefix_v_rows = nullptr;
  void* dprefix_k = nullptr;
  void* dprefix_v = nullptr;
  void* dbias = nullptr;  // [B, H, N, N] contiguous, q's dtype, zero-filled by the caller; or null
  // gradients of the relative tables (when the embeddings need them): per row [B, H, D, rel_stride], then
  // summed over the batch in order into [H, D, rel_stride]; c2p's includes the scale, p2c's does not
  void* dc2p_rows = nullptr;
  void* dp2c_rows = nullptr;
  void* dc2p = nullptr;
  void* dp2c = nullptr;
};

template <typename scalar_t>
void forward(const Params& p, const ForwardOutputs& o);

template <typename scalar_t>
void backward(const Params& p, const BackwardArgs& g);

}  // namespace ptv2_cpu
