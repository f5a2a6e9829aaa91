// Backward of the fused CPU prefix attention. One work item is one (batch row, head): for each query block
// it recomputes the probabilities of every chunk from the saved log-sum-exp and accumulates
//   dV += P_drop^T dO,  dS = P * (D * (dO V^T) - rowsum(dO * O)),  dQ += dS K,  dK += dS^T Q
// (D: the attention-dropout keep factors), with dK/dV of the sequence and of the prefix held in
// per-thread float32 (float64) buffers for the whole row. The prefix gradients of each (b, h) are written
// to their own slot of a [B, H, P, D] buffer (with the row's prefix-dropout factors applied) and summed
// over the batch, per task, in batch order afterwards: deterministic, whatever the number of threads.

#include "kernel_common.h"

namespace ptv2_cpu {
namespace {

template <typename scalar_t>
struct BackwardWork {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t kLaneVecs = kBlockQ / Vec::size();
  static constexpr bool kConvert = !std::is_same_v<scalar_t, acc_t>;

  const Params& p;
  const BackwardArgs& g;
  const Visibility& vis;
  int64_t dim_pad;

  struct State {
    Scratch<acc_t> qt, dot, q_rows, do_rows, probs, dprobs, dropped, factor, dq, dqt, dq_rel;
    Scratch<acc_t> dk, dv, dpk, dpv, keys, values, prefix_keys, prefix_values, row_factor;
    Scratch<uint32_t> words;
    State(const Params& p, int64_t dp)
        : qt(dp * kBlockQ), dot(dp * kBlockQ), q_rows(kConvert ? kBlockQ * dp : 0),
          do_rows(kConvert ? kBlockQ * dp : 0), probs(kChunkK * kBlockQ), dprobs(kChunkK * kBlockQ),
          dropped(kChunkK * kBlockQ), factor(kChunkK * kBlockQ), dq(kBlockQ * dp), dqt(p.c2p_t ? dp * kBlockQ : 0),
          dq_rel(p.c2p_t ? kBlockQ * dp : 0), dk(p.seq * dp), dv(p.seq * dp),
          dpk(p.prefix * dp), dpv(p.prefix * dp), keys(kConvert ? p.seq * dp : 0), values(kConvert ? p.seq * dp : 0),
          prefix_keys(p.prefix * dp), prefix_values(p.prefix * dp), row_factor(dp + 8),
          words(8 * kBlockQ + 2 * dp + 32) {}
  };

  State make_state() const { return State(p, dim_pad); }

  void operator()(int64_t item, State& s) const {
    const int64_t b = item / p.heads, h = item % p.heads;
    const int64_t length = vis.length(b), keys = vis.key_end(b), dp = dim_pad, dim = p.dim;
    const auto bh = static_cast<uint32_t>(b * p.heads + h);
    const int64_t task = p.task_ids ? p.task_ids[b] : 0;
    const auto* pk = static_cast<const scalar_t*>(p.prefix_k) + task * p.pk_task_stride + h * p.pk_head_stride;
    const auto* pv = static_cast<const scalar_t*>(p.prefix_v) + task * p.pv_task_stride + h * p.pv_head_stride;
    Block<acc_t> prefix{}, seq{};
    if (p.prefix_dropout) {
      prefix.k = dropped_prefix<scalar_t>(p, pk, p.pk_row_stride, bh, kPrefixKeys, s.prefix_keys.get(), dp,
                                          s.row_factor.get(), s.words.get());
      prefix.v = dropped_prefix<scalar_t>(p, pv, p.pv_row_stride, bh, kPrefixValues, s.prefix_values.get(), dp,
                                          s.row_factor.get(), s.words.get());
      prefix.ldk = prefix.ldv = dp;
    } else {
      prefix.k = rows_as_acc(pk, p.pk_row_stride, p.prefix, dim, s.prefix_keys.get(), dp, prefix.ldk);
      prefix.v = rows_as_acc(pv, p.pv_row_stride, p.prefix, dim, s.prefix_values.get(), dp, prefix.ldv);
    }
    seq.k = rows_as_acc(row_ptr<scalar_t>(p, p.k, b, h, 0), p.k.row_stride, keys, dim, s.keys.get(), dp, seq.ldk);
    seq.v = rows_as_acc(row_ptr<scalar_t>(p, p.v, b, h, 0), p.v.row_stride, keys, dim, s.values.get(), dp, seq.ldv);
    std::fill(s.dk.get(), s.dk.get() + keys * dp, acc_t(0));
    std::fill(s.dv.get(), s.dv.get() + keys * dp, acc_t(0));
    std::fill(s.dpk.get(), s.dpk.get() + p.prefix * dp, acc_t(0));
    std::fill(s.dpv.get(), s.dpv.get() + p.prefix * dp, acc_t(0));
    for (void* table : {g.dc2p_rows, g.dp2c_rows}) {
      if (!table) continue;
      acc_t* rows = static_cast<acc_t*>(table) + bh * dim * p.rel_stride;
      std::fill(rows, rows + dim * p.rel_stride, acc_t(0));
    }
    const std::vector<Chunk> chunks = row_chunks(p, vis, b);
    // query rows from the last one with a nonzero output gradient on contribute exactly nothing (padded
    // rows of a model, whose outputs are never read): dq = 0 there, no work
    const int64_t queries = gradient_rows(b, h, length);
    for (int64_t i0 = 0; i0 < queries; i0 += kBlockQ)
      query_block(b, h, i0, std::min(kBlockQ, queries - i0), prefix, seq, chunks, s);
    for (int64_t i = queries; i < length; ++i) {
      scalar_t* dq = mutable_row_ptr<scalar_t>(p, g.dq, b, h, i);
      std::fill(dq, dq + dim, scalar_t(0));
    }
    write_row_grads(b, h, length, keys, s);
  }

