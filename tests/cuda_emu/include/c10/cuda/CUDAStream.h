// Stand-in for c10/cuda/CUDAStream.h under the host emulator (tests/cuda_emu/): one stream,
// and every launch runs to completion before it returns.
#pragma once

#include <cuda_runtime.h>

namespace c10::cuda {
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(int = -1) { return {}; }
}  // namespace c10::cuda
