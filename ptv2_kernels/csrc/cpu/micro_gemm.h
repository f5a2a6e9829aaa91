// A small register-blocked GEMM on at::vec::Vectorized for the attention kernels' block products:
//   C[m, n] (=, +=) sum_k A(m, k) * B[k * ldb + n]      m < M, n < N, k < K
// with A(m, k) = A[m * a_rs + k * a_ks] read as broadcast scalars (any two strides: row-major, or the
// transposed score tiles) and B rows contiguous in n (q/k/v rows in place, or packed tiles). Every tile
// is MR rows by NV vectors of accumulators held in registers; the last vector of a row may be partial
// (masked loads and stores), so N need not be a multiple of the vector width. The order of the k sum is
// fixed, so results do not depend on threads or on where a block sits in memory.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>

namespace ptv2_cpu {

using at::vec::Vectorized;

#if defined(CPU_CAPABILITY_AVX512)
constexpr int kVectorRegisters = 32;
#else
constexpr int kVectorRegisters = 16;
#endif

// Rows per register tile for NV vectors per row: accumulators + one row of B + a broadcast fit the
// register file.
template <int NV>
constexpr int tile_rows() {
  return std::max(1, std::min(12, (kVectorRegisters - NV - 2) / NV));
}

template <typename T, int MR, int NV, bool TAIL>
inline void gemm_tile(int64_t K, const T* __restrict A, int64_t a_rs, int64_t a_ks, const T* __restrict B,
                      int64_t ldb, T* __restrict C, int64_t ldc, int tail, bool accumulate) {
  using Vec = Vectorized<T>;
  constexpr int W = Vec::size();
  Vec c[MR][NV];
  if (accumulate) {
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v)
        c[r][v] = (TAIL && v == NV - 1) ? Vec::loadu(C + r * ldc + v * W, tail) : Vec::loadu(C + r * ldc + v * W);
  } else {
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) c[r][v] = Vec(T(0));
  }
  for (int64_t k = 0; k < K; ++k) {
    const T* b_row = B + k * ldb;
    Vec b[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      b[v] = (TAIL && v == NV - 1) ? Vec::loadu(b_row + v * W, tail) : Vec::loadu(b_row + v * W);
    const T* a_col = A + k * a_ks;
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const Vec a(a_col[r * a_rs]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) c[r][v] = at::vec::fmadd(a, b[v], c[r][v]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      if (TAIL && v == NV - 1) {
        c[r][v].store(C + r * ldc + v * W, tail);
      } else {
        c[r][v].store(C + r * ldc + v * W);
      }
    }
}

// All row tiles of one panel of NV vectors (the last one possibly partial).
template <typename T, int NV, bool TAIL>
inline void gemm_panel(int64_t M, int64_t K, const T* A, int64_t a_rs, int64_t a_ks, const T* B, int64_t ldb,
                       T* C, int64_t ldc, int tail, bool accumulate) {
  constexpr int MR = tile_rows<NV>();
  int64_t m = 0;
  for (; m + MR <= M; m += MR)
    gemm_tile<T, MR, NV, TAIL>(K, A + m * a_rs, a_rs, a_ks, B, ldb, C + m * ldc, ldc, tail, accumulate);
  const int64_t rest = M - m;
  if (rest == 0) return;
  const T* a = A + m * a_rs;
  T* c = C + m * ldc;
  // the remaining rows, one tile of exactly that height (MR <= 12 for NV >= 2, 16 for NV = 1)
  switch (rest) {
#define PTV2_REST(R)                                                                           \
  case R:                                                                                      \
    if constexpr (R < MR) gemm_tile<T, R, NV, TAIL>(K, a, a_rs, a_ks, B, ldb, c, ldc, tail, accumulate); \
    break;
    PTV2_REST(1) PTV2_REST(2) PTV2_REST(3) PTV2_REST(4) PTV2_REST(5) PTV2_REST(6) PTV2_REST(7) PTV2_REST(8)
    PTV2_REST(9) PTV2_REST(10) PTV2_REST(11) PTV2_REST(12) PTV2_REST(13) PTV2_REST(14) PTV2_REST(15)
#undef PTV2_REST
    default:
      break;
  }
}

// C (=, +=) A * B for any M, N, K >= 0 (see the header comment for the layouts).
template <typename T>
inline void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t a_rs, int64_t a_ks, const T* B, int64_t ldb,
                 T* C, int64_t ldc, bool accumulate) {
  constexpr int W = Vectorized<T>::size();
  constexpr int NVMAX = 4;
  if (M <= 0 || N <= 0) return;
  if (K <= 0 && accumulate) return;
  for (int64_t n0 = 0; n0 < N; n0 += NVMAX * W) {
    const int64_t width = std::min<int64_t>(N - n0, NVMAX * W);
    const int nv = static_cast<int>((width + W - 1) / W);
    const int tail = static_cast<int>(width - (nv - 1) * W);
    const bool partial = tail != W;
    const T* b = B + n0;
    T* c = C + n0;
#define PTV2_PANEL(NV)                                                                     \
  if (nv == NV) {                                                                          \
    if (partial)                                                                           \
      gemm_panel<T, NV, true>(M, K, A, a_rs, a_ks, b, ldb, c, ldc, tail, accumulate);     \
    else                                                                                   \
      gemm_panel<T, NV, false>(M, K, A, a_rs, a_ks, b, ldb, c, ldc, tail, accumulate);    \
    continue;                                                                              \
  }
    PTV2_PANEL(1) PTV2_PANEL(2) PTV2_PANEL(3) PTV2_PANEL(4)
#undef PTV2_PANEL
  }
}

}  // namespace ptv2_cpu
