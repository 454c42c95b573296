// Argument checks shared by the CPU and CUDA kernels of block_skip.
#pragma once
#include <ATen/ATen.h>

#include <vector>

#include "checks.h"

namespace fastablate {

// Checks the arguments (index range and distinctness only on CPU: on CUDA they would cost a
// device synchronization; the wrapper documents them as the caller's promise).
inline void block_skip_check(const at::Tensor& shortcut, const at::Tensor& residual, const at::Tensor& keep,
                             const c10::optional<at::Tensor>& index) {
  constexpr const char* op = "block_skip";
  check_floating(op, "shortcut", shortcut);
  check_same_device_dtype(op, "shortcut", shortcut, "residual", residual);
  check_rows_mask(op, "keep", keep, shortcut);
  const int64_t n = shortcut.size(0);
  TORCH_CHECK(residual.dim() == shortcut.dim() && residual.sizes().slice(1) == shortcut.sizes().slice(1),
              op, ": residual has shape ", residual.sizes(), ", shortcut has shape ", shortcut.sizes(),
              " (all but the first dimension must match)");
  if (!index.has_value()) {
    TORCH_CHECK(residual.size(0) == n, op, ": residual has ", residual.size(0),
                " rows, shortcut has ", n, " (pass index= for the gather form)");
    return;
  }
  const at::Tensor& idx = *index;
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 1, op,
              ": index must be a 1-d int64 tensor, got ", idx.scalar_type(), " of shape ", idx.sizes());
  TORCH_CHECK(idx.device() == shortcut.device(), op, ": index is on ", idx.device(),
              ", shortcut is on ", shortcut.device());
  TORCH_CHECK(idx.size(0) == residual.size(0), op, ": index has ", idx.size(0),
              " entries, residual has ", residual.size(0), " rows");
  if (idx.numel() > 0 && idx.is_cpu()) {
    std::vector<bool> seen(n, false);
    const at::Tensor ic = idx.contiguous();
    const int64_t* p = ic.const_data_ptr<int64_t>();
    for (int64_t j = 0; j < idx.numel(); ++j) {
      TORCH_CHECK(p[j] >= 0 && p[j] < n, op, ": index[", j, "] = ", p[j], " is out of range [0, ", n, ")");
      TORCH_CHECK(!seen[p[j]], op, ": index holds row ", p[j], " twice; rows must be distinct");
      seen[p[j]] = true;
    }
  }
}

}  // namespace fastablate
