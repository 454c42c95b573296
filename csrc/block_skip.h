// Argument checks and row mapping shared by the CPU and CUDA kernels of block_skip.
#pragma once
#include <ATen/ATen.h>

#include <vector>

#include "checks.h"

namespace fastablate {

// Checks the arguments and returns, for each output row n, the residual row added to it
// (int64, -1 where the row keeps its shortcut alone). Dense form: row n, where keep[n].
// Gather form: row j for output row index[j], where keep[index[j]].
inline at::Tensor block_skip_rowmap(const at::Tensor& shortcut, const at::Tensor& residual,
                                    const at::Tensor& keep, const c10::optional<at::Tensor>& index) {
  constexpr const char* op = "block_skip";
  check_floating(op, "shortcut", shortcut);
  check_same_device_dtype(op, "shortcut", shortcut, "residual", residual);
  check_rows_mask(op, "keep", keep, shortcut);
  const int64_t n = shortcut.size(0);
  TORCH_CHECK(residual.dim() == shortcut.dim() && residual.sizes().slice(1) == shortcut.sizes().slice(1),
              op, ": residual has shape ", residual.sizes(), ", shortcut has shape ", shortcut.sizes(),
              " (all but the first dimension must match)");
  auto long_opts = keep.options().dtype(at::kLong);
  if (!index.has_value()) {
    TORCH_CHECK(residual.size(0) == n, op, ": residual has ", residual.size(0),
                " rows, shortcut has ", n, " (pass index= for the gather form)");
    return at::where(keep, at::arange(n, long_opts), at::full({n}, -1, long_opts));
  }
  const at::Tensor& idx = *index;
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 1, op,
              ": index must be a 1-d int64 tensor, got ", idx.scalar_type(), " of shape ", idx.sizes());
  TORCH_CHECK(idx.device() == shortcut.device(), op, ": index is on ", idx.device(),
              ", shortcut is on ", shortcut.device());
  TORCH_CHECK(idx.size(0) == residual.size(0), op, ": index has ", idx.size(0),
              " entries, residual has ", residual.size(0), " rows");
  if (idx.numel() > 0 && idx.is_cpu()) {
    // On CUDA this check would cost a device synchronization; the wrapper documents it.
    std::vector<bool> seen(n, false);
    const int64_t* p = idx.contiguous().data_ptr<int64_t>();
    for (int64_t j = 0; j < idx.numel(); ++j) {
      TORCH_CHECK(p[j] >= 0 && p[j] < n, op, ": index[", j, "] = ", p[j], " is out of range [0, ", n, ")");
      TORCH_CHECK(!seen[p[j]], op, ": index holds row ", p[j], " twice; rows must be distinct");
      seen[p[j]] = true;
    }
  }
  auto rowmap = at::full({n}, -1, long_opts);
  if (idx.numel() > 0) {
    auto j = at::arange(idx.numel(), long_opts);
    rowmap.index_put_({idx}, at::where(keep.index_select(0, idx), j, at::full_like(j, -1)));
  }
  return rowmap;
}

}  // namespace fastablate
