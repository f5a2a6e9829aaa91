// Torch binding of the fused CPU prefix-attention kernels: tensors in, Params out, outputs allocated here.
// Arguments arrive validated by ptv2_kernels/ops/prefix_attention.py; cpu_backend.py normalises dtypes
// (bias in q's dtype, bool mask, int64 task_ids / cu_seqlens, unit last strides). Only the headers it needs
// (torch's pybind casters and three ATen ops), not torch/extension.h: a third of the compile time.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/utils/pybind.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "params.h"

namespace {

using ptv2_cpu::Params;
using ptv2_cpu::SeqTensor;

// Padded [B, H, N, D] or packed [total, H, D] (strides of row b's start come from cu_seqlens).
SeqTensor seq_tensor(const at::Tensor& t) {
  TORCH_CHECK(t.stride(-1) == 1 || t.size(-1) == 1, "ptv2 cpu kernel: the last dimension must be contiguous");
  SeqTensor s;
  s.data = t.data_ptr();
  if (t.dim() == 4) {
    s.batch_stride = t.stride(0);
    s.head_stride = t.stride(1);
    s.row_stride = t.stride(2);
  } else {
    s.head_stride = t.stride(1);
    s.row_stride = t.stride(0);
  }
  return s;
}

// An uninitialised tensor like q: padded [B, H, N, D] stored as [B, N, H, D] (transformers reshapes it to
// hidden states without a copy), or contiguous packed [total, H, D].
at::Tensor empty_like_qkv(const at::Tensor& q) {
  if (q.dim() == 3) return at::empty(q.sizes(), q.options());
  return at::empty({q.size(0), q.size(2), q.size(1), q.size(3)}, q.options()).transpose(1, 2);
}

at::ScalarType acc_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

Params make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
                   const at::Tensor& prefix_v, const c10::optional<at::Tensor>& mask,
                   const c10::optional<at::Tensor>& task_ids, const c10::optional<at::Tensor>& bias,
                   const c10::optional<at::Tensor>& cu_seqlens, int64_t max_seqlen, double scale, int64_t seed,
                   double attn_p, double prefix_p, const c10::optional<at::Tensor>& c2p_t,
                   const c10::optional<at::Tensor>& p2c_t, const c10::optional<at::Tensor>& p2c_rows) {
  TORCH_CHECK(prefix_k.dim() == 4 && prefix_v.dim() == 4, "ptv2 cpu kernel: prefix must be [T, H, P, D]");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() &&
                  prefix_k.scalar_type() == q.scalar_type() && prefix_v.scalar_type() == q.scalar_type(),
              "ptv2 cpu kernel: q, k, v and the prefix must share one dtype");
  Params p;
  const bool packed = cu_seqlens.has_value();
  p.batch = packed ? cu_seqlens->size(0) - 1 : q.size(0);
  p.heads = q.size(1);
  p.seq = packed ? max_seqlen : q.size(2);
  p.dim = q.size(-1);
  p.prefix = prefix_k.size(2);
  p.tasks = prefix_k.size(0);
  p.q = seq_tensor(q);
  p.k = seq_tensor(k);
  p.v = seq_tensor(v);
  p.prefix_k = prefix_k.data_ptr();
  p.prefix_v = prefix_v.data_ptr();
  p.pk_task_stride = prefix_k.stride(0);
  p.pk_head_stride = prefix_k.stride(1);
  p.pk_row_stride = prefix_k.stride(2);
  p.pv_task_stride = prefix_v.stride(0);
  p.pv_head_stride = prefix_v.stride(1);
  p.pv_row_stride = prefix_v.stride(2);
  if (task_ids) p.task_ids = task_ids->data_ptr<int64_t>();
  if (mask) p.key_mask = reinterpret_cast<const uint8_t*>(mask->data_ptr<bool>());
  if (cu_seqlens) p.cu_seqlens = cu_seqlens->data_ptr<int64_t>();
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == q.scalar_type(), "ptv2 cpu kernel: attn_bias must have q's dtype");
    p.bias = bias->data_ptr();
    for (int d = 0; d < 4; ++d) p.bias_strides[d] = bias->stride(d);
  }
  p.scale = scale;
  const auto check_table = [&](const at::Tensor& t, int64_t rows, int64_t cols) {
    TORCH_CHECK(!packed && t.is_contiguous() && t.scalar_type() == acc_dtype(q) && t.dim() == 3 &&
                    t.size(0) == p.heads && t.size(1) == rows && t.size(2) == cols,
                "ptv2 cpu kernel: bad relative-position table");
  };
  if (c2p_t || p2c_t) {
    p.rel_stride = (c2p_t ? *c2p_t : *p2c_t).size(2);
    TORCH_CHECK(p.rel_stride >= 2 * p.seq - 1 + ptv2_cpu::kBlockQ, "ptv2 cpu kernel: relative tables too short");
  }
  if (c2p_t) {
    check_table(*c2p_t, p.dim, p.rel_stride);
    p.c2p_t = c2p_t->data_ptr();
  }
  if (p2c_t) {
    check_table(*p2c_t, p.dim, p.rel_stride);
    p.p2c_t = p2c_t->data_ptr();
  }
  if (p2c_rows) {
    check_table(*p2c_rows, p.rel_stride, p.dim);
    p.p2c_rows = p2c_rows->data_ptr();
  }
  p.seed = static_cast<uint64_t>(seed);
  p.attn_dropout = attn_p > 0.0;
  p.prefix_dropout = prefix_p > 0.0;
  // the contract's threshold round(p * 2^24) and keep scale 1 / (1 - p), as every backend computes them
  p.attn_threshold = static_cast<uint32_t>(std::nearbyint(attn_p * 16777216.0));
  p.prefix_threshold = static_cast<uint32_t>(std::nearbyint(prefix_p * 16777216.0));
  p.attn_keep_scale = 1.0 / (1.0 - attn_p);
  p.prefix_keep_scale = 1.0 / (1.0 - prefix_p);
  return p;
}

