// C++ test of the kernels library through the dispatcher, as a C++ user of the ops sees it:
// the schemas resolve, the CPU kernels agree with straightforward loops written here, and bad
// input is refused with a message. Run by ctest (see CMakeLists.txt).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>
#include <cstdio>
#include <string>

static int failures = 0;

static void expect(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "PASS" : "FAIL", what.c_str());
  if (!ok) ++failures;
}

static c10::OperatorHandle op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

int main() {
  at::manual_seed(0);

  // masked MSE with a 1-D patch of 4 on x (B=2, C=1, S=8): L = 2, P = 4
  {
    auto x = at::randn({2, 1, 8});
    auto pred = at::randn({2, 2, 4});
    auto w = at::tensor({1.0f, 0.0f, 1.0f, 1.0f}).view({2, 2});
    auto out = op("pyimputmae::masked_mse_forward")
                   .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                             const at::Tensor&, int64_t, bool)>()
                   .call(pred, x, w, 4, false);
    auto target = x.view({2, 2, 4});
    auto per_row = (pred - target).pow(2).mean(-1);
    auto expected = (per_row * w).sum() / w.sum();
    expect(std::abs(std::get<0>(out).item<float>() - expected.item<float>()) < 1e-5, "masked_mse_forward loss");
    auto grad = 2.0 * (pred - target) * w.unsqueeze(-1) / (4.0 * w.sum());
    expect(at::allclose(std::get<1>(out), grad, 1e-5, 1e-6), "masked_mse_forward gradient");
    auto empty = op("pyimputmae::masked_mse_forward")
                     .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                               const at::Tensor&, int64_t, bool)>()
                     .call(pred, x, at::zeros_like(w), 4, false);
    expect(std::get<0>(empty).item<float>() == 0.0f && std::get<1>(empty).abs().sum().item<float>() == 0.0f,
           "masked_mse_forward: empty mask gives 0 and a zero gradient");
  }

  // select_keep: exactly K kept per present segment, missing segment fully hidden; its inverse map
  // (the slot of each kept position, -2 elsewhere) is what unshuffle_fill builds for the pair; a
  // fill with no token writes zeros; fill_backward = (gather_visible, hidden_sum)
  {
    auto present = at::tensor({1, 1, 1, 0}).to(at::kBool).view({2, 2});
    auto rng = at::tensor({int64_t{7}, int64_t{3}});
    auto out = op("pyimputmae::select_keep")
                   .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, c10::IntArrayRef,
                                                                         c10::IntArrayRef, const at::Tensor&)>()
                   .call(present, {6, 4}, {3, 2}, rng);
    auto ids = std::get<0>(out), mask = std::get<1>(out), inverse = std::get<2>(out);
    expect(ids.sizes() == c10::IntArrayRef({2, 5}), "select_keep ids shape");
    expect(mask.slice(1, 0, 6).logical_not().sum(1).equal(at::tensor({int64_t{3}, int64_t{3}})),
           "select_keep keeps exactly K of the first segment");
    expect(mask[1].slice(0, 6, 10).all().item<bool>(), "select_keep hides a missing segment entirely");
    auto want = at::full({2, 10}, -2, at::kInt);
    for (int64_t b = 0; b < 2; ++b) {
      for (int64_t k = 0; k < 5; ++k) {
        const int64_t id = ids[b][k].item<int64_t>();
        if (!mask[b][id].item<bool>()) want[b][id] = k;
      }
    }
    expect(inverse.equal(want), "select_keep's inverse map holds the slot of each kept position, -2 elsewhere");

    using Fill = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&);
    auto x = at::randn({2, 5, 3});
    auto token = at::randn({3});
    auto built = op("pyimputmae::unshuffle_fill").typed<Fill>().call(x, ids, mask, token, std::nullopt);
    auto given = op("pyimputmae::unshuffle_fill").typed<Fill>().call(x, ids, mask, token, inverse);
    expect(given.equal(built), "unshuffle_fill given select_keep's map equals the fill that builds it");
    auto zero_filled = op("pyimputmae::unshuffle_fill").typed<Fill>().call(x, ids, mask, std::nullopt, inverse);
    expect(zero_filled.equal(built.masked_fill(mask.unsqueeze(-1), 0.0)), "unshuffle_fill without a token: zeros");
    auto grad = at::randn({2, 10, 3});
    auto grads = op("pyimputmae::fill_backward")
                     .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&)>()
                     .call(grad, ids, mask);
    auto gathered = op("pyimputmae::gather_visible")
                        .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>()
                        .call(grad, ids, mask);
    expect(std::get<0>(grads).equal(gathered), "fill_backward's x gradient is gather_visible's");
    expect(at::allclose(std::get<1>(grads), (grad * mask.unsqueeze(-1)).sum({0, 1}), 1e-5, 1e-6),
           "fill_backward's token gradient sums the hidden rows");
  }

  // patch_embed_forward equals conv1d with kernel = stride
  {
    auto x = at::randn({2, 3, 12});
    auto weight = at::randn({5, 3 * 4});
    auto bias = at::randn({5});
    auto out = op("pyimputmae::patch_embed_forward")
                   .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                     const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t)>()
                   .call(x, weight, bias, std::nullopt, std::nullopt, 4);
    auto conv = at::conv1d(x, weight.view({5, 3, 4}), bias, 4).transpose(1, 2);
    expect(at::allclose(out, conv, 1e-4, 1e-5), "patch_embed_forward equals conv1d");
    bool refused = false;
    try {
      op("pyimputmae::patch_embed_forward")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t)>()
          .call(at::randn({2, 3, 10}), weight, bias, std::nullopt, std::nullopt, 4);
    } catch (const c10::Error& e) {
      refused = std::string(e.what()).find("10") != std::string::npos;
    }
    expect(refused, "patch_embed_forward refuses a size not divisible by the patch, naming it");
  }

  std::printf("%d failed\n", failures);
  return failures ? 1 : 0;
}
