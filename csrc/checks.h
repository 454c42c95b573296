// Shared argument checks for fastablate kernels; every message names the op and the bad value.
#pragma once
#include <ATen/ATen.h>

namespace fastablate {

inline void check_same_device_dtype(const char* op, const char* name_a, const at::Tensor& a,
                                    const char* name_b, const at::Tensor& b) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", name_b, " is on ", b.device(), ", ", name_a,
              " is on ", a.device());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", name_b, " has dtype ",
              b.scalar_type(), ", ", name_a, " has dtype ", a.scalar_type());
}

inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " must be a floating tensor, got ", t.scalar_type());
}

inline void check_rows_mask(const char* op, const char* name, const at::Tensor& mask,
                            const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1, op, ": x must have a batch dimension, got a 0-d tensor");
  TORCH_CHECK(mask.scalar_type() == at::kBool, op, ": ", name, " must be bool, got ",
              mask.scalar_type());
  TORCH_CHECK(mask.dim() == 1 && mask.size(0) == x.size(0), op, ": ", name, " has shape ",
              mask.sizes(), ", expected (", x.size(0), ",)");
  TORCH_CHECK(mask.device() == x.device(), op, ": ", name, " is on ", mask.device(),
              ", x is on ", x.device());
}


}  // namespace fastablate
