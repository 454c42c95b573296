// The allocation of the kernels' outputs.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastablate {

constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kHugeOutput = size_t(8) << 20;

// A new tensor like t (same layout). A large CPU one is advised onto transparent huge pages
// before it is first written, so that writing it costs one page fault per 2 MiB instead of one
// per 4 KiB (PyTorch does the same for its own tensors under THP_MEM_ALLOC_ENABLE=1). Pages
// already in use are unaffected; the advice failing changes nothing but speed.
inline at::Tensor empty_output(const at::Tensor& t) {
  at::Tensor out = at::empty_like(t);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (out.is_cpu() && out.nbytes() >= kHugeOutput) {
    const auto begin = reinterpret_cast<uintptr_t>(out.data_ptr());
    const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
    const uintptr_t last = (begin + out.nbytes()) & ~(kHugePage - 1);
    if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return out;
}

}  // namespace fastablate
