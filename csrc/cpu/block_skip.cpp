// CPU kernel of block_skip: out = post(shortcut + keep[row] * residual), one pass, vectorized.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "block_skip.h"
#include "cpu/memory.h"

namespace fastablate {
namespace {

constexpr int64_t kGrain = 1 << 17;  // elements per task: below two of these, one thread is faster here

// out = post(s + r) or post(s) over one stretch of a row. Plain loops the compiler vectorizes,
// built for AVX2 and for the baseline (chosen at load time). ReLU keeps NaN, as torch.relu.
template <typename T>
__attribute__((target_clones("avx2", "default"))) void add_post(T* __restrict__ out, const T* __restrict__ s,
                                                                const T* __restrict__ r, int64_t len, bool relu) {
  if (r != nullptr && relu) {
    for (int64_t i = 0; i < len; ++i) {
      const T v = s[i] + r[i];
      out[i] = v > T(0) || v != v ? v : T(0);
    }
  } else if (r != nullptr) {
    for (int64_t i = 0; i < len; ++i) out[i] = s[i] + r[i];
  } else if (relu) {
    for (int64_t i = 0; i < len; ++i) out[i] = s[i] > T(0) || s[i] != s[i] ? s[i] : T(0);
  } else {
    std::copy(s, s + len, out);
  }
}

template <typename scalar_t>
void block_skip_rows(const scalar_t* s, const scalar_t* r, const int64_t* rowmap, scalar_t* out, int64_t rows,
                     int64_t row_numel, bool relu) {
  at::parallel_for(0, rows * row_numel, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      const int64_t n = i / row_numel;
      const int64_t stop = std::min(end, (n + 1) * row_numel);
      const int64_t m = rowmap[n];
      add_post<scalar_t>(out + i, s + i, m >= 0 ? r + m * row_numel + (i - n * row_numel) : nullptr, stop - i, relu);
      i = stop;
    }
  });
}

at::Tensor block_skip_cpu(const at::Tensor& shortcut, const at::Tensor& residual, const at::Tensor& keep,
                          bool relu, const c10::optional<at::Tensor>& index) {
  block_skip_check(shortcut, residual, keep, index);
  const auto fmt = shortcut.suggest_memory_format();
  const at::Tensor s = shortcut.contiguous(fmt);
  const at::Tensor r = residual.contiguous(fmt);
  at::Tensor out = empty_output(s);
  if (out.numel() == 0) return out;
  // For each output row, the residual row added to it, or -1 (the shortcut alone).
  const int64_t rows = s.size(0);
  const at::Tensor kc = keep.contiguous();
  const bool* k = kc.const_data_ptr<bool>();
  std::vector<int64_t> rowmap(rows, -1);
  if (!index.has_value()) {
    for (int64_t n = 0; n < rows; ++n) rowmap[n] = k[n] ? n : -1;
  } else {
    const at::Tensor ic = index->contiguous();
    const int64_t* idx = ic.const_data_ptr<int64_t>();
    for (int64_t j = 0; j < ic.numel(); ++j) rowmap[idx[j]] = k[idx[j]] ? j : -1;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "block_skip_cpu", [&] {
    block_skip_rows<scalar_t>(s.const_data_ptr<scalar_t>(), r.const_data_ptr<scalar_t>(), rowmap.data(),
                              out.mutable_data_ptr<scalar_t>(), rows, s.numel() / rows, relu);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastablate, CPU, m) { m.impl("block_skip", &block_skip_cpu); }

}  // namespace fastablate
