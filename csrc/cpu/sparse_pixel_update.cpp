// CPU kernel of sparse_pixel_update: per image (in parallel), saliency, a partial sort of the k
// most salient pixels, and the step on all their channels, clamped; one pass over grad.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <vector>

#include "sparse_pixel_update.h"

namespace fastablate {
namespace {

constexpr int64_t kInsertMax = 1024;  // up to this k, one insertion pass beats a partial sort (about k*ln(n/k) inserts)

// Saliency is a sum of |g|: never negative, so the bits of a float (double) order like its
// value, with NaN (positive after fabs) above +inf: the order of salient_before as integers.
inline uint32_t order_key(float v) {
  uint32_t b;
  std::memcpy(&b, &v, sizeof(b));
  return b;
}
inline uint64_t order_key(double v) {
  uint64_t b;
  std::memcpy(&b, &v, sizeof(b));
  return b;
}

// The k most salient pixels, most salient first (ties: lower index), into chosen[0..k).
template <typename T>
void select_top(const T* sal, int64_t pixels, int64_t k, int64_t* chosen, std::vector<int64_t>& order) {
  if (k == 0) return;
  if (k <= kInsertMax) {
    // Scan in index order keeping chosen[0..count) sorted: a later pixel goes before an earlier
    // one only when strictly more salient, and most pixels fail the first comparison.
    int64_t count = 0;
    auto worst = order_key(sal[0]);
    for (int64_t p = 0; p < pixels; ++p) {
      const auto key = order_key(sal[p]);
      if (count == k && key <= worst) continue;
      int64_t j = count < k ? count++ : k - 1;
      for (; j > 0 && key > order_key(sal[chosen[j - 1]]); --j) chosen[j] = chosen[j - 1];
      chosen[j] = p;
      worst = order_key(sal[chosen[count - 1]]);
    }
    return;
  }
  std::iota(order.begin(), order.end(), int64_t(0));
  std::partial_sort(order.begin(), order.begin() + k, order.end(),
                    [&](int64_t a, int64_t b) { return salient_before(sal[a], a, sal[b], b); });
  std::copy(order.begin(), order.begin() + k, chosen);
}

// sal[p] += |g[p]| (one channel), vectorized; built for AVX2 and the baseline.
template <typename scalar_t, typename acc_t>
__attribute__((target_clones("avx2", "default"))) void add_abs(acc_t* __restrict__ sal, const scalar_t* __restrict__ g,
                                                               int64_t n) {
  for (int64_t p = 0; p < n; ++p) sal[p] += std::abs(static_cast<acc_t>(g[p]));
}

template <typename scalar_t>
void update_images(const at::Tensor& x, const at::Tensor& grad, at::Tensor& out, at::Tensor& idx, int64_t k,
                   double step, const double* lo, const double* hi, bool given, bool l2) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = x.size(0), c = x.size(1), pixels = x.size(2) * x.size(3);
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  int64_t* ix = idx.mutable_data_ptr<int64_t>();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sal(given ? 0 : pixels);
    std::vector<int64_t> order(given || k <= kInsertMax ? 0 : pixels);
    for (int64_t img = begin; img < end; ++img) {
      const scalar_t* gi = g + img * c * pixels;
      scalar_t* oi = o + img * c * pixels;
      int64_t* chosen = ix + img * k;
      if (!given) {
        std::fill(sal.begin(), sal.end(), acc_t(0));
        for (int64_t ch = 0; ch < c; ++ch) add_abs(sal.data(), gi + ch * pixels, pixels);  // in order, as the reference
        select_top(sal.data(), pixels, k, chosen, order);
      }
      double scale = step;
      if (l2) {
        double sq = 0;
        for (int64_t j = 0; j < k; ++j) {
          for (int64_t ch = 0; ch < c; ++ch) {
            const double v = static_cast<double>(gi[ch * pixels + chosen[j]]);
            sq += v * v;
          }
        }
        scale = sq > 0 ? step / std::sqrt(sq) : 0.0;
      }
      for (int64_t j = 0; j < k; ++j) {
        for (int64_t ch = 0; ch < c; ++ch) {
          const int64_t at = ch * pixels + chosen[j];
          const double gv = static_cast<double>(gi[at]);
          const acc_t delta = l2 ? static_cast<acc_t>(gv * scale)
                                 : static_cast<acc_t>(step) * static_cast<acc_t>((gv > 0) - (gv < 0));
          acc_t v = static_cast<acc_t>(oi[at]) + delta;
          v = std::min(std::max(v, static_cast<acc_t>(lo[ch])), static_cast<acc_t>(hi[ch]));
          oi[at] = static_cast<scalar_t>(v);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> sparse_pixel_update_cpu(const at::Tensor& x, const at::Tensor& grad, int64_t k,
                                                           double step, const at::Tensor& lo, const at::Tensor& hi,
                                                           const c10::optional<at::Tensor>& indices,
                                                           c10::string_view mode) {
  const bool l2 = sparse_pixel_check(x, grad, k, step, lo, hi, indices, std::string(mode));
  at::Tensor out = x.contiguous().clone();
  at::Tensor idx = indices.has_value() ? indices->contiguous().clone() : at::empty({x.size(0), k}, x.options().dtype(at::kLong));
  if (out.numel() > 0 && k > 0) {
    const at::Tensor g = grad.contiguous();
    const at::Tensor lo_c = lo.contiguous(), hi_c = hi.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparse_pixel_update_cpu", [&] {
      update_images<scalar_t>(x, g, out, idx, k, step, lo_c.const_data_ptr<double>(), hi_c.const_data_ptr<double>(),
                              indices.has_value(), l2);
    });
  }
  return {x.is_contiguous() ? out : out.contiguous(x.suggest_memory_format()), idx};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastablate, CPU, m) { m.impl("sparse_pixel_update", &sparse_pixel_update_cpu); }

}  // namespace fastablate
