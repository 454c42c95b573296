// CPU kernel of sparse_pixel_update: per image (in parallel), saliency and the selection of the
// k most salient pixels, then the copy of x and the step on all channels of those, clamped.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "cpu/memory.h"
#include "sparse_pixel_update.h"

namespace fastablate {
namespace {

constexpr int64_t kInsertMax = 32;  // up to this k, a sorted insertion array; above it, a buffer
constexpr int64_t kGrain = 1 << 15;  // elements per task
constexpr int64_t kTile = 64;       // pixels whose saliency is computed, then offered, at once

// Saliency is a sum of |g|: never negative, so the bits of a float (double) order like its
// value, with NaN (positive after fabs) above +inf, as a descending stable sort orders them.
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

// The k most salient pixels among those offered. Pixels come in index order and must have a
// key above bar(), so a later pixel displaces a kept one only when strictly more salient: ties
// go to the lower index. Up to kInsertMax, a sorted array; above, a buffer of up to 2k
// candidates cut back to the best k when full (O(1) per candidate).
template <typename Key>
class TopK {
 public:
  void reset(int64_t k) {
    k_ = k;
    bar_ = -1;
    best_.clear();
    best_.reserve(k <= kInsertMax ? k : 2 * k);
  }
  // The key a pixel must beat: the least salient kept once there are k, -1 before (keys are
  // below 2^63: saliency is never negative).
  int64_t bar() const { return bar_; }

  void offer(Key key, int64_t p) {
    const int64_t size = static_cast<int64_t>(best_.size());
    if (k_ > kInsertMax) {
      best_.emplace_back(key, p);
      if (size + 1 == 2 * k_) cut();
      return;
    }
    if (size < k_) best_.emplace_back(key, p);  // best_ sorted, most salient first
    int64_t j = std::min(size, k_ - 1);
    for (; j > 0 && key > best_[j - 1].first; --j) best_[j] = best_[j - 1];
    best_[j] = {key, p};
    if (static_cast<int64_t>(best_.size()) == k_) bar_ = static_cast<int64_t>(best_.back().first);
  }

  // Writes the kept pixels, most salient first.
  void write(int64_t* chosen) {
    if (k_ > kInsertMax) {
      if (static_cast<int64_t>(best_.size()) > k_) cut();
      std::sort(best_.begin(), best_.end(), MoreSalient());
    }
    for (int64_t j = 0; j < k_; ++j) chosen[j] = best_[j].second;
  }

 private:
  struct MoreSalient {
    bool operator()(const std::pair<Key, int64_t>& a, const std::pair<Key, int64_t>& b) const {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    }
  };
  void cut() {
    std::nth_element(best_.begin(), best_.begin() + (k_ - 1), best_.end(), MoreSalient());
    best_.resize(k_);
    bar_ = static_cast<int64_t>(best_[k_ - 1].first);
  }
  int64_t k_ = 0, bar_ = -1;
  std::vector<std::pair<Key, int64_t>> best_;
};

// Saliency of len pixels (channels summed in order, as the reference: 0 + |g0| is |g0|), and
// the largest key among them; vectorized, built for AVX2 and the baseline.
template <typename scalar_t, typename acc_t>
__attribute__((target_clones("avx2", "default"))) auto saliency_tile(const scalar_t* __restrict__ g, int64_t stride,
                                                                     int64_t c, int64_t len, acc_t* __restrict__ sal) {
  for (int64_t p = 0; p < len; ++p) sal[p] = std::abs(static_cast<acc_t>(g[p]));
  for (int64_t ch = 1; ch < c; ++ch) {
    const scalar_t* gc = g + ch * stride;
    for (int64_t p = 0; p < len; ++p) sal[p] += std::abs(static_cast<acc_t>(gc[p]));
  }
  decltype(order_key(acc_t())) top = 0;
  for (int64_t p = 0; p < len; ++p) top = std::max(top, order_key(sal[p]));
  return top;
}

// Positions j < len whose key is above bar, into pos. Returns how many.
template <typename acc_t>
int64_t above_portable(const acc_t* __restrict__ sal, int64_t len, int64_t bar, int32_t* __restrict__ pos) {
  int64_t m = 0;
  for (int64_t j = 0; j < len; ++j) {
    pos[m] = static_cast<int32_t>(j);
    m += static_cast<int64_t>(order_key(sal[j])) > bar;
  }
  return m;
}

#if defined(__x86_64__)
// The same for float keys (< 2^31, so a signed compare orders them) with AVX2: 8 compares,
// then one step per set bit, so a tile with few candidates costs little.
__attribute__((target("avx2,bmi"))) int64_t above_avx2(const float* sal, int64_t len, int64_t bar, int32_t* pos) {
  const __m256i b = _mm256_set1_epi32(static_cast<int32_t>(bar));  // bar is -1 or a float key
  int64_t m = 0, j = 0;
  for (; j + 8 <= len; j += 8) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sal + j));
    for (unsigned mask = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(v, b))); mask; mask &= mask - 1) {
      pos[m++] = static_cast<int32_t>(j + _tzcnt_u32(mask));
    }
  }
  for (; j < len; ++j) {
    if (static_cast<int64_t>(order_key(sal[j])) > bar) pos[m++] = static_cast<int32_t>(j);
  }
  return m;
}
#endif

inline int64_t above(const double* sal, int64_t len, int64_t bar, int32_t* pos) {
  return above_portable(sal, len, bar, pos);
}

inline int64_t above(const float* sal, int64_t len, int64_t bar, int32_t* pos) {
#if defined(__x86_64__)
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("bmi");
  if (avx2) return above_avx2(sal, len, bar, pos);
#endif
  return above_portable(sal, len, bar, pos);
}