  // One past the last query row of (b, h) whose output gradient is not all zeros.
  int64_t gradient_rows(int64_t b, int64_t h, int64_t length) const {
    for (int64_t i = length; i > 0; --i) {
      const scalar_t* row = row_ptr<scalar_t>(p, g.d_out, b, h, i - 1);
      for (int64_t d = 0; d < p.dim; ++d)
        if (static_cast<acc_t>(row[d]) != acc_t(0)) return i;
    }
    return 0;
  }

  void query_block(int64_t b, int64_t h, int64_t i0, int64_t rows, const Block<acc_t>& prefix,
                   const Block<acc_t>& seq, const std::vector<Chunk>& chunks, State& s) const {
    const int64_t dim = p.dim, dp = dim_pad;
    const acc_t scale = static_cast<acc_t>(p.scale);
    const scalar_t* q = row_ptr<scalar_t>(p, p.q, b, h, i0);
    const scalar_t* d_out = row_ptr<scalar_t>(p, g.d_out, b, h, i0);
    const scalar_t* out = row_ptr<scalar_t>(p, g.out, b, h, i0);
    int64_t ldq, ldo;
    const acc_t* q_rows = rows_as_acc(q, p.q.row_stride, rows, dim, s.q_rows.get(), dp, ldq);
    const acc_t* do_rows = rows_as_acc(d_out, g.d_out.row_stride, rows, dim, s.do_rows.get(), dp, ldo);
    pack_transposed(q_rows, ldq, rows, dim, scale, s.qt.get());
    pack_transposed(do_rows, ldo, rows, dim, acc_t(1), s.dot.get());
    // per-lane log-sum-exp (+inf past the block: probabilities 0) and rowsum(dO * O)
    alignas(64) acc_t lse[kBlockQ], delta[kBlockQ];
    const auto* saved = static_cast<const acc_t*>(g.lse) + (b * p.heads + h) * p.seq + i0;
    for (int64_t i = 0; i < kBlockQ; ++i) {
      lse[i] = i < rows ? saved[i] : std::numeric_limits<acc_t>::infinity();
      acc_t sum = 0;
      if (i < rows) {
        const scalar_t* grad_row = d_out + i * g.d_out.row_stride;
        const scalar_t* out_row = out + i * g.out.row_stride;
        for (int64_t d = 0; d < dim; ++d) sum += static_cast<acc_t>(grad_row[d]) * static_cast<acc_t>(out_row[d]);
      }
      delta[i] = sum;
    }
    acc_t* probs = s.probs.get();
    acc_t* dprobs = s.dprobs.get();
    acc_t* dq = s.dq.get();
    std::fill(dq, dq + rows * dp, acc_t(0));
    if (p.c2p_t) std::fill(s.dqt.get(), s.dqt.get() + dim * kBlockQ, acc_t(0));
    for (const Chunk& c : chunks) {
      const Block<acc_t>& kv = c.prefix ? prefix : seq;
      acc_t* dk = (c.prefix ? s.dpk.get() : s.dk.get()) + c.j0 * dp;
      acc_t* dv = (c.prefix ? s.dpv.get() : s.dv.get()) + c.j0 * dp;
      const int64_t n = c.rows * kBlockQ;
      chunk_scores<scalar_t>(p, vis, c, kv, s.qt.get(), b, h, i0, rows, probs, s.dropped.get());
      for (int64_t j = 0; j < c.rows; ++j)
        for (int v = 0; v < kLaneVecs; ++v) {
          acc_t* t = probs + j * kBlockQ + v * Vec::size();
          (Vec::loadu(t) - Vec::loadu(lse + v * Vec::size())).exp_u20().store(t);
        }
      const acc_t* weights = probs;  // the probabilities after dropout
      if (p.attn_dropout) {
        acc_t* factor = s.factor.get();
        acc_t* dropped = s.dropped.get();
        chunk_keep<acc_t>(p, c, b, h, i0, factor, s.words.get());
        for (int64_t e = 0; e < n; e += Vec::size())
          (Vec::loadu(probs + e) * Vec::loadu(factor + e)).store(dropped + e);
        weights = dropped;
      }
      // dV[j, :] += sum_i p_drop[j, i] dO_i
      gemm<acc_t>(c.rows, dim, rows, weights, kBlockQ, 1, do_rows, ldo, dv, dp, true);
      // dP[j, i] = v_j . dO_i
      gemm<acc_t>(c.rows, kBlockQ, dim, kv.v + c.j0 * kv.ldv, kv.ldv, 1, s.dot.get(), kBlockQ, dprobs, kBlockQ, false);
      // dS = P * (D * dP - delta), in place
      for (int64_t j = 0; j < c.rows; ++j)
        for (int v = 0; v < kLaneVecs; ++v) {
          const int64_t e = j * kBlockQ + v * Vec::size();
          Vec dpv = Vec::loadu(dprobs + e);
          if (p.attn_dropout) dpv = dpv * Vec::loadu(s.factor.get() + e);
          (Vec::loadu(probs + e) * (dpv - Vec::loadu(delta + v * Vec::size()))).store(dprobs + e);
        }
      if (g.dbias && !c.prefix) {
        auto* dbias = static_cast<scalar_t*>(g.dbias) + ((b * p.heads + h) * p.seq + i0) * p.seq + c.j0;
        if constexpr (std::is_same_v<scalar_t, float>) {
          at::vec::transpose_mxn<float>(dprobs, kBlockQ, dbias, p.seq, static_cast<int>(c.rows),
                                        static_cast<int>(rows));
        } else {
          for (int64_t i = 0; i < rows; ++i)
            for (int64_t j = 0; j < c.rows; ++j) dbias[i * p.seq + j] = static_cast<scalar_t>(dprobs[j * kBlockQ + i]);
        }
      }
      // dQ[i, :] += sum_j dS[j, i] k_j ; dK[j, :] += sum_i dS[j, i] q_i (scales applied when written)
      gemm<acc_t>(rows, dim, c.rows, dprobs, 1, kBlockQ, kv.k + c.j0 * kv.ldk, kv.ldk, dq, dp, true);
      gemm<acc_t>(c.rows, dim, rows, dprobs, kBlockQ, 1, q_rows, ldq, dk, dp, true);
      if (!c.prefix) relative_grads(b, h, i0, rows, c, kv, dprobs, dk, s);
    }
    if (p.c2p_t) {  // dq += sum_j dS[i, j] c2p row t(i, j), accumulated transposed
      acc_t* add = s.dq_rel.get();
      at::vec::transpose_mxn<acc_t>(s.dqt.get(), kBlockQ, add, dp, static_cast<int>(dim), static_cast<int>(rows));
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t d = 0; d < dim; d += Vec::size())
          (Vec::loadu(dq + i * dp + d) + Vec::loadu(add + i * dp + d)).store(dq + i * dp + d);
    }
    for (int64_t i = 0; i < rows; ++i) {
      acc_t* row = dq + i * dp;
      for (int64_t d = 0; d < dim; d += Vec::size()) (Vec::loadu(row + d) * Vec(scale)).store(row + d);
      at::vec::convert(row, mutable_row_ptr<scalar_t>(p, g.dq, b, h, i0 + i), dim);
    }
  }

