// CUDA implementation of patch_embed_forward / patch_embed_backward.
// Spec: pyimputmae/reference/patch_embed.py and patch_embed_backward in reference/backend.py.
//
// Forward: a gather kernel copies only the kept patches of x into a contiguous (B·N, F) buffer
// (F = C·p^k, features (c, i, j, t) as in an nn.Conv{k}d weight), then one cuBLAS GEMM
// (at::addmm / at::mm; bf16 and fp16 run in their dtype with fp32 accumulation). Bias goes into addmm; with pos,
// a small kernel first writes pos[l] + bias into the output and the GEMM accumulates onto it.
// Backward: grad_weight = grad_outᵀ · patches (patches gathered again), grad_x = col2im of
// grad_out · weight, a kernel writing every element of grad_x (zeros for patches not read).
// The gather and scatter move raw elements (2, 4 or 8 bytes), 16 bytes at a time when the
// patch's innermost run allows it, so they need no dtype dispatch. x may be wider than the weight
// (fp32 input, bf16 or fp16 weights under autocast): the gathered patches are then rounded to the weight's
// dtype, and grad_x is moved back in x's dtype.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "cuda_utils.cuh"

namespace pyimputmae {
namespace cuda {
namespace {

constexpr int kRowThreads = 256;
constexpr int kUnroll = 4;

// cols[row] = the F features of patch l of batch item b, row = b·N + n, l = keep[b, n] (or n)
// One block per row; unit U is V raw elements ET (V divides the patch size).
template <typename ET, typename U>
__global__ void __launch_bounds__(kRowThreads)
    patch_gather_kernel(U* __restrict__ cols, const ET* __restrict__ x, const int64_t* __restrict__ keep,
                        PatchGeometry geo, int64_t rows, int64_t N, int32_t units) {
  constexpr int V = sizeof(U) / sizeof(ET);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t b = row / N;
    const int64_t l = keep != nullptr ? keep[row] : row - b * N;
    const bool in_range = l >= 0 && l < geo.patches;
    CUDA_KERNEL_ASSERT(in_range && "patch_embed: keep index out of [0, L)");
    U* dst = cols + row * units;
    const ET* src = x + geo.origin(b, in_range ? static_cast<int32_t>(l) : 0);
    for (int32_t u0 = threadIdx.x; u0 < units; u0 += kUnroll * blockDim.x) {
      U v[kUnroll];
#pragma unroll
      for (int r = 0; r < kUnroll; ++r) {
        const int32_t u = u0 + r * blockDim.x;
        if (u < units) v[r] = *reinterpret_cast<const U*>(src + geo.vec_offset<V>(static_cast<uint32_t>(u)));
      }
#pragma unroll
      for (int r = 0; r < kUnroll; ++r) {
        const int32_t u = u0 + r * blockDim.x;
        if (u < units) dst[u] = v[r];
      }
    }
  }
}

// grad_x over patch l of batch item b (row = b·L + l) = gcols[b·N + n] with n = inverse[row]
// (or l without keep), zeros when no kept patch is l. Patches tile x, so every element is written.
template <typename ET, typename U>
__global__ void __launch_bounds__(kRowThreads)
    patch_scatter_kernel(ET* __restrict__ grad_x, const U* __restrict__ gcols, const int32_t* __restrict__ inverse,
                         PatchGeometry geo, int64_t rows, int64_t N, int32_t units) {
  constexpr int V = sizeof(U) / sizeof(ET);
  const int64_t L = geo.patches;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t b = row / L;
    const int32_t l = static_cast<int32_t>(row - b * L);
    const int64_t n = inverse != nullptr ? inverse[row] : l;
    const U* src = n >= 0 ? gcols + (b * N + n) * units : nullptr;
    // every offset below is a multiple of V elements, so the patch is addressed in whole units
    U* dst = reinterpret_cast<U*>(grad_x + geo.origin(b, l));
    for (int32_t u0 = threadIdx.x; u0 < units; u0 += kUnroll * blockDim.x) {
      U v[kUnroll];
#pragma unroll
      for (int r = 0; r < kUnroll; ++r) {
        const int32_t u = u0 + r * blockDim.x;
        v[r] = (src != nullptr && u < units) ? src[u] : U{};
      }
#pragma unroll
      for (int r = 0; r < kUnroll; ++r) {
        const int32_t u = u0 + r * blockDim.x;
        if (u < units) dst[geo.vec_offset<V>(static_cast<uint32_t>(u)) / V] = v[r];
      }
    }
  }
}

// inverse[b, l] = the largest n with keep[b, n] = l, else -1 (one block per batch item; keep from
// select_keep has no repeats, the max only makes repeats deterministic)
__global__ void __launch_bounds__(kRowThreads)
    keep_inverse_kernel(int32_t* __restrict__ inverse, const int64_t* __restrict__ keep, int64_t N, int64_t L) {
  const int64_t b = blockIdx.x;
  int32_t* inv_row = inverse + b * L;
  for (int64_t l = threadIdx.x; l < L; l += blockDim.x) inv_row[l] = -1;
  __syncthreads();  // makes the -1s visible to the block before the atomics
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
    const int64_t l = keep[b * N + n];
    const bool in_range = l >= 0 && l < L;
    CUDA_KERNEL_ASSERT(in_range && "patch_embed: keep index out of [0, L)");
    if (in_range) atomicMax(inv_row + l, static_cast<int32_t>(n));
  }
}

