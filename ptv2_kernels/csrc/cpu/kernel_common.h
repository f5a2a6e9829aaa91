// What the forward and backward kernels share: accumulation types, block sizes, per-thread scratch,
// row addressing of padded/packed tensors, key visibility, the chunks of one row's columns, loading and
// packing blocks, the score tile of one chunk, and the dynamic work loop.
//
// Score tiles are stored key-major: tile[j * kBlockQ + i] for key j of the chunk and query i of the block,
// so that the softmax statistics of a query are lane-wise vector operations (no horizontal reductions)
// and a masked key is one row.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "micro_gemm.h"
#include "params.h"
#include "philox.h"

namespace ptv2_cpu {

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Zero-initialised, 64-byte aligned scratch of one thread.
template <typename T>
struct Scratch {
  std::unique_ptr<T[], void (*)(void*)> data{nullptr, std::free};
  explicit Scratch(int64_t n) {
    const size_t bytes = static_cast<size_t>(round_up(std::max<int64_t>(n, 1) * sizeof(T), 64));
    data.reset(static_cast<T*>(std::aligned_alloc(64, bytes)));
    std::memset(data.get(), 0, bytes);
  }
  T* get() const { return data.get(); }
};

// Element offsets of row b, head h, position i of a padded or packed tensor.
inline int64_t row_offset(const Params& p, const SeqTensor& t, int64_t b, int64_t h, int64_t i) {
  const int64_t start = p.cu_seqlens ? p.cu_seqlens[b] * t.row_stride : b * t.batch_stride;
  return start + h * t.head_stride + i * t.row_stride;
}

template <typename T>
inline const T* row_ptr(const Params& p, const SeqTensor& t, int64_t b, int64_t h, int64_t i) {
  return static_cast<const T*>(t.data) + row_offset(p, t, b, h, i);
}

template <typename T>
inline T* mutable_row_ptr(const Params& p, const SeqTensor& t, int64_t b, int64_t h, int64_t i) {
  return static_cast<T*>(t.data) + row_offset(p, t, b, h, i);
}

// Which keys of each row are visible: packed rows and rows without a mask see all of their tokens;
// with a key padding mask, counts of visible keys per prefix of the row (O(1) per chunk).
class Visibility {
 public:
  explicit Visibility(const Params& p) : p_(p) {
    const int64_t n = p.seq;
    end_.resize(p.batch);
    if (p.key_mask) {
      counts_.resize(p.batch * (n + 1));
      for (int64_t b = 0; b < p.batch; ++b) {
        int32_t* c = counts_.data() + b * (n + 1);
        const uint8_t* m = p.key_mask + b * n;
        c[0] = 0;
        int64_t last = 0;
        for (int64_t j = 0; j < n; ++j) {
          c[j + 1] = c[j] + (m[j] ? 1 : 0);
          if (m[j]) last = j + 1;
        }
        end_[b] = last;
      }
    } else {
      for (int64_t b = 0; b < p.batch; ++b) end_[b] = length(b);
    }
  }
  // queries (and keys) of row b
  int64_t length(int64_t b) const { return p_.cu_seqlens ? p_.cu_seqlens[b + 1] - p_.cu_seqlens[b] : p_.seq; }
  // one past the last visible key of row b
  int64_t key_end(int64_t b) const { return end_[b]; }
  // visible keys of row b in [j0, j1)
  int64_t visible(int64_t b, int64_t j0, int64_t j1) const {
    if (counts_.empty()) return j1 - j0;
    const int32_t* c = counts_.data() + b * (p_.seq + 1);
    return c[j1] - c[j0];
  }
  bool key_visible(int64_t b, int64_t j) const { return !p_.key_mask || p_.key_mask[b * p_.seq + j]; }

