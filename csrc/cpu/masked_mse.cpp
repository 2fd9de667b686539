// CPU masked MSE: loss and d loss / d pred in one pass. Spec: pyimputmae/reference/masked_mse.py.
//
// Each (b, l) row with a weight reads pred's row and its target patch straight from x (the
// patchified target never exists), and writes grad = 2·w·(pred − target)/(P·Σw); a row without
// weight writes zeros and reads nothing. The loss is summed in double over fixed chunks of rows
// and then in chunk order, so it does not depend on the number of threads. The gradient is in
// pred's dtype, except for fp16 pred: fp32 (reference gradient_dtype; fp16's range cannot hold it).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu_kernel_utils.h"
#include "patch_geometry.h"

namespace pyimputmae {
namespace {

constexpr double kNormPixEps = 1e-6;  // as MAE's norm_pix_loss
constexpr int64_t kLossChunkRows = 16;

// The dtype of the gradient kept for a pred_t pred (reference: gradient_dtype).
template <typename pred_t>
using grad_type = std::conditional_t<std::is_same_v<pred_t, c10::Half>, float, pred_t>;

template <typename pred_t, typename x_t>
void masked_mse_rows(const pred_t* pred, const x_t* x, const float* weight, const PatchGeometry& g, bool norm_pix,
                     at::opmath_type<pred_t> denominator, grad_type<pred_t>* grad, double* chunk_losses) {
  using grad_t = grad_type<pred_t>;
  using acc_t = at::opmath_type<pred_t>;
  const int64_t rows = g.batch * g.num_patches;
  const int64_t features = g.features;
  const int64_t chunks = ceil_div(rows, kLossChunkRows);
  at::parallel_for(0, chunks, 1, [&](int64_t first_chunk, int64_t last_chunk) {
    std::vector<acc_t> target(features);
    for (int64_t c = first_chunk; c < last_chunk; ++c) {
      double chunk_loss = 0;
      const int64_t row_end = std::min(rows, (c + 1) * kLossChunkRows);
      for (int64_t r = c * kLossChunkRows; r < row_end; ++r) {
        grad_t* grad_row = grad + r * features;
        const acc_t w = static_cast<acc_t>(weight[r]);
        if (w == acc_t(0)) {
          std::fill_n(grad_row, features, static_cast<grad_t>(0));
          continue;
        }
        const pred_t* pred_row = pred + r * features;
        const x_t* origin = x + (r / g.num_patches) * g.sample_stride + g.patch_origin(r % g.num_patches);
        const acc_t grad_scale = acc_t(2) * w / (static_cast<acc_t>(features) * denominator);
        // the target patch into an L1-sized buffer first: one long vector loop beats runs of p
        for_each_patch_run(g, [&](int64_t src, int64_t dst, int64_t length) {
          for (int64_t t = 0; t < length; ++t) target[dst + t] = static_cast<acc_t>(origin[src + t]);
        });
        acc_t shift = 0, inv_std = 1;
        if (norm_pix) {
          // normalised by the patch's own mean and unbiased variance (two passes: no cancellation)
          acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
          for (int64_t f = 0; f < features; ++f) sum += target[f];
          shift = sum / static_cast<acc_t>(features);
          acc_t centred = 0;
#pragma omp simd reduction(+ : centred)
          for (int64_t f = 0; f < features; ++f) centred += (target[f] - shift) * (target[f] - shift);
          inv_std = acc_t(1) / std::sqrt(centred / static_cast<acc_t>(features - 1) + static_cast<acc_t>(kNormPixEps));
        }
        acc_t squared = 0;
#pragma omp simd reduction(+ : squared)
        for (int64_t f = 0; f < features; ++f) {
          const acc_t diff = static_cast<acc_t>(pred_row[f]) - (target[f] - shift) * inv_std;
          squared += diff * diff;
          grad_row[f] = static_cast<grad_t>(diff * grad_scale);
        }
        chunk_loss += static_cast<double>(w) * static_cast<double>(squared) / static_cast<double>(features);
      }
      chunk_losses[c] = chunk_loss;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> masked_mse_forward_cpu(const at::Tensor& pred, const at::Tensor& x,
                                                          const at::Tensor& weight, int64_t patch, bool norm_pix) {
  constexpr const char* op = "masked_mse_forward";
  check_cpu_tensor(pred, "pred", op);
  check_float_dtype(pred, "pred", op);
  check_cpu_tensor(x, "x", op);
  check_float_dtype(x, "x", op);
  const PatchGeometry g = make_patch_geometry(x, patch, op);
  TORCH_CHECK(pred.dim() == 3 && pred.size(0) == g.batch && pred.size(1) == g.num_patches &&
                  pred.size(2) == g.features,
              op, ": pred must be (B, L, P) = (", g.batch, ", ", g.num_patches, ", ", g.features, ") for x ",
              x.sizes(), " and patch ", patch, ", got shape ", pred.sizes());
  check_cpu_tensor(weight, "weight", op);
  TORCH_CHECK(weight.scalar_type() == at::kFloat, op, ": weight must be float32, got ", weight.scalar_type());
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == g.batch && weight.size(1) == g.num_patches, op,
              ": weight must be (B, L) = (", g.batch, ", ", g.num_patches, "), got shape ", weight.sizes());
  TORCH_CHECK(!norm_pix || g.features >= 2, op, ": norm_pix needs at least 2 values per patch, got P = ",
              g.features);

  const auto loss_dtype = pred.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor loss = at::empty({}, pred.options().dtype(loss_dtype));
  const auto grad_dtype = pred.scalar_type() == at::kHalf ? at::kFloat : pred.scalar_type();
  at::Tensor grad = at::empty(pred.sizes(), pred.options().dtype(grad_dtype));
  const int64_t rows = g.batch * g.num_patches;
  const float* weight_data = weight.const_data_ptr<float>();
  double weight_sum = 0;
  for (int64_t r = 0; r < rows; ++r) weight_sum += weight_data[r];
  std::vector<double> chunk_losses(ceil_div(rows, kLossChunkRows), 0.0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, pred.scalar_type(), "masked_mse_forward_cpu", [&] {
    using pred_t = scalar_t;
    using acc_t = at::opmath_type<pred_t>;
    // the reference sums the weights in acc_t and falls back to 1 when the sum is not positive
    const acc_t denominator = weight_sum > 0 ? static_cast<acc_t>(weight_sum) : acc_t(1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "masked_mse_forward_cpu", [&] {
      masked_mse_rows<pred_t, scalar_t>(pred.const_data_ptr<pred_t>(), x.const_data_ptr<scalar_t>(), weight_data, g,
                                        norm_pix, denominator, grad.mutable_data_ptr<grad_type<pred_t>>(),
                                        chunk_losses.data());
    });
    double total = 0;
    for (double chunk_loss : chunk_losses) total += chunk_loss;
    const double value = total / static_cast<double>(denominator);
    if (loss_dtype == at::kDouble) {
      *loss.mutable_data_ptr<double>() = value;
    } else {
      *loss.mutable_data_ptr<float>() = static_cast<float>(value);
    }
  });
  return {loss, grad};
}

void scale_grad_cpu(const at::Tensor& grad, const at::Tensor& scale) {
  constexpr const char* op = "scale_grad_";
  check_cpu_tensor(grad, "grad", op);
  check_float_dtype(grad, "grad", op);
  TORCH_CHECK(scale.device().is_cpu(), op, ": scale must be a CPU tensor here, got device ", scale.device());
  TORCH_CHECK(scale.numel() == 1, op, ": scale must hold one value, got shape ", scale.sizes());
  TORCH_CHECK(scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kDouble, op,
              ": scale must be float32 or float64, got ", scale.scalar_type());
  const double factor = scale.scalar_type() == at::kDouble ? *scale.const_data_ptr<double>()
                                                           : static_cast<double>(*scale.const_data_ptr<float>());
  if (factor == 1.0) return;  // the usual backward of a loss: nothing to touch
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "scale_grad_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t multiplier = static_cast<acc_t>(factor);
    scalar_t* data = grad.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, grad.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) data[i] = static_cast<scalar_t>(static_cast<acc_t>(data[i]) * multiplier);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(pyimputmae, CPU, m) {
  m.impl("masked_mse_forward", &masked_mse_forward_cpu);
  m.impl("scale_grad_", &scale_grad_cpu);
}

}  // namespace pyimputmae