// out[row] = pos[l] (+ bias), row = b·N + n, l = keep[b, n] (or n): the GEMM then adds onto it
template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    pos_bias_kernel(T* __restrict__ out, const T* __restrict__ pos, const T* __restrict__ bias,
                    const int64_t* __restrict__ keep, int64_t rows, int64_t N, int64_t L, int64_t E) {
  using A = acc_t<T>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= rows) return;
  const int64_t l = keep != nullptr ? keep[row] : row % N;
  const bool in_range = l >= 0 && l < L;
  CUDA_KERNEL_ASSERT(in_range && "patch_embed: keep index out of [0, L)");
  const T* pos_row = pos + (in_range ? l : 0) * E;
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
    const A v = static_cast<A>(pos_row[e]) + (bias != nullptr ? static_cast<A>(bias[e]) : A(0));
    out[row * E + e] = static_cast<T>(v);
  }
}

// Calls f(ET{}, U{}) with ET the raw element type of `element_size` bytes and U either a 16-byte
// unit (vectorised) or ET itself.
template <typename F>
void with_move_types(int64_t element_size, bool vectorised, const F& f) {
  auto pick = [&](auto element) {
    if (vectorised) {
      f(element, uint4{});
    } else {
      f(element, element);
    }
  };
  switch (element_size) {
    case 2: pick(uint16_t{}); break;
    case 4: pick(uint32_t{}); break;
    default: pick(uint64_t{}); break;
  }
}

// Whether patches of x move in 16-byte units: the innermost run (p elements) and every pointer
// involved must be 16-byte aligned.
bool patch_moves_vectorised(const at::Tensor& x, int64_t patch, std::initializer_list<const void*> others) {
  bool ok = (patch * x.element_size()) % 16 == 0 && is_aligned(x.data_ptr(), 16);
  for (const void* p : others) ok = ok && is_aligned(p, 16);
  return ok;
}

int row_threads(int64_t units) {
  return static_cast<int>(std::min<int64_t>(kRowThreads, std::max<int64_t>(32, ceil_div(ceil_div(units, kUnroll), 32) * 32)));
}

unsigned row_blocks(int64_t rows) { return static_cast<unsigned>(std::min<int64_t>(rows, (int64_t(1) << 31) - 1)); }

// cols (B·N, F) <- the kept patches of x
void gather_patches(const char* op, const at::Tensor& cols, const at::Tensor& x, const at::Tensor* keep,
                    int64_t patch, int64_t N, cudaStream_t stream) {
  const int64_t rows = cols.size(0);
  if (rows == 0) return;
  const bool vectorised = patch_moves_vectorised(x, patch, {cols.data_ptr()});
  const int64_t es = x.element_size();
  const int64_t vec = vectorised ? 16 / es : 1;
  const PatchGeometry geo = make_patch_geometry(x, patch, vec, op);
  const int32_t units = static_cast<int32_t>(geo.features / vec);
  const int64_t* keep_ptr = keep != nullptr ? keep->data_ptr<int64_t>() : nullptr;
  with_move_types(es, vectorised, [&](auto element, auto unit) {
    using ET = decltype(element);
    using U = decltype(unit);
    patch_gather_kernel<ET, U><<<row_blocks(rows), row_threads(units), 0, stream>>>(
        static_cast<U*>(cols.data_ptr()), static_cast<const ET*>(x.data_ptr()), keep_ptr, geo, rows, N, units);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

struct Checked {
  const char* op;
  int64_t B, N, L, F, E;
};

Checked check_patch_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& keep, int64_t patch) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got one on ", x.device());
  check_cuda_tensor(weight, std::string(op) + ": weight", x);
  TORCH_CHECK(is_float_kind(x.scalar_type()), op, ": x must be float32, float64, float16 or bfloat16, got ",
              x.scalar_type());
  TORCH_CHECK(is_float_kind(weight.scalar_type()), op,
              ": weight must be float32, float64, float16 or bfloat16, got ", weight.scalar_type());
  const PatchGeometry shape = make_patch_geometry(x, patch, 1, op);
  const int64_t F = shape.features, L = shape.patches, B = x.size(0);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == F, op, ": weight must be (E, C·p^k) = (E, ", F, ") for input ",
              x.sizes(), " and patch ", patch, ", got ", weight.sizes());
  int64_t N = L;
  if (keep.has_value()) {
    check_cuda_tensor(*keep, std::string(op) + ": keep", x);
    TORCH_CHECK(keep->dim() == 2 && keep->size(0) == B && keep->scalar_type() == at::kLong, op,
                ": keep must be a (B, K) int64 tensor with B = ", B, ", got shape ", keep->sizes(), " dtype ",
                keep->scalar_type());
    N = keep->size(1);
    check_index_size(op, "K (columns of keep)", N);
  }
  // cuBLAS takes a GEMM's sizes and leading dimensions as 32-bit ints. The GEMMs here are
  // cols (B·N, F) · weightᵀ (F, E), grad_outᵀ (E, B·N) · cols and grad_out (B·N, E) · weight (E, F), with
  // leading dimensions F and E: so B·N, E and F (checked with the patch geometry) must fit, and are
  // refused here, before the (B·N, F) patches are allocated.
  const int64_t E = weight.size(0);
  check_index_size(op, "E (rows of weight, the embedding width)", E);
  check_index_size(op, keep.has_value() ? "B*K (patch rows of the GEMM: rows of keep times its columns)"
                                        : "B*L (patch rows of the GEMM: batch size times patches per item)",
                   B * N);
  return {op, B, N, L, F, E};
}

