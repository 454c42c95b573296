// CPU kernel of gaussian_noise: Philox normals drawn in the pass that adds them, never stored
// beyond a block of 128 values on the stack.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "cpu/memory.h"
#include "gaussian_noise.h"

namespace fastablate {
namespace {

constexpr int64_t kBlock = 64;       // Philox counters per block (4 values each); a multiple of 8
constexpr int64_t kGrain = 1 << 14;  // elements per task

using Words = uint32_t[4][kBlock];   // the four output words of each counter of a block

// Philox words of counters ctr0 .. ctr0 + n - 1, portable (the compiler vectorizes it).
void philox_portable(uint64_t ctr0, int64_t n, uint64_t seed, Words& r) {
  for (int64_t k = 0; k < n; ++k) {
    const philox::Out4 o = philox::philox4x32_10(ctr0 + k, seed);
    for (int w = 0; w < 4; ++w) r[w][k] = o.v[w];
  }
}

#if defined(__x86_64__)
// The same with AVX2. A counter word sits in the low half of a 64-bit lane, so one vpmuludq
// gives both halves of a round's product; the high halves are never read (vpmuludq ignores
// them). Two independent sets of 4 counters per step let their multiplies overlap.
__attribute__((target("avx2"))) inline __m256i low_halves(__m256i a, __m256i b) {  // 8 words: a's 4, then b's
  const __m256i idx = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
  return _mm256_permute2x128_si256(_mm256_permutevar8x32_epi32(a, idx), _mm256_permutevar8x32_epi32(b, idx), 0x20);
}

__attribute__((target("avx2"))) void philox_avx2(uint64_t ctr0, int64_t n, uint64_t seed, Words& r) {
  const __m256i m0 = _mm256_set1_epi64x(0xD2511F53u), m1 = _mm256_set1_epi64x(0xCD9E8D57u);
  __m256i k0[10], k1[10];
  uint32_t key0 = static_cast<uint32_t>(seed), key1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    k0[round] = _mm256_set1_epi64x(key0);
    k1[round] = _mm256_set1_epi64x(key1);
    key0 += 0x9E3779B9u;
    key1 += 0xBB67AE85u;
  }
  const __m256i lanes = _mm256_setr_epi64x(0, 1, 2, 3), four = _mm256_set1_epi64x(4);
  for (int64_t k = 0; k < n; k += 8) {  // may compute up to 7 counters past n: r has room (kBlock % 8 == 0)
    const __m256i ca = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<int64_t>(ctr0 + k)), lanes);
    const __m256i cb = _mm256_add_epi64(ca, four);
    __m256i a0 = ca, a1 = _mm256_srli_epi64(ca, 32), a2 = _mm256_setzero_si256(), a3 = a2;
    __m256i b0 = cb, b1 = _mm256_srli_epi64(cb, 32), b2 = a2, b3 = a2;
#pragma GCC unroll 10
    for (int round = 0; round < 10; ++round) {
      const __m256i pa0 = _mm256_mul_epu32(a0, m0), pa2 = _mm256_mul_epu32(a2, m1);
      const __m256i pb0 = _mm256_mul_epu32(b0, m0), pb2 = _mm256_mul_epu32(b2, m1);
      a0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pa2, 32), a1), k0[round]);
      a2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pa0, 32), a3), k1[round]);
      b0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pb2, 32), b1), k0[round]);
      b2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pb0, 32), b3), k1[round]);
      a1 = pa2;
      a3 = pa0;
      b1 = pb2;
      b3 = pb0;
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(&r[0][k]), low_halves(a0, b0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(&r[1][k]), low_halves(a1, b1));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(&r[2][k]), low_halves(a2, b2));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(&r[3][k]), low_halves(a3, b3));
  }
}
#endif

void philox_words(uint64_t ctr0, int64_t n, uint64_t seed, Words& r) {
#if defined(__x86_64__)
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2) return philox_avx2(ctr0, n, seed, r);
#endif
  philox_portable(ctr0, n, seed, r);
}

// Box-Muller on the words of a block, written out in element order; branch-free, vectorized,
// built for AVX2 and for the baseline (chosen at load time).
__attribute__((target_clones("avx2", "default"))) void normals_from(const Words& r, int64_t n, float* __restrict__ z) {
  float zz[4][kBlock];
  for (int64_t k = 0; k < n; ++k) {
    philox::box_muller(r[0][k], r[1][k], zz[0][k], zz[1][k]);
    philox::box_muller(r[2][k], r[3][k], zz[2][k], zz[3][k]);
  }
  for (int64_t k = 0; k < n; ++k) {
    for (int w = 0; w < 4; ++w) z[4 * k + w] = zz[w][k];
  }
}

// Normals (and, if u is given, uniforms) of quads quad0 .. quad0 + nquads - 1, in element order.
void fill_block(uint64_t quad0, int64_t nquads, uint64_t seed, float* z, uint32_t* u) {
  alignas(32) Words r;
  philox_words(quad0, nquads, seed, r);
  normals_from(r, nquads, z);
  if (u == nullptr) return;
  philox_words(quad0 | philox::kUniformStream, nquads, seed, r);
  for (int64_t k = 0; k < nquads; ++k) {
    for (int w = 0; w < 4; ++w) u[4 * k + w] = r[w][k];
  }
}

