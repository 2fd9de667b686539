// CPU random per-modality masking and MASK_TOKEN fill. Spec: pyimputmae/reference/masking.py.
//
// select_keep ranks Philox keys per (row, segment) with nth_element on (key, index) pairs — the
// same set as the reference's stable sort, in O(L_m) — and writes the kept positions in order.
// gather_visible / unshuffle_fill / hidden_sum are row copies and a row sum, parallel over rows.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu_kernel_utils.h"
#include "philox.h"

namespace pyimputmae {
namespace {

// ~32 KiB of rows per parallel chunk: enough work to amortise a task, fine-grained enough to balance.
int64_t grain_rows(int64_t row_bytes) { return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, row_bytes)); }

void check_ids_and_mask(const at::Tensor& ids_keep, const at::Tensor& mask, int64_t batch, const char* op) {
  check_cpu_tensor(ids_keep, "ids_keep", op);
  check_cpu_tensor(mask, "mask", op);
  TORCH_CHECK(ids_keep.scalar_type() == at::kLong, op, ": ids_keep must be int64, got ", ids_keep.scalar_type());
  TORCH_CHECK(mask.scalar_type() == at::kBool, op, ": mask must be bool, got ", mask.scalar_type());
  TORCH_CHECK(ids_keep.dim() == 2 && ids_keep.size(0) == batch, op, ": ids_keep must be (B, K) with B = ", batch,
              ", got shape ", ids_keep.sizes());
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == batch, op, ": mask must be (B, L) with B = ", batch,
              ", got shape ", mask.sizes());
}

inline void check_id(int64_t id, int64_t length, int64_t b, int64_t k, const char* op) {
  TORCH_CHECK(id >= 0 && id < length, op, ": ids_keep[", b, ", ", k, "] = ", id, " is outside [0, L) = [0, ",
              length, ")");
}