 private:
  const Params& p_;
  std::vector<int64_t> end_;
  std::vector<int32_t> counts_;
};

// One chunk of a row's columns: keys/values rows [j0, j0 + rows) of the prefix or of the sequence.
struct Chunk {
  bool prefix;
  int64_t j0, rows;
  bool partial;  // some keys of the chunk are padding
};

// The chunks of row b in softmax order: the prefix, then the sequence up to its last visible key,
// skipping chunks with no visible key.
inline std::vector<Chunk> row_chunks(const Params& p, const Visibility& vis, int64_t b) {
  std::vector<Chunk> chunks;
  for (int64_t j0 = 0; j0 < p.prefix; j0 += kChunkK)
    chunks.push_back({true, j0, std::min(kChunkK, p.prefix - j0), false});
  const int64_t end = vis.key_end(b);
  for (int64_t j0 = 0; j0 < end; j0 += kChunkK) {
    const int64_t rows = std::min(kChunkK, end - j0);
    const int64_t seen = vis.visible(b, j0, j0 + rows);
    if (seen > 0) chunks.push_back({false, j0, rows, seen != rows});
  }
  return chunks;
}

// Rows of a [rows, D] block with row stride `stride` as acc_t: the block itself when it already is
// (fp32/fp64 read in place), else converted into `scratch` (row stride ld_scratch). `factor`, when given,
// multiplies element (r, d) by factor[r * ld_factor + d] (prefix dropout) and always copies.
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
inline const acc_t* rows_as_acc(const scalar_t* src, int64_t stride, int64_t rows, int64_t dim, acc_t* scratch,
                                int64_t ld_scratch, int64_t& ld) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    ld = stride;
    return src;
  } else {
    for (int64_t r = 0; r < rows; ++r) at::vec::convert(src + r * stride, scratch + r * ld_scratch, dim);
    ld = ld_scratch;
    return scratch;
  }
}

// A prefix block of row (b, h) with its per-row dropout applied: (PK or PV)[j, d] * keep factor of element
// (j, d) of `stream`, as acc_t in `dst` (row stride ld). Returns dst.
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
inline const acc_t* dropped_prefix(const Params& p, const scalar_t* src, int64_t stride, uint32_t batch_head,
                                   Stream stream, acc_t* dst, int64_t ld, acc_t* factor, uint32_t* words) {
  const acc_t keep_scale = static_cast<acc_t>(p.prefix_keep_scale);
  for (int64_t j = 0; j < p.prefix; ++j) {
    keep_run<acc_t>(p.seed, p.prefix_threshold, keep_scale, 0, p.dim, static_cast<uint32_t>(j), batch_head, stream,
                    words, factor);
    const scalar_t* s = src + j * stride;
    acc_t* d = dst + j * ld;
    for (int64_t e = 0; e < p.dim; ++e) d[e] = static_cast<acc_t>(s[e]) * factor[e];
  }
  return dst;
}

// qt[d * kBlockQ + i] = alpha * x[i * ld + d] for the rows < rows of a query block (acc_t rows), 0 for the
// lanes past them: ATen's in-register 16x16 transposes for float.
template <typename acc_t>
inline void pack_transposed(const acc_t* x, int64_t ld, int64_t rows, int64_t dim, acc_t alpha, acc_t* qt) {
  using Vec = Vectorized<acc_t>;
  at::vec::transpose_mxn<acc_t>(x, ld, qt, kBlockQ, static_cast<int>(rows), static_cast<int>(dim));
  for (int64_t d = 0; d < dim; ++d) {
    acc_t* lanes = qt + d * kBlockQ;
    std::fill(lanes + rows, lanes + kBlockQ, acc_t(0));
    if (alpha != acc_t(1))
      for (int64_t i = 0; i < kBlockQ; i += Vec::size()) (Vec::loadu(lanes + i) * Vec(alpha)).store(lanes + i);
  }
}

// The keys/values a chunk reads, as acc_t rows.
template <typename acc_t>
struct Block {
  const acc_t* k;
  int64_t ldk;
  const acc_t* v;
  int64_t ldv;
};

