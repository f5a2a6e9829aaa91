// Thin torch binding of the CUDA prefix-attention kernels: argument checks, strides, allocation, the
// current stream. Only device-generic c10 headers are used (c10/cuda/* and ATen/cuda/* need generated
// headers that the CPU torch wheel lacks), so this file also compiles against a CPU-only torch: the
// current CUDA stream comes from the CUDA DeviceGuardImpl registered at runtime by a CUDA torch,
// through c10::Stream::native_handle() (the cudaStream_t).
#include <torch/extension.h>

#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <optional>
#include <vector>

#include "params.h"

namespace {

using ptv2::PrefixAttentionParams;

cudaStream_t current_stream(const at::Device& device) {
  const c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  return static_cast<cudaStream_t>(impl.getStream(device).native_handle());
}

ptv2::TensorBHND bhnd(const at::Tensor& t) {
  return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

// A [B, H, N, D] tensor stored as [B, N, H, D] (what transformers reshapes to hidden states without a copy).
at::Tensor empty_bnhd_like(const at::Tensor& t) {
  return at::empty({t.size(0), t.size(2), t.size(1), t.size(3)}, t.options()).transpose(1, 2);
}

void check_bhnd(const at::Tensor& t, const at::Tensor& q, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.dim() == 4 && t.sizes() == q.sizes(), name, " must be [B, H, N, D] = ", q.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.stride(3) == 1, name, " must have a unit stride in its last dimension");
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), name, " must have the dtype of q");
  TORCH_CHECK(t.device() == q.device(), name, " must be on the device of q");
}

// Everything the forward and backward share: shapes, tensors, mask, task ids, scales, dropout.
PrefixAttentionParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                                  const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& task_ids,
                                  double scale, double scale_log2, int64_t seed, bool attn_dropout,
                                  int64_t attn_threshold, double attn_keep_scale, bool prefix_dropout,
                                  int64_t prefix_threshold, double prefix_keep_scale) {
  check_bhnd(q, q, "q");
  check_bhnd(k, q, "k");
  check_bhnd(v, q, "v");
  const int64_t batch = q.size(0), heads = q.size(1), seq_len = q.size(2), head_dim = q.size(3);
  TORCH_CHECK(head_dim >= 1 && head_dim <= 128, "head_dim must be in 1..128, got ", head_dim);
  for (const at::Tensor* t : {&prefix_k, &prefix_v}) {
    TORCH_CHECK(t->dim() == 4 && t->size(1) == heads && t->size(3) == head_dim && t->sizes() == prefix_k.sizes(),
                "prefix_k/prefix_v must be [T, H, P, D] with H, D of q, got ", t->sizes());
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == q.scalar_type() && t->device() == q.device(),
                "prefix_k/prefix_v must be contiguous, on q's device, with q's dtype");
  }

  PrefixAttentionParams p;
  switch (q.scalar_type()) {
    case at::kHalf: p.dtype = ptv2::DType::kFloat16; break;
    case at::kBFloat16: p.dtype = ptv2::DType::kBFloat16; break;
    case at::kFloat: p.dtype = ptv2::DType::kFloat32; break;
    default: TORCH_CHECK(false, "dtype must be float16, bfloat16 or float32, got ", q.scalar_type());
  }
  p.q = bhnd(q);
  p.k = bhnd(k);
  p.v = bhnd(v);
  p.prefix_k = prefix_k.data_ptr();
  p.prefix_v = prefix_v.data_ptr();
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool || mask->scalar_type() == at::kByte, "mask must be bool or uint8");
    TORCH_CHECK(mask->is_contiguous() && mask->device() == q.device() && mask->sizes() == at::IntArrayRef({batch, seq_len}),
                "mask must be a contiguous [B, N] tensor on q's device");
    p.key_padding_mask = static_cast<const uint8_t*>(mask->data_ptr());
  }
  if (task_ids.has_value()) {
    TORCH_CHECK(task_ids->scalar_type() == at::kLong && task_ids->is_contiguous() && task_ids->numel() == batch &&
                    task_ids->device() == q.device(),
                "task_ids must be a contiguous int64 [B] tensor on q's device");
    p.task_ids = task_ids->data_ptr<int64_t>();
  } else {
    TORCH_CHECK(prefix_k.size(0) == 1, "task_ids is required with a prefix bank of ", prefix_k.size(0), " tasks");
  }
  TORCH_CHECK(batch * heads <= INT32_MAX && seq_len <= INT32_MAX, "B*H and N must fit in int32");
  p.batch = static_cast<int>(batch);
  p.heads = static_cast<int>(heads);
  p.seq_len = static_cast<int>(seq_len);
  p.prefix_len = static_cast<int>(prefix_k.size(2));
  p.head_dim = static_cast<int>(head_dim);
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale_log2);
  p.seed = static_cast<uint64_t>(seed);
  p.attn_dropout = attn_dropout;
  p.attn_threshold = static_cast<uint32_t>(attn_threshold);
  p.attn_keep_scale = static_cast<float>(attn_keep_scale);
  p.prefix_dropout = prefix_dropout;
  p.prefix_threshold = static_cast<uint32_t>(prefix_threshold);
  p.prefix_keep_scale = static_cast<float>(prefix_keep_scale);
  return p;
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

