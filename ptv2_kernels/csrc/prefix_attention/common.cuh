// Device building blocks shared by the forward and backward kernels: tile shapes, shared-memory layout,
// the block-wide tensor-core matrix product, tile loads with masking and prefix dropout.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include "params.h"
#include "philox.cuh"

namespace ptv2 {

constexpr int kThreads = 128;  // 4 warps per block, for every kernel

// Tile shapes of element type T (__half, __nv_bfloat16 or float) and a head_dim bucket kHeadDim (32/64/128).
// Row and column tiles are both kBlock wide; 32 where 64 would need too much shared memory.
template <typename T, int kHeadDim>
struct Tile {
  static_assert(kHeadDim % 16 == 0, "head_dim bucket must be a multiple of the 16-wide mma tile");
  static constexpr int kBlock = kHeadDim * int(sizeof(T)) >= 256 ? 32 : 64;
  static constexpr int kThreadsPerRow = kThreads / kBlock;  // a row group: threads sharing one tile row
  // Padded row strides (elements) of shared tiles: multiples of 8 (16-bit wmma) / 4 (float), off the bank period.
  static constexpr int kLdT = kHeadDim + 8;  // [rows][head_dim] tiles of T
  static constexpr int kLdAcc = kHeadDim + 4;  // [rows][head_dim] float accumulators
  static constexpr int kLdS = kBlock + 4;  // [kBlock][kBlock] float score tiles
  static constexpr int kLdP = kBlock + 8;  // [kBlock][kBlock] probability tiles of T
};

// Hands out 128-byte aligned pieces of dynamic shared memory; on the host (base 0) it only measures.
class SmemCarver {
 public:
  __host__ __device__ explicit SmemCarver(uintptr_t base) : base_(base) {}
  template <typename U>
  __host__ __device__ U* take(int count) {
    offset_ = (offset_ + 127) / 128 * 128;
    U* piece = reinterpret_cast<U*>(base_ + offset_);
    offset_ += sizeof(U) * size_t(count);
    return piece;
  }
  __host__ __device__ size_t bytes() const { return offset_; }

 private:
  uintptr_t base_;
  size_t offset_ = 0;
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(x);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(x);
  } else {
    return x;
  }
}

// c[M x N] (= or +=) a[M x K] * b, all in shared memory, by the whole block. a is row-major; b is the
// row-major [K x N] matrix, or with kBTransposed its transpose stored row-major as [N x K]; c is row-major
// float. 16-bit types use tensor cores (wmma 16x16x16, one output tile per warp at a time); float uses a
// plain FMA loop (exact fp32, no TF32). Callers synchronise before and after.
template <typename T, int M, int N, int K, bool kBTransposed, bool kAccumulate>
__device__ __forceinline__ void block_gemm(const T* a, int lda, const T* b, int ldb, float* c, int ldc) {
  static_assert(M % 16 == 0 && N % 16 == 0 && K % 16 == 0, "tile sizes must be multiples of 16");
  if constexpr (std::is_same_v<T, float>) {
    for (int idx = threadIdx.x; idx < M * N; idx += kThreads) {
      const int m = idx / N, n = idx % N;
      float acc = kAccumulate ? c[m * ldc + n] : 0.f;
#pragma unroll 8
      for (int k = 0; k < K; ++k) {
        acc = fmaf(a[m * lda + k], kBTransposed ? b[n * ldb + k] : b[k * ldb + n], acc);
      }
      c[m * ldc + n] = acc;
    }
  } else {
    namespace wmma = nvcuda::wmma;
    using BLayout = std::conditional_t<kBTransposed, wmma::col_major, wmma::row_major>;
    constexpr int kTilesN = N / 16;
    for (int tile = threadIdx.x / 32; tile < (M / 16) * kTilesN; tile += kThreads / 32) {
      const int m0 = tile / kTilesN * 16, n0 = tile % kTilesN * 16;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      if constexpr (kAccumulate) {
        wmma::load_matrix_sync(acc, c + m0 * ldc + n0, ldc, wmma::mem_row_major);
      } else {
        wmma::fill_fragment(acc, 0.f);
      }
#pragma unroll
      for (int k0 = 0; k0 < K; k0 += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> frag_a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> frag_b;
        wmma::load_matrix_sync(frag_a, a + m0 * lda + k0, lda);
        wmma::load_matrix_sync(frag_b, kBTransposed ? b + n0 * ldb + k0 : b + k0 * ldb + n0, ldb);
        wmma::mma_sync(acc, frag_a, frag_b, acc);
      }
      wmma::store_matrix_sync(c + m0 * ldc + n0, acc, ldc, wmma::mem_row_major);
    }
  }
}

