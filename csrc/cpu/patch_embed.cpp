// CPU patch embedding: im2col of the (kept) patches in cache-sized blocks of rows, one GEMM per
// block. Spec: pyimputmae/reference/patch_embed.py and reference/backend.py.
//
// Every thread owns whole blocks: it gathers a block of patch rows into its own buffer and runs a
// single-threaded GEMM on it while the buffer is still in cache, so the patchified input never
// exists in full. bf16 and fp16 are gathered and multiplied in fp32 (no fast 16-bit GEMM without
// AVX-512 BF16 / FP16, and fp32 accumulation is the contract), then rounded once to the output's
// dtype; fp32 and fp64 GEMM straight into the output.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu_kernel_utils.h"
#include "patch_geometry.h"

namespace pyimputmae {
namespace {

// 4 MiB of im2col rows per block (512 rows of a 64^3 x 4-channel p=8 input): a thread's buffers
// stay in L3 while its GEMM reads them, and the GEMM's per-call packing of the weight and, in
// backward, the read-modify-write of the (E, F) grad_weight partial are amortised over many rows
// (1 MiB blocks cost ~5% more CPU in forward and ~15% in backward on a 2-core EPYC).
constexpr int64_t kBlockBytes = 4 << 20;
constexpr int64_t kMinBlockRows = 32;
constexpr int64_t kMaxBlockRows = 1024;

// Rows per block: cache-sized, but small enough that every thread gets at least one block.
int64_t rows_per_block(int64_t rows, int64_t features, int64_t element_size) {
  const int64_t cache_rows =
      std::clamp<int64_t>(kBlockBytes / std::max<int64_t>(1, features * element_size), kMinBlockRows, kMaxBlockRows);
  const int64_t per_thread = ceil_div(rows, at::get_num_threads());
  return std::max<int64_t>(1, std::min(cache_rows, per_thread));
}

// Patch index of output row r = (b, slot): keep[b, slot] (keep is (B, N) contiguous) or the slot.
inline int64_t patch_of_row(const int64_t* keep, int64_t rows_per_sample, int64_t r) {
  return keep != nullptr ? keep[r] : r % rows_per_sample;
}

// im2col: rows [r0, r0 + n) of the patch matrix into cols (n, F), converted to acc_t.
template <typename scalar_t, typename acc_t>
void gather_patch_rows(const scalar_t* x, const PatchGeometry& g, const int64_t* keep, int64_t rows_per_sample,
                       int64_t r0, int64_t n, acc_t* cols) {
  for (int64_t r = r0; r < r0 + n; ++r) {
    const scalar_t* origin =
        x + (r / rows_per_sample) * g.sample_stride + g.patch_origin(patch_of_row(keep, rows_per_sample, r));
    acc_t* row = cols + (r - r0) * g.features;
    for_each_patch_run(g, [&](int64_t src, int64_t dst, int64_t length) {
      for (int64_t t = 0; t < length; ++t) row[dst + t] = static_cast<acc_t>(origin[src + t]);
    });
  }
}

// col2im: rows [r0, r0 + n) of gcols (n, F) back into grad_x. Patches do not overlap, so a
// plain store is race-free unless keep names a patch twice (then: accumulate, one thread).
template <typename scalar_t, typename acc_t>
void scatter_patch_rows(const acc_t* gcols, const PatchGeometry& g, const int64_t* keep, int64_t rows_per_sample,
                        int64_t r0, int64_t n, bool accumulate, scalar_t* grad_x) {
  for (int64_t r = r0; r < r0 + n; ++r) {
    scalar_t* origin =
        grad_x + (r / rows_per_sample) * g.sample_stride + g.patch_origin(patch_of_row(keep, rows_per_sample, r));
    const acc_t* row = gcols + (r - r0) * g.features;
    for_each_patch_run(g, [&](int64_t dst, int64_t src, int64_t length) {
      if (accumulate) {
        for (int64_t t = 0; t < length; ++t)
          origin[dst + t] = static_cast<scalar_t>(static_cast<acc_t>(origin[dst + t]) + row[src + t]);
      } else {
        for (int64_t t = 0; t < length; ++t) origin[dst + t] = static_cast<scalar_t>(row[src + t]);
      }
    });
  }
}

template <typename acc_t, typename scalar_t>
void convert_rows(const scalar_t* src, int64_t count, acc_t* dst) {
  for (int64_t i = 0; i < count; ++i) dst[i] = static_cast<acc_t>(src[i]);
}

// A copy of t in acc_t (the fp32 operands of a bf16 or fp16 GEMM).
template <typename acc_t, typename scalar_t>
at::Tensor to_accumulate(const at::Tensor& t) {
  at::Tensor out = at::empty(t.sizes(), t.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  const scalar_t* src = t.const_data_ptr<scalar_t>();
  acc_t* dst = out.mutable_data_ptr<acc_t>();
  at::parallel_for(0, t.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
    convert_rows(src + begin, end - begin, dst + begin);
  });
  return out;
}

void check_keep(const at::Tensor& keep, const PatchGeometry& g, const char* op) {
  TORCH_CHECK(keep.device().is_cpu(), op, ": keep must be a CPU tensor, got device ", keep.device());
  TORCH_CHECK(keep.scalar_type() == at::kLong, op, ": keep must be int64, got ", keep.scalar_type());
  TORCH_CHECK(keep.dim() == 2 && keep.size(0) == g.batch, op, ": keep must be (B, K) with B = ", g.batch,
              ", got shape ", keep.sizes());
  TORCH_CHECK(keep.is_contiguous(), op, ": keep must be contiguous, got strides ", keep.strides());
  const int64_t* ids = keep.const_data_ptr<int64_t>();
  const int64_t kept = keep.size(1);
  for (int64_t i = 0; i < keep.numel(); ++i) {
    TORCH_CHECK(ids[i] >= 0 && ids[i] < g.num_patches, op, ": keep[", i / kept, ", ", i % kept, "] = ", ids[i],
                " is outside [0, ", g.num_patches, ") (the patch grid of x has ", g.num_patches, " patches)");
  }
}

PatchGeometry check_embed_inputs(const at::Tensor& x, const at::Tensor& weight, int64_t patch, const char* op) {
  check_cpu_tensor(x, "x", op);
  check_float_dtype(x, "x", op);
  const PatchGeometry g = make_patch_geometry(x, patch, op);
  check_cpu_tensor(weight, "weight", op);
  check_float_dtype(weight, "weight", op);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == g.features, op, ": weight must be (E, C*p^k) = (E, ",
              g.features, ") for x ", x.sizes(), " and patch ", patch, ", got shape ", weight.sizes());
  return g;
}

// x may have another dtype than the weight (an fp32 input with bf16 or fp16 weights under
// autocast): its patches are rounded to the weight's dtype. Here by converting x once (the CPU
// kernels gather every row block in the accumulation type anyway); everything after runs in the
// weight's dtype.
at::Tensor in_weight_dtype(const at::Tensor& x, const at::Tensor& weight) {
  return x.scalar_type() == weight.scalar_type() ? x : x.to(weight.scalar_type());
}

at::Tensor patch_embed_forward_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& pos,
                                   const std::optional<at::Tensor>& keep, int64_t patch) {
  constexpr const char* op = "patch_embed_forward";
  const PatchGeometry g = check_embed_inputs(x_in, weight, patch, op);
  const at::Tensor x = in_weight_dtype(x_in, weight);
  const int64_t embed = weight.size(0);
  if (bias.has_value()) {
    check_cpu_tensor(*bias, "bias", op);
    TORCH_CHECK(bias->scalar_type() == weight.scalar_type(), op, ": bias dtype ", bias->scalar_type(),
                " differs from weight dtype ", weight.scalar_type());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == embed, op, ": bias must be (", embed, ",), got shape ",
                bias->sizes());
  }
  if (pos.has_value()) {
    check_cpu_tensor(*pos, "pos", op);
    TORCH_CHECK(pos->scalar_type() == weight.scalar_type(), op, ": pos dtype ", pos->scalar_type(),
                " differs from weight dtype ", weight.scalar_type());
    TORCH_CHECK(pos->dim() == 2 && pos->size(0) == g.num_patches && pos->size(1) == embed, op,
                ": pos must be (L, E) = (", g.num_patches, ", ", embed, "), got shape ", pos->sizes());
  }
  if (keep.has_value()) check_keep(*keep, g, op);

  const int64_t rows_per_sample = keep.has_value() ? keep->size(1) : g.num_patches;
  const int64_t rows = g.batch * rows_per_sample;
  at::Tensor out = at::empty({g.batch, rows_per_sample, embed}, x.options());
  if (rows == 0 || embed == 0) return out;

  PlainComputeGuard plain;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "patch_embed_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr bool kGemmInOutput = std::is_same_v<scalar_t, acc_t>;
    const at::Tensor weight_acc = kGemmInOutput ? weight : to_accumulate<acc_t, scalar_t>(weight);
    const at::Tensor weight_t = weight_acc.t();  // (F, E) view: cols (n, F) @ weight^T
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    const int64_t* keep_data = keep.has_value() ? keep->const_data_ptr<int64_t>() : nullptr;
    const scalar_t* bias_data = bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* pos_data = pos.has_value() ? pos->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
    const at::Tensor out_rows = out.view({rows, embed});
    const auto acc_options = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const int64_t block = rows_per_block(rows, g.features, sizeof(acc_t));
    const int64_t num_blocks = ceil_div(rows, block);

    at::parallel_for(0, num_blocks, 1, [&](int64_t first_block, int64_t last_block) {
      PlainComputeGuard plain_in_worker;
      at::Tensor cols = at::empty({block, g.features}, acc_options);
      at::Tensor gemm_out = kGemmInOutput ? at::Tensor() : at::empty({block, embed}, acc_options);
      for (int64_t blk = first_block; blk < last_block; ++blk) {
        const int64_t r0 = blk * block;
        const int64_t n = std::min(block, rows - r0);
        gather_patch_rows(x_data, g, keep_data, rows_per_sample, r0, n, cols.mutable_data_ptr<acc_t>());
        const at::Tensor cols_n = cols.narrow(0, 0, n);
        if constexpr (kGemmInOutput) {
          at::Tensor out_n = out_rows.narrow(0, r0, n);
          if (bias_data == nullptr && pos_data == nullptr) {
            at::mm_out(out_n, cols_n, weight_t);
            continue;
          }
          // bias + pos rows first, then out += cols @ weight^T (GEMM with beta = 1)
          for (int64_t r = r0; r < r0 + n; ++r) {
            scalar_t* o = out_data + r * embed;
            const scalar_t* p = pos_data ? pos_data + patch_of_row(keep_data, rows_per_sample, r) * embed : nullptr;
            if (bias_data && p) {
              for (int64_t e = 0; e < embed; ++e) o[e] = bias_data[e] + p[e];
            } else {
              std::copy_n(bias_data ? bias_data : p, embed, o);
            }
          }
          out_n.addmm_(cols_n, weight_t);
        } else {
          at::Tensor gemm_n = gemm_out.narrow(0, 0, n);
          at::mm_out(gemm_n, cols_n, weight_t);
          const acc_t* gemm_data = gemm_out.const_data_ptr<acc_t>();
          for (int64_t r = r0; r < r0 + n; ++r) {
            const acc_t* v = gemm_data + (r - r0) * embed;
            scalar_t* o = out_data + r * embed;
            const scalar_t* p = pos_data ? pos_data + patch_of_row(keep_data, rows_per_sample, r) * embed : nullptr;
            for (int64_t e = 0; e < embed; ++e) {
              acc_t value = v[e];
              if (bias_data) value += static_cast<acc_t>(bias_data[e]);
              if (p) value += static_cast<acc_t>(p[e]);
              o[e] = static_cast<scalar_t>(value);
            }
          }
        }
      }
    });
  });
  return out;
}