// keep ? a : b as a bitwise blend through an unsigned integer of the same width: exact (x
// stays x, -0.0 included), and unlike a ternary on floats the compiler vectorizes it.
template <typename T>
using BitsOf = std::conditional_t<sizeof(T) == 2, uint16_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>>;

template <typename T>
inline T select_bits(bool keep, T a, T b) {
  using U = BitsOf<T>;
  U ua, ub;
  std::memcpy(&ua, &a, sizeof(T));
  std::memcpy(&ub, &b, sizeof(T));
  const U m = static_cast<U>(U(0) - static_cast<U>(keep));
  const U r = static_cast<U>((ua & m) | (ub & static_cast<U>(~m)));
  T out;
  std::memcpy(&out, &r, sizeof(T));
  return out;
}

template <typename scalar_t>
void noise_rows(const NoisePlan& plan, scalar_t* y, double sigma, uint64_t seed, uint64_t offset) {
  const scalar_t* x = plan.x.const_data_ptr<scalar_t>();
  const int64_t numel = plan.x.numel(), inner = plan.inner, channels = plan.channels;
  const float* sc = plan.sigma_c.defined() ? plan.sigma_c.const_data_ptr<float>() : nullptr;
  const bool* pm = plan.plane_mask.defined() ? plan.plane_mask.const_data_ptr<bool>() : nullptr;
  const bool* em = plan.elem_mask.defined() ? plan.elem_mask.const_data_ptr<bool>() : nullptr;
  const uint64_t threshold = plan.threshold;
  const bool bernoulli = !pm && !em && threshold < (uint64_t(1) << 32);
  using acc_t = at::opmath_type<scalar_t>;  // double for double, float otherwise
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    alignas(64) float z[4 * kBlock];
    alignas(64) uint32_t u[4 * kBlock];
    for (int64_t i = begin; i < end;) {
      const int64_t plane = i / inner;
      const int64_t stop = std::min(end, (plane + 1) * inner);
      const acc_t s = static_cast<acc_t>(sigma) * (sc ? static_cast<acc_t>(sc[plane % channels]) : acc_t(1));
      if (pm && !pm[plane]) {
        if (y != x) std::copy(x + i, x + stop, y + i);
        i = stop;
        continue;
      }
      while (i < stop) {
        const uint64_t quad0 = (offset + i) >> 2;
        const int64_t shift = static_cast<int64_t>(offset + i - 4 * quad0);
        const int64_t len = std::min<int64_t>(stop - i, 4 * kBlock - shift);
        const int64_t nquads = static_cast<int64_t>(((offset + i + len - 1) >> 2) - quad0 + 1);
        fill_block(quad0, nquads, seed, z, bernoulli ? u : nullptr);
        scalar_t* yi = y + i;
        const scalar_t* xi = x + i;
        const float* zi = z + shift;
        if (bernoulli) {
          const uint32_t* ui = u + shift;
          const uint32_t t32 = static_cast<uint32_t>(threshold);  // < 2^32 here; same-width compare vectorizes
          for (int64_t j = 0; j < len; ++j) {
            const scalar_t x0 = xi[j];
            yi[j] = select_bits(ui[j] < t32, static_cast<scalar_t>(static_cast<acc_t>(x0) + s * zi[j]), x0);
          }
        } else if (em) {
          const bool* mi = em + i;
          for (int64_t j = 0; j < len; ++j) {
            const scalar_t x0 = xi[j];
            yi[j] = select_bits(mi[j], static_cast<scalar_t>(static_cast<acc_t>(x0) + s * zi[j]), x0);
          }
        } else {
          for (int64_t j = 0; j < len; ++j) yi[j] = static_cast<scalar_t>(static_cast<acc_t>(xi[j]) + s * zi[j]);
        }
        i += len;
      }
    }
  });
}

void run(const NoisePlan& plan, const at::Tensor& y, double sigma, int64_t seed, int64_t offset) {
  if (plan.x.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.x.scalar_type(), "gaussian_noise_cpu", [&] {
    noise_rows<scalar_t>(plan, y.mutable_data_ptr<scalar_t>(), sigma, static_cast<uint64_t>(seed),
                         static_cast<uint64_t>(offset));
  });
}

at::Tensor gaussian_noise_cpu(const at::Tensor& x, double sigma, const c10::optional<at::Tensor>& channel_sigma,
                              double p, const c10::optional<at::Tensor>& mask, int64_t seed, int64_t offset) {
  return gaussian_noise_functional(x, sigma, channel_sigma, p, mask, seed, offset, empty_output, run);
}

void gaussian_noise_cpu_(at::Tensor& x, double sigma, const c10::optional<at::Tensor>& channel_sigma, double p,
                         const c10::optional<at::Tensor>& mask, int64_t seed, int64_t offset) {
  gaussian_noise_inplace(x, sigma, channel_sigma, p, mask, seed, offset, run);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastablate, CPU, m) {
  m.impl("gaussian_noise", &gaussian_noise_cpu);
  m.impl("gaussian_noise_", &gaussian_noise_cpu_);
}

}  // namespace fastablate