// Per-thread buffers of the selection.
template <typename acc_t>
struct Selection {
  using Key = decltype(order_key(acc_t()));
  std::vector<acc_t> sal;  // saliency of every pixel of the image
  std::vector<Key> tops;   // the largest key of each tile of kTile pixels
  std::vector<Key> order;
  TopK<Key> best;
};

// The k most salient pixels of one image (c planes of `pixels`), most salient first, into chosen.
// Two passes: saliency and each tile's largest key, then the candidates of the tiles that can
// hold one. A pixel among the k best is at least the k-th largest tile maximum (k tiles hold a
// pixel that large), so that is where the bar starts: few pixels are offered.
template <typename scalar_t, typename acc_t>
void select_top(const scalar_t* g, int64_t c, int64_t pixels, int64_t k, int64_t* chosen, Selection<acc_t>& s) {
  using Key = typename Selection<acc_t>::Key;
  const int64_t tiles = (pixels + kTile - 1) / kTile;
  s.sal.resize(pixels);
  s.tops.resize(tiles);
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t p0 = t * kTile;
    s.tops[t] = saliency_tile(g + p0, pixels, c, std::min(kTile, pixels - p0), s.sal.data() + p0);
  }
  int64_t bar = -1;  // offered: keys above bar
  if (tiles >= k) {
    s.order.assign(s.tops.begin(), s.tops.end());
    std::nth_element(s.order.begin(), s.order.begin() + (k - 1), s.order.end(), std::greater<Key>());
    bar = static_cast<int64_t>(s.order[k - 1]) - 1;  // pixels equal to it may still be chosen
  }
  alignas(64) int32_t pos[kTile];
  s.best.reset(k);
  for (int64_t t = 0; t < tiles; ++t) {
    if (static_cast<int64_t>(s.tops[t]) <= bar) continue;
    const int64_t p0 = t * kTile;
    const acc_t* sal = s.sal.data() + p0;
    const int64_t m = above(sal, std::min(kTile, pixels - p0), bar, pos);
    for (int64_t i = 0; i < m; ++i) {
      const Key key = order_key(sal[pos[i]]);
      if (static_cast<int64_t>(key) <= bar) continue;  // bar rose since
      s.best.offer(key, p0 + pos[i]);
      bar = std::max(bar, s.best.bar());
    }
  }
  s.best.write(chosen);
}

// Per image: saliency and selection, then the copy of x into out and the step, plane by plane.
template <typename scalar_t>
void update_images(const at::Tensor& x, const at::Tensor& grad, at::Tensor& out, at::Tensor& idx, int64_t k,
                   double step, const double* lo, const double* hi, bool given, bool l2) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = x.size(0), c = x.size(1), pixels = x.size(2) * x.size(3);
  const scalar_t* xs = x.const_data_ptr<scalar_t>();
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  int64_t* ix = idx.mutable_data_ptr<int64_t>();
  const bool streaming = out.nbytes() >= kLargeOutput;
  // Images per task: at least kGrain elements, or the thread hop costs more than it saves.
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, c * pixels));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    Selection<acc_t> selection;
    for (int64_t img = begin; img < end; ++img) {
      const scalar_t* gi = g + img * c * pixels;
      scalar_t* oi = o + img * c * pixels;
      int64_t* chosen = ix + img * k;
      const scalar_t* xi = xs + img * c * pixels;
      if (k > 0 && !given) select_top(gi, c, pixels, k, chosen, selection);
      // The gradient at the chosen entries: independent loads, started together.
      for (int64_t j = 0; j < k; ++j) {
        for (int64_t ch = 0; ch < c; ++ch) __builtin_prefetch(gi + ch * pixels + chosen[j]);
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
      // Plane by plane: the copy of x, then the step on the chosen pixels, from x's plane while
      // it is in cache.
      for (int64_t ch = 0; ch < c; ++ch) {
        scalar_t* oc = oi + ch * pixels;
        const scalar_t* xc = xi + ch * pixels;
        const scalar_t* gc = gi + ch * pixels;
        copy_bytes(oc, xc, sizeof(scalar_t) * pixels, streaming);
        const acc_t lo_c = static_cast<acc_t>(lo[ch]), hi_c = static_cast<acc_t>(hi[ch]);
        for (int64_t j = 0; j < k; ++j) {
          const double gv = static_cast<double>(gc[chosen[j]]);
          const acc_t delta = l2 ? static_cast<acc_t>(gv * scale)
                                 : static_cast<acc_t>(step) * static_cast<acc_t>((gv > 0) - (gv < 0));
          const acc_t v = static_cast<acc_t>(xc[chosen[j]]) + delta;
          oc[chosen[j]] = static_cast<scalar_t>(std::min(std::max(v, lo_c), hi_c));
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
  const at::Tensor xc = x.contiguous();
  at::Tensor out = empty_output(xc);
  at::Tensor idx = indices.has_value() ? indices->contiguous().clone() : at::empty({x.size(0), k}, x.options().dtype(at::kLong));
  if (out.numel() > 0) {
    const at::Tensor g = grad.contiguous();
    const at::Tensor lo_c = lo.contiguous(), hi_c = hi.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparse_pixel_update_cpu", [&] {
      update_images<scalar_t>(xc, g, out, idx, k, step, lo_c.const_data_ptr<double>(), hi_c.const_data_ptr<double>(),
                              indices.has_value(), l2);
    });
  }
  return {x.is_contiguous() ? out : out.contiguous(x.suggest_memory_format()), idx};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastablate, CPU, m) { m.impl("sparse_pixel_update", &sparse_pixel_update_cpu); }

}  // namespace fastablate