template <typename F>
void dispatch(at::ScalarType dtype, const F& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, "ptv2 cpu kernel: unsupported dtype ", dtype);
  }
}

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                                const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& task_ids,
                                const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& cu_seqlens,
                                int64_t max_seqlen, double scale, int64_t seed, double attn_p, double prefix_p,
                                const c10::optional<at::Tensor>& c2p_t, const c10::optional<at::Tensor>& p2c_t) {
  const Params p = make_params(q, k, v, prefix_k, prefix_v, mask, task_ids, bias, cu_seqlens, max_seqlen, scale,
                               seed, attn_p, prefix_p, c2p_t, p2c_t, c10::nullopt);
  at::Tensor out = empty_like_qkv(q);
  // +inf where no query row is (packed rows shorter than max_seqlen): every element defined, as the
  // registered op's callers (and torch.compile's checks) expect of an output
  at::Tensor lse = at::full({p.batch, p.heads, p.seq}, std::numeric_limits<double>::infinity(),
                            q.options().dtype(acc_dtype(q)));
  ptv2_cpu::ForwardOutputs o;
  o.out = seq_tensor(out);
  o.lse = lse.data_ptr();
  dispatch(q.scalar_type(), [&](auto tag) { ptv2_cpu::forward<decltype(tag)>(p, o); });
  return {out, lse};
}

