// CUDA kernel of gaussian_noise: one thread per Philox counter (four elements), grid-stride.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "gaussian_noise.h"
#include "launch.cuh"

namespace fastablate {
namespace {

// x and y may alias (the in-place form), so they carry no __restrict__.
template <typename scalar_t>
__global__ void noise_kernel(const scalar_t* x, scalar_t* y, int64_t numel, int64_t inner,
                             int64_t channels, double sigma, const float* __restrict__ sc,
                             const bool* __restrict__ pm, const bool* __restrict__ em, uint64_t threshold,
                             uint64_t seed, uint64_t offset) {
  const uint64_t first = offset >> 2;
  const int64_t nquads = static_cast<int64_t>(((offset + numel - 1) >> 2) - first + 1);
  const bool bernoulli = !pm && !em && threshold < (uint64_t(1) << 32);
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < nquads;
       k += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const uint64_t quad = first + k;
    float z[4];
    philox::normals4(quad, seed, z);
    const philox::Out4 u = bernoulli ? philox::uniforms4(quad, seed) : philox::Out4{{0, 0, 0, 0}};
#pragma unroll
    for (int lane = 0; lane < 4; ++lane) {
      const int64_t i = static_cast<int64_t>(4 * quad + lane - offset);
      if (i < 0 || i >= numel) continue;
      const int64_t plane = (sc || pm) ? i / inner : 0;  // a 64-bit division: only when needed
      const bool keep = pm ? pm[plane] : em ? em[i] : u.v[lane] < threshold;
      using acc_t = at::opmath_type<scalar_t>;  // double for double, float otherwise
      const acc_t s = static_cast<acc_t>(sigma) * (sc ? static_cast<acc_t>(sc[plane % channels]) : acc_t(1));
      y[i] = keep ? static_cast<scalar_t>(static_cast<acc_t>(x[i]) + s * z[lane]) : x[i];
    }
  }
}

void run(const NoisePlan& plan, const at::Tensor& y, double sigma, int64_t seed, int64_t offset) {
  const int64_t numel = plan.x.numel();
  if (numel == 0) return;
  const c10::cuda::CUDAGuard guard(plan.x.device());
  const int64_t nquads = (numel + 6) / 4;
  auto stream = at::cuda::getCurrentCUDAStream();
  const float* sc = plan.sigma_c.defined() ? plan.sigma_c.const_data_ptr<float>() : nullptr;
  const bool* pm = plan.plane_mask.defined() ? plan.plane_mask.const_data_ptr<bool>() : nullptr;
  const bool* em = plan.elem_mask.defined() ? plan.elem_mask.const_data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.x.scalar_type(), "gaussian_noise_cuda", [&] {
    noise_kernel<scalar_t><<<grid_for(nquads, 16), kThreads, 0, stream>>>(
        plan.x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), numel, plan.inner, plan.channels,
        sigma, sc, pm, em, plan.threshold, static_cast<uint64_t>(seed),
        static_cast<uint64_t>(offset));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor gaussian_noise_cuda(const at::Tensor& x, double sigma, const c10::optional<at::Tensor>& channel_sigma,
                               double p, const c10::optional<at::Tensor>& mask, int64_t seed, int64_t offset) {
  const auto empty = [](const at::Tensor& like) { return at::empty_like(like); };
  return gaussian_noise_functional(x, sigma, channel_sigma, p, mask, seed, offset, empty, run);
}

void gaussian_noise_cuda_(at::Tensor& x, double sigma, const c10::optional<at::Tensor>& channel_sigma, double p,
                          const c10::optional<at::Tensor>& mask, int64_t seed, int64_t offset) {
  gaussian_noise_inplace(x, sigma, channel_sigma, p, mask, seed, offset, run);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastablate, CUDA, m) {
  m.impl("gaussian_noise", &gaussian_noise_cuda);
  m.impl("gaussian_noise_", &gaussian_noise_cuda_);
}

}  // namespace fastablate
