// CPU kernel of block_skip: out = post(shortcut + keep[row] * residual), one pass, vectorized.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "block_skip.h"

namespace fastablate {
namespace {

constexpr int64_t kGrain = 1 << 15;  // elements per task: enough work to amortize a thread hop

template <typename scalar_t>
void block_skip_rows(const scalar_t* s, const scalar_t* r, const int64_t* rowmap, scalar_t* out,
                     int64_t rows, int64_t row_numel, bool relu) {
  using Vec = at::vec::Vectorized<scalar_t>;
  at::parallel_for(0, rows * row_numel, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      const int64_t n = i / row_numel;
      const int64_t stop = std::min(end, (n + 1) * row_numel);
      const int64_t len = stop - i;
      const int64_t m = rowmap[n];
      if (m >= 0) {
        const scalar_t* rr = r + m * row_numel + (i - n * row_numel);
        if (relu) {
          at::vec::map2([](Vec a, Vec b) { return at::vec::maximum(a + b, Vec(0)); }, out + i, s + i, rr, len);
        } else {
          at::vec::map2([](Vec a, Vec b) { return a + b; }, out + i, s + i, rr, len);
        }
      } else if (relu) {
        at::vec::map([](Vec a) { return at::vec::maximum(a, Vec(0)); }, out + i, s + i, len);
      } else {
        std::copy(s + i, s + stop, out + i);
      }
      i = stop;
    }
  });
}

at::Tensor block_skip_cpu(const at::Tensor& shortcut, const at::Tensor& residual, const at::Tensor& keep,
                          bool relu, const c10::optional<at::Tensor>& index) {
  const at::Tensor rowmap = block_skip_rowmap(shortcut, residual, keep, index).contiguous();
  const auto fmt = shortcut.suggest_memory_format();
  const at::Tensor s = shortcut.contiguous(fmt);
  const at::Tensor r = residual.contiguous(fmt);
  at::Tensor out = at::empty_like(s);
  if (out.numel() == 0) return out;
  const int64_t rows = s.size(0);
  const int64_t row_numel = s.numel() / rows;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "block_skip_cpu", [&] {
    block_skip_rows<scalar_t>(s.const_data_ptr<scalar_t>(), r.const_data_ptr<scalar_t>(),
                              rowmap.const_data_ptr<int64_t>(), out.mutable_data_ptr<scalar_t>(), rows,
                              row_numel, relu);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastablate, CPU, m) { m.impl("block_skip", &block_skip_cpu); }

}  // namespace fastablate
