// CUDA kernel of block_skip: out = post(shortcut + keep[row] * residual), grid-stride, one pass.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "block_skip.h"
#include "launch.cuh"

namespace fastablate {
namespace {

template <typename scalar_t>
__global__ void block_skip_kernel(const scalar_t* __restrict__ s, const scalar_t* __restrict__ r,
                                  const int64_t* __restrict__ rowmap, scalar_t* __restrict__ out,
                                  int64_t numel, int64_t row_numel, bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t n = i / row_numel;
    const int64_t m = rowmap[n];
    acc_t v = static_cast<acc_t>(s[i]);
    if (m >= 0) v += static_cast<acc_t>(r[m * row_numel + (i - n * row_numel)]);
    // v != v keeps NaN, as torch.relu does.
    if (relu && !(v > acc_t(0)) && v == v) v = acc_t(0);
    out[i] = static_cast<scalar_t>(v);
  }
}

// For each output row, the residual row added to it (int64, -1 where the row keeps its
// shortcut alone), built on the device with ATen ops.
at::Tensor rowmap_on_device(const at::Tensor& keep, const c10::optional<at::Tensor>& index) {
  const int64_t n = keep.size(0);
  auto long_opts = keep.options().dtype(at::kLong);
  if (!index.has_value()) return at::where(keep, at::arange(n, long_opts), at::full({n}, -1, long_opts));
  auto rowmap = at::full({n}, -1, long_opts);
  if (index->numel() > 0) {
    auto j = at::arange(index->numel(), long_opts);
    rowmap.index_put_({*index}, at::where(keep.index_select(0, *index), j, at::full_like(j, -1)));
  }
  return rowmap;
}

at::Tensor block_skip_cuda(const at::Tensor& shortcut, const at::Tensor& residual, const at::Tensor& keep,
                           bool relu, const c10::optional<at::Tensor>& index) {
  block_skip_check(shortcut, residual, keep, index);
  const at::Tensor rowmap = rowmap_on_device(keep, index);
  const c10::cuda::CUDAGuard guard(shortcut.device());
  const auto fmt = shortcut.suggest_memory_format();
  const at::Tensor s = shortcut.contiguous(fmt);
  const at::Tensor r = residual.contiguous(fmt);
  at::Tensor out = at::empty_like(s);
  const int64_t numel = out.numel();
  if (numel == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "block_skip_cuda", [&] {
    block_skip_kernel<scalar_t><<<grid_for(numel), kThreads, 0, stream>>>(
        s.const_data_ptr<scalar_t>(), r.const_data_ptr<scalar_t>(), rowmap.const_data_ptr<int64_t>(),
        out.mutable_data_ptr<scalar_t>(), numel, s.numel() / s.size(0), relu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastablate, CUDA, m) { m.impl("block_skip", &block_skip_cuda); }

}  // namespace fastablate
