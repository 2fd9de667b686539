// CUDA kernels of the masking ops: select_keep, gather_visible, unshuffle_fill, hidden_sum, and
// fill_backward (a gather and a hidden sum from one call).
// Spec: pyimputmae/reference/masking.py (and hidden_sum in reference/backend.py).
//
// select_keep ranks Philox keys inside one block per (row, segment) (no sort) and reads
// (seed, offset) on the device, so it runs inside CUDA graphs. The row movers are dtype-agnostic:
// they copy rows as 16/8/4/2-byte units, whichever the row width and pointers allow.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>

#include "cuda_utils.cuh"
#include "philox.h"

namespace pyimputmae {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// select_keep

constexpr int kSegmentsPerLaunch = 64;  // segment table passed by value (1 KiB of kernel arguments)
constexpr int kKeyTile = 4096;          // keys cached in shared memory at a time (16 KiB)

struct SegmentTable {
  int32_t start[kSegmentsPerLaunch];      // o_m: first token of the segment in [0, L)
  int32_t length[kSegmentsPerLaunch];     // L_m
  int32_t out_start[kSegmentsPerLaunch];  // q_m: first visible slot in [0, K)
  int32_t keep[kSegmentsPerLaunch];       // K_m
};

// The inverse map (B, L) int32 of unshuffle_fill: where each output position takes its row from.
constexpr int32_t kHidden = -2;    // position holds mask_token
constexpr int32_t kUnnamed = -1;   // visible position no id names (zeros)

// One block per (row b, segment). Token t of the segment is kept when fewer than K_m tokens u have
// (key_u, u) < (key_t, t); its visible slot is the number of kept tokens before it (a block scan).
// inverse: the slot of each kept position, kHidden at the others — unshuffle_fill's map for this
// pair, so a fill of select_keep's own output need not build it.
__global__ void __launch_bounds__(kMaxThreads)
    select_keep_kernel(int64_t* __restrict__ ids_keep, bool* __restrict__ mask, int32_t* __restrict__ inverse,
                       const bool* __restrict__ present, const int64_t* __restrict__ rng, SegmentTable table,
                       int32_t first_segment, int32_t segments, int64_t L, int64_t K) {
  __shared__ uint32_t keys[kKeyTile];
  __shared__ int32_t warp_kept[32];
  const int64_t b = blockIdx.x;
  const int s = blockIdx.y;
  const int32_t o = table.start[s], n = table.length[s], q = table.out_start[s], k = table.keep[s];
  int64_t* ids_row = ids_keep + b * K + q;
  bool* mask_row = mask + b * L + o;
  int32_t* inverse_row = inverse + b * L + o;
  const int tid = threadIdx.x, nthreads = blockDim.x;

  if (!present[b * segments + first_segment + s]) {  // block-uniform: the whole block leaves
    for (int32_t t = tid; t < k; t += nthreads) ids_row[t] = static_cast<int64_t>(o) + t;
    for (int32_t t = tid; t < n; t += nthreads) {
      mask_row[t] = true;
      inverse_row[t] = kHidden;
    }
    return;
  }
  const uint64_t seed = static_cast<uint64_t>(rng[0]);
  const uint64_t offset = static_cast<uint64_t>(rng[1]);
  const uint32_t row = static_cast<uint32_t>(b);
  auto key_of = [&](int32_t t) { return philox_token_key(static_cast<uint32_t>(o + t), row, seed, offset); };

  const bool one_tile = n <= kKeyTile;
  if (one_tile) {
    for (int32_t t = tid; t < n; t += nthreads) keys[t] = key_of(t);
    __syncthreads();
  }
  const int lane = tid & 31, warp = tid >> 5, warps = nthreads >> 5;
  int32_t kept_before_chunk = 0;
  for (int32_t t0 = 0; t0 < n; t0 += nthreads) {  // block-uniform loop
    const int32_t t = t0 + tid;
    const bool valid = t < n;
    const uint32_t my_key = !valid ? 0u : (one_tile ? keys[t] : key_of(t));
    int32_t rank = 0;
    for (int32_t u0 = 0; u0 < n; u0 += kKeyTile) {
      const int32_t un = min(kKeyTile, n - u0);
      if (!one_tile) {
        __syncthreads();  // the previous tile's readers are done
        for (int32_t i = tid; i < un; i += nthreads) keys[i] = key_of(u0 + i);
        __syncthreads();
      }
      if (valid) {
#pragma unroll 4
        for (int32_t i = 0; i < un; ++i) {
          const uint32_t ku = keys[i];
          rank += (ku < my_key) | ((ku == my_key) & (u0 + i < t));
        }
      }
    }
    const bool kept = valid && rank < k;
    const uint32_t ballot = __ballot_sync(0xffffffffu, kept);
    if (lane == 0) warp_kept[warp] = __popc(ballot);
    __syncthreads();
    int32_t slot = kept_before_chunk + __popc(ballot & ((1u << lane) - 1u));
    int32_t chunk_kept = 0;
    for (int w = 0; w < warps; ++w) {
      const int32_t c = warp_kept[w];
      slot += w < warp ? c : 0;
      chunk_kept += c;
    }
    __syncthreads();  // warp_kept is rewritten by the next chunk
    if (kept) ids_row[slot] = static_cast<int64_t>(o) + t;
    if (valid) {
      mask_row[t] = !kept;
      inverse_row[t] = kept ? q + slot : kHidden;  // (a slot of the whole row: q_m + the segment's slot)
    }
    kept_before_chunk += chunk_kept;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_keep_cuda(const at::Tensor& present_in, at::IntArrayRef lengths,
                                                    at::IntArrayRef keeps, const at::Tensor& rng) {
  TORCH_CHECK(present_in.is_cuda(), "select_keep: present must be a CUDA tensor, got one on ", present_in.device());
  check_cuda_tensor(rng, "select_keep: rng", present_in);
  TORCH_CHECK(present_in.dim() == 2 && present_in.scalar_type() == at::kBool,
              "select_keep: present must be a (B, M) bool tensor, got shape ", present_in.sizes(), " dtype ",
              present_in.scalar_type());
  TORCH_CHECK(rng.dim() == 1 && rng.size(0) == 2 && rng.scalar_type() == at::kLong,
              "select_keep: rng must be a (2,) int64 tensor (seed, offset), got shape ", rng.sizes(), " dtype ",
              rng.scalar_type());
  const int64_t M = static_cast<int64_t>(lengths.size());
  TORCH_CHECK(static_cast<int64_t>(keeps.size()) == M, "select_keep: ", keeps.size(), " keep counts given for ", M,
              " segments");
  TORCH_CHECK(present_in.size(1) == M, "select_keep: present has ", present_in.size(1), " columns but ", M,
              " segments are given");
  int64_t L = 0, K = 0;
  for (int64_t m = 0; m < M; ++m) {
    TORCH_CHECK(lengths[m] >= 1, "select_keep: segment ", m, " has length ", lengths[m],
                "; every segment needs at least one token");
    TORCH_CHECK(keeps[m] >= 0 && keeps[m] <= lengths[m], "select_keep: segment ", m, " keeps ", keeps[m],
                " of its ", lengths[m], " tokens");
    L += lengths[m];
    K += keeps[m];
  }
  check_index_size("select_keep", "L (sum of the segment lengths)", L);  // K <= L
  const int64_t B = present_in.size(0);
  check_grid_x("select_keep", "B (rows of present)", B);  // one block per (row, segment)
  const c10::cuda::CUDAGuard guard(present_in.device());
  const at::Tensor present = present_in.contiguous();
  const at::Tensor rng_c = rng.contiguous();
  at::Tensor ids_keep = at::empty({B, K}, present.options().dtype(at::kLong));
  at::Tensor mask = at::empty({B, L}, present.options().dtype(at::kBool));
  at::Tensor inverse = at::empty({B, L}, present.options().dtype(at::kInt));
  if (B == 0 || M == 0) return {ids_keep, mask, inverse};

  int64_t longest = 0;
  for (int64_t m = 0; m < M; ++m) longest = std::max<int64_t>(longest, lengths[m]);
  const int threads = static_cast<int>(std::min<int64_t>(kMaxThreads, std::max<int64_t>(32, ceil_div(longest, 32) * 32)));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int64_t token = 0, slot = 0;
  for (int64_t first = 0; first < M; first += kSegmentsPerLaunch) {
    const int count = static_cast<int>(std::min<int64_t>(kSegmentsPerLaunch, M - first));
    SegmentTable table{};
    for (int s = 0; s < count; ++s) {
      table.start[s] = static_cast<int32_t>(token);
      table.length[s] = static_cast<int32_t>(lengths[first + s]);
      table.out_start[s] = static_cast<int32_t>(slot);
      table.keep[s] = static_cast<int32_t>(keeps[first + s]);
      token += lengths[first + s];
      slot += keeps[first + s];
    }
    const dim3 grid(static_cast<unsigned>(B), static_cast<unsigned>(count));
    select_keep_kernel<<<grid, threads, 0, stream>>>(
        ids_keep.data_ptr<int64_t>(), mask.data_ptr<bool>(), inverse.data_ptr<int32_t>(), present.data_ptr<bool>(),
        rng_c.data_ptr<int64_t>(), table, static_cast<int32_t>(first), static_cast<int32_t>(M), L, K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {ids_keep, mask, inverse};
}

// ---------------------------------------------------------------------------------------------
// Row movers (gather_visible, unshuffle_fill): rows of `units` values of type U (a 2-16 byte unit).
// A block holds blockDim.y rows of blockDim.x lanes; each lane keeps up to 4 loads in flight.

constexpr int kRowThreads = 256;
constexpr int kUnroll = 4;

// dst[0, units) = src[0, units), or zeros when src is null
template <typename U>
__device__ __forceinline__ void copy_row(U* __restrict__ dst, const U* __restrict__ src, int32_t units) {
  const int lane = threadIdx.x, lanes = blockDim.x;
  for (int32_t u0 = lane; u0 < units; u0 += kUnroll * lanes) {
    U v[kUnroll];
#pragma unroll
    for (int r = 0; r < kUnroll; ++r) {
      const int32_t u = u0 + r * lanes;
      v[r] = (src != nullptr && u < units) ? src[u] : U{};
    }
#pragma unroll
    for (int r = 0; r < kUnroll; ++r) {
      const int32_t u = u0 + r * lanes;
      if (u < units) dst[u] = v[r];
    }
  }
}

// out[b, k] = tokens[b, ids_keep[b, k]], zeros where that position is hidden
template <typename U>
__global__ void __launch_bounds__(kRowThreads)
    gather_visible_kernel(U* __restrict__ out, const U* __restrict__ tokens, const int64_t* __restrict__ ids_keep,
                          const bool* __restrict__ mask, int64_t rows, int64_t K, int64_t L, int32_t units) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (r >= rows) return;
  const int64_t b = r / K;
  const int64_t id = ids_keep[r];
  const bool in_range = id >= 0 && id < L;
  CUDA_KERNEL_ASSERT(in_range && "gather_visible: ids_keep out of [0, L)");
  const bool visible = in_range && !mask[b * L + id];
  copy_row(out + r * units, visible ? tokens + (b * L + id) * units : nullptr, units);
}

// inverse[b, l] = kHidden where mask[b, l]; else the largest k with ids_keep[b, k] = l, or kUnnamed
// (one block per row b; ids from select_keep are unique, the max only makes duplicates deterministic)
__global__ void __launch_bounds__(kRowThreads)
    inverse_ids_kernel(int32_t* __restrict__ inverse, const int64_t* __restrict__ ids_keep,
                       const bool* __restrict__ mask, int64_t K, int64_t L) {
  const int64_t b = blockIdx.x;
  int32_t* inv_row = inverse + b * L;
  for (int64_t l = threadIdx.x; l < L; l += blockDim.x) inv_row[l] = mask[b * L + l] ? kHidden : kUnnamed;
  __syncthreads();  // makes the initial values visible to the block before the atomics
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const int64_t id = ids_keep[b * K + k];
    const bool in_range = id >= 0 && id < L;
    CUDA_KERNEL_ASSERT(in_range && "unshuffle_fill: ids_keep out of [0, L)");
    if (in_range && !mask[b * L + id]) atomicMax(inv_row + id, static_cast<int32_t>(k));
  }
}

// out[b, l] = mask_token where hidden (zeros when it is null), x[b, inverse[b, l]] where visible,
// zeros where no id names l
template <typename U>
__global__ void __launch_bounds__(kRowThreads)
    unshuffle_fill_kernel(U* __restrict__ out, const U* __restrict__ x, const U* __restrict__ mask_token,
                          const int32_t* __restrict__ inverse, int64_t rows, int64_t K, int64_t L, int32_t units) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (r >= rows) return;
  const int32_t k = inverse[r];
  const U* src = k == kHidden ? mask_token : (k >= 0 ? x + ((r / L) * K + k) * units : nullptr);
  copy_row(out + r * units, src, units);
}

// The widest unit (16, 8, 4 or 2 bytes) dividing the row and the address of every pointer.
int unit_bytes(int64_t row_bytes, std::initializer_list<const void*> ptrs) {
  for (int bytes : {16, 8, 4}) {
    bool ok = row_bytes % bytes == 0;
    for (const void* p : ptrs) ok = ok && is_aligned(p, bytes);
    if (ok) return bytes;
  }
  return 2;  // every element is 2, 4 or 8 bytes wide and aligned to its size
}

template <typename F>
void with_unit_type(int bytes, const F& f) {
  switch (bytes) {
    case 16: f(uint4{}); break;
    case 8: f(uint2{}); break;
    case 4: f(uint32_t{}); break;
    default: f(uint16_t{}); break;
  }
}

// Threads per row (a power of two up to 32) and the grid for `rows` rows of `units` units.
struct RowLaunch {
  dim3 grid, block;
};
RowLaunch row_launch(int64_t rows, int64_t units) {
  int lanes = 1;
  while (lanes < 32 && lanes < units) lanes <<= 1;
  const int rows_per_block = kRowThreads / lanes;
  const int64_t blocks = ceil_div(rows, rows_per_block);
  TORCH_CHECK(blocks < (int64_t(1) << 31), "too many rows (", rows, ") for one launch");
  return {dim3(static_cast<unsigned>(blocks)), dim3(lanes, rows_per_block)};
}

// (the message is put together only when the check fails)
void check_float_tensor(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(is_float_kind(t.scalar_type()), op, ": ", name, " must be float32, float64, float16 or bfloat16, got ",
              t.scalar_type());
}

void check_ids_and_mask(const char* op, const at::Tensor& ids_keep, const at::Tensor& mask, int64_t B, int64_t K,
                        const at::Tensor& like) {
  check_cuda_tensor(ids_keep, std::string(op) + ": ids_keep", like);
  check_cuda_tensor(mask, std::string(op) + ": mask", like);
  TORCH_CHECK(ids_keep.dim() == 2 && ids_keep.size(0) == B && ids_keep.size(1) == K &&
                  ids_keep.scalar_type() == at::kLong,
              op, ": ids_keep must be a (B, K) = (", B, ", ", K, ") int64 tensor, got shape ", ids_keep.sizes(),
              " dtype ", ids_keep.scalar_type());
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == B && mask.scalar_type() == at::kBool, op,
              ": mask must be a (B, L) bool tensor with B = ", B, ", got shape ", mask.sizes(), " dtype ",
              mask.scalar_type());
}

// `op`: the name errors give (fill_backward calls this for the gradient of a fill's x)
at::Tensor gather_visible_named(const at::Tensor& tokens_in, const at::Tensor& ids_keep_in, const at::Tensor& mask_in,
                                const char* op) {
  TORCH_CHECK(tokens_in.is_cuda(), op, ": tokens must be a CUDA tensor, got one on ", tokens_in.device());
  TORCH_CHECK(tokens_in.dim() == 3, op, ": tokens must be (B, L, E), got shape ", tokens_in.sizes());
  check_float_tensor(tokens_in, op, "tokens");
  const int64_t B = tokens_in.size(0), L = tokens_in.size(1), E = tokens_in.size(2);
  TORCH_CHECK(ids_keep_in.dim() == 2, op, ": ids_keep must be (B, K), got shape ", ids_keep_in.sizes());
  const int64_t K = ids_keep_in.size(1);
  check_ids_and_mask(op, ids_keep_in, mask_in, B, K, tokens_in);
  TORCH_CHECK(mask_in.size(1) == L, op, ": mask must be (B, L) = (", B, ", ", L, "), got shape ", mask_in.sizes());
  // a row moves in units of at least one element (every element is aligned to its size): units <= E
  check_index_size(op, "E (token width)", E);
  const c10::cuda::CUDAGuard guard(tokens_in.device());
  const at::Tensor tokens = tokens_in.contiguous(), ids_keep = ids_keep_in.contiguous(), mask = mask_in.contiguous();
  at::Tensor out = at::empty({B, K, E}, tokens.options());
  const int64_t rows = B * K;
  if (rows == 0 || E == 0) return out;
  const int64_t row_bytes = E * tokens.element_size();
  const int bytes = unit_bytes(row_bytes, {tokens.data_ptr(), out.data_ptr()});
  TORCH_INTERNAL_ASSERT(row_bytes / bytes <= E, op, ": ", E, " values move as ", row_bytes / bytes, " units");
  const int32_t units = static_cast<int32_t>(row_bytes / bytes);
  const RowLaunch launch = row_launch(rows, units);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  with_unit_type(bytes, [&](auto unit) {
    using U = decltype(unit);
    gather_visible_kernel<U><<<launch.grid, launch.block, 0, stream>>>(
        static_cast<U*>(out.data_ptr()), static_cast<const U*>(tokens.data_ptr()), ids_keep.data_ptr<int64_t>(),
        mask.data_ptr<bool>(), rows, K, L, units);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor gather_visible_cuda(const at::Tensor& tokens, const at::Tensor& ids_keep, const at::Tensor& mask) {
  return gather_visible_named(tokens, ids_keep, mask, "gather_visible");
}

// mask_token: (E,), or none for zeros (the gather's backward: no zero token is allocated).
// inverse: select_keep's third output for this very (ids_keep, mask), or none to build the map here.
at::Tensor unshuffle_fill_cuda(const at::Tensor& x_in, const at::Tensor& ids_keep_in, const at::Tensor& mask_in,
                               const std::optional<at::Tensor>& mask_token_in,
                               const std::optional<at::Tensor>& inverse_in) {
  TORCH_CHECK(x_in.is_cuda(), "unshuffle_fill: x must be a CUDA tensor, got one on ", x_in.device());
  TORCH_CHECK(x_in.dim() == 3, "unshuffle_fill: x must be (B, K, E), got shape ", x_in.sizes());
  check_float_tensor(x_in, "unshuffle_fill", "x");
  const int64_t B = x_in.size(0), K = x_in.size(1), E = x_in.size(2);
  check_ids_and_mask("unshuffle_fill", ids_keep_in, mask_in, B, K, x_in);
  if (mask_token_in.has_value()) {
    const at::Tensor& token = *mask_token_in;
    check_cuda_tensor(token, "unshuffle_fill: mask_token", x_in);
    TORCH_CHECK(token.dim() == 1 && token.size(0) == E, "unshuffle_fill: mask_token must be (E,) = (", E,
                ",), got shape ", token.sizes());
    TORCH_CHECK(token.scalar_type() == x_in.scalar_type(), "unshuffle_fill: mask_token has dtype ",
                token.scalar_type(), " but x has ", x_in.scalar_type());
  }
  const int64_t L = mask_in.size(1);
  if (inverse_in.has_value()) {
    check_cuda_tensor(*inverse_in, "unshuffle_fill: inverse", x_in);
    TORCH_CHECK(inverse_in->dim() == 2 && inverse_in->size(0) == B && inverse_in->size(1) == L &&
                    inverse_in->scalar_type() == at::kInt && inverse_in->is_contiguous(),
                "unshuffle_fill: inverse must be a contiguous (B, L) = (", B, ", ", L,
                ") int32 tensor (select_keep's third output), got shape ", inverse_in->sizes(), " dtype ",
                inverse_in->scalar_type());
  }
  check_index_size("unshuffle_fill", "L (columns of mask)", L);
  check_index_size("unshuffle_fill", "K (columns of x)", K);
  check_index_size("unshuffle_fill", "E (token width)", E);  // units <= E, as in gather_visible
  check_grid_x("unshuffle_fill", "B (rows of x)", B);     // inverse_ids_kernel: one block per row
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), ids_keep = ids_keep_in.contiguous(), mask = mask_in.contiguous();
  const at::Tensor mask_token = mask_token_in.has_value() ? mask_token_in->contiguous() : at::Tensor();
  const void* token_ptr = mask_token.defined() ? mask_token.data_ptr() : nullptr;  // (aligned to any unit)
  at::Tensor out = at::empty({B, L, E}, x.options());
  const int64_t rows = B * L;
  if (rows == 0 || E == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor inverse;
  if (inverse_in.has_value()) {
    inverse = *inverse_in;
  } else {
    inverse = at::empty({B, L}, x.options().dtype(at::kInt));
    inverse_ids_kernel<<<static_cast<unsigned>(B), kRowThreads, 0, stream>>>(
        inverse.data_ptr<int32_t>(), ids_keep.data_ptr<int64_t>(), mask.data_ptr<bool>(), K, L);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  const int64_t row_bytes = E * x.element_size();
  const int bytes = unit_bytes(row_bytes, {x.data_ptr(), out.data_ptr(), token_ptr});
  TORCH_INTERNAL_ASSERT(row_bytes / bytes <= E, "unshuffle_fill: ", E, " values move as ", row_bytes / bytes, " units");
  const int32_t units = static_cast<int32_t>(row_bytes / bytes);
  const RowLaunch launch = row_launch(rows, units);
  with_unit_type(bytes, [&](auto unit) {
    using U = decltype(unit);
    unshuffle_fill_kernel<U><<<launch.grid, launch.block, 0, stream>>>(
        static_cast<U*>(out.data_ptr()), static_cast<const U*>(x.data_ptr()),
        static_cast<const U*>(token_ptr), inverse.data_ptr<int32_t>(), rows, K, L, units);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// hidden_sum: Σ over rows with mask of grad[row, :], in two deterministic stages: per-block
// partial sums over a fixed chunk of rows, then a fixed-order sum of the partials per column.

constexpr int kSumLanes = 32;  // column vectors per block
constexpr int kSumRows = 8;    // row lanes per block
constexpr int kSumTargetBlocks = 1024;
constexpr int kSumUnroll = 4;

template <typename T, int V>
__global__ void __launch_bounds__(kSumLanes * kSumRows)
    hidden_sum_partial_kernel(acc_t<T>* __restrict__ partial, const T* __restrict__ grad,
                              const bool* __restrict__ mask, int64_t rows, int64_t rows_per_chunk, int64_t E) {
  using A = acc_t<T>;
  __shared__ A stage[kSumRows][kSumLanes][V];
  const int64_t vecs = E / V;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kSumLanes + threadIdx.x;  // column vector index
  const int64_t chunk = blockIdx.y;
  const int64_t chunk_end = (chunk + 1) * rows_per_chunk;
  const int64_t row_end = chunk_end < rows ? chunk_end : rows;
  A sum[V];
#pragma unroll
  for (int j = 0; j < V; ++j) sum[j] = A(0);
  if (col < vecs) {
    // kSumUnroll rows at a time: their mask bytes, then their values, are loaded together
    for (int64_t r0 = chunk * rows_per_chunk + threadIdx.y; r0 < row_end; r0 += kSumUnroll * kSumRows) {
      bool take[kSumUnroll];
#pragma unroll
      for (int q = 0; q < kSumUnroll; ++q) {
        const int64_t r = r0 + q * kSumRows;
        take[q] = r < row_end && mask[r];
      }
      Pack<T, V> p[kSumUnroll];
#pragma unroll
      for (int q = 0; q < kSumUnroll; ++q) {
        if (take[q]) p[q] = reinterpret_cast<const Pack<T, V>*>(grad + (r0 + q * kSumRows) * E)[col];
      }
#pragma unroll
      for (int q = 0; q < kSumUnroll; ++q) {
        if (take[q]) {
#pragma unroll
          for (int j = 0; j < V; ++j) sum[j] += static_cast<A>(p[q].v[j]);
        }
      }
    }
  }
#pragma unroll
  for (int j = 0; j < V; ++j) stage[threadIdx.y][threadIdx.x][j] = sum[j];
  __syncthreads();
  if (threadIdx.y == 0 && col < vecs) {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      A total = stage[0][threadIdx.x][j];
      for (int y = 1; y < kSumRows; ++y) total += stage[y][threadIdx.x][j];
      partial[chunk * E + col * V + j] = total;
    }
  }
}

template <typename T>
__global__ void hidden_sum_final_kernel(T* __restrict__ out, const acc_t<T>* __restrict__ partial, int64_t chunks,
                                        int64_t E) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= E) return;
  acc_t<T> total = 0;
  for (int64_t c = 0; c < chunks; ++c) total += partial[c * E + e];
  out[e] = static_cast<T>(total);
}

at::Tensor hidden_sum_named(const at::Tensor& grad_in, const at::Tensor& mask_in, const char* op) {
  TORCH_CHECK(grad_in.is_cuda(), op, ": grad must be a CUDA tensor, got one on ", grad_in.device());
  TORCH_CHECK(grad_in.dim() == 3, op, ": grad must be (B, L, E), got shape ", grad_in.sizes());
  check_float_tensor(grad_in, op, "grad");
  check_cuda_tensor(mask_in, std::string(op) + ": mask", grad_in);
  const int64_t B = grad_in.size(0), L = grad_in.size(1), E = grad_in.size(2);
  TORCH_CHECK(mask_in.dim() == 2 && mask_in.size(0) == B && mask_in.size(1) == L && mask_in.scalar_type() == at::kBool,
              op, ": mask must be a (B, L) = (", B, ", ", L, ") bool tensor, got shape ", mask_in.sizes(),
              " dtype ", mask_in.scalar_type());
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const int64_t rows = B * L;
  if (rows == 0 || E == 0) return at::zeros({E}, grad_in.options());
  const at::Tensor grad = grad_in.contiguous(), mask = mask_in.contiguous();
  at::Tensor out = at::empty({E}, grad.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "hidden_sum_cuda", [&] {
    using A = acc_t<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vectorised = E % kVec == 0 && is_aligned(grad.data_ptr(), 16);
    const int64_t vecs = vectorised ? E / kVec : E;
    const int64_t col_blocks = ceil_div(vecs, kSumLanes);
    TORCH_CHECK(col_blocks < (int64_t(1) << 31), op, ": E = ", E, " is too large");
    // a shape-only choice of the chunking, so the result is the same on every GPU
    const int64_t chunks = std::max<int64_t>(
        1, std::min<int64_t>(std::max<int64_t>(1, kSumTargetBlocks / col_blocks), ceil_div(rows, 4 * kSumRows)));
    const int64_t rows_per_chunk = ceil_div(rows, chunks);
    at::Tensor partial = at::empty({chunks, E}, grad.options().dtype(c10::CppTypeToScalarType<A>::value));
    const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(chunks));
    const dim3 block(kSumLanes, kSumRows);
    if (vectorised) {
      hidden_sum_partial_kernel<scalar_t, kVec><<<grid, block, 0, stream>>>(
          partial.data_ptr<A>(), grad.data_ptr<scalar_t>(), mask.data_ptr<bool>(), rows, rows_per_chunk, E);
    } else {
      hidden_sum_partial_kernel<scalar_t, 1><<<grid, block, 0, stream>>>(
          partial.data_ptr<A>(), grad.data_ptr<scalar_t>(), mask.data_ptr<bool>(), rows, rows_per_chunk, E);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    hidden_sum_final_kernel<scalar_t><<<static_cast<unsigned>(ceil_div(E, 256)), 256, 0, stream>>>(
        out.data_ptr<scalar_t>(), partial.data_ptr<A>(), chunks, E);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor hidden_sum_cuda(const at::Tensor& grad, const at::Tensor& mask) {
  return hidden_sum_named(grad, mask, "hidden_sum");
}

// The gradients of a fill's x and mask_token from one call (one dispatch from Python instead of
// two): grad's kept rows gathered to their slots (zero where hidden), and the sum of its hidden
// rows. The two read disjoint rows of grad, so grad is read once in all.
std::tuple<at::Tensor, at::Tensor> fill_backward_cuda(const at::Tensor& grad, const at::Tensor& ids_keep,
                                                      const at::Tensor& mask) {
  constexpr const char* op = "fill_backward";
  at::Tensor grad_x = gather_visible_named(grad, ids_keep, mask, op);
  return {grad_x, hidden_sum_named(grad, mask, op)};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(pyimputmae, CUDA, m) {
  m.impl("select_keep", &cuda::select_keep_cuda);
  m.impl("gather_visible", &cuda::gather_visible_cuda);
  m.impl("unshuffle_fill", &cuda::unshuffle_fill_cuda);
  m.impl("hidden_sum", &cuda::hidden_sum_cuda);
  m.impl("fill_backward", &cuda::fill_backward_cuda);
}

}  // namespace pyimputmae
