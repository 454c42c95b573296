// CUDA kernels of sparse_pixel_update: saliency (one thread per pixel, channels summed in
// order), a stable descending sort for the selection, a per-image L2 norm (fixed order), and
// the clamped step on all channels of the chosen pixels.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "launch.cuh"
#include "sparse_pixel_update.h"

namespace fastablate {
namespace {

template <typename scalar_t, typename acc_t>
__global__ void saliency_kernel(const scalar_t* __restrict__ g, acc_t* __restrict__ sal, int64_t n, int64_t c,
                                int64_t pixels) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n * pixels;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t img = i / pixels, p = i - img * pixels;
    const scalar_t* gi = g + img * c * pixels + p;
    acc_t s = 0;
    for (int64_t ch = 0; ch < c; ++ch) s += fabs(static_cast<acc_t>(gi[ch * pixels]));
    sal[i] = s;
  }
}

// One thread per image sums the squares in the CPU kernel's order (pixels, channels inner):
// k * C is small in a sparse attack, and the fixed order makes the result exact.
template <typename scalar_t>
__global__ void l2_scale_kernel(const scalar_t* __restrict__ g, const int64_t* __restrict__ idx, double* scale,
                                int64_t n, int64_t c, int64_t pixels, int64_t k, double step) {
  for (int64_t img = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; img < n;
       img += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    double sq = 0;
    for (int64_t j = 0; j < k; ++j) {
      for (int64_t ch = 0; ch < c; ++ch) {
        const double v = static_cast<double>(g[(img * c + ch) * pixels + idx[img * k + j]]);
        sq += v * v;
      }
    }
    scale[img] = sq > 0 ? step / sqrt(sq) : 0.0;
  }
}

template <typename scalar_t>
__global__ void step_kernel(const scalar_t* __restrict__ g, scalar_t* __restrict__ out, const int64_t* __restrict__ idx,
                            const double* __restrict__ scale, const double* __restrict__ lo,
                            const double* __restrict__ hi, int64_t n, int64_t c, int64_t pixels, int64_t k,
                            double step, bool l2) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n * k * c;
       e += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t img = e / (k * c), rest = e - img * k * c, j = rest / c, ch = rest - j * c;
    const int64_t at = (img * c + ch) * pixels + idx[img * k + j];
    const double gv = static_cast<double>(g[at]);
    const acc_t delta = l2 ? static_cast<acc_t>(gv * scale[img])
                           : static_cast<acc_t>(step) * static_cast<acc_t>((gv > 0) - (gv < 0));
    acc_t v = static_cast<acc_t>(out[at]) + delta;
    v = fmin(fmax(v, static_cast<acc_t>(lo[ch])), static_cast<acc_t>(hi[ch]));
    out[at] = static_cast<scalar_t>(v);
  }
}

std::tuple<at::Tensor, at::Tensor> sparse_pixel_update_cuda(const at::Tensor& x, const at::Tensor& grad, int64_t k,
                                                            double step, const at::Tensor& lo, const at::Tensor& hi,
                                                            const c10::optional<at::Tensor>& indices,
                                                            c10::string_view mode) {
  const bool l2 = sparse_pixel_check(x, grad, k, step, lo, hi, indices, std::string(mode));
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0), c = x.size(1), pixels = x.size(2) * x.size(3);
  at::Tensor out = x.contiguous().clone();
  const at::Tensor g = grad.contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor idx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparse_pixel_update_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (indices.has_value()) {
      idx = indices->contiguous().clone();
    } else {
      at::Tensor sal = at::empty({n, pixels}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
      if (sal.numel() > 0) {
        saliency_kernel<scalar_t, acc_t><<<grid_for(n * pixels), kThreads, 0, stream>>>(
            g.const_data_ptr<scalar_t>(), sal.mutable_data_ptr<acc_t>(), n, c, pixels);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      // Stable and descending: ties keep the lower pixel index first, as on the CPU.
      idx = std::get<1>(at::sort(sal, /*stable=*/true, /*dim=*/1, /*descending=*/true)).narrow(1, 0, k).contiguous();
    }
    if (out.numel() == 0 || k == 0) return;
    at::Tensor scale = at::empty({n}, x.options().dtype(at::kDouble));
    if (l2) {
      l2_scale_kernel<scalar_t><<<grid_for(n), kThreads, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(), scale.mutable_data_ptr<double>(), n, c,
          pixels, k, step);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const at::Tensor lo_c = lo.contiguous(), hi_c = hi.contiguous();
    step_kernel<scalar_t><<<grid_for(n * k * c), kThreads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(),
        scale.const_data_ptr<double>(), lo_c.const_data_ptr<double>(), hi_c.const_data_ptr<double>(), n, c, pixels,
        k, step, l2);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {x.is_contiguous() ? out : out.contiguous(x.suggest_memory_format()), idx};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastablate, CUDA, m) { m.impl("sparse_pixel_update", &sparse_pixel_update_cuda); }

}  // namespace fastablate
