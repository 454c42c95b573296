// Argument checks shared by the CPU and CUDA kernels of sparse_pixel_update.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <string>

#include "checks.h"

namespace fastablate {

// Checks; returns true for mode "l2", false for "sign".
inline bool sparse_pixel_check(const at::Tensor& x, const at::Tensor& grad, int64_t k, double step,
                               const at::Tensor& lo, const at::Tensor& hi, const c10::optional<at::Tensor>& indices,
                               const std::string& mode) {
  constexpr const char* op = "sparse_pixel_update";
  check_floating(op, "x", x);
  TORCH_CHECK(x.dim() == 4, op, ": x must be (N, C, H, W), got shape ", x.sizes());
  check_same_device_dtype(op, "x", x, "grad", grad);
  TORCH_CHECK(grad.sizes() == x.sizes(), op, ": grad has shape ", grad.sizes(), ", x has shape ", x.sizes());
  TORCH_CHECK(mode == "sign" || mode == "l2", op, ": mode must be 'sign' or 'l2', got '", mode, "'");
  TORCH_CHECK(std::isfinite(step), op, ": step must be finite, got ", step);
  const int64_t pixels = x.size(2) * x.size(3);
  TORCH_CHECK(k >= 0 && k <= pixels, op, ": k must be in [0, H*W = ", pixels, "], got ", k);
  for (const auto* b : {&lo, &hi}) {
    TORCH_CHECK(b->dim() == 1 && b->size(0) == x.size(1) && b->scalar_type() == at::kDouble, op,
                ": bounds must be float64 tensors of shape (", x.size(1), ",), got ", b->scalar_type(), " ",
                b->sizes());
    TORCH_CHECK(b->device() == x.device(), op, ": bounds are on ", b->device(), ", x is on ", x.device());
  }
  if (indices.has_value()) {
    const at::Tensor& idx = *indices;
    TORCH_CHECK(idx.scalar_type() == at::kLong, op, ": indices must be int64, got ", idx.scalar_type());
    TORCH_CHECK(idx.dim() == 2 && idx.size(0) == x.size(0) && idx.size(1) == k, op, ": indices has shape ",
                idx.sizes(), ", expected (", x.size(0), ", ", k, ")");
    TORCH_CHECK(idx.device() == x.device(), op, ": indices is on ", idx.device(), ", x is on ", x.device());
    if (idx.is_cpu() && idx.numel() > 0) {
      const auto mn = idx.min().item<int64_t>(), mx = idx.max().item<int64_t>();
      TORCH_CHECK(mn >= 0 && mx < pixels, op, ": indices must be in [0, ", pixels, "), got values in [", mn, ", ",
                  mx, "]");
    }
  }
  return mode == "l2";
}

}  // namespace fastablate