  // dqt[d + r][li] += sum_lj ds[lj][li] c2p_t[d + r][t0 - lj + li] for r < R dims (sharing the ds loads).
  template <int R>
  void c2p_dq_rows(const acc_t* table, int64_t d, int64_t keys, int64_t t0, const acc_t* ds, acc_t* dqt) const {
    constexpr int64_t W = Vec::size();
    const int64_t ld = p.rel_stride;
    Vec acc[R][kLaneVecs];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < kLaneVecs; ++v) acc[r][v] = Vec::loadu(dqt + (d + r) * kBlockQ + v * W);
    for (int64_t lj = 0; lj < keys; ++lj) {
      Vec grad[kLaneVecs];
      for (int v = 0; v < kLaneVecs; ++v) grad[v] = Vec::loadu(ds + lj * kBlockQ + v * W);
      for (int r = 0; r < R; ++r) {
        const acc_t* t = table + (d + r) * ld + t0 - lj;
        for (int v = 0; v < kLaneVecs; ++v) acc[r][v] = at::vec::fmadd(grad[v], Vec::loadu(t + v * W), acc[r][v]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < kLaneVecs; ++v) acc[r][v].store(dqt + (d + r) * kBlockQ + v * W);
  }

  // The relative terms' share of the gradients for one sequence chunk of a query block (ds: its dS tile):
  // dq (transposed, into s.dqt), dk (rows `dk` of the chunk), and the tables' per-row gradients if wanted.
  void relative_grads(int64_t b, int64_t h, int64_t i0, int64_t rows, const Chunk& c, const Block<acc_t>& kv,
                      const acc_t* ds, acc_t* dk, State& s) const {
    const int64_t ld = p.rel_stride, dim = p.dim, dp = dim_pad, bh = b * p.heads + h;
    auto shift = [&](int64_t lj) { return i0 - (c.j0 + lj) + p.seq - 1; };  // t of lane 0
    if (p.c2p_t) {
      const acc_t* table = static_cast<const acc_t*>(p.c2p_t) + h * dim * ld;
      int64_t d = 0;
      for (; d + 4 <= dim; d += 4) c2p_dq_rows<4>(table, d, c.rows, shift(0), ds, s.dqt.get());
      for (; d < dim; ++d) c2p_dq_rows<1>(table, d, c.rows, shift(0), ds, s.dqt.get());
      if (g.dc2p_rows) {  // dc2p[t] += dS[i, j] * scale q_i (the packed queries carry the scale)
        acc_t* grad = static_cast<acc_t*>(g.dc2p_rows) + bh * dim * ld;
        for (int64_t lj = 0; lj < c.rows; ++lj)
          for (int64_t d = 0; d < dim; ++d) {
            acc_t* t = grad + d * ld + shift(lj);
            for (int v = 0; v < kLaneVecs; ++v) {
              const int64_t e = v * Vec::size();
              at::vec::fmadd(Vec::loadu(ds + lj * kBlockQ + e), Vec::loadu(s.qt.get() + d * kBlockQ + e),
                             Vec::loadu(t + e)).store(t + e);
            }
          }
      }
    }
    if (p.p2c_t) {  // dk_j += sum_i dS[i, j] p2c row t(i, j): rows t of one key are consecutive in i
      const acc_t* table = static_cast<const acc_t*>(p.p2c_rows) + h * ld * dim;
      for (int64_t lj = 0; lj < c.rows; ++lj)
        gemm<acc_t>(1, dim, rows, ds + lj * kBlockQ, kBlockQ, 1, table + shift(lj) * dim, dim, dk + lj * dp, dp, true);
      if (g.dp2c_rows) {  // dp2c[t] += dS[i, j] k_j (times the scale afterwards)
        acc_t* grad = static_cast<acc_t*>(g.dp2c_rows) + bh * dim * ld;
        for (int64_t lj = 0; lj < c.rows; ++lj) {
          const acc_t* key = kv.k + (c.j0 + lj) * kv.ldk;
          for (int64_t d = 0; d < dim; ++d) {
            acc_t* t = grad + d * ld + shift(lj);
            const Vec k(key[d]);
            for (int v = 0; v < kLaneVecs; ++v) {
              const int64_t e = v * Vec::size();
              at::vec::fmadd(Vec::loadu(ds + lj * kBlockQ + e), k, Vec::loadu(t + e)).store(t + e);
            }
          }
        }
      }
    }
  }

  // dk, dv of the row's tokens (zero past its last visible key) and the row's prefix gradients.
  void write_row_grads(int64_t b, int64_t h, int64_t length, int64_t keys, State& s) const {
    const int64_t dim = p.dim, dp = dim_pad;
    const acc_t scale = static_cast<acc_t>(p.scale);
    for (int64_t j = 0; j < length; ++j) {
      scalar_t* dk = mutable_row_ptr<scalar_t>(p, g.dk, b, h, j);
      scalar_t* dv = mutable_row_ptr<scalar_t>(p, g.dv, b, h, j);
      if (j >= keys) {
        std::fill(dk, dk + dim, scalar_t(0));
        std::fill(dv, dv + dim, scalar_t(0));
        continue;
      }
      acc_t* row = s.dk.get() + j * dp;
      for (int64_t d = 0; d < dim; d += Vec::size()) (Vec::loadu(row + d) * Vec(scale)).store(row + d);
      at::vec::convert(row, dk, dim);
      at::vec::convert(s.dv.get() + j * dp, dv, dim);
    }
    const auto bh = static_cast<uint32_t>(b * p.heads + h);
    const acc_t prefix_keep = static_cast<acc_t>(p.prefix_keep_scale);
    auto* dpk = static_cast<acc_t*>(g.dprefix_k_rows) + bh * p.prefix * dim;
    auto* dpv = static_cast<acc_t*>(g.dprefix_v_rows) + bh * p.prefix * dim;
    acc_t* factor = s.row_factor.get();
    for (int64_t j = 0; j < p.prefix; ++j) {
      const acc_t* gk = s.dpk.get() + j * dp;
      const acc_t* gv = s.dpv.get() + j * dp;
      if (p.prefix_dropout) {
        keep_run<acc_t>(p.seed, p.prefix_threshold, prefix_keep, 0, dim, static_cast<uint32_t>(j), bh, kPrefixKeys,
                        s.words.get(), factor);
        for (int64_t d = 0; d < dim; ++d) dpk[j * dim + d] = gk[d] * scale * factor[d];
        keep_run<acc_t>(p.seed, p.prefix_threshold, prefix_keep, 0, dim, static_cast<uint32_t>(j), bh, kPrefixValues,
                        s.words.get(), factor);
        for (int64_t d = 0; d < dim; ++d) dpv[j * dim + d] = gv[d] * factor[d];
      } else {
        for (int64_t d = 0; d < dim; ++d) {
          dpk[j * dim + d] = gk[d] * scale;
          dpv[j * dim + d] = gv[d];
        }
      }
    }
  }
};

// dprefix[t, h] = sum over rows b with task t (in batch order) of rows[b, h]; zero for unused tasks.
template <typename acc_t>
void reduce_prefix_rows(const Params& p, const acc_t* rows, acc_t* out) {
  const int64_t per_head = p.prefix * p.dim;
  if (per_head == 0) return;
  at::parallel_for(0, p.tasks * p.heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t th = begin; th < end; ++th) {
      const int64_t t = th / p.heads, h = th % p.heads;
      acc_t* dst = out + th * per_head;
      std::fill(dst, dst + per_head, acc_t(0));
      for (int64_t b = 0; b < p.batch; ++b) {
        if ((p.task_ids ? p.task_ids[b] : 0) != t) continue;
        const acc_t* src = rows + (b * p.heads + h) * per_head;
        for (int64_t e = 0; e < per_head; ++e) dst[e] += src[e];
      }
    }
  });
}

