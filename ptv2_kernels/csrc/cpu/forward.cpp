// Forward of the fused CPU prefix attention: one online-softmax pass per query block over the prefix
// chunks (read from the compact bank, per-row dropout applied in a per-thread copy) and then the
// sequence chunks up to the row's last visible key; saves the row log-sum-exp.
//
// Work items are (batch row, head, group of query blocks), handed out dynamically; a group shares the
// setup of its (b, h): converted keys/values (half precision) and the dropped-out prefix.

#include "kernel_common.h"

namespace ptv2_cpu {
namespace {

template <typename scalar_t>
struct ForwardWork {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t kLaneVecs = kBlockQ / Vec::size();

  const Params& p;
  const ForwardOutputs& o;
  const Visibility& vis;
  int64_t blocks_per_group, groups_per_row;
  int64_t dim_pad;

  struct State {
    Scratch<acc_t> qt, q_rows, scores, acc, factor, keys, values, prefix_keys, prefix_values, row_factor;
    Scratch<uint32_t> words;
    State(const Params& p, int64_t dp)
        : qt(dp * kBlockQ), q_rows(std::is_same_v<scalar_t, acc_t> ? 0 : kBlockQ * dp), scores(kChunkK * kBlockQ),
          acc(kBlockQ * dp), factor(kChunkK * kBlockQ),
          keys(std::is_same_v<scalar_t, acc_t> ? 0 : p.seq * dp),
          values(std::is_same_v<scalar_t, acc_t> ? 0 : p.seq * dp), prefix_keys(p.prefix * dp),
          prefix_values(p.prefix * dp), row_factor(dp + 8), words(8 * kBlockQ + 2 * dp + 32) {}
  };

  State make_state() const { return State(p, dim_pad); }

  // Keys/values of row (b, h): prefix (bank task, dropout) and sequence, as acc_t rows.
  std::pair<Block<acc_t>, Block<acc_t>> blocks(int64_t b, int64_t h, State& s) const {
    const int64_t task = p.task_ids ? p.task_ids[b] : 0;
    const auto* pk = static_cast<const scalar_t*>(p.prefix_k) + task * p.pk_task_stride + h * p.pk_head_stride;
    const auto* pv = static_cast<const scalar_t*>(p.prefix_v) + task * p.pv_task_stride + h * p.pv_head_stride;
    Block<acc_t> prefix{};
    if (p.prefix_dropout) {
      const auto bh = static_cast<uint32_t>(b * p.heads + h);
      prefix.k = dropped_prefix<scalar_t>(p, pk, p.pk_row_stride, bh, kPrefixKeys, s.prefix_keys.get(), dim_pad,
                                          s.row_factor.get(), s.words.get());
      prefix.v = dropped_prefix<scalar_t>(p, pv, p.pv_row_stride, bh, kPrefixValues, s.prefix_values.get(), dim_pad,
                                          s.row_factor.get(), s.words.get());
      prefix.ldk = prefix.ldv = dim_pad;
    } else {
      prefix.k = rows_as_acc(pk, p.pk_row_stride, p.prefix, p.dim, s.prefix_keys.get(), dim_pad, prefix.ldk);
      prefix.v = rows_as_acc(pv, p.pv_row_stride, p.prefix, p.dim, s.prefix_values.get(), dim_pad, prefix.ldv);
    }
    const int64_t keys = vis.key_end(b);
    Block<acc_t> seq{};
    seq.k = rows_as_acc(row_ptr<scalar_t>(p, p.k, b, h, 0), p.k.row_stride, keys, p.dim, s.keys.get(), dim_pad,
                        seq.ldk);
    seq.v = rows_as_acc(row_ptr<scalar_t>(p, p.v, b, h, 0), p.v.row_stride, keys, p.dim, s.values.get(), dim_pad,
                        seq.ldv);
    return {prefix, seq};
  }

  void operator()(int64_t item, State& s) const {
    const int64_t group = item % groups_per_row, bh = item / groups_per_row;
    const int64_t b = bh / p.heads, h = bh % p.heads;
    const int64_t length = vis.length(b);
    const int64_t first = group * blocks_per_group * kBlockQ;
    if (first >= length) return;
    const int64_t last = std::min(length, first + blocks_per_group * kBlockQ);
    const auto [prefix, seq] = blocks(b, h, s);
    const std::vector<Chunk> chunks = row_chunks(p, vis, b);
    for (int64_t i0 = first; i0 < last; i0 += kBlockQ) query_block(b, h, i0, std::min(kBlockQ, last - i0), prefix, seq,
                                                                    chunks, s);
  }