// The third output, inverse (B, L) int32: the slot of each kept position and kNotKept at the others:
// unshuffle_fill's map for this very pair (the same values as the CUDA kernel writes).
constexpr int32_t kNotKept = -2;

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_keep_cpu(const at::Tensor& present, at::IntArrayRef lengths,
                                                               at::IntArrayRef keeps, const at::Tensor& rng) {
  constexpr const char* op = "select_keep";
  check_cpu_tensor(present, "present", op);
  TORCH_CHECK(present.scalar_type() == at::kBool, op, ": present must be bool, got ", present.scalar_type());
  const int64_t segments = static_cast<int64_t>(lengths.size());
  TORCH_CHECK(present.dim() == 2 && present.size(1) == segments, op, ": present must be (B, M) with M = ", segments,
              " segments, got shape ", present.sizes());
  TORCH_CHECK(static_cast<int64_t>(keeps.size()) == segments, op, ": ", keeps.size(), " keep counts given for ",
              segments, " segments");
  int64_t total_length = 0, total_keep = 0;
  for (int64_t m = 0; m < segments; ++m) {
    TORCH_CHECK(lengths[m] >= 1, op, ": segment ", m, " has length ", lengths[m],
                "; every segment needs at least one token");
    TORCH_CHECK(keeps[m] >= 0 && keeps[m] <= lengths[m], op, ": segment ", m, " keeps ", keeps[m],
                " tokens, outside [0, ", lengths[m], "]");
    total_length += lengths[m];
    total_keep += keeps[m];
  }
  const int64_t batch = present.size(0);
  // Philox counters hold token and row as 32-bit words
  TORCH_CHECK(total_length <= std::numeric_limits<uint32_t>::max(), op, ": L = ", total_length,
              " tokens exceeds the 32-bit token counter");
  TORCH_CHECK(batch <= std::numeric_limits<uint32_t>::max(), op, ": B = ", batch,
              " rows exceeds the 32-bit row counter");
  TORCH_CHECK(rng.device().is_cpu(), op, ": rng must be a CPU tensor here, got device ", rng.device());
  TORCH_CHECK(rng.scalar_type() == at::kLong && rng.dim() == 1 && rng.size(0) == 2, op,
              ": rng must be a (2,) int64 tensor (seed, offset), got shape ", rng.sizes(), " ", rng.scalar_type());
  const int64_t* rng_data = rng.const_data_ptr<int64_t>();
  const int64_t rng_step = rng.stride(0);
  const uint64_t seed = static_cast<uint64_t>(rng_data[0]);
  const uint64_t offset = static_cast<uint64_t>(rng_data[rng_step]);

  TORCH_CHECK(total_keep < std::numeric_limits<int32_t>::max(), op, ": K = ", total_keep, " visible slots is too many");
  at::Tensor ids_keep = at::empty({batch, total_keep}, present.options().dtype(at::kLong));
  at::Tensor mask = at::empty({batch, total_length}, present.options().dtype(at::kBool));
  at::Tensor inverse = at::empty({batch, total_length}, present.options().dtype(at::kInt));
  int32_t* inverse_data = inverse.mutable_data_ptr<int32_t>();
  const bool* present_data = present.const_data_ptr<bool>();
  int64_t* ids_data = ids_keep.mutable_data_ptr<int64_t>();
  bool* mask_data = mask.mutable_data_ptr<bool>();
  const int64_t longest = segments > 0 ? *std::max_element(lengths.begin(), lengths.end()) : 0;

  at::parallel_for(0, batch, 1, [&](int64_t first_row, int64_t last_row) {
    std::vector<uint64_t> ranked(longest);  // (key << 32 | index): integer order = (key, index) order
    for (int64_t b = first_row; b < last_row; ++b) {
      bool* mask_row = mask_data + b * total_length;
      int64_t* ids_row = ids_data + b * total_keep;
      int32_t* inverse_row = inverse_data + b * total_length;
      std::fill_n(mask_row, total_length, true);
      std::fill_n(inverse_row, total_length, kNotKept);
      int64_t start = 0, first_slot = 0;
      for (int64_t m = 0; m < segments; ++m) {
        const int64_t length = lengths[m], keep = keeps[m];
        bool* seg_mask = mask_row + start;
        if (!present_data[b * segments + m]) {
          // missing modality: its slots name the segment's first K_m positions, all hidden
          for (int64_t i = 0; i < keep; ++i) ids_row[i] = start + i;
        } else if (keep > 0) {  // (a present segment with K_m = 0 stays hidden throughout)
          if (keep < length) {
            for (int64_t t = 0; t < length; ++t) {
              const uint32_t key = philox_token_key(static_cast<uint32_t>(start + t), static_cast<uint32_t>(b), seed,
                                                    offset);
              ranked[t] = (static_cast<uint64_t>(key) << 32) | static_cast<uint64_t>(t);
            }
            // pairs are distinct, so the first `keep` after nth_element are exactly the smallest
            std::nth_element(ranked.begin(), ranked.begin() + keep, ranked.begin() + length);
            for (int64_t i = 0; i < keep; ++i) seg_mask[ranked[i] & 0xFFFFFFFFu] = false;
          } else {
            std::fill_n(seg_mask, length, false);
          }
          int64_t slot = 0;
          for (int64_t t = 0; t < length; ++t) {
            if (seg_mask[t]) continue;
            inverse_row[start + t] = static_cast<int32_t>(first_slot + slot);
            ids_row[slot++] = start + t;
          }
        }
        ids_row += keep;
        first_slot += keep;
        start += length;
      }
    }
  });
  return {ids_keep, mask, inverse};
}

// `op`: the name errors give (fill_backward calls this for the gradient of a fill's x)
at::Tensor gather_visible_cpu_named(const at::Tensor& tokens, const at::Tensor& ids_keep, const at::Tensor& mask,
                                   const char* op) {
  check_cpu_tensor(tokens, "tokens", op);
  check_float_dtype(tokens, "tokens", op);
  TORCH_CHECK(tokens.dim() == 3, op, ": tokens must be (B, L, E), got shape ", tokens.sizes());
  const int64_t batch = tokens.size(0), length = tokens.size(1), embed = tokens.size(2);
  check_ids_and_mask(ids_keep, mask, batch, op);
  TORCH_CHECK(mask.size(1) == length, op, ": mask ", mask.sizes(), " does not match tokens ", tokens.sizes(),
              " (L = ", length, ")");
  const int64_t visible = ids_keep.size(1);
  at::Tensor out = at::empty({batch, visible, embed}, tokens.options());
  const int64_t* ids = ids_keep.const_data_ptr<int64_t>();
  const bool* hidden = mask.const_data_ptr<bool>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, tokens.scalar_type(), "gather_visible_cpu", [&] {
    const scalar_t* src = tokens.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, batch * visible, grain_rows(embed * sizeof(scalar_t)), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / visible, id = ids[r];
        check_id(id, length, b, r % visible, op);
        scalar_t* row = dst + r * embed;
        if (hidden[b * length + id]) {
          std::fill_n(row, embed, static_cast<scalar_t>(0));
        } else {
          std::memcpy(row, src + (b * length + id) * embed, embed * sizeof(scalar_t));
        }
      }
    });
  });
  return out;
}

