// Schemas of the kernel-level ops. Implementations: csrc/cpu/*.cpp (CPU dispatch key) and
// csrc/cuda/*.cu (CUDA dispatch key). The user-facing ops, their autograd and their fake
// kernels live in pyimputmae/ops/, which picks a backend and calls these through torch.ops.
#include <torch/library.h>

#include <vector>

#ifdef PYIMPUTMAE_PYTHON_MODULE
#include <Python.h>
// `import pyimputmae._C` loads this library, whose static initialisers register the ops.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "pyimputmae kernels", -1, nullptr};
  return PyModule_Create(&module);
}
#endif

namespace pyimputmae {

// CUDA architectures this build carries machine code for (e.g. 80, 90), empty without CUDA.
std::vector<int64_t> compiled_cuda_archs() {
  std::vector<int64_t> archs;
#ifdef PYIMPUTMAE_CUDA_ARCHS
  for (int64_t a : {PYIMPUTMAE_CUDA_ARCHS}) archs.push_back(a);
#endif
  return archs;
}

TORCH_LIBRARY(pyimputmae, m) {
  // patch embedding: x (B, C, *S), weight (E, C*p^k) -> (B, L or K, E)
  m.def("patch_embed_forward(Tensor x, Tensor weight, Tensor? bias, Tensor? pos, Tensor? keep, int patch) -> Tensor");
  // -> (grad_x or empty, grad_weight or empty); bias and pos gradients are plain reductions
  m.def("patch_embed_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? keep, int patch, "
        "bool need_x, bool need_weight) -> (Tensor, Tensor)");
  // masking: present (B, M) bool, rng (2,) int64 -> ids_keep (B, K) int64, mask (B, L) bool, and
  // inverse (B, L) int32: the slot of each kept position, -2 elsewhere (unshuffle_fill's map for the pair)
  m.def("select_keep(Tensor present, int[] lengths, int[] keeps, Tensor rng) -> (Tensor, Tensor, Tensor)");
  // tokens (B, L, E) -> (B, K, E): tokens[b, ids_keep[b, k]], zero where that position is hidden
  m.def("gather_visible(Tensor tokens, Tensor ids_keep, Tensor mask) -> Tensor");
  // x (B, K, E) -> (B, L, E): mask_token (zeros when None) where hidden, x scattered to visible positions;
  // inverse: select_keep's third output for this very (ids_keep, mask), or None to build the map
  m.def("unshuffle_fill(Tensor x, Tensor ids_keep, Tensor mask, Tensor? mask_token, Tensor? inverse=None) -> Tensor");
  // grad (B, L, E) -> (E,): sum of the rows at hidden positions (fp32 accumulation)
  m.def("hidden_sum(Tensor grad, Tensor mask) -> Tensor");
  // a fill's backward in one call: grad (B, L, E) -> (gather_visible(grad, ...), hidden_sum(grad, mask))
  m.def("fill_backward(Tensor grad, Tensor ids_keep, Tensor mask) -> (Tensor, Tensor)");
  // masked MSE: loss (fp32 scalar) and its gradient w.r.t. pred, in one pass
  m.def("masked_mse_forward(Tensor pred, Tensor x, Tensor weight, int patch, bool norm_pix) -> (Tensor, Tensor)");
  // grad *= scale[0], in place; returns at once, touching nothing, when scale == 1
  m.def("scale_grad_(Tensor(a!) grad, Tensor scale) -> ()");
  m.def("compiled_cuda_archs() -> int[]", &compiled_cuda_archs);
}

}  // namespace pyimputmae