// s[j * kBlockQ + i] += bias[b, h, i0 + i, j0 + j] for the block's rows: a float bias contiguous along keys
// goes through an in-register transpose (`tile`: kChunkK * kBlockQ scratch), any other one element-wise.
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
inline void add_bias_tile(const Params& p, const Chunk& c, int64_t b, int64_t h, int64_t i0, int64_t rows, acc_t* s,
                          acc_t* tile) {
  using Vec = Vectorized<acc_t>;
  const int64_t* st = p.bias_strides;
  const scalar_t* bias = static_cast<const scalar_t*>(p.bias) + b * st[0] + h * st[1] + i0 * st[2] + c.j0 * st[3];
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (st[3] == 1) {
      at::vec::transpose_mxn<float>(bias, st[2], tile, kBlockQ, static_cast<int>(rows), static_cast<int>(c.rows));
      for (int64_t j = 0; j < c.rows; ++j)
        for (int64_t i = 0; i < rows; i += Vec::size()) {
          const int64_t n = std::min<int64_t>(Vec::size(), rows - i);
          acc_t* dst = s + j * kBlockQ + i;
          (Vec::loadu(dst, n) + Vec::loadu(tile + j * kBlockQ + i, n)).store(dst, n);
        }
      return;
    }
  }
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t* row = bias + i * st[2];
    for (int64_t j = 0; j < c.rows; ++j) s[j * kBlockQ + i] += static_cast<acc_t>(row[j * st[3]]);
  }
}

// DeBERTa's c2p and p2c terms of a sequence chunk's tile: s[lj * kBlockQ + li] += sum_d qt[d][li] c2p_t[h][d][t]
// + k_j[d] p2c_t[h][d][t] at distance t = i - j + N - 1 (i = i0 + li, j = j0 + lj), which runs along the lanes: a
// contiguous window of each table row per key.
template <typename acc_t, bool C2P, bool P2C, int64_t R>
inline void add_relative_rows(const Params& p, const acc_t* c2p, const acc_t* p2c, const acc_t* keys, int64_t ldk,
                              const acc_t* qt, int64_t shift, acc_t* s) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t NV = kBlockQ / Vec::size(), W = Vec::size();
  const int64_t ld = p.rel_stride;
  Vec acc[R][NV];
  for (int64_t r = 0; r < R; ++r)
    for (int64_t v = 0; v < NV; ++v) acc[r][v] = Vec::loadu(s + r * kBlockQ + v * W);
  for (int64_t d = 0; d < p.dim; ++d) {
    Vec q[NV];
    if constexpr (C2P)
      for (int64_t v = 0; v < NV; ++v) q[v] = Vec::loadu(qt + d * kBlockQ + v * W);
    for (int64_t r = 0; r < R; ++r) {  // key r of the group: distances shifted down by r
      if constexpr (C2P) {
        const acc_t* t = c2p + d * ld + shift - r;
        for (int64_t v = 0; v < NV; ++v) acc[r][v] = at::vec::fmadd(q[v], Vec::loadu(t + v * W), acc[r][v]);
      }
      if constexpr (P2C) {
        const acc_t* t = p2c + d * ld + shift - r;
        const Vec k(keys[r * ldk + d]);
        for (int64_t v = 0; v < NV; ++v) acc[r][v] = at::vec::fmadd(k, Vec::loadu(t + v * W), acc[r][v]);
      }
    }
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t v = 0; v < NV; ++v) acc[r][v].store(s + r * kBlockQ + v * W);
}

