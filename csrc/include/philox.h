// Philox4x32-10 for host and device: the per-token random keys of the masking ops.
// Spec and counter layout: pyimputmae/reference/philox.py
//   counter = (token, row, offset_lo, offset_hi), key = (seed_lo, seed_hi), word 0 is the key.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define PYIMPUTMAE_HD __host__ __device__ __forceinline__
#else
#define PYIMPUTMAE_HD inline
#endif

namespace pyimputmae {

PYIMPUTMAE_HD uint32_t philox_token_key(uint32_t token, uint32_t row, uint64_t seed, uint64_t offset) {
  uint32_t c0 = token, c1 = row, c2 = static_cast<uint32_t>(offset), c3 = static_cast<uint32_t>(offset >> 32);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

}  // namespace pyimputmae