// Sum (reduce=add) or max over the kWidth consecutive lanes of a row group.
template <int kWidth>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
  for (int offset = kWidth / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}
template <int kWidth>
__device__ __forceinline__ float group_max(float x) {
#pragma unroll
  for (int offset = kWidth / 2; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

// Rows [row0, row0 + kRows) of a [B, H, N, D] tensor at (b, h) into a [kRows][ld] tile; zero beyond N and D.
template <typename T, int kRows, int kHeadDim>
__device__ __forceinline__ void load_rows(T* tile, int ld, const TensorBHND& t, int b, int h, int row0, int seq_len,
                                          int head_dim) {
  const T* base = static_cast<const T*>(t.data) + b * t.stride_b + h * t.stride_h;
  for (int idx = threadIdx.x; idx < kRows * kHeadDim; idx += kThreads) {
    const int r = idx / kHeadDim, d = idx % kHeadDim, row = row0 + r;
    tile[r * ld + d] = row < seq_len && d < head_dim ? base[row * t.stride_n + d] : from_float<T>(0.f);
  }
}

// Prefix rows [col0, col0 + kRows) of task `task`, head h from the compact [T, H, P, D] buffer, with
// batch row bh's prefix-dropout mask applied (kept values scaled by 1/(1-p), as Triton: in fp32 then cast).
template <typename T, int kRows, int kHeadDim>
__device__ __forceinline__ void load_prefix_rows(T* tile, int ld, const void* prefix, RngStream stream,
                                                 const PrefixAttentionParams& p, int task, int h, int bh, int col0) {
  const T* base = static_cast<const T*>(prefix) + (int64_t(task) * p.heads + h) * p.prefix_len * p.head_dim;
  for (int idx = threadIdx.x; idx < kRows * kHeadDim; idx += kThreads) {
    const int r = idx / kHeadDim, d = idx % kHeadDim, j = col0 + r;
    T value = from_float<T>(0.f);
    if (j < p.prefix_len && d < p.head_dim) {
      value = base[int64_t(j) * p.head_dim + d];
      if (p.prefix_dropout) {
        const bool keep = dropout_keep(p.seed, p.prefix_threshold, d, j, bh, stream);
        value = from_float<T>(keep ? to_float(value) * p.prefix_keep_scale : 0.f);
      }
    }
    tile[r * ld + d] = value;
  }
}

// Visibility of kCols attention columns starting at col0 of the prefix (is_prefix) or of the sequence.
template <int kCols>
__device__ __forceinline__ void load_column_mask(bool* col_ok, const PrefixAttentionParams& p, int b, int col0,
                                                 bool is_prefix) {
  for (int c = threadIdx.x; c < kCols; c += kThreads) {
    const int col = col0 + c;
    bool ok = col < (is_prefix ? p.prefix_len : p.seq_len);
    if (ok && !is_prefix && p.key_padding_mask != nullptr) ok = p.key_padding_mask[int64_t(b) * p.seq_len + col] != 0;
    col_ok[c] = ok;
  }
}

__device__ __forceinline__ int task_of(const PrefixAttentionParams& p, int b) {
  return p.task_ids != nullptr ? static_cast<int>(p.task_ids[b]) : 0;
}

// Calls fn(T(), std::integral_constant<int, kHeadDim>()) for the params' dtype and the smallest head_dim
// bucket (32, 64, 128) that holds head_dim; cudaErrorInvalidValue if none does.
template <typename Fn>
cudaError_t dispatch_dtype_head_dim(const PrefixAttentionParams& p, Fn&& fn) {
  auto by_dim = [&](auto type_tag) -> cudaError_t {
    if (p.head_dim <= 0) return cudaErrorInvalidValue;
    if (p.head_dim <= 32) return fn(type_tag, std::integral_constant<int, 32>());
    if (p.head_dim <= 64) return fn(type_tag, std::integral_constant<int, 64>());
    if (p.head_dim <= 128) return fn(type_tag, std::integral_constant<int, 128>());
    return cudaErrorInvalidValue;
  };
  switch (p.dtype) {
    case DType::kFloat16: return by_dim(__half());
    case DType::kBFloat16: return by_dim(__nv_bfloat16());
    case DType::kFloat32: return by_dim(float());
  }
  return cudaErrorInvalidValue;
}

// Launch kernel with dynamic shared memory above the 48 KB default when needed.
template <typename Kernel, typename... Args>
cudaError_t launch(Kernel kernel, dim3 grid, size_t smem_bytes, cudaStream_t stream, Args... args) {
  if (grid.x == 0 || grid.y == 0) return cudaSuccess;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem_bytes));
  if (err != cudaSuccess) return err;
  kernel<<<grid, kThreads, smem_bytes, stream>>>(args...);
  return cudaGetLastError();
}

}  // namespace ptv2