// DeBERTa's c2p and p2c terms of a sequence chunk's tile: s[lj * kBlockQ + li] += sum_d qt[d][li] c2p_t[h][d][t]
// + k_j[d] p2c_t[h][d][t] at distance t = i - j + N - 1 (i = i0 + li, j = j0 + lj), which runs along the lanes: a
// contiguous window of each table row per key, keys in groups of 4 sharing the query loads.
template <typename acc_t, bool C2P, bool P2C>
inline void add_relative_terms(const Params& p, const Chunk& c, const Block<acc_t>& kv, const acc_t* qt, int64_t h,
                               int64_t i0, acc_t* s) {
  constexpr int64_t kGroup = 4;
  const int64_t ld = p.rel_stride;
  const acc_t* c2p = C2P ? static_cast<const acc_t*>(p.c2p_t) + h * p.dim * ld : nullptr;
  const acc_t* p2c = P2C ? static_cast<const acc_t*>(p.p2c_t) + h * p.dim * ld : nullptr;
  int64_t lj = 0;
  for (; lj + kGroup <= c.rows; lj += kGroup)
    add_relative_rows<acc_t, C2P, P2C, kGroup>(p, c2p, p2c, kv.k + (c.j0 + lj) * kv.ldk, kv.ldk, qt,
                                               i0 - (c.j0 + lj) + p.seq - 1, s + lj * kBlockQ);
  for (; lj < c.rows; ++lj)
    add_relative_rows<acc_t, C2P, P2C, 1>(p, c2p, p2c, kv.k + (c.j0 + lj) * kv.ldk, kv.ldk, qt,
                                          i0 - (c.j0 + lj) + p.seq - 1, s + lj * kBlockQ);
}

// Scores of one chunk for one query block, key-major: s[j * kBlockQ + i] = qt-scaled q_i . k_j (+ bias),
// -inf for padded keys. (b, h, i0, rows): the query block; `tile`: kChunkK * kBlockQ scratch.
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
inline void chunk_scores(const Params& p, const Visibility& vis, const Chunk& c, const Block<acc_t>& kv,
                         const acc_t* qt, int64_t b, int64_t h, int64_t i0, int64_t rows, acc_t* s, acc_t* tile) {
  gemm<acc_t>(c.rows, kBlockQ, p.dim, kv.k + c.j0 * kv.ldk, kv.ldk, 1, qt, kBlockQ, s, kBlockQ, false);
  if (c.prefix) return;
  if (p.bias) add_bias_tile<scalar_t>(p, c, b, h, i0, rows, s, tile);
  if (p.c2p_t && p.p2c_t) {
    add_relative_terms<acc_t, true, true>(p, c, kv, qt, h, i0, s);
  } else if (p.c2p_t) {
    add_relative_terms<acc_t, true, false>(p, c, kv, qt, h, i0, s);
  } else if (p.p2c_t) {
    add_relative_terms<acc_t, false, true>(p, c, kv, qt, h, i0, s);
  }
  if (c.partial) {
    const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
    for (int64_t j = 0; j < c.rows; ++j)
      if (!vis.key_visible(b, c.j0 + j)) std::fill(s + j * kBlockQ, s + (j + 1) * kBlockQ, neg_inf);
  }
}

// Attention-dropout keep factors of a chunk's tile (0 or 1/(1-p)), key-major like the scores. Columns:
// prefix j -> j, sequence j -> P + j.
template <typename acc_t>
inline void chunk_keep(const Params& p, const Chunk& c, int64_t b, int64_t h, int64_t i0, acc_t* factor,
                       uint32_t* words) {
  const int64_t column = c.prefix ? c.j0 : p.prefix + c.j0;
  attention_keep_tile<acc_t>(p.seed, p.attn_threshold, static_cast<acc_t>(p.attn_keep_scale), column, c.rows, i0,
                             kBlockQ, static_cast<uint32_t>(b * p.heads + h), words, factor, kBlockQ);
}

// Runs work(item, thread_slot) for item < count over at::parallel_for's threads, handing items out
// dynamically (rows of different lengths stay balanced). Each item's result is independent of the
// thread that computes it, so the output does not depend on the number of threads.
template <typename Work>
inline void for_each_item(int64_t count, const Work& work) {
  if (count <= 0) return;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), count);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t slot = begin; slot < end; ++slot) {
      auto state = work.make_state();
      for (int64_t item = next.fetch_add(1); item < count; item = next.fetch_add(1)) work(item, state);
    }
  });
}

}  // namespace ptv2_cpu
