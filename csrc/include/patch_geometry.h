// Patch grid of an input x (B, C, *S) cut into non-overlapping p^k patches, shared by the CPU
// patch embedding (im2col / col2im) and the masked MSE (target patches read straight from x).
// Spec: pyimputmae/reference/patch_embed.py (patchify). Patches are numbered row-major over the
// grid; a patch's features are ordered (c, i, j, l) like an nn.Conv{k}d weight.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace pyimputmae {

// k = 1, 2, 3 spatial dims padded to three (leading size 1, patch extent 1), so one loop nest
// serves every k: a patch is C * extent[0] * extent[1] runs of extent[2] contiguous elements.
struct PatchGeometry {
  int64_t batch = 0;
  int64_t channels = 0;
  int64_t size[3] = {1, 1, 1};
  int64_t extent[3] = {1, 1, 1};
  int64_t grid[3] = {1, 1, 1};
  int64_t num_patches = 0;  // L = prod(grid)
  int64_t features = 0;     // F = C * p^k
  int64_t channel_stride = 0;
  int64_t sample_stride = 0;

  // Offset of patch n's first element from the start of its sample.
  int64_t patch_origin(int64_t n) const {
    const int64_t g2 = n % grid[2];
    const int64_t g1 = (n / grid[2]) % grid[1];
    const int64_t g0 = n / (grid[2] * grid[1]);
    return (g0 * extent[0] * size[1] + g1 * extent[1]) * size[2] + g2 * extent[2];
  }
};

// Validates x (B, C, *S) against the patch size; messages name the op, the shape and the value.
inline PatchGeometry make_patch_geometry(const at::Tensor& x, int64_t patch, const char* op) {
  TORCH_CHECK(x.dim() >= 3 && x.dim() <= 5, op, ": x must be (B, C, *S) with 1 to 3 spatial dims, got shape ",
              x.sizes());
  TORCH_CHECK(patch >= 1, op, ": patch size must be positive, got ", patch);
  PatchGeometry g;
  g.batch = x.size(0);
  g.channels = x.size(1);
  const int64_t k = x.dim() - 2;
  g.num_patches = 1;
  g.features = g.channels;
  for (int64_t axis = 0; axis < k; ++axis) {
    const int64_t s = x.size(2 + axis);
    TORCH_CHECK(s % patch == 0, op, ": spatial size ", s, " (dim ", 2 + axis, " of x ", x.sizes(),
                ") is not divisible by patch ", patch);
    const int64_t slot = 3 - k + axis;
    g.size[slot] = s;
    g.extent[slot] = patch;
    g.grid[slot] = s / patch;
    g.num_patches *= s / patch;
    g.features *= patch;
  }
  g.channel_stride = g.size[0] * g.size[1] * g.size[2];
  g.sample_stride = g.channels * g.channel_stride;
  return g;
}

// Calls run(src_offset, dst_offset, length) for every contiguous run of one patch, in feature
// order: src_offset relative to the patch origin in x, dst_offset into the (F,) feature row.
template <typename RunFn>
inline void for_each_patch_run(const PatchGeometry& g, RunFn&& run) {
  const int64_t row_stride = g.size[2];
  const int64_t plane_stride = g.size[1] * g.size[2];
  const int64_t run_length = g.extent[2];
  int64_t dst = 0;
  for (int64_t c = 0; c < g.channels; ++c) {
    for (int64_t i = 0; i < g.extent[0]; ++i) {
      for (int64_t j = 0; j < g.extent[1]; ++j) {
        run(c * g.channel_stride + i * plane_stride + j * row_stride, dst, run_length);
        dst += run_length;
      }
    }
  }
}

}  // namespace pyimputmae