// Marks the patches keep names (per sample) and reports whether one is named twice.
bool mark_kept_patches(const at::Tensor& keep, const PatchGeometry& g, std::vector<uint8_t>& kept) {
  kept.assign(g.batch * g.num_patches, 0);
  const int64_t* ids = keep.const_data_ptr<int64_t>();
  const int64_t per_sample = keep.size(1);
  bool repeated = false;
  for (int64_t b = 0; b < g.batch; ++b) {
    for (int64_t k = 0; k < per_sample; ++k) {
      uint8_t& flag = kept[b * g.num_patches + ids[b * per_sample + k]];
      repeated |= flag != 0;
      flag = 1;
    }
  }
  return repeated;
}

// grad_x regions of the patches keep never read: their gradient is zero.
template <typename scalar_t>
void zero_unkept_patches(const std::vector<uint8_t>& kept, const PatchGeometry& g, scalar_t* grad_x) {
  at::parallel_for(0, g.batch * g.num_patches, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (kept[i]) continue;
      scalar_t* origin = grad_x + (i / g.num_patches) * g.sample_stride + g.patch_origin(i % g.num_patches);
      for_each_patch_run(g, [&](int64_t dst, int64_t, int64_t length) {
        std::fill_n(origin + dst, length, static_cast<scalar_t>(0));
      });
    }
  });
}

