// Launch configuration shared by the CUDA kernels: grid-stride loops over `work` items with
// kThreads threads per block and a grid capped at a few blocks per multiprocessor.
#pragma once
#include <ATen/cuda/CUDAContext.h>

#include <algorithm>
#include <cstdint>

namespace fastablate {

constexpr int kThreads = 256;

// Enough blocks to give every item a thread, at most blocks_per_sm per multiprocessor (the
// loops stride over the rest), and at least one.
inline int grid_for(int64_t work, int blocks_per_sm = 8) {
  const int64_t max_blocks =
      static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * blocks_per_sm;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, max_blocks)));
}

}  // namespace fastablate
