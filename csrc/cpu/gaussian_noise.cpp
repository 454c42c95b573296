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
// The same with AVX2 on 8 counters at once: a 32x32->64 multiply is vpmuludq on the even and
// the odd lanes (the compiler's own vectorization of philox_portable handles these poorly).
__attribute__((target("avx2"))) inline void mulhilo8(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

__attribute__((target("avx2"))) void philox_avx2(uint64_t ctr0, int64_t n, uint64_t seed, Words& r) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  for (int64_t k = 0; k < n; k += 8) {  // may compute up to 7 counters past n: r has room (kBlock % 8 == 0)
    alignas(32) uint32_t lo[8], hi[8];
    for (int j = 0; j < 8; ++j) {
      const uint64_t c = ctr0 + k + j;
      lo[j] = static_cast<uint32_t>(c);
      hi[j] = static_cast<uint32_t>(c >> 32);
    }
    __m256i c0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo));
    __m256i c1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi));
    __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo8(c0, m0, hi0, lo0);
      mulhilo8(c2, m1, hi1, lo1);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
      c1 = lo1;
      c3 = lo0;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(&r[0][k]), c0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(&r[1][k]), c1);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(&r[2][k]), c2);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(&r[3][k]), c3);
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
  return gaussian_noise_functional(x, sigma, channel_sigma, p, mask, seed, offset, run);
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