// (dq, dk, dv, dprefix_k, dprefix_v [T, H, P, D] float32 (float64 for double), dbias, dc2p, dp2c [H, D, rel_stride]
// (float32/float64, dc2p with the scale, dp2c without); the last three undefined unless asked for)
std::vector<at::Tensor> backward(const at::Tensor& d_out, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                                 const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& task_ids,
                                 const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& cu_seqlens,
                                 int64_t max_seqlen, const at::Tensor& out, const at::Tensor& lse, bool bias_grad,
                                 double scale, int64_t seed, double attn_p, double prefix_p,
                                 const c10::optional<at::Tensor>& c2p_t, const c10::optional<at::Tensor>& p2c_t,
                                 const c10::optional<at::Tensor>& p2c_rows, bool c2p_grad, bool p2c_grad) {
  const Params p = make_params(q, k, v, prefix_k, prefix_v, mask, task_ids, bias, cu_seqlens, max_seqlen, scale,
                               seed, attn_p, prefix_p, c2p_t, p2c_t, p2c_rows);
  TORCH_CHECK(!p2c_t || p2c_rows, "ptv2 cpu kernel: the backward of p2c needs its row table");
  TORCH_CHECK(d_out.scalar_type() == q.scalar_type() && d_out.sizes() == q.sizes(),
              "ptv2 cpu kernel: d_out must be shaped like q, in q's dtype");
  TORCH_CHECK(lse.is_contiguous() && lse.scalar_type() == acc_dtype(q), "ptv2 cpu kernel: bad saved lse");
  at::Tensor dq = empty_like_qkv(q), dk = empty_like_qkv(k), dv = empty_like_qkv(v);
  const auto acc = q.options().dtype(acc_dtype(q));
  at::Tensor rows_k = at::empty({p.batch, p.heads, p.prefix, p.dim}, acc);
  at::Tensor rows_v = at::empty({p.batch, p.heads, p.prefix, p.dim}, acc);
  at::Tensor dpk = at::empty({p.tasks, p.heads, p.prefix, p.dim}, acc);
  at::Tensor dpv = at::empty({p.tasks, p.heads, p.prefix, p.dim}, acc);
  at::Tensor dbias;
  if (bias_grad) dbias = at::zeros({p.batch, p.heads, p.seq, p.seq}, q.options());
  ptv2_cpu::BackwardArgs g;
  g.d_out = seq_tensor(d_out);
  g.out = seq_tensor(out);
  g.lse = lse.data_ptr();
  g.dq = seq_tensor(dq);
  g.dk = seq_tensor(dk);
  g.dv = seq_tensor(dv);
  g.dprefix_k_rows = rows_k.data_ptr();
  g.dprefix_v_rows = rows_v.data_ptr();
  g.dprefix_k = dpk.data_ptr();
  g.dprefix_v = dpv.data_ptr();
  g.dbias = bias_grad ? dbias.data_ptr() : nullptr;
  at::Tensor dc2p_rows, dp2c_rows, dc2p, dp2c;
  if (c2p_grad && c2p_t) {
    dc2p_rows = at::empty({p.batch, p.heads, p.dim, p.rel_stride}, acc);
    dc2p = at::empty({p.heads, p.dim, p.rel_stride}, acc);
    g.dc2p_rows = dc2p_rows.data_ptr();
    g.dc2p = dc2p.data_ptr();
  }
  if (p2c_grad && p2c_t) {
    dp2c_rows = at::empty({p.batch, p.heads, p.dim, p.rel_stride}, acc);
    dp2c = at::empty({p.heads, p.dim, p.rel_stride}, acc);
    g.dp2c_rows = dp2c_rows.data_ptr();
    g.dp2c = dp2c.data_ptr();
  }
  dispatch(q.scalar_type(), [&](auto tag) { ptv2_cpu::backward<decltype(tag)>(p, g); });
  return {dq, dk, dv, dpk, dpv, dbias, dc2p, dp2c};
}

// The vector instruction set the kernels were compiled for (ATen's CPU_CAPABILITY names).
std::string capability() {
#if defined(CPU_CAPABILITY_AVX512)
  return "AVX512";
#elif defined(CPU_CAPABILITY_AVX2)
  return "AVX2";
#else
  return "DEFAULT";
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ptv2_kernels: fused CPU prefix attention (csrc/cpu)";
  m.def("forward", &forward, "fused prefix attention forward -> (out, lse)");
  m.def("backward", &backward, "fused prefix attention backward -> (dq, dk, dv, dprefix_k, dprefix_v, dbias)");
  m.def("capability", &capability, "vector instruction set compiled for");
}