// out[e] = sum over b (in batch order) of rows[b, e] for the per-row gradients [B, per_row].
template <typename acc_t>
void sum_over_batch(const Params& p, const acc_t* rows, acc_t* out, int64_t per_row) {
  constexpr int64_t kGrain = 4096;
  at::parallel_for(0, per_row, kGrain, [&](int64_t begin, int64_t end) {
    std::fill(out + begin, out + end, acc_t(0));
    for (int64_t b = 0; b < p.batch; ++b)
      for (int64_t e = begin; e < end; ++e) out[e] += rows[b * per_row + e];
  });
}

}  // namespace

template <typename scalar_t>
void backward(const Params& p, const BackwardArgs& g) {
  using acc_t = acc_type<scalar_t>;
  const Visibility vis(p);
  const BackwardWork<scalar_t> work{p, g, vis, round_up(p.dim, Vectorized<acc_t>::size())};
  for_each_item(p.batch * p.heads, work);
  reduce_prefix_rows<acc_t>(p, static_cast<const acc_t*>(g.dprefix_k_rows), static_cast<acc_t*>(g.dprefix_k));
  reduce_prefix_rows<acc_t>(p, static_cast<const acc_t*>(g.dprefix_v_rows), static_cast<acc_t*>(g.dprefix_v));
  const int64_t table = p.heads * p.dim * p.rel_stride;
  if (g.dc2p_rows) sum_over_batch<acc_t>(p, static_cast<const acc_t*>(g.dc2p_rows), static_cast<acc_t*>(g.dc2p), table);
  if (g.dp2c_rows) sum_over_batch<acc_t>(p, static_cast<const acc_t*>(g.dp2c_rows), static_cast<acc_t*>(g.dp2c), table);
}

template void backward<float>(const Params&, const BackwardArgs&);
template void backward<double>(const Params&, const BackwardArgs&);
template void backward<c10::BFloat16>(const Params&, const BackwardArgs&);
template void backward<c10::Half>(const Params&, const BackwardArgs&);

}  // namespace ptv2_cpu
