// Stand-in for c10/cuda/CUDAException.h under the host emulator (tests/cuda_emu/).
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#define C10_CUDA_CHECK(expr)                                                                      \
  do {                                                                                            \
    const cudaError_t emu_error_ = (expr);                                                        \
    TORCH_CHECK(emu_error_ == cudaSuccess, "CUDA emulator: ", #expr, ": ", cudaGetErrorString(emu_error_)); \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ::emu::launch_check(__FILE__, __LINE__)