  void query_block(int64_t b, int64_t h, int64_t i0, int64_t rows, const Block<acc_t>& prefix,
                   const Block<acc_t>& seq, const std::vector<Chunk>& chunks, State& s) const {
    const int64_t dim = p.dim, dp = dim_pad;
    acc_t* qt = s.qt.get();
    acc_t* scores = s.scores.get();
    acc_t* acc = s.acc.get();
    int64_t ldq;
    const acc_t* q = rows_as_acc(row_ptr<scalar_t>(p, p.q, b, h, i0), p.q.row_stride, rows, dim, s.q_rows.get(), dp,
                                 ldq);
    pack_transposed(q, ldq, rows, dim, static_cast<acc_t>(p.scale), qt);
    const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
    Vec m[kLaneVecs], l[kLaneVecs];
    for (int v = 0; v < kLaneVecs; ++v) {
      m[v] = Vec(neg_inf);
      l[v] = Vec(acc_t(0));
    }
    std::fill(acc, acc + rows * dp, acc_t(0));
    alignas(64) acc_t alpha[kBlockQ];
    for (const Chunk& c : chunks) {
      const Block<acc_t>& kv = c.prefix ? prefix : seq;
      chunk_scores<scalar_t>(p, vis, c, kv, qt, b, h, i0, rows, scores, s.factor.get());
      // online softmax, lane-wise over the block's queries
      Vec m_new[kLaneVecs], m_safe[kLaneVecs], sum[kLaneVecs];
      for (int v = 0; v < kLaneVecs; ++v) m_new[v] = m[v];
      for (int64_t j = 0; j < c.rows; ++j)
        for (int v = 0; v < kLaneVecs; ++v)
          m_new[v] = at::vec::maximum(m_new[v], Vec::loadu(scores + j * kBlockQ + v * Vec::size()));
      for (int v = 0; v < kLaneVecs; ++v) {
        // a query that has seen only padding so far keeps max -inf: shift by 0 so that exp gives 0, not NaN
        m_safe[v] = Vec::blendv(m_new[v], Vec(acc_t(0)), m_new[v] == Vec(neg_inf));
        (m[v] - m_safe[v]).exp_u20().store(alpha + v * Vec::size());
        sum[v] = Vec(acc_t(0));
      }
      for (int64_t j = 0; j < c.rows; ++j)
        for (int v = 0; v < kLaneVecs; ++v) {
          acc_t* t = scores + j * kBlockQ + v * Vec::size();
          const Vec e = (Vec::loadu(t) - m_safe[v]).exp_u20();
          sum[v] = sum[v] + e;
          e.store(t);
        }
      for (int v = 0; v < kLaneVecs; ++v) {
        l[v] = at::vec::fmadd(l[v], Vec::loadu(alpha + v * Vec::size()), sum[v]);
        m[v] = m_new[v];
      }
      if (p.attn_dropout) {
        acc_t* factor = s.factor.get();
        chunk_keep<acc_t>(p, c, b, h, i0, factor, s.words.get());
        for (int64_t e = 0; e < c.rows * kBlockQ; e += Vec::size())
          (Vec::loadu(scores + e) * Vec::loadu(factor + e)).store(scores + e);
      }
      for (int64_t i = 0; i < rows; ++i) {
        if (alpha[i] == acc_t(1)) continue;
        const Vec a(alpha[i]);
        acc_t* row = acc + i * dp;
        for (int64_t d = 0; d < dim; d += Vec::size()) (Vec::loadu(row + d) * a).store(row + d);
      }
      // acc[i, :] += sum_j p[j, i] v_j
      gemm<acc_t>(rows, dim, c.rows, scores, 1, kBlockQ, kv.v + c.j0 * kv.ldv, kv.ldv, acc, dp, true);
    }
    alignas(64) acc_t m_out[kBlockQ], l_out[kBlockQ];
    for (int v = 0; v < kLaneVecs; ++v) {
      m[v].store(m_out + v * Vec::size());
      l[v].store(l_out + v * Vec::size());
    }
    auto* lse = static_cast<acc_t*>(o.lse) + (b * p.heads + h) * p.seq + i0;
    for (int64_t i = 0; i < rows; ++i) {
      const bool seen = l_out[i] > acc_t(0);
      lse[i] = seen ? m_out[i] + std::log(l_out[i]) : std::numeric_limits<acc_t>::infinity();
      const Vec inv(seen ? acc_t(1) / l_out[i] : acc_t(0));
      acc_t* row = acc + i * dp;
      for (int64_t d = 0; d < dim; d += Vec::size()) (Vec::loadu(row + d) * inv).store(row + d);
      at::vec::convert(row, mutable_row_ptr<scalar_t>(p, o.out, b, h, i0 + i), dim);
    }
  }
};

}  // namespace

template <typename scalar_t>
void forward(const Params& p, const ForwardOutputs& o) {
  const Visibility vis(p);
  const int64_t blocks = (p.seq + kBlockQ - 1) / kBlockQ;
  // enough items to balance the threads, few enough to share each (b, h)'s setup
  const int64_t rows = p.batch * p.heads;
  const int64_t target = 4 * static_cast<int64_t>(at::get_num_threads());
  const int64_t per_group = std::clamp<int64_t>(rows * blocks / std::max<int64_t>(target, 1), 1, blocks);
  const int64_t groups = (blocks + per_group - 1) / per_group;
  using Vec = Vectorized<acc_type<scalar_t>>;
  const ForwardWork<scalar_t> work{p, o, vis, per_group, groups, round_up(p.dim, Vec::size())};
  for_each_item(rows * groups, work);
}

template void forward<float>(const Params&, const ForwardOutputs&);
template void forward<double>(const Params&, const ForwardOutputs&);
template void forward<c10::BFloat16>(const Params&, const ForwardOutputs&);
template void forward<c10::Half>(const Params&, const ForwardOutputs&);

}  // namespace ptv2_cpu
