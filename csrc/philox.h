// Counter-based random numbers for fastablate's kernels, shared by CPU and CUDA.
//
// Philox-4x32-10 (Salmon et al. 2011, "Parallel Random Numbers: As Easy as 1, 2, 3"), keyed
// by a 64-bit seed. Element g of a draw (g = offset + element index) belongs to quad g >> 2:
// counter q gives the four normals of elements 4q .. 4q+3 (two Box-Muller pairs), counter
// q | 2^63 their four 32-bit uniforms (drawn only where a Bernoulli mask is). A value depends
// on (seed, g) alone, never on threads, chunking, the device's grid or on p. log/sin/cos are
// branch-free polynomials (abs. error < 1e-6) so that the CPU loops vectorize.
#pragma once
#include <math.h>
#include <string.h>

#include <cstdint>

#if defined(__CUDACC__)
#define FA_HD __host__ __device__ __forceinline__
#else
#define FA_HD inline
#endif

namespace fastablate {
namespace philox {

struct Out4 {
  uint32_t v[4];
};

FA_HD void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

FA_HD Out4 philox4x32_10(uint64_t counter, uint64_t seed) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(0xD2511F53u, c0, hi0, lo0);
    mulhilo(0xCD9E8D57u, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Out4{{c0, c1, c2, c3}};
}

FA_HD uint32_t as_bits(float f) {
  uint32_t i;
  memcpy(&i, &f, sizeof(i));
  return i;
}

FA_HD float as_float(uint32_t i) {
  float f;
  memcpy(&f, &i, sizeof(f));
  return f;
}

// log(x) for x in (0, 1]: x = m * 2^e with m in [sqrt(1/2), sqrt(2)) found by integer
// arithmetic on the bits (no branch, so loops of it vectorize), then log m = 2 atanh(s).
FA_HD float log_unit(float x) {
  const uint32_t ix = as_bits(x) - 0x3F3504F3u;  // bits of sqrt(1/2)
  const int32_t e = static_cast<int32_t>(ix) >> 23;
  const float m = as_float((ix & 0x007FFFFFu) + 0x3F3504F3u);
  const float s = (m - 1.0f) / (m + 1.0f), s2 = s * s;
  const float poly = 1.0f + s2 * (1.0f / 3 + s2 * (1.0f / 5 + s2 * (1.0f / 7 + s2 * (1.0f / 9))));
  return 0.69314718f * static_cast<float>(e) + 2.0f * s * poly;
}

// (cos, sin) of 2*pi*t for t in [0, 1): quadrant q = round(4t), Taylor on [-pi/4, pi/4],
// then the quadrant's swap and sign flips as bit operations.
FA_HD void cossin_turn(float t, float& c, float& s) {
  const int q = static_cast<int>(4.0f * t + 0.5f);
  const float a = (4.0f * t - static_cast<float>(q)) * 1.57079633f, a2 = a * a;
  const float sn = a * (1.0f + a2 * (-1.0f / 6 + a2 * (1.0f / 120 + a2 * (-1.0f / 5040 + a2 * (1.0f / 362880)))));
  const float cs = 1.0f + a2 * (-0.5f + a2 * (1.0f / 24 + a2 * (-1.0f / 720 + a2 * (1.0f / 40320 + a2 * (-1.0f / 3628800)))));
  const bool odd = q & 1;
  c = as_float(as_bits(odd ? sn : cs) ^ (static_cast<uint32_t>((q + 1) & 2) << 30));  // negative in quadrants 1, 2
  s = as_float(as_bits(odd ? cs : sn) ^ (static_cast<uint32_t>(q & 2) << 30));        // negative in quadrants 2, 3
}

// Two N(0, 1) values from two 32-bit uniforms (Box-Muller).
FA_HD void box_muller(uint32_t ua, uint32_t ub, float& z0, float& z1) {
  // a = (2k + 1) / 2^24 with k < 2^23: exact in float, in (0, 1), so log(a) is finite and the
  // radius has no rounding error where a is near 1 (where it is near 0).
  const float a = static_cast<float>(static_cast<int32_t>(((ua >> 9) << 1) | 1u)) * 5.9604645e-08f;
  const float b = static_cast<float>(static_cast<int32_t>(ub >> 8)) * 5.9604645e-08f;           // [0, 1)
  float c, s;
  cossin_turn(b, c, s);
  const float rad = sqrtf(-2.0f * log_unit(a));
  z0 = rad * c;
  z1 = rad * s;
}

constexpr uint64_t kUniformStream = uint64_t(1) << 63;  // counter bit of the mask uniforms

// The four normals of quad q (elements 4q .. 4q+3).
FA_HD void normals4(uint64_t quad, uint64_t seed, float* z) {
  const Out4 r = philox4x32_10(quad, seed);
  box_muller(r.v[0], r.v[1], z[0], z[1]);
  box_muller(r.v[2], r.v[3], z[2], z[3]);
}

// The four 32-bit uniforms of quad q, for Bernoulli masks.
FA_HD Out4 uniforms4(uint64_t quad, uint64_t seed) { return philox4x32_10(quad | kUniformStream, seed); }

// Bernoulli(p) by comparing a 32-bit uniform with floor(p * 2^32); p >= 1 always keeps.
inline uint64_t bernoulli_threshold(double p) {
  return p >= 1.0 ? (uint64_t(1) << 32) : p <= 0.0 ? 0 : static_cast<uint64_t>(p * 4294967296.0);
}

}  // namespace philox
}  // namespace fastablate
