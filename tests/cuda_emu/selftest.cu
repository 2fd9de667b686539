// Kernels that check the CUDA host emulator itself (tests/test_cuda_emulator.py): that it computes
// what correct CUDA code computes (block_sum, ballots), and that it reports what real hardware would
// get wrong or hang on (a missing barrier, divergent barriers, warp operations naming exited lanes,
// device-side assertions, refused launch configurations).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda_utils.cuh"

namespace {

using pyimputmae::cuda::block_sum;

// out[t] = Σ values, as returned to thread t of one block by block_sum
__global__ void block_sum_kernel(float* out, const float* values, int64_t n) {
  __shared__ float scratch[32];
  float mine = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) mine += values[i];
  out[threadIdx.x] = block_sum(mine, scratch);
}

at::Tensor block_sum_op(const at::Tensor& values, int64_t threads) {
  at::Tensor out = at::empty({threads}, values.options());
  block_sum_kernel<<<1, static_cast<unsigned>(threads)>>>(out.data_ptr<float>(), values.data_ptr<float>(),
                                                         values.numel());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// out[b, w] = ballot of (flags[b, t] != 0) over warp w of block b
__global__ void ballot_kernel(int64_t* out, const bool* flags, int threads) {
  const unsigned bits = __ballot_sync(0xffffffffu, flags[blockIdx.x * threads + threadIdx.x]);
  if ((threadIdx.x & 31) == 0) out[blockIdx.x * (threads / 32) + threadIdx.x / 32] = bits;
}

at::Tensor ballot_op(const at::Tensor& flags) {
  const int64_t blocks = flags.size(0), threads = flags.size(1);
  at::Tensor out = at::empty({blocks, threads / 32}, flags.options().dtype(at::kLong));
  ballot_kernel<<<static_cast<unsigned>(blocks), static_cast<unsigned>(threads)>>>(
      out.data_ptr<int64_t>(), flags.data_ptr<bool>(), static_cast<int>(threads));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// out[t] = values[n - 1 - t] through shared memory; without the barrier a thread may read a slot
// before its writer has run
__global__ void reverse_kernel(float* out, const float* values, bool barrier) {
  __shared__ float stage[1024];
  const int t = threadIdx.x, n = blockDim.x;
  stage[t] = values[t];
  if (barrier) __syncthreads();
  out[t] = stage[n - 1 - t];
}

at::Tensor reverse_op(const at::Tensor& values, bool barrier) {
  at::Tensor out = at::empty_like(values);
  reverse_kernel<<<1, static_cast<unsigned>(values.numel())>>>(out.data_ptr<float>(), values.data_ptr<float>(),
                                                              barrier);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// The faults: kind 0 divergent __syncthreads, 1 a barrier after some threads returned, 2 a shuffle
// naming an exited lane, 3 a failed device assertion, 4 a block of 2048 threads
__global__ void fault_kernel(float* out, int64_t kind) {
  const int t = threadIdx.x;
  float v = static_cast<float>(t);
  if (kind == 0) {
    if (t < 16) {
      __syncthreads();
    } else {
      __syncthreads();
    }
  } else if (kind == 1) {
    if (t == 3) return;
    __syncthreads();
  } else if (kind == 2) {
    if (t == 5) return;
    v += __shfl_xor_sync(0xffffffffu, v, 1);
  } else if (kind == 3) {
    CUDA_KERNEL_ASSERT(t != 7 && "thread 7 must not run");
  }
  out[t] = v;
}

void fault_op(int64_t kind) {
  at::Tensor out = at::empty({2048}, at::TensorOptions().dtype(at::kFloat));
  fault_kernel<<<1, kind == 4 ? 2048 : 64>>>(out.data_ptr<float>(), kind);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY(cuda_emu_selftest, m) {
  m.def("block_sum(Tensor values, int threads) -> Tensor");
  m.def("ballot(Tensor flags) -> Tensor");
  m.def("reverse(Tensor values, bool barrier) -> Tensor");
  m.def("fault(int kind) -> ()", &fault_op);  // no tensor argument to dispatch on
}

TORCH_LIBRARY_IMPL(cuda_emu_selftest, CUDA, m) {
  m.impl("block_sum", &block_sum_op);
  m.impl("ballot", &ballot_op);
  m.impl("reverse", &reverse_op);
}