// The checked inputs made contiguous (under the caller's device guard, as the copies may launch).
struct Operands {
  at::Tensor x, weight;
  std::optional<at::Tensor> keep;
  int64_t rows;  // B·N rows of the embedded matrix

  Operands(const at::Tensor& x_in, const at::Tensor& weight_in, const std::optional<at::Tensor>& keep_in,
           const Checked& d)
      : x(x_in.contiguous()), weight(weight_in.contiguous()), rows(d.B * d.N) {
    if (keep_in.has_value()) keep = keep_in->contiguous();
  }
  const at::Tensor* keep_or_null() const { return keep.has_value() ? &*keep : nullptr; }
};

// cols (rows, F) of the kept patches of x in the weight's dtype: gathered in x's dtype, then rounded
// when x is wider than the weight (an fp32 input with 16-bit weights under autocast), so only the kept
// patches are read and converted.
at::Tensor gather_in_weight_dtype(const Operands& o, const Checked& d, int64_t patch, cudaStream_t stream) {
  at::Tensor cols = at::empty({o.rows, d.F}, o.x.options());
  gather_patches(d.op, cols, o.x, o.keep_or_null(), patch, d.N, stream);
  return cols.scalar_type() == o.weight.scalar_type() ? cols : cols.to(o.weight.scalar_type());
}

