// Stand-in for the CUDA runtime header under the host emulator (tests/cuda_emu/emu_runtime.h
// defines the built-in types): the few runtime calls the launchers of csrc/cuda/ make.
#pragma once

#include <cstring>

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

// an H100 SXM's multiprocessor count, so grid sizes derived from it are realistic
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *value = 132;
  return cudaSuccess;
}
inline const char* cudaGetErrorString(cudaError_t error) { return error == cudaSuccess ? "no error" : "invalid value"; }