std::tuple<at::Tensor, at::Tensor> patch_embed_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x_in,
                                                            const at::Tensor& weight,
                                                            const std::optional<at::Tensor>& keep, int64_t patch,
                                                            bool need_x, bool need_weight) {
  constexpr const char* op = "patch_embed_backward";
  const PatchGeometry g = check_embed_inputs(x_in, weight, patch, op);
  const at::Tensor x = in_weight_dtype(x_in, weight);  // grad_x goes back to x_in's dtype at the end
  const int64_t embed = weight.size(0);
  if (keep.has_value()) check_keep(*keep, g, op);
  const int64_t rows_per_sample = keep.has_value() ? keep->size(1) : g.num_patches;
  check_cpu_tensor(grad_out, "grad_out", op);
  TORCH_CHECK(grad_out.scalar_type() == weight.scalar_type(), op, ": grad_out dtype ", grad_out.scalar_type(),
              " differs from weight dtype ", weight.scalar_type());
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == g.batch && grad_out.size(1) == rows_per_sample &&
                  grad_out.size(2) == embed,
              op, ": grad_out must be (B, N, E) = (", g.batch, ", ", rows_per_sample, ", ", embed, "), got shape ",
              grad_out.sizes());

  const int64_t rows = g.batch * rows_per_sample;
  at::Tensor grad_x = need_x ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  at::Tensor grad_weight = need_weight ? at::empty(weight.sizes(), weight.options()) : at::empty({0}, weight.options());
  if (!need_x && !need_weight) return {grad_x.to(x_in.scalar_type()), grad_weight};
  if (rows == 0 || embed == 0) {
    if (need_x) grad_x.zero_();
    if (need_weight) grad_weight.zero_();
    return {grad_x.to(x_in.scalar_type()), grad_weight};
  }

  // With keep, only kept patches get a gradient; a patch kept twice gets the sum of both rows,
  // which needs accumulation into a zeroed grad_x in one thread (select_keep never repeats one).
  bool accumulate_x = false;
  std::vector<uint8_t> kept;
  if (need_x && keep.has_value()) accumulate_x = mark_kept_patches(*keep, g, kept);

  PlainComputeGuard plain;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "patch_embed_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr bool kGemmInPlace = std::is_same_v<scalar_t, acc_t>;
    const auto acc_options = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const at::Tensor weight_acc = kGemmInPlace ? weight : to_accumulate<acc_t, scalar_t>(weight);
    const at::Tensor grad_rows = grad_out.view({rows, embed});
    const scalar_t* grad_data = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    const int64_t* keep_data = keep.has_value() ? keep->const_data_ptr<int64_t>() : nullptr;
    scalar_t* grad_x_data = need_x ? grad_x.mutable_data_ptr<scalar_t>() : nullptr;
    if (need_x && keep.has_value()) {
      if (accumulate_x) {
        grad_x.zero_();
      } else {
        zero_unkept_patches(kept, g, grad_x_data);
      }
    }

    const int64_t block = rows_per_block(rows, g.features, sizeof(acc_t));
    const int64_t num_blocks = ceil_div(rows, block);
    // grad_weight: one partial per slot (a slot = a fixed run of blocks), summed in slot order
    const int64_t num_slots = accumulate_x ? 1 : std::min<int64_t>(num_blocks, at::get_num_threads());
    std::vector<at::Tensor> partials(need_weight ? num_slots : 0);
    for (int64_t s = 0; s < static_cast<int64_t>(partials.size()); ++s) {
      partials[s] = (s == 0 && kGemmInPlace) ? grad_weight : at::empty({embed, g.features}, acc_options);
    }

    at::parallel_for(0, num_slots, 1, [&](int64_t first_slot, int64_t last_slot) {
      PlainComputeGuard plain_in_worker;
      at::Tensor cols = need_weight ? at::empty({block, g.features}, acc_options) : at::Tensor();
      at::Tensor gcols = need_x ? at::empty({block, g.features}, acc_options) : at::Tensor();
      at::Tensor grad_acc = kGemmInPlace ? at::Tensor() : at::empty({block, embed}, acc_options);
      for (int64_t s = first_slot; s < last_slot; ++s) {
        const int64_t blk_begin = s * num_blocks / num_slots;
        const int64_t blk_end = (s + 1) * num_blocks / num_slots;
        for (int64_t blk = blk_begin; blk < blk_end; ++blk) {
          const int64_t r0 = blk * block;
          const int64_t n = std::min(block, rows - r0);
          at::Tensor grad_n;
          if constexpr (kGemmInPlace) {
            grad_n = grad_rows.narrow(0, r0, n);
          } else {
            convert_rows(grad_data + r0 * embed, n * embed, grad_acc.mutable_data_ptr<acc_t>());
            grad_n = grad_acc.narrow(0, 0, n);
          }
          if (need_weight) {
            gather_patch_rows(x_data, g, keep_data, rows_per_sample, r0, n, cols.mutable_data_ptr<acc_t>());
            const at::Tensor cols_n = cols.narrow(0, 0, n);
            if (blk == blk_begin) {
              at::mm_out(partials[s], grad_n.t(), cols_n);
            } else {
              partials[s].addmm_(grad_n.t(), cols_n);
            }
          }
          if (need_x) {
            at::Tensor gcols_n = gcols.narrow(0, 0, n);
            at::mm_out(gcols_n, grad_n, weight_acc);
            scatter_patch_rows(gcols.const_data_ptr<acc_t>(), g, keep_data, rows_per_sample, r0, n, accumulate_x,
                               grad_x_data);
          }
        }
      }
    });

    if (need_weight && !(kGemmInPlace && num_slots == 1)) {
      // fixed-order sum of the slot partials (deterministic for a given thread count)
      std::vector<const acc_t*> partial_data;
      for (const at::Tensor& partial : partials) partial_data.push_back(partial.const_data_ptr<acc_t>());
      scalar_t* gw = grad_weight.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, embed * g.features, 1 << 14, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          acc_t sum = partial_data[0][i];
          for (int64_t s = 1; s < num_slots; ++s) sum += partial_data[s][i];
          gw[i] = static_cast<scalar_t>(sum);
        }
      });
    }
  });
  return {grad_x.to(x_in.scalar_type()), grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyimputmae, CPU, m) {
  m.impl("patch_embed_forward", &patch_embed_forward_cpu);
  m.impl("patch_embed_backward", &patch_embed_backward_cpu);
}

}  // namespace pyimputmae
