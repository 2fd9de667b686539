// CUDA kernels of masked_mse_forward and scale_grad_. Spec: pyimputmae/reference/masked_mse.py.
//
// masked_mse_forward is one pass over pred: one block per (b, l) row reads pred and the target
// patch straight from the raw input x (patch addressing, never a materialised target), writes the
// gradient 2·w·(pred − target)/(P·Σw) and the row's loss term. Rows with w = 0 read nothing and
// write zeros. Σw comes from a tiny first kernel and the loss from a fixed-order sum of the row
// terms in a last one, so the loss is deterministic and no value crosses to the host. The gradient
// is in pred's dtype, except for fp16 pred: fp32 (reference gradient_dtype; fp16's range cannot hold
// it, nor GradScaler's scale), rounded to fp16 by the op's backward after scaling.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "cuda_utils.cuh"

namespace pyimputmae {
namespace cuda {
namespace {

constexpr int kMseThreads = 512;      // most threads per row block
// Vectors of V values a thread holds in registers at a time (target and pred each): 16 values for
// vectorised fp32/bf16/fp16, 8 for their scalar fallback, 4 for fp64 (a checking dtype): sizes that keep
// every variant free of register spills on sm_90. On sm_80 ptxas holds the vectorised 16-bit norm_pix
// variants (and fp64 pred on fp32 x) to 64 registers or fewer and spills 12-36 bytes per thread (to L1);
// `__launch_bounds__(512, 1)` removes that at half the resident warps. Which is faster is for an A100
// to say (registers and spills: tools/cuda_resource_check.py --arch 80).
constexpr int mse_items(int acc_bytes, int vec) { return (acc_bytes == 8 ? 4 : vec == 1 ? 8 : 16) / vec; }
constexpr double kNormPixEps = 1e-6;  // as in MAE's norm_pix_loss
constexpr int kSumThreads = 1024;

// This thread's share of Σ values[0, n) for a one-block sum: a fixed set of indices summed in a
// fixed order (deterministic), kUnroll independent loads in flight at a time.
template <typename A, typename T>
__device__ __forceinline__ A strided_sum(const T* __restrict__ values, int64_t n) {
  constexpr int kUnroll = 8;
  A sum = 0;
  for (int64_t i0 = threadIdx.x; i0 < n; i0 += kUnroll * blockDim.x) {
    A v[kUnroll];
#pragma unroll
    for (int q = 0; q < kUnroll; ++q) {
      const int64_t i = i0 + q * blockDim.x;
      v[q] = i < n ? static_cast<A>(values[i]) : A(0);
    }
#pragma unroll
    for (int q = 0; q < kUnroll; ++q) sum += v[q];
  }
  return sum;
}

// factors[0] = den = Σ w, or 1 when that is not positive (then every row term is 0 and so is the
// loss); factors[1] = 2 / (P·den), the gradient's factor (divisions stay out of the row kernel)
template <typename A>
__global__ void __launch_bounds__(kSumThreads)
    weight_sum_kernel(A* __restrict__ factors, const float* __restrict__ weight, int64_t n, int32_t P) {
  __shared__ A scratch[32];
  const A total = block_sum(strided_sum<A>(weight, n), scratch);
  if (threadIdx.x == 0) {
    const A den = total > A(0) ? total : A(1);
    factors[0] = den;
    factors[1] = A(2) / (static_cast<A>(P) * den);
  }
}

// loss = Σ_rows row_loss / den, in a fixed order
template <typename A>
__global__ void __launch_bounds__(kSumThreads)
    loss_sum_kernel(A* __restrict__ loss, const A* __restrict__ row_loss, const A* __restrict__ den, int64_t n) {
  __shared__ A scratch[32];
  const A total = block_sum(strided_sum<A>(row_loss, n), scratch);
  if (threadIdx.x == 0) *loss = total / *den;
}

// One block per row (b, l) of pred: P = vecs·V values, V at a time (V divides the patch size, so a
// vector never leaves the contiguous innermost run of the patch in x). A chunk is the
// blockDim.x·ITEMS vectors the block holds in registers at once; rows of more than one chunk
// (P beyond 8192 fp32/bf16/fp16 or 2048 fp64 values) re-read the target patch (from L2) for norm_pix.
// GradT: pred's dtype, or float for fp16 pred.
template <typename PredT, typename XT, typename GradT, int V, bool NORM>
__global__ void __launch_bounds__(kMseThreads)
    masked_mse_rows_kernel(GradT* __restrict__ grad, acc_t<PredT>* __restrict__ row_loss,
                           const PredT* __restrict__ pred, const XT* __restrict__ x, const float* __restrict__ weight,
                           const acc_t<PredT>* __restrict__ factors, PatchGeometry geo, int64_t rows, int32_t vecs,
                           acc_t<PredT> inv_p, acc_t<PredT> inv_p_minus_1) {
  using A = acc_t<PredT>;
  using PredPack = Pack<PredT, V>;
  using XPack = Pack<XT, V>;
  using GradPack = Pack<GradT, V>;
  constexpr int ITEMS = mse_items(sizeof(A), V);
  __shared__ A scratch[32];
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int32_t P = vecs * V;
  const int32_t per_chunk = nthreads * ITEMS;
  const int32_t chunks = (vecs + per_chunk - 1) / per_chunk;
  const A grad_factor = factors[1];

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {  // block-uniform loop
    const float w = weight[row];
    GradPack* grad_row = reinterpret_cast<GradPack*>(grad + row * P);
    if (w == 0.f) {  // block-uniform: nothing counted, nothing read
      GradPack zero;
#pragma unroll
      for (int j = 0; j < V; ++j) zero.v[j] = static_cast<GradT>(0.f);
      for (int32_t u = tid; u < vecs; u += nthreads) grad_row[u] = zero;
      if (tid == 0) row_loss[row] = A(0);
      continue;
    }
    const int64_t b = row / geo.patches;
    const XT* x_patch = x + geo.origin(b, static_cast<int32_t>(row - b * geo.patches));
    const PredPack* pred_row = reinterpret_cast<const PredPack*>(pred + row * P);

    A target[ITEMS][V];
    auto load_target = [&](int32_t chunk) {
#pragma unroll
      for (int it = 0; it < ITEMS; ++it) {
        const int32_t u = chunk * per_chunk + it * nthreads + tid;
        if (u < vecs) {
          const XPack p = *reinterpret_cast<const XPack*>(x_patch + geo.vec_offset<V>(static_cast<uint32_t>(u)));
#pragma unroll
          for (int j = 0; j < V; ++j) target[it][j] = static_cast<A>(p.v[j]);
        } else {
#pragma unroll
          for (int j = 0; j < V; ++j) target[it][j] = A(0);
        }
      }
    };

    PredPack p[ITEMS];
    auto load_pred = [&](int32_t chunk) {
#pragma unroll
      for (int it = 0; it < ITEMS; ++it) {
        const int32_t u = chunk * per_chunk + it * nthreads + tid;
        if (u < vecs) p[it] = pred_row[u];
      }
    };

    A mean = 0, rstd = 1;
    if (NORM) {  // per-patch mean and unbiased variance, two passes (exact, no cancellation)
      A sum = 0;
      for (int32_t chunk = 0; chunk < chunks; ++chunk) {
        load_target(chunk);
        if (chunks == 1) load_pred(0);  // in flight while the statistics are reduced
#pragma unroll
        for (int it = 0; it < ITEMS; ++it)
#pragma unroll
          for (int j = 0; j < V; ++j) sum += target[it][j];  // out-of-row items hold 0
      }
      mean = block_sum(sum, scratch) * inv_p;
      A sq = 0;
      for (int32_t chunk = 0; chunk < chunks; ++chunk) {
        if (chunks > 1) load_target(chunk);  // one chunk: still in registers
#pragma unroll
        for (int it = 0; it < ITEMS; ++it) {
          if (chunk * per_chunk + it * nthreads + tid < vecs) {
#pragma unroll
            for (int j = 0; j < V; ++j) {
              const A d = target[it][j] - mean;
              sq += d * d;
            }
          }
        }
      }
      const A var = block_sum(sq, scratch) * inv_p_minus_1;
      rstd = rsqrt(var + static_cast<A>(kNormPixEps));
    }

    const A grad_scale = static_cast<A>(w) * grad_factor;
    A sq_err = 0;
    for (int32_t chunk = 0; chunk < chunks; ++chunk) {
      if (!NORM || chunks > 1) {
        load_target(chunk);
        load_pred(chunk);
      }
#pragma unroll
      for (int it = 0; it < ITEMS; ++it) {
        const int32_t u = chunk * per_chunk + it * nthreads + tid;
        if (u < vecs) {
          GradPack g;
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const A t = NORM ? (target[it][j] - mean) * rstd : target[it][j];
            const A d = static_cast<A>(p[it].v[j]) - t;
            sq_err += d * d;
            g.v[j] = static_cast<GradT>(d * grad_scale);
          }
          grad_row[u] = g;
        }
      }
    }
    const A total = block_sum(sq_err, scratch);
    if (tid == 0) row_loss[row] = static_cast<A>(w) * total * inv_p;
  }
}

// GradT: the gradient's element type (PredT, or float for fp16 pred)
template <typename PredT, typename XT, typename GradT = PredT>
void launch_masked_mse(const at::Tensor& grad, const at::Tensor& loss, const at::Tensor& work, const at::Tensor& pred,
                       const at::Tensor& x, const at::Tensor& weight, int64_t patch, bool norm_pix) {
  using A = acc_t<PredT>;
  // V values of the widest of the three element types fill one 16-byte move (pred and x, or the
  // grad of fp16 pred, move in narrower ones)
  constexpr int kWidest = std::max({sizeof(PredT), sizeof(XT), sizeof(GradT)});
  constexpr int kVec = 16 / kWidest;
  const bool vectorised = patch % kVec == 0 && is_aligned(x.data_ptr(), kVec * sizeof(XT)) &&
                          is_aligned(pred.data_ptr(), kVec * sizeof(PredT)) &&
                          is_aligned(grad.data_ptr(), kVec * sizeof(GradT));
  const int vec = vectorised ? kVec : 1;
  const PatchGeometry geo = make_patch_geometry(x, patch, vec, "masked_mse");
  const int64_t rows = pred.size(0) * pred.size(1);
  const int32_t vecs = geo.features / vec;
  const int items = mse_items(sizeof(A), vec);
  const int threads = static_cast<int>(
      std::min<int64_t>(kMseThreads, std::max<int64_t>(32, ceil_div(ceil_div(vecs, items), 32) * 32)));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  A* factors = work.data_ptr<A>();
  A* row_loss = factors + 2;
  const int32_t P = geo.features;
  const A inv_p = static_cast<A>(1.0 / P);
  const A inv_p_minus_1 = static_cast<A>(P > 1 ? 1.0 / (P - 1) : 0.0);

  weight_sum_kernel<A><<<1, kSumThreads, 0, stream>>>(factors, weight.data_ptr<float>(), rows, P);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (rows > 0) {
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(rows, (int64_t(1) << 31) - 1));
    auto launch = [&](auto vec_tag, auto norm_tag) {
      constexpr int VV = decltype(vec_tag)::value;
      constexpr bool NN = decltype(norm_tag)::value;
      masked_mse_rows_kernel<PredT, XT, GradT, VV, NN><<<blocks, threads, 0, stream>>>(
          grad.data_ptr<GradT>(), row_loss, pred.data_ptr<PredT>(), x.data_ptr<XT>(), weight.data_ptr<float>(),
          factors, geo, rows, vecs, inv_p, inv_p_minus_1);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    using VecTag = std::integral_constant<int, kVec>;
    using ScalarTag = std::integral_constant<int, 1>;
    using NormTag = std::true_type;
    using PlainTag = std::false_type;
    if (vectorised && norm_pix) {
      launch(VecTag{}, NormTag{});
    } else if (vectorised) {
      launch(VecTag{}, PlainTag{});
    } else if (norm_pix) {
      launch(ScalarTag{}, NormTag{});
    } else {
      launch(ScalarTag{}, PlainTag{});
    }
  }
  loss_sum_kernel<A><<<1, kSumThreads, 0, stream>>>(loss.data_ptr<A>(), row_loss, factors, rows);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> masked_mse_forward_cuda(const at::Tensor& pred_in, const at::Tensor& x_in,
                                                           const at::Tensor& weight_in, int64_t patch, bool norm_pix) {
  TORCH_CHECK(pred_in.is_cuda(), "masked_mse: pred must be a CUDA tensor, got one on ", pred_in.device());
  check_cuda_tensor(x_in, "masked_mse: x", pred_in);
  check_cuda_tensor(weight_in, "masked_mse: weight", pred_in);
  const at::ScalarType pred_type = pred_in.scalar_type();
  TORCH_CHECK(is_float_kind(pred_type), "masked_mse: pred must be float32, float64, float16 or bfloat16, got ",
              pred_type);
  TORCH_CHECK(x_in.dim() >= 3 && x_in.dim() <= 5, "masked_mse: x must be (B, C, *S) with 1 to 3 spatial dims, got shape ",
              x_in.sizes());
  TORCH_CHECK(!x_in.is_complex() && x_in.scalar_type() != at::kBool, "masked_mse: x must be a real tensor, got ",
              x_in.scalar_type());
  const PatchGeometry shape = make_patch_geometry(x_in, patch, 1, "masked_mse");
  const int64_t B = x_in.size(0), L = shape.patches, P = shape.features;
  TORCH_CHECK(pred_in.dim() == 3 && pred_in.size(0) == B && pred_in.size(1) == L && pred_in.size(2) == P,
              "masked_mse: pred must be (B, L, P) = (", B, ", ", L, ", ", P, ") for input ", x_in.sizes(),
              " and patch ", patch, ", got ", pred_in.sizes());
  TORCH_CHECK(weight_in.scalar_type() == at::kFloat && weight_in.dim() == 2 && weight_in.size(0) == B &&
                  weight_in.size(1) == L,
              "masked_mse: weight must be a (B, L) = (", B, ", ", L, ") float32 tensor, got shape ", weight_in.sizes(),
              " dtype ", weight_in.scalar_type());
  TORCH_CHECK(!norm_pix || P >= 2, "masked_mse: norm_pix needs at least 2 values per patch, got P = ", P);

  const c10::cuda::CUDAGuard guard(pred_in.device());
  const at::Tensor pred = pred_in.contiguous(), weight = weight_in.contiguous();
  // x is read natively in pred's dtype or in float32; any other dtype is converted to float32 first
  // (an extra copy of x; the same values as the reference, which also rounds x to float32 unless
  // pred is float64, and float32 holds bf16, half and small integers exactly)
  const at::ScalarType x_type = x_in.scalar_type();
  const bool native_x = x_type == pred_type || x_type == at::kFloat;
  const at::Tensor x = native_x ? x_in.contiguous() : x_in.to(at::kFloat).contiguous();
  const at::ScalarType acc_type = pred_type == at::kDouble ? at::kDouble : at::kFloat;
  // fp16 pred keeps its gradient in fp32 (reference gradient_dtype)
  at::Tensor grad = at::empty_like(pred, pred.options().dtype(pred_type == at::kHalf ? at::kFloat : pred_type));
  at::Tensor loss = at::empty({}, pred.options().dtype(acc_type));
  at::Tensor work = at::empty({B * L + 2}, pred.options().dtype(acc_type));  // den, 2/(P·den), row terms
  const bool x_f32 = x.scalar_type() == at::kFloat;
  switch (pred_type) {
    case at::kFloat:
      launch_masked_mse<float, float>(grad, loss, work, pred, x, weight, patch, norm_pix);
      break;
    case at::kHalf:
      if (x_f32) {
        launch_masked_mse<c10::Half, float, float>(grad, loss, work, pred, x, weight, patch, norm_pix);
      } else {
        launch_masked_mse<c10::Half, c10::Half, float>(grad, loss, work, pred, x, weight, patch, norm_pix);
      }
      break;
    case at::kBFloat16:
      if (x_f32) {
        launch_masked_mse<c10::BFloat16, float>(grad, loss, work, pred, x, weight, patch, norm_pix);
      } else {
        launch_masked_mse<c10::BFloat16, c10::BFloat16>(grad, loss, work, pred, x, weight, patch, norm_pix);
      }
      break;
    default:  // double
      if (x_f32) {
        launch_masked_mse<double, float>(grad, loss, work, pred, x, weight, patch, norm_pix);
      } else {
        launch_masked_mse<double, double>(grad, loss, work, pred, x, weight, patch, norm_pix);
      }
      break;
  }
  return {loss, grad};
}

// ---------------------------------------------------------------------------------------------
// scale_grad_: grad *= scale[0] in place. The scale is read on the device; when it is 1 every
// thread returns at once (the usual training step: d loss = 1), so no pass over grad and no sync.

constexpr int kScaleThreads = 256;

template <typename T, int V>
__global__ void __launch_bounds__(kScaleThreads)
    scale_grad_kernel(T* __restrict__ grad, const void* __restrict__ scale, bool scale_is_double, int64_t n) {
  using A = acc_t<T>;
  const A s = scale_is_double ? static_cast<A>(*static_cast<const double*>(scale))
                              : static_cast<A>(*static_cast<const float*>(scale));
  if (s == A(1)) return;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t packs = n / V;
  Pack<T, V>* g = reinterpret_cast<Pack<T, V>*>(grad);
  for (int64_t i = first; i < packs; i += stride) {
    Pack<T, V> p = g[i];
#pragma unroll
    for (int j = 0; j < V; ++j) p.v[j] = static_cast<T>(static_cast<A>(p.v[j]) * s);
    g[i] = p;
  }
  for (int64_t i = packs * V + first; i < n; i += stride) grad[i] = static_cast<T>(static_cast<A>(grad[i]) * s);
}

void scale_grad_cuda(const at::Tensor& grad, const at::Tensor& scale) {
  TORCH_CHECK(grad.is_cuda(), "scale_grad_: grad must be a CUDA tensor, got one on ", grad.device());
  check_cuda_tensor(scale, "scale_grad_: scale", grad);
  TORCH_CHECK(is_float_kind(grad.scalar_type()),
              "scale_grad_: grad must be float32, float64, float16 or bfloat16, got ", grad.scalar_type());
  TORCH_CHECK(grad.is_contiguous(), "scale_grad_: grad must be contiguous (it is scaled in place), got strides ",
              grad.strides());
  TORCH_CHECK(scale.numel() == 1 && (scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kDouble),
              "scale_grad_: scale must hold one float32 or float64 value, got shape ", scale.sizes(), " dtype ",
              scale.scalar_type());
  const int64_t n = grad.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor scale_c = scale.contiguous();
  const bool scale_is_double = scale_c.scalar_type() == at::kDouble;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t max_blocks = 4 * static_cast<int64_t>(num_sms(grad.get_device()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "scale_grad_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vectorised = is_aligned(grad.data_ptr(), 16);
    const int64_t work_items = vectorised ? ceil_div(n, kVec) : n;
    const unsigned blocks = static_cast<unsigned>(std::min(max_blocks, ceil_div(work_items, kScaleThreads)));
    if (vectorised) {
      scale_grad_kernel<scalar_t, kVec><<<blocks, kScaleThreads, 0, stream>>>(
          grad.data_ptr<scalar_t>(), scale_c.data_ptr(), scale_is_double, n);
    } else {
      scale_grad_kernel<scalar_t, 1><<<blocks, kScaleThreads, 0, stream>>>(grad.data_ptr<scalar_t>(),
                                                                           scale_c.data_ptr(), scale_is_double, n);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(pyimputmae, CUDA, m) {
  m.impl("masked_mse_forward", &cuda::masked_mse_forward_cuda);
  m.impl("scale_grad_", &cuda::scale_grad_cuda);
}

}  // namespace pyimputmae
