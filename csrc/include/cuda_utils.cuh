// Helpers shared by the CUDA kernels in csrc/cuda/: input checks, the SM count, packed (16-byte)
// loads, a fast integer divider, a deterministic block sum and the patch addressing of x.
// Included only by .cu files; keeps to light headers (see DESIGN.md section 4).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <string>

namespace pyimputmae {
namespace cuda {

// Accumulation type: fp32 for fp16, bf16 and fp32 data, fp64 for fp64 (at::opmath_type's choice).
// 16-bit values convert through float (c10::Half / c10::BFloat16 operators, round to nearest even).
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

constexpr int kMaxThreads = 1024;

// Lengths, counts and feature numbers the kernels count with 32-bit loop counters stay below this,
// so that a counter stepping a block past its bound never overflows (the Triton kernels' limit too).
constexpr int64_t kIndexLimit = (int64_t(1) << 31) - (int64_t(1) << 16);

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// n with thousands separators, as the Triton launchers print sizes: 2147418112 -> "2,147,418,112"
inline std::string grouped(int64_t n) {
  std::string digits = std::to_string(n);
  const int first = n < 0 ? 1 : 0;
  for (int i = static_cast<int>(digits.size()) - 3; i > first; i -= 3) digits.insert(i, ",");
  return digits;
}

// A size the kernels count in 32 bits: a ValueError naming the op (and the input it comes from) and
// the size when it is kIndexLimit or more, the message of the Triton launchers' check_sizes.
inline void check_index_size(const std::string& op, const char* name, int64_t n) {
  TORCH_CHECK_VALUE(n < kIndexLimit, op, ": ", name, " = ", grouped(n),
                    " is too large for the CUDA kernels (they take sizes below 2^31 - 2^16 = ", grouped(kIndexLimit),
                    "); split the input or use backend='reference'");
}

// A size that sets the number of blocks along gridDim.x of one launch (at most 2^31 - 1).
inline void check_grid_x(const std::string& op, const char* name, int64_t n) {
  TORCH_CHECK_VALUE(n < (int64_t(1) << 31), op, ": ", name, " = ", grouped(n),
                    " is too large for one CUDA launch (at most 2,147,483,647); split the input or use "
                    "backend='reference'");
}

inline bool is_aligned(const void* ptr, size_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

// Multiprocessor count of a device, queried once per device (cudaDeviceGetAttribute is not a
// stream operation, so this is safe during CUDA graph capture).
inline int num_sms(int device) {
  static std::atomic<int> cache[64];
  if (device >= 0 && device < 64) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  if (device >= 0 && device < 64) cache[device].store(count, std::memory_order_relaxed);
  return count;
}

// `name` says which op and argument, e.g. "gather_visible: mask"
inline void check_cuda_tensor(const at::Tensor& t, const std::string& name, const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), " but the other inputs are on ",
              like.device());
}

inline bool is_float_kind(at::ScalarType s) {
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

// N consecutive values of T moved as one load/store of sizeof(T)*N bytes (a power of two up to 16).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Division by a runtime divisor d in [1, 2^31) of a dividend n in [0, 2^31) with a multiply-high
// and a shift (Granlund & Montgomery, "Division by invariant integers using multiplication",
// PLDI'94: m = floor(2^32 (2^s - d) / d) + 1 with 2^s >= d; q = (mulhi(n, m) + n) >> s).
struct FastDivmod {
  uint32_t divisor = 1;
  uint32_t magic = 1;
  uint32_t shift = 0;

  FastDivmod() = default;
  explicit FastDivmod(int64_t d) {
    TORCH_CHECK(d >= 1 && d < (int64_t(1) << 31), "FastDivmod: divisor ", d, " is outside [1, 2^31)");
    divisor = static_cast<uint32_t>(d);
    shift = 0;
    while ((uint64_t(1) << shift) < divisor) ++shift;
    magic = static_cast<uint32_t>(((uint64_t(1) << 32) * ((uint64_t(1) << shift) - divisor)) / divisor + 1);
  }
  __device__ __forceinline__ uint32_t div(uint32_t n) const { return (__umulhi(n, magic) + n) >> shift; }
  // n = q * divisor + r
  __device__ __forceinline__ void divmod(uint32_t n, uint32_t& q, uint32_t& r) const {
    q = div(n);
    r = n - q * divisor;
  }
};

// Sum over the block, the same value returned to every thread; fixed order, so deterministic.
// blockDim.x must be a multiple of 32; `scratch` holds 32 values. Every thread must call it.
template <typename T>
__device__ __forceinline__ T block_sum(T value, T* scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // earlier readers of scratch are done
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  T total = 0;
  const int warps = blockDim.x >> 5;
  for (int w = 0; w < warps; ++w) total += scratch[w];
  return total;
}

// Where the patches of x: (B, C, *S) live. Spatial dims are padded on the left to 3 axes of
// extent 1 with patch extent 1, so 1-D, 2-D and 3-D patches share one addressing:
// feature f = ((c*p1 + i)*p2 + j)*p3 + t sits at x[b, c, g1*p1 + i, g2*p2 + j, g3*p3 + t] for
// patch l = (g1*G2 + g2)*G3 + g3 (row-major over the grid, features (c, i, j, t) as in a Conv weight).
// The innermost run of p3 = p features is contiguous in x; a thread works on V of them at once.
struct PatchGeometry {
  int64_t stride_b = 0;   // C*S1*S2*S3
  int64_t stride_c = 0;   // S1*S2*S3
  int64_t stride_1 = 0;   // S2*S3
  int64_t stride_2 = 0;   // S3
  int32_t grid_2 = 1, grid_3 = 1;  // patch grid along the last two axes
  int32_t p1 = 1, p2 = 1, p3 = 1;  // patch extent along the three axes
  int32_t patches = 0;  // L = G1*G2*G3
  int32_t features = 0;  // F = C*p1*p2*p3
  FastDivmod run_vecs;  // vectors of V features per innermost run: p3 / V
  FastDivmod div_p2, div_p1;

  // element offset in x of feature 0 of patch l of batch item b
  __device__ __forceinline__ int64_t origin(int64_t b, int32_t l) const {
    const int32_t g3 = l % grid_3;
    const int32_t rest = l / grid_3;
    const int32_t g2 = rest % grid_2, g1 = rest / grid_2;
    return b * stride_b + int64_t(g1) * p1 * stride_1 + int64_t(g2) * p2 * stride_2 + int64_t(g3) * p3;
  }
  // element offset, relative to origin(), of the first feature of vector u (features u*V ..)
  template <int V>
  __device__ __forceinline__ int64_t vec_offset(uint32_t u) const {
    uint32_t run, t, i, j, c, rest;
    run_vecs.divmod(u, run, t);
    div_p2.divmod(run, rest, j);
    div_p1.divmod(rest, c, i);
    return int64_t(c) * stride_c + int64_t(i) * stride_1 + int64_t(j) * stride_2 + int64_t(t) * V;
  }
};

// Geometry of x for patch size `patch`, vectors of `vec` features (vec must divide patch); `op`
// names the op in the errors.
inline PatchGeometry make_patch_geometry(const at::Tensor& x, int64_t patch, int64_t vec, const char* op) {
  const int64_t k = x.dim() - 2;
  TORCH_CHECK(k >= 1 && k <= 3, op, ": patch input must be (B, C, *S) with 1 to 3 spatial dims, got shape ",
              x.sizes());
  TORCH_CHECK(patch >= 1, op, ": patch size must be positive, got ", patch);
  int64_t S[3] = {1, 1, 1}, p[3] = {1, 1, 1};
  for (int64_t a = 0; a < k; ++a) {
    const int64_t size = x.size(2 + a);
    TORCH_CHECK(size % patch == 0, op, ": spatial size ", size, " (axis ", 2 + a, " of input shape ", x.sizes(),
                ") is not divisible by the patch size ", patch);
    S[3 - k + a] = size;
    p[3 - k + a] = patch;
  }
  const int64_t C = x.size(1);
  const int64_t patches = (S[0] / p[0]) * (S[1] / p[1]) * (S[2] / p[2]);
  const int64_t features = C * p[0] * p[1] * p[2];
  TORCH_CHECK_VALUE(C >= 1, op, ": x must have at least one channel, got shape ", x.sizes());
  const std::string where = std::string(op) + ": input " + c10::str(x.sizes()) + ", patch " + std::to_string(patch);
  check_index_size(where, "patches", patches);
  check_index_size(where, "features C*p^k", features);
  TORCH_CHECK(vec >= 1 && p[2] % vec == 0, "internal: vector width ", vec, " does not divide patch ", patch);
  PatchGeometry g;
  g.stride_2 = S[2];
  g.stride_1 = S[1] * S[2];
  g.stride_c = S[0] * S[1] * S[2];
  g.stride_b = C * g.stride_c;
  g.grid_2 = static_cast<int32_t>(S[1] / p[1]);
  g.grid_3 = static_cast<int32_t>(S[2] / p[2]);
  g.p1 = static_cast<int32_t>(p[0]);
  g.p2 = static_cast<int32_t>(p[1]);
  g.p3 = static_cast<int32_t>(p[2]);
  g.patches = static_cast<int32_t>(patches);
  g.features = static_cast<int32_t>(features);
  g.run_vecs = FastDivmod(p[2] / vec);
  g.div_p2 = FastDivmod(p[1]);
  g.div_p1 = FastDivmod(p[0]);
  return g;
}

}  // namespace cuda
}  // namespace pyimputmae
