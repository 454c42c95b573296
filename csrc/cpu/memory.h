// Memory helpers of the CPU kernels: outputs on huge pages, plane copies.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastablate {

constexpr size_t kHugePage = size_t(2) << 20;
// An output this large: on huge pages, and written with non-temporal stores where a kernel
// copies it whole (it leaves the cache before it is read; the stores skip reading each line
// before writing it).
constexpr size_t kLargeOutput = size_t(8) << 20;

// A new tensor like t (same layout). A large one is advised onto transparent huge pages
// before it is first written, so that writing it costs one page fault per 2 MiB instead of one
// per 4 KiB (PyTorch does the same for its own tensors under THP_MEM_ALLOC_ENABLE=1). Pages
// already in use are unaffected; the advice failing changes nothing but speed.
inline at::Tensor empty_output(const at::Tensor& t) {
  at::Tensor out = at::empty_like(t);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (out.nbytes() >= kLargeOutput) {
    const auto begin = reinterpret_cast<uintptr_t>(out.data_ptr());
    const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
    const uintptr_t last = (begin + out.nbytes()) & ~(kHugePage - 1);
    if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return out;
}

// Copies bytes with AVX2 stores where the CPU has them (rep movsb, glibc's choice for a few
// KiB, is slow on some machines), non-temporal when streaming.
#if defined(__x86_64__)
template <bool kStream>
__attribute__((target("avx2"))) void copy_avx2(char* dst, const char* src, size_t bytes) {
  const size_t head = std::min(bytes, (32 - reinterpret_cast<uintptr_t>(dst) % 32) % 32);
  std::memcpy(dst, src, head);
  size_t i = head;
  for (; i + 32 <= bytes; i += 32) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    if (kStream) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i), v);
    } else {
      _mm256_store_si256(reinterpret_cast<__m256i*>(dst + i), v);
    }
  }
  std::memcpy(dst + i, src + i, bytes - i);
  if (kStream) _mm_sfence();
}
#endif

inline void copy_bytes(void* dst, const void* src, size_t bytes, bool streaming) {
#if defined(__x86_64__)
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2) {
    return streaming ? copy_avx2<true>(static_cast<char*>(dst), static_cast<const char*>(src), bytes)
                     : copy_avx2<false>(static_cast<char*>(dst), static_cast<const char*>(src), bytes);
  }
#endif
  std::memcpy(dst, src, bytes);
}

}  // namespace fastablate
