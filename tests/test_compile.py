"""torch.compile(fullgraph=True) of a whole pre-training step built from the fused ops, per backend:
one graph, no graph breaks, no recompilation for a new (seed, offset), and the same loss and
gradients as eager (including the masked_mse backward, which scales a saved forward output in place)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from op_testing import assert_close
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from pyimputmae import masked_mse, patch_embed, random_masking, unshuffle_fill

SIGNAL_TOKENS, IMAGE_TOKENS = 4, 4  # a (1, 32) signal in patches of 8, a (3, 8, 8) image in patches of 4


class TinyImputMAE(nn.Module):
    """Two modalities through the whole MAE step: embed → mask → encode the visible tokens → fill
    with a learnable mask_token → decode → one head per modality → masked MSE on hidden patches."""

    def __init__(self, backend: str, width: int = 16):
        super().__init__()
        self.backend = backend
        self.signal_embed = nn.Linear(1 * 8, width)
        self.signal_pos = nn.Parameter(0.1 * torch.randn(SIGNAL_TOKENS, width))
        self.image_embed = nn.Linear(3 * 4 * 4, width)
        self.image_pos = nn.Parameter(0.1 * torch.randn(IMAGE_TOKENS, width))
        self.encoder = nn.Linear(width, width)
        # nonzero, unlike the paper's zero init, so that a wrong gradient to it cannot hide
        self.mask_token = nn.Parameter(0.1 * torch.randn(width))
        self.decoder = nn.Linear(width, width)
        self.signal_head = nn.Linear(width, 1 * 8)
        self.image_head = nn.Linear(width, 3 * 4 * 4)

    def forward(self, signal, image, present, rng):
        """signal: (B, 1, 32); image: (B, 3, 8, 8); present: (B, 2) bool; rng: (2,) int64 → (loss, mask)."""
        be = self.backend
        tokens = torch.cat([
            patch_embed(signal, self.signal_embed.weight, self.signal_embed.bias, self.signal_pos, patch=8, backend=be),
            patch_embed(image, self.image_embed.weight, self.image_embed.bias, self.image_pos, patch=4, backend=be),
        ], dim=1)
        visible, ids_keep, mask = random_masking(tokens, (SIGNAL_TOKENS, IMAGE_TOKENS), 0.5, present, rng, backend=be)
        full = unshuffle_fill(F.gelu(self.encoder(visible)), ids_keep, mask, self.mask_token, backend=be)
        decoded = self.decoder(full)
        s, i = slice(0, SIGNAL_TOKENS), slice(SIGNAL_TOKENS, SIGNAL_TOKENS + IMAGE_TOKENS)
        loss = (masked_mse(self.signal_head(decoded[:, s]), signal, mask[:, s], present[:, 0], patch=8, backend=be)
                + masked_mse(self.image_head(decoded[:, i]), image, mask[:, i], present[:, 1], patch=4,
                             norm_pix=True, backend=be))
        return loss, mask


def _step(model: nn.Module, run, inputs, scale: float):
    model.zero_grad(set_to_none=True)
    loss, mask = run(*inputs)
    (loss * scale).backward()
    return loss.detach(), mask, {name: p.grad.clone() for name, p in model.named_parameters()}


def test_compiled_training_step_matches_eager_without_graph_breaks(backend, device):
    """Backend "inductor" on every device (its CPU compile takes ~10-20 s here, within budget)."""
    torch._dynamo.reset()
    model = TinyImputMAE(backend).to(device)
    B = 3
    signal = torch.randn(B, 1, 32, device=device)
    image = torch.randn(B, 3, 8, 8, device=device)
    present = torch.tensor([[True, True], [True, False], [False, True]], device=device)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=False)

    masks = []
    # incoming gradient 3 (the saved masked_mse gradient must be rescaled), then 1 (the no-op path)
    for offset, scale in [(0, 3.0), (1, 1.0)]:
        inputs = (signal, image, present, torch.tensor([11, offset], device=device))
        loss_e, mask_e, grads_e = _step(model, model, inputs, scale)
        loss_c, mask_c, grads_c = _step(model, compiled, inputs, scale)
        assert torch.equal(mask_c, mask_e), f"{backend}: compiled mask differs from eager (offset {offset})"
        assert_close(loss_c, loss_e, what=f"{backend} compiled loss (offset {offset})")
        assert grads_c.keys() == grads_e.keys()
        for name in grads_e:
            assert_close(grads_c[name], grads_e[name], what=f"{backend} compiled grad of {name} (offset {offset})")
        assert grads_e["mask_token"].abs().sum() > 0, "the mask_token gradient should not vanish here"
        masks.append(mask_c)
    assert counter.frame_count == 1, f"{backend}: {counter.frame_count} graphs, expected one (break or recompile)"
    assert not torch.equal(masks[0], masks[1]), "a new offset must give a new mask without recompiling"


@pytest.mark.parametrize("norm_pix", [False, True], ids=["raw", "norm_pix"])
def test_compiled_masked_mse_backward_scales_the_saved_gradient(backend, device, norm_pix):
    """masked_mse alone under compile, with an incoming gradient of 3 applied inside the graph."""
    torch._dynamo.reset()
    pred = torch.randn(2, 6, 48, device=device)
    x = torch.randn(2, 3, 8, 12, device=device)
    mask = torch.rand(2, 6, device=device) < 0.5
    mask[0, 0] = True

    def scaled_loss(p):
        return 3 * masked_mse(p, x, mask, patch=4, norm_pix=norm_pix, backend=backend)

    grads = []
    for fn in (scaled_loss, torch.compile(scaled_loss, backend="aot_eager", fullgraph=True)):
        leaf = pred.clone().requires_grad_(True)
        fn(leaf).backward()
        grads.append(leaf.grad)
    assert_close(grads[1], grads[0], what=f"{backend} compiled masked_mse grad")