at::Tensor gather_visible_cpu(const at::Tensor& tokens, const at::Tensor& ids_keep, const at::Tensor& mask) {
  return gather_visible_cpu_named(tokens, ids_keep, mask, "gather_visible");
}

// Where each output position of unshuffle_fill takes its row from.
constexpr int32_t kNoSource = -1;   // visible, named by no id: zeros
constexpr int32_t kManySources = -2;  // visible, named by several ids: their sum (scatter_add)

// mask_token: (E,), or none for zeros (the gather's backward).
// inverse: select_keep's third output for this very (ids_keep, mask), or none to build the map here.
at::Tensor unshuffle_fill_cpu(const at::Tensor& x, const at::Tensor& ids_keep, const at::Tensor& mask,
                              const std::optional<at::Tensor>& mask_token, const std::optional<at::Tensor>& inverse) {
  constexpr const char* op = "unshuffle_fill";
  check_cpu_tensor(x, "x", op);
  check_float_dtype(x, "x", op);
  TORCH_CHECK(x.dim() == 3, op, ": x must be (B, K, E), got shape ", x.sizes());
  const int64_t batch = x.size(0), visible = x.size(1), embed = x.size(2);
  check_ids_and_mask(ids_keep, mask, batch, op);
  TORCH_CHECK(ids_keep.size(1) == visible, op, ": ids_keep ", ids_keep.sizes(), " does not match x ", x.sizes());
  TORCH_CHECK(visible < std::numeric_limits<int32_t>::max(), op, ": K = ", visible, " visible slots is too many");
  if (mask_token.has_value()) {
    check_cpu_tensor(*mask_token, "mask_token", op);
    TORCH_CHECK(mask_token->scalar_type() == x.scalar_type(), op, ": mask_token dtype ", mask_token->scalar_type(),
                " differs from x dtype ", x.scalar_type());
    TORCH_CHECK(mask_token->dim() == 1 && mask_token->size(0) == embed, op, ": mask_token must be (", embed,
                ",), got shape ", mask_token->sizes());
  }
  const int64_t length = mask.size(1);
  if (inverse.has_value()) {
    check_cpu_tensor(*inverse, "inverse", op);
    TORCH_CHECK(inverse->scalar_type() == at::kInt && inverse->dim() == 2 && inverse->size(0) == batch &&
                    inverse->size(1) == length,
                op, ": inverse must be a (B, L) = (", batch, ", ", length,
                ") int32 tensor (select_keep's third output), got shape ", inverse->sizes(), " dtype ",
                inverse->scalar_type());
  }
  at::Tensor out = at::empty({batch, length, embed}, x.options());
  const int64_t* ids = ids_keep.const_data_ptr<int64_t>();
  const bool* hidden = mask.const_data_ptr<bool>();

  // inverse map, (B, L): the slot k whose row lands at each visible position (read nowhere else)
  std::vector<int32_t> built;
  if (!inverse.has_value()) {
    built.resize(batch * length);
    at::parallel_for(0, batch, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, length + visible)),
                     [&](int64_t first_row, int64_t last_row) {
      for (int64_t b = first_row; b < last_row; ++b) {
        int32_t* src_row = built.data() + b * length;
        std::fill_n(src_row, length, kNoSource);
        for (int64_t k = 0; k < visible; ++k) {
          const int64_t id = ids[b * visible + k];
          check_id(id, length, b, k, op);
          if (hidden[b * length + id]) continue;
          src_row[id] = src_row[id] == kNoSource ? static_cast<int32_t>(k) : kManySources;
        }
      }
    });
  }
  const int32_t* source = inverse.has_value() ? inverse->const_data_ptr<int32_t>() : built.data();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "unshuffle_fill_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    const scalar_t* token = mask_token.has_value() ? mask_token->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, batch * length, grain_rows(embed * sizeof(scalar_t)), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> sum;
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* row = dst + r * embed;
        const int32_t k = source[r];
        if (hidden[r]) {  // mask_token, or zeros without one
          if (token != nullptr) {
            std::memcpy(row, token, embed * sizeof(scalar_t));
          } else {
            std::fill_n(row, embed, static_cast<scalar_t>(0));
          }
        } else if (k >= 0) {
          std::memcpy(row, x_data + ((r / length) * visible + k) * embed, embed * sizeof(scalar_t));
        } else if (k == kNoSource) {
          std::fill_n(row, embed, static_cast<scalar_t>(0));
        } else {
          // a position named twice (never by select_keep): sum the rows, like the reference's scatter_add
          const int64_t b = r / length, position = r % length;
          sum.assign(embed, acc_t(0));
          for (int64_t slot = 0; slot < visible; ++slot) {
            if (ids[b * visible + slot] != position) continue;
            const scalar_t* x_row = x_data + (b * visible + slot) * embed;
            for (int64_t e = 0; e < embed; ++e) sum[e] += static_cast<acc_t>(x_row[e]);
          }
          for (int64_t e = 0; e < embed; ++e) row[e] = static_cast<scalar_t>(sum[e]);
        }
      }
    });
  });
  return out;
}

