// CPU kernel of gaussian_noise: Philox normals drawn in the pass that adds them, never stored
// beyond a block of 128 values on the stack.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "gaussian_noise.h"

namespace fastablate {
namespace {

constexpr int64_t kBlock = 64;       // Philox counters per block (4 values each)
constexpr int64_t kGrain = 1 << 14;  // elements per task

// Normals (and, if u is given, uniforms) of quads quad0 .. quad0 + nquads - 1, in element
// order. Branch-free loops the compiler vectorizes; built for AVX2 and for the baseline,
// the one to run chosen at load time.
__attribute__((target_clones("avx2", "default"))) void fill_block(uint64_t quad0, int64_t nquads, uint64_t seed,
                                                                  float* __restrict__ z, uint32_t* __restrict__ u) {
  uint32_t r[4][kBlock];
  float zz[4][kBlock];
  for (int64_t k = 0; k < nquads; ++k) {
    const philox::Out4 o = philox::philox4x32_10(quad0 + k, seed);
    for (int w = 0; w < 4; ++w) r[w][k] = o.v[w];
  }
  for (int64_t k = 0; k < nquads; ++k) {
    philox::box_muller(r[0][k], r[1][k], zz[0][k], zz[1][k]);
    philox::box_muller(r[2][k], r[3][k], zz[2][k], zz[3][k]);
  }
  for (int64_t k = 0; k < nquads; ++k) {
    for (int w = 0; w < 4; ++w) z[4 * k + w] = zz[w][k];
  }
  if (u == nullptr) return;
  for (int64_t k = 0; k < nquads; ++k) {
    const philox::Out4 o = philox::uniforms4(quad0 + k, seed);
    for (int w = 0; w < 4; ++w) u[4 * k + w] = o.v[w];
  }
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
          for (int64_t j = 0; j < len; ++j) {
            const acc_t v = static_cast<acc_t>(xi[j]) + s * zi[j];
            yi[j] = ui[j] < threshold ? static_cast<scalar_t>(v) : xi[j];
          }
        } else if (em) {
          const bool* mi = em + i;
          for (int64_t j = 0; j < len; ++j) {
            const acc_t v = static_cast<acc_t>(xi[j]) + s * zi[j];
            yi[j] = mi[j] ? static_cast<scalar_t>(v) : xi[j];
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
