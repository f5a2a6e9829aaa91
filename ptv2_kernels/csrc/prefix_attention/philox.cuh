// Philox4x32-10 and the dropout keep test of RNG contract v2, shared with the Triton kernels
// (kernels/prefix_attention_triton.py): key (seed lo, seed hi), counter (x >> 2, c1, c2, stream), element x
// reads output word x & 3, keep iff (word >> 8) >= threshold. Bit-identical to triton.language.random.philox.
// Also compiles as plain host C++ (tests/test_cuda_compile.py checks it against the Triton kernels' masks
// under the interpreter).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define PTV2_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PTV2_HOST_DEVICE inline
#endif

namespace ptv2 {

PTV2_HOST_DEVICE uint32_t mul_hi_u32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// The four output words of Philox4x32-10 (Salmon et al. 2011) for the given counter and 64-bit seed.
PTV2_HOST_DEVICE void philox4(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t out[4]) {
  constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
  constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi_b = mul_hi_u32(kRoundB, c2), lo_b = kRoundB * c2;
    const uint32_t hi_a = mul_hi_u32(kRoundA, c0), lo_a = kRoundA * c0;
    c0 = hi_b ^ c1 ^ k0;
    c2 = hi_a ^ c3 ^ k1;
    c1 = lo_b;
    c3 = lo_a;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// Counter word c3 of each dropout stream.
enum RngStream : uint32_t { kAttnStream = 0, kPrefixKStream = 1, kPrefixVStream = 2 };

// Keep test of RNG contract v2. Element x of a run of consecutive elements (attention column c of query row
// i, or prefix element d of prefix row j) reads word x & 3 of the counter (x >> 2, i or j, bh, stream): one
// Philox call serves four consecutive elements. Keep iff (word >> 8) >= threshold.
PTV2_HOST_DEVICE bool dropout_keep(uint64_t seed, uint32_t threshold, uint32_t x, uint32_t c1, uint32_t bh,
                                   RngStream stream) {
  uint32_t words[4];
  philox4(seed, x >> 2, c1, bh, stream, words);
  const uint32_t word = (x & 2) ? ((x & 1) ? words[3] : words[2]) : ((x & 1) ? words[1] : words[0]);
  return (word >> 8) >= threshold;
}

}  // namespace ptv2