// Returns {out [B, H, N, D] stored as [B, N, H, D], lse float32 [B, H, N]}.
std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                                const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& task_ids,
                                double scale, double scale_log2, int64_t seed, bool attn_dropout,
                                int64_t attn_threshold, double attn_keep_scale, bool prefix_dropout,
                                int64_t prefix_threshold, double prefix_keep_scale) {
  PrefixAttentionParams p = make_params(q, k, v, prefix_k, prefix_v, mask, task_ids, scale, scale_log2, seed,
                                        attn_dropout, attn_threshold, attn_keep_scale, prefix_dropout,
                                        prefix_threshold, prefix_keep_scale);
  const c10::DeviceGuard guard(q.device());
  at::Tensor out = empty_bnhd_like(q);
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  p.out = bhnd(out);
  p.lse = lse.data_ptr<float>();
  check_launch(ptv2::prefix_attention_forward(p, current_stream(q.device())), "prefix_attention_forward");
  return {out, lse};
}

// Returns {dq, dk, dv (stored as [B, N, H, D]), d_prefix_k, d_prefix_v (float32 [T, H, P, D])}.
std::vector<at::Tensor> backward(const at::Tensor& d_out, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                                 const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& task_ids,
                                 const at::Tensor& out, const at::Tensor& lse, double scale, double scale_log2,
                                 int64_t seed, bool attn_dropout, int64_t attn_threshold, double attn_keep_scale,
                                 bool prefix_dropout, int64_t prefix_threshold, double prefix_keep_scale,
                                 bool deterministic) {
  PrefixAttentionParams p = make_params(q, k, v, prefix_k, prefix_v, mask, task_ids, scale, scale_log2, seed,
                                        attn_dropout, attn_threshold, attn_keep_scale, prefix_dropout,
                                        prefix_threshold, prefix_keep_scale);
  check_bhnd(d_out, q, "d_out");
  check_bhnd(out, q, "out");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() &&
                  lse.sizes() == at::IntArrayRef({q.size(0), q.size(1), q.size(2)}),
              "lse must be a contiguous float32 [B, H, N] tensor");
  const c10::DeviceGuard guard(q.device());
  at::Tensor dq = empty_bnhd_like(q), dk = empty_bnhd_like(k), dv = empty_bnhd_like(v);
  at::Tensor d_prefix_k = at::zeros(prefix_k.sizes(), prefix_k.options().dtype(at::kFloat));
  at::Tensor d_prefix_v = at::zeros_like(d_prefix_k);
  at::Tensor delta = at::empty_like(lse);
  p.out = bhnd(out);
  p.d_out = bhnd(d_out);
  p.dq = bhnd(dq);
  p.dk = bhnd(dk);
  p.dv = bhnd(dv);
  p.d_prefix_k = d_prefix_k.data_ptr<float>();
  p.d_prefix_v = d_prefix_v.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.deterministic = deterministic;
  check_launch(ptv2::prefix_attention_backward(p, current_stream(q.device())), "prefix_attention_backward");
  return {dq, dk, dv, d_prefix_k, d_prefix_v};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CUDA kernels of ptv2_kernels' fused prefix attention (backend='cuda')";
  m.def("forward", &forward, "prefix attention forward: (out, lse)", py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("prefix_k"), py::arg("prefix_v"), py::arg("mask"), py::arg("task_ids"), py::arg("scale"),
        py::arg("scale_log2"), py::arg("seed"), py::arg("attn_dropout"), py::arg("attn_threshold"),
        py::arg("attn_keep_scale"), py::arg("prefix_dropout"), py::arg("prefix_threshold"),
        py::arg("prefix_keep_scale"));
  m.def("backward", &backward, "prefix attention backward: (dq, dk, dv, d_prefix_k, d_prefix_v)", py::arg("d_out"),
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("prefix_k"), py::arg("prefix_v"), py::arg("mask"),
        py::arg("task_ids"), py::arg("out"), py::arg("lse"), py::arg("scale"), py::arg("scale_log2"),
        py::arg("seed"), py::arg("attn_dropout"), py::arg("attn_threshold"), py::arg("attn_keep_scale"),
        py::arg("prefix_dropout"), py::arg("prefix_threshold"), py::arg("prefix_keep_scale"),
        py::arg("deterministic"));
}
