// Host-side interface of the CUDA prefix-attention kernels: the parameter struct and the launchers.
// Pure C++/CUDA runtime (no torch); the torch binding (binding.cpp) fills the struct.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace ptv2 {

// A [B, H, N, D] tensor with arbitrary batch/head/sequence strides (in elements) and a unit last stride.
struct TensorBHND {
  void* data = nullptr;
  int64_t stride_b = 0;
  int64_t stride_h = 0;
  int64_t stride_n = 0;
};

enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

// One call of the operation (SPEC §1). Attention columns 0..P-1 are the prefix, P..P+N-1 the sequence.
// Dropout follows the RNG contract of kernels/prefix_attention_triton.py (see philox.cuh).
struct PrefixAttentionParams {
  TensorBHND q, k, v, out;           // forward inputs and output
  TensorBHND d_out, dq, dk, dv;      // backward only
  const void* prefix_k = nullptr;    // contiguous [T, H, P, D], same dtype as q
  const void* prefix_v = nullptr;
  float* d_prefix_k = nullptr;       // float32 [T, H, P, D], zero-filled by the caller (backward only)
  float* d_prefix_v = nullptr;
  const int64_t* task_ids = nullptr;        // [B] task of each row, or null (T = 1)
  const uint8_t* key_padding_mask = nullptr;  // contiguous [B, N], 1 = real token, or null
  float* lse = nullptr;    // float32 [B, H, N]: base-2 log-sum-exp of the scaled scores, +inf for empty rows
  float* delta = nullptr;  // float32 [B, H, N]: rowsum(out * d_out), backward scratch

  int batch = 0, heads = 0, seq_len = 0, prefix_len = 0, head_dim = 0;
  DType dtype = DType::kFloat16;
  float scale = 1.f;       // score scale
  float scale_log2 = 1.f;  // scale * log2(e)

  uint64_t seed = 0;
  bool attn_dropout = false;     // dropout on attention probabilities (prefix columns included)
  uint32_t attn_threshold = 0;   // keep iff (philox >> 8) >= threshold, threshold = round(p * 2^24)
  float attn_keep_scale = 1.f;   // 1 / (1 - p)
  bool prefix_dropout = false;   // per-batch-row dropout on the prefix K/V elements
  uint32_t prefix_threshold = 0;
  float prefix_keep_scale = 1.f;

  bool deterministic = false;  // reduce prefix gradients over the batch in a fixed order (no atomics)
};

// Fill out and lse. Supported: dtype fp16/bf16/fp32, head_dim 1..128 (kernels for 32, 64, 128; smaller
// head dims run zero-padded in the next one). Returns the launch error, or cudaErrorInvalidValue.
cudaError_t prefix_attention_forward(const PrefixAttentionParams& params, cudaStream_t stream);

// Fill dq, dk, dv and add the prefix gradients into d_prefix_k/v (reads q, k, v, prefix, out, d_out, lse).
cudaError_t prefix_attention_backward(const PrefixAttentionParams& params, cudaStream_t stream);

}  // namespace ptv2
