// Small helpers shared by the CPU kernels in csrc/cpu/.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

namespace pyimputmae {

// The ATen calls inside our kernels (the GEMMs) are plain compute on buffers: no autograd graph
// and no autocast. The kernel's caller runs below autograd, but autocast may still be on, and
// at::parallel_for's worker threads inherit none of the caller's thread-local dispatch state,
// so every thread that calls ATen holds one of these.
struct PlainComputeGuard {
  c10::impl::ExcludeDispatchKeyGuard exclude{c10::autograd_dispatch_keyset_with_ADInplaceOrView |
                                             c10::autocast_dispatch_keyset};
};

inline void check_cpu_tensor(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (shape ", t.sizes(), ", strides ",
              t.strides(), ")");
}

inline void check_float_dtype(const at::Tensor& t, const char* name, const char* op) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op, ": ",
              name, " must be float32, float64, float16 or bfloat16, got ", dtype);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace pyimputmae