// Rows per partial sum of hidden_sum: a fixed chunking, so the result does not depend on the
// number of threads.
constexpr int64_t kHiddenSumChunkRows = 256;

at::Tensor hidden_sum_cpu_named(const at::Tensor& grad, const at::Tensor& mask, const char* op) {
  check_cpu_tensor(grad, "grad", op);
  check_float_dtype(grad, "grad", op);
  TORCH_CHECK(grad.dim() == 3, op, ": grad must be (B, L, E), got shape ", grad.sizes());
  check_cpu_tensor(mask, "mask", op);
  TORCH_CHECK(mask.scalar_type() == at::kBool, op, ": mask must be bool, got ", mask.scalar_type());
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == grad.size(0) && mask.size(1) == grad.size(1), op,
              ": mask must be (B, L) = (", grad.size(0), ", ", grad.size(1), "), got shape ", mask.sizes());
  const int64_t rows = grad.size(0) * grad.size(1), embed = grad.size(2);
  at::Tensor out = at::empty({embed}, grad.options());
  const bool* hidden = mask.const_data_ptr<bool>();
  const int64_t chunks = std::max<int64_t>(1, ceil_div(rows, kHiddenSumChunkRows));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "hidden_sum_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = grad.const_data_ptr<scalar_t>();
    std::vector<acc_t> partials(chunks * embed, acc_t(0));
    at::parallel_for(0, chunks, 1, [&](int64_t first_chunk, int64_t last_chunk) {
      for (int64_t c = first_chunk; c < last_chunk; ++c) {
        acc_t* partial = partials.data() + c * embed;
        const int64_t row_end = std::min(rows, (c + 1) * kHiddenSumChunkRows);
        for (int64_t r = c * kHiddenSumChunkRows; r < row_end; ++r) {
          if (!hidden[r]) continue;
          const scalar_t* row = src + r * embed;
          for (int64_t e = 0; e < embed; ++e) partial[e] += static_cast<acc_t>(row[e]);
        }
      }
    });
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, embed, 256, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) {
        acc_t total = 0;
        for (int64_t c = 0; c < chunks; ++c) total += partials[c * embed + e];
        dst[e] = static_cast<scalar_t>(total);
      }
    });
  });
  return out;
}

at::Tensor hidden_sum_cpu(const at::Tensor& grad, const at::Tensor& mask) {
  return hidden_sum_cpu_named(grad, mask, "hidden_sum");
}

// The gradients of a fill's x and mask_token from one call: grad's kept rows gathered to their
// slots (zero where hidden) and the sum of its hidden rows. The two read disjoint rows of grad.
std::tuple<at::Tensor, at::Tensor> fill_backward_cpu(const at::Tensor& grad, const at::Tensor& ids_keep,
                                                     const at::Tensor& mask) {
  constexpr const char* op = "fill_backward";
  return {gather_visible_cpu_named(grad, ids_keep, mask, op), hidden_sum_cpu_named(grad, mask, op)};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyimputmae, CPU, m) {
  m.impl("select_keep", &select_keep_cpu);
  m.impl("gather_visible", &gather_visible_cpu);
  m.impl("unshuffle_fill", &unshuffle_fill_cpu);
  m.impl("hidden_sum", &hidden_sum_cpu);
  m.impl("fill_backward", &fill_backward_cpu);
}

}  // namespace pyimputmae
