// Argument checks and the mask/sigma plan shared by the CPU and CUDA kernels of gaussian_noise.
#pragma once
#include <ATen/ATen.h>

#include "checks.h"
#include "philox.h"

namespace fastablate {

// x is seen as (N, C, inner): plane = element / inner, channel = plane % C.
struct NoisePlan {
  at::Tensor x;            // x, contiguous (row-major logical order: noise is keyed by it)
  at::Tensor sigma_c;      // (C,) float32, or undefined
  at::Tensor plane_mask;   // (N*C,) bool when the mask is per sample/channel, or undefined
  at::Tensor elem_mask;    // (numel,) bool when the mask is per element, or undefined
  int64_t channels = 1, inner = 1;
  uint64_t threshold = 0;  // Bernoulli(p) as a 32-bit comparison; 2^32 keeps every element
};

inline NoisePlan gaussian_noise_plan(const at::Tensor& x, double sigma, const c10::optional<at::Tensor>& channel_sigma,
                                     double p, const c10::optional<at::Tensor>& mask, int64_t offset) {
  constexpr const char* op = "gaussian_noise";
  check_floating(op, "x", x);
  TORCH_CHECK(std::isfinite(sigma) && sigma >= 0, op, ": sigma must be finite and >= 0, got ", sigma);
  TORCH_CHECK(p >= 0 && p <= 1, op, ": p must be in [0, 1], got ", p);
  TORCH_CHECK(offset >= 0, op, ": offset must be >= 0, got ", offset);
  NoisePlan plan;
  plan.x = x.contiguous();
  const int64_t n = x.dim() >= 1 ? x.size(0) : 1;
  plan.channels = x.dim() >= 2 ? x.size(1) : 1;
  plan.inner = x.numel() / std::max<int64_t>(1, n * plan.channels);
  if (channel_sigma.has_value()) {
    const at::Tensor& cs = *channel_sigma;
    TORCH_CHECK(x.dim() >= 2, op, ": a per-channel sigma needs x with a channel dimension, x has shape ", x.sizes());
    TORCH_CHECK(cs.dim() == 1 && cs.size(0) == plan.channels, op, ": sigma has shape ", cs.sizes(),
                ", expected (", plan.channels, ",) for x of shape ", x.sizes());
    TORCH_CHECK(cs.device() == x.device(), op, ": sigma is on ", cs.device(), ", x is on ", x.device());
    plan.sigma_c = cs.to(at::kFloat).contiguous();
  }
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.scalar_type() == at::kBool, op, ": mask must be bool, got ", m.scalar_type());
    TORCH_CHECK(m.device() == x.device(), op, ": mask is on ", m.device(), ", x is on ", x.device());
    TORCH_CHECK(m.dim() <= x.dim(), op, ": mask of shape ", m.sizes(), " does not broadcast to x of shape ", x.sizes());
    std::vector<int64_t> shape(x.dim() - m.dim(), 1);
    shape.insert(shape.end(), m.sizes().begin(), m.sizes().end());
    bool per_plane = x.dim() >= 2;
    for (int64_t d = 0; d < x.dim(); ++d) {
      TORCH_CHECK(shape[d] == 1 || shape[d] == x.size(d), op, ": mask of shape ", m.sizes(),
                  " does not broadcast to x of shape ", x.sizes());
      if (d >= 2 && shape[d] != 1) per_plane = false;
    }
    const at::Tensor full = m.view(shape);
    if (per_plane) {
      std::vector<int64_t> plane_shape = {x.size(0), x.size(1)};
      plane_shape.resize(x.dim(), 1);
      plan.plane_mask = full.expand(plane_shape).contiguous().view(-1);
    } else {
      plan.elem_mask = full.expand(x.sizes()).contiguous().view(-1);
    }
  }
  plan.threshold = mask.has_value() ? (uint64_t(1) << 32) : philox::bernoulli_threshold(p);
  return plan;
}

// The functional and in-place entry points around a backend's run(plan, y, sigma, seed, offset)
// (and, for the functional one, its empty(like) that allocates the output).
// Noise follows x's logical (row-major) order; a non-contiguous x is worked on as a contiguous copy.
template <typename Empty, typename Run>
at::Tensor gaussian_noise_functional(const at::Tensor& x, double sigma, const c10::optional<at::Tensor>& channel_sigma,
                                     double p, const c10::optional<at::Tensor>& mask, int64_t seed, int64_t offset,
                                     Empty empty, Run run) {
  const NoisePlan plan = gaussian_noise_plan(x, sigma, channel_sigma, p, mask, offset);
  at::Tensor y = empty(plan.x);
  run(plan, y, sigma, seed, offset);
  return x.is_contiguous() ? y : y.contiguous(x.suggest_memory_format());
}

template <typename Run>
void gaussian_noise_inplace(at::Tensor& x, double sigma, const c10::optional<at::Tensor>& channel_sigma, double p,
                            const c10::optional<at::Tensor>& mask, int64_t seed, int64_t offset, Run run) {
  const NoisePlan plan = gaussian_noise_plan(x, sigma, channel_sigma, p, mask, offset);
  if (x.is_contiguous()) {
    run(plan, x, sigma, seed, offset);
  } else {  // plan.x is a contiguous copy: noise it, then write it back in x's layout
    run(plan, plan.x, sigma, seed, offset);
    x.copy_(plan.x);
  }
}

}  // namespace fastablate