at::Tensor patch_embed_forward_cuda(const at::Tensor& x_in, const at::Tensor& weight_in,
                                    const std::optional<at::Tensor>& bias_in, const std::optional<at::Tensor>& pos_in,
                                    const std::optional<at::Tensor>& keep_in, int64_t patch) {
  const Checked d = check_patch_args("patch_embed_forward", x_in, weight_in, keep_in, patch);
  if (bias_in.has_value()) {
    check_cuda_tensor(*bias_in, "patch_embed_forward: bias", x_in);
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == d.E && bias_in->scalar_type() == weight_in.scalar_type(),
                "patch_embed_forward: bias must be (E,) = (", d.E, ",) of dtype ", weight_in.scalar_type(), ", got shape ",
                bias_in->sizes(), " dtype ", bias_in->scalar_type());
  }
  if (pos_in.has_value()) {
    check_cuda_tensor(*pos_in, "patch_embed_forward: pos", x_in);
    TORCH_CHECK(pos_in->dim() == 2 && pos_in->size(0) == d.L && pos_in->size(1) == d.E &&
                    pos_in->scalar_type() == weight_in.scalar_type(),
                "patch_embed_forward: pos must be (L, E) = (", d.L, ", ", d.E, ") of dtype ", weight_in.scalar_type(),
                ", got shape ", pos_in->sizes(), " dtype ", pos_in->scalar_type());
  }
  const c10::cuda::CUDAGuard guard(x_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Operands o(x_in, weight_in, keep_in, d);
  const at::Tensor& weight = o.weight;
  const std::optional<at::Tensor>& keep = o.keep;
  const int64_t rows = o.rows;

  const at::Tensor cols = gather_in_weight_dtype(o, d, patch, stream);
  const at::Tensor weight_t = weight.t();
  at::Tensor out;
  if (pos_in.has_value()) {
    const at::Tensor pos = pos_in->contiguous();
    std::optional<at::Tensor> bias;
    if (bias_in.has_value()) bias = bias_in->contiguous();
    out = at::empty({rows, d.E}, weight.options());
    if (rows > 0 && d.E > 0) {
      const dim3 block(32, kRowThreads / 32);
      const int64_t blocks = ceil_div(rows, block.y);
      TORCH_CHECK(blocks < (int64_t(1) << 31), "patch_embed_forward: too many rows (", rows, ")");
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "patch_embed_pos_bias", [&] {
        pos_bias_kernel<scalar_t><<<static_cast<unsigned>(blocks), block, 0, stream>>>(
            out.data_ptr<scalar_t>(), pos.data_ptr<scalar_t>(), bias ? bias->data_ptr<scalar_t>() : nullptr,
            keep ? keep->data_ptr<int64_t>() : nullptr, rows, d.N, d.L, d.E);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    out.addmm_(cols, weight_t);  // out = pos[l] + bias + cols · weightᵀ, one GEMM with beta = 1
  } else if (bias_in.has_value()) {
    out = at::addmm(bias_in->contiguous(), cols, weight_t);
  } else {
    out = at::mm(cols, weight_t);
  }
  return out.view({d.B, d.N, d.E});
}

std::tuple<at::Tensor, at::Tensor> patch_embed_backward_cuda(const at::Tensor& grad_out_in, const at::Tensor& x_in,
                                                             const at::Tensor& weight_in,
                                                             const std::optional<at::Tensor>& keep_in, int64_t patch,
                                                             bool need_x, bool need_weight) {
  const Checked d = check_patch_args("patch_embed_backward", x_in, weight_in, keep_in, patch);
  check_cuda_tensor(grad_out_in, "patch_embed_backward: grad_out", x_in);
  TORCH_CHECK(grad_out_in.dim() == 3 && grad_out_in.size(0) == d.B && grad_out_in.size(1) == d.N &&
                  grad_out_in.size(2) == d.E && grad_out_in.scalar_type() == weight_in.scalar_type(),
              "patch_embed_backward: grad_out must be (B, N, E) = (", d.B, ", ", d.N, ", ", d.E, ") of dtype ",
              weight_in.scalar_type(), ", got shape ", grad_out_in.sizes(), " dtype ", grad_out_in.scalar_type());
  // keep_inverse_kernel runs one block per batch item
  if (need_x && keep_in.has_value()) check_grid_x(d.op, "B (rows of keep)", d.B);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Operands o(x_in, weight_in, keep_in, d);
  const at::Tensor &x = o.x, &weight = o.weight;
  const std::optional<at::Tensor>& keep = o.keep;
  const at::Tensor grad = grad_out_in.contiguous().view({o.rows, d.E});

  at::Tensor grad_weight = at::empty({0}, weight.options());
  if (need_weight) grad_weight = at::mm(grad.t(), gather_in_weight_dtype(o, d, patch, stream));  // (E, F)
  at::Tensor grad_x = at::empty({0}, x.options());
  if (need_x) {
    const at::Tensor gcols = at::mm(grad, weight).to(x.scalar_type());  // (B·N, F), moved in x's dtype
    grad_x = at::empty(x.sizes(), x.options());
    const int64_t patch_rows = d.B * d.L;
    if (patch_rows > 0) {
      at::Tensor inverse;
      if (keep.has_value()) {
        inverse = at::empty({d.B, d.L}, x.options().dtype(at::kInt));
        keep_inverse_kernel<<<static_cast<unsigned>(d.B), kRowThreads, 0, stream>>>(
            inverse.data_ptr<int32_t>(), keep->data_ptr<int64_t>(), d.N, d.L);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      const bool vectorised = patch_moves_vectorised(x, patch, {grad_x.data_ptr(), gcols.data_ptr()});
      const int64_t es = x.element_size();
      const int64_t vec = vectorised ? 16 / es : 1;
      const PatchGeometry geo = make_patch_geometry(x, patch, vec, d.op);
      const int32_t units = static_cast<int32_t>(geo.features / vec);
      const int32_t* inverse_ptr = keep.has_value() ? inverse.data_ptr<int32_t>() : nullptr;
      with_move_types(es, vectorised, [&](auto element, auto unit) {
        using ET = decltype(element);
        using U = decltype(unit);
        patch_scatter_kernel<ET, U><<<row_blocks(patch_rows), row_threads(units), 0, stream>>>(
            static_cast<ET*>(grad_x.data_ptr()), static_cast<const U*>(gcols.data_ptr()), inverse_ptr, geo,
            patch_rows, d.N, units);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
  }
  return {grad_x, grad_weight};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(pyimputmae, CUDA, m) {
  m.impl("patch_embed_forward", &cuda::patch_embed_forward_cuda);
  m.impl("patch_embed_backward", &cuda::patch_embed_backward_cuda);
}

}  // namespace pyimputmae
