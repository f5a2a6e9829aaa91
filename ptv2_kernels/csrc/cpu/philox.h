// Dropout RNG contract v2 on the CPU: Philox4x32-10 with key (seed lo, seed hi); all four output words
// are used. Element x of a run of consecutive elements reads word x & 3 of the call with counter
// (x >> 2, c1, c2, stream); it is kept iff (word >> 8) >= threshold (threshold = round(p * 2^24)).
//   attention probability (b, h, query i, column c; prefix columns first): counter (c >> 2, i, b*H + h, 0)
//   prefix key / value element (b, h, position j, dim d):                   counter (d >> 2, j, b*H + h, 1 / 2)
// The loops run over independent counters with plain 32/64-bit integer arithmetic so that the compiler
// vectorises them (vpmuludq); nothing depends on tile sizes.
#pragma once

#include <cstdint>

namespace ptv2_cpu {

enum Stream : uint32_t { kAttention = 0, kPrefixKeys = 1, kPrefixValues = 2 };

// out[w][l] = word w of Philox4x32-10(counter (c0[l], c1[l], c2, c3), key (seed lo, seed hi)), l < n.
inline void philox(uint64_t seed, int64_t n, const uint32_t* __restrict c0, const uint32_t* __restrict c1,
                   uint32_t c2, uint32_t c3, uint32_t* __restrict out0, uint32_t* __restrict out1,
                   uint32_t* __restrict out2, uint32_t* __restrict out3) {
  constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
  constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
  const uint32_t key0 = static_cast<uint32_t>(seed), key1 = static_cast<uint32_t>(seed >> 32);
  for (int64_t l = 0; l < n; ++l) {
    uint32_t x0 = c0[l], x1 = c1[l], x2 = c2, x3 = c3, k0 = key0, k1 = key1;
    for (int round = 0; round < 10; ++round) {
      const uint64_t pb = static_cast<uint64_t>(kRoundB) * x2;
      const uint64_t pa = static_cast<uint64_t>(kRoundA) * x0;
      x0 = static_cast<uint32_t>(pb >> 32) ^ x1 ^ k0;
      x2 = static_cast<uint32_t>(pa >> 32) ^ x3 ^ k1;
      x1 = static_cast<uint32_t>(pb);
      x3 = static_cast<uint32_t>(pa);
      k0 += kKeyA;
      k1 += kKeyB;
    }
    out0[l] = x0;
    out1[l] = x1;
    out2[l] = x2;
    out3[l] = x3;
  }
}

// Keep factors of a run of consecutive elements x0 .. x0 + count - 1 that share the other counters c1, c2,
// stream: factor[x - x0] = keep_scale if element x is kept, else 0. `words` is scratch of 4 * ceil((count + 3) / 4)
// + 8 uint32 (counters and outputs).
template <typename acc_t>
inline void keep_run(uint64_t seed, uint32_t threshold, acc_t keep_scale, int64_t x0, int64_t count, uint32_t c1,
                     uint32_t c2, Stream stream, uint32_t* words, acc_t* factor) {
  const int64_t first = x0 >> 2, groups = ((x0 + count - 1) >> 2) - first + 1;
  uint32_t* ctr0 = words;
  uint32_t* ctr1 = words + groups;
  uint32_t* out = words + 2 * groups;  // 4 * groups words
  for (int64_t g = 0; g < groups; ++g) {
    ctr0[g] = static_cast<uint32_t>(first + g);
    ctr1[g] = c1;
  }
  philox(seed, groups, ctr0, ctr1, c2, stream, out, out + groups, out + 2 * groups, out + 3 * groups);
  for (int64_t e = 0; e < count; ++e) {
    const int64_t x = x0 + e;
    const uint32_t word = out[(x & 3) * groups + ((x >> 2) - first)];
    factor[e] = (word >> 8) >= threshold ? keep_scale : acc_t(0);
  }
}

// Keep factors of the attention probabilities of query rows q0 .. q0 + lanes - 1 (the lanes) and columns
// c0 .. c0 + rows - 1, stored column-major like the kernels' score tiles: factor[r * ld + l] for column
// c0 + r, query q0 + l. `words` is scratch of 6 * lanes uint32.
template <typename acc_t>
inline void attention_keep_tile(uint64_t seed, uint32_t threshold, acc_t keep_scale, int64_t c0, int64_t rows,
                                int64_t q0, int64_t lanes, uint32_t batch_head, uint32_t* words, acc_t* factor,
                                int64_t ld) {
  uint32_t* ctr0 = words;
  uint32_t* ctr1 = words + lanes;
  uint32_t* out = words + 2 * lanes;  // 4 * lanes words
  for (int64_t l = 0; l < lanes; ++l) ctr1[l] = static_cast<uint32_t>(q0 + l);
  for (int64_t group = c0 >> 2; group <= (c0 + rows - 1) >> 2; ++group) {
    for (int64_t l = 0; l < lanes; ++l) ctr0[l] = static_cast<uint32_t>(group);
    philox(seed, lanes, ctr0, ctr1, batch_head, kAttention, out, out + lanes, out + 2 * lanes, out + 3 * lanes);
    for (int w = 0; w < 4; ++w) {
      const int64_t r = group * 4 + w - c0;
      if (r < 0 || r >= rows) continue;
      const uint32_t* word = out + w * lanes;
      acc_t* dst = factor + r * ld;
      for (int64_t l = 0; l < lanes; ++l) dst[l] = (word[l] >> 8) >= threshold ? keep_scale : acc_t(0);
    }
  }
}

}  // namespace ptv2_cpu
