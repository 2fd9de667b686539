"""GPU check of pyimputmae.kernels: correctness vs reference on CUDA, then timings. Run from repo root."""
import json, os, sys, time, traceback
sys.path.insert(0, os.getcwd())
import torch, triton
import kernels
sys.modules["pyimputmae.kernels"] = kernels
import pyimputmae
from pyimputmae.reference import backend as RB
from pyimputmae.reference.patch_embed import patchify
import kernels.masked_mse as KM
from triton.testing import do_bench

T0 = time.time()
dev = "cuda"
print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
ok_all = True

def section(name):
    def deco(fn):
        global ok_all
        t = time.time()
        try:
            fn()
            print(f"[ok] {name} ({time.time() - t:.1f}s)", flush=True)
            res.setdefault("sections", {})[name] = "ok"
        except Exception:
            ok_all = False
            print(f"[FAIL] {name}", flush=True)
            traceback.print_exc()
            res.setdefault("sections", {})[name] = traceback.format_exc()[-2000:]
        with open(os.path.join(os.environ.get("OUT", "/tmp"), "gpu_check.json"), "w") as fh:
            json.dump(res, fh, indent=1)
        return fn
    return deco

@section("masking correctness")
def _():
    g = torch.Generator().manual_seed(0)
    for B, lengths, keeps in [(96, [32, 24, 256, 64], [16, 12, 128, 32]), (4, [1, 17, 300, 9, 11], [0, 8, 150, 9, 5])]:
        for seed, off in [(-7, 2**40 + 3), (2**63 - 1, -1)]:
            rng = torch.tensor([seed, off], device=dev)
            present = torch.rand(B, len(lengths), generator=g) > 0.3
            present[0] = False
            present = present.to(dev)
            i1, m1 = kernels.select_keep(present, lengths, keeps, rng)
            i0, m0 = RB.select_keep(present.cpu(), lengths, keeps, rng.cpu())
            assert torch.equal(i1.cpu(), i0) and torch.equal(m1.cpu(), m0), (B, lengths, seed)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        tok = torch.randn(5, 40, 70, device=dev).to(dtype)
        mask = torch.rand(5, 40, device=dev) > 0.5
        ids = torch.stack([torch.randperm(40, device=dev)[:17] for _ in range(5)])
        assert torch.equal(kernels.gather_visible(tok, ids, mask), RB.gather_visible(tok, ids, mask))
        xv = torch.randn(5, 17, 70, device=dev).to(dtype); mt = torch.randn(70, device=dev).to(dtype)
        assert torch.equal(kernels.unshuffle_fill(xv, ids, mask, mt), RB.unshuffle_fill(xv, ids, mask, mt))
        h1, h0 = kernels.hidden_sum(tok, mask), RB.hidden_sum(tok, mask)
        torch.testing.assert_close(h1.float(), h0.float(), atol=2e-2, rtol=1e-2)
        g1 = torch.randn(300, 70, device=dev).to(dtype); g2 = g1.clone()
        for s in (1.0, 0.37):
            sc = torch.tensor([s], device=dev, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
            kernels.scale_grad_(g1, sc); RB.scale_grad_(g2, sc)
            assert torch.equal(g1, g2)

@section("masked_mse correctness")
def _():
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for shape, patch in [((3, 4, 16, 16, 16), 8), ((2, 1, 32768), 16384)][: 1 if dtype != torch.float32 else 2]:
            x = torch.randn(*shape, device=dev)
            k = len(shape) - 2
            L = 1
            for s in shape[2:]: L *= s // patch
            P = shape[1] * patch ** k
            pred = torch.randn(shape[0], L, P, device=dev).to(dtype)
            w = (torch.rand(shape[0], L, device=dev) > 0.5).float()
            for npix in (False, True):
                l1, g1 = kernels.masked_mse_forward(pred, x, w, patch, npix)
                l0, g0 = RB.masked_mse_forward(pred, x, w, patch, npix)
                tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float64: 1e-10}[dtype]
                torch.testing.assert_close(l1, l0, atol=tol, rtol=tol)
                torch.testing.assert_close(g1.float(), g0.float(), atol=tol * g0.abs().max().item(), rtol=tol)

@section("patch_embed correctness")
def _():
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        for shape, patch, E in [((3, 4, 16, 16, 16), 8, 96), ((2, 3, 32, 48), 16, 80)][: 2 if dtype == torch.bfloat16 else 1]:
            x = torch.randn(*shape, device=dev).to(dtype)
            k = len(shape) - 2
            L = 1
            for s in shape[2:]: L *= s // patch
            F = shape[1] * patch ** k
            w = (torch.randn(E, F, device=dev) / F ** 0.5).to(dtype)
            b = torch.randn(E, device=dev).to(dtype); pos = torch.randn(L, E, device=dev).to(dtype)
            keep = torch.stack([torch.randperm(L, device=dev)[: L // 2] for _ in range(shape[0])])
            for kp in (None, keep):
                f64 = lambda t: None if t is None else t.double()
                o1 = kernels.patch_embed_forward(x, w, b, pos, kp, patch)
                o0 = RB.patch_embed_forward(x.double(), w.double(), b.double(), pos.double(), kp, patch)
                tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float64: 1e-10}[dtype]
                torch.testing.assert_close(o1.double(), o0, atol=tol, rtol=tol)
                go = torch.randn_like(o1)
                gx1, gw1 = kernels.patch_embed_backward(go, x, w, kp, patch, True, True)
                xx = x.double().requires_grad_(); ww = w.double().requires_grad_()
                RB.patch_embed_forward(xx, ww, None, None, kp, patch).backward(go.double())
                torch.testing.assert_close(gx1.double(), xx.grad, atol=tol * 3, rtol=tol)
                torch.testing.assert_close(gw1.double(), ww.grad, atol=tol * 30, rtol=tol)

@section("public ops + gradcheck on cuda")
def _():
    lengths = [4, 6, 8]
    present = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.bool, device=dev)
    rng = torch.tensor([3, 4], device=dev)
    tok = torch.randn(3, 18, 5, dtype=torch.float64, device=dev, requires_grad=True)
    mt = torch.randn(5, dtype=torch.float64, device=dev, requires_grad=True)
    _, ids, mask = pyimputmae.random_masking(tok, lengths, 0.5, present, rng, backend="triton")
    torch.autograd.gradcheck(lambda t, m: pyimputmae.unshuffle_fill(
        pyimputmae.random_masking(t, lengths, 0.5, present, rng, backend="triton")[0], ids, mask, m, backend="triton"), (tok, mt))
    x = torch.randn(2, 2, 8, 4, dtype=torch.float64, device=dev)
    pred = torch.randn(2, 8, 8, dtype=torch.float64, device=dev, requires_grad=True)
    m = torch.rand(2, 8, device=dev) > 0.5
    torch.autograd.gradcheck(lambda p: pyimputmae.masked_mse(p, x, m, None, patch=2, norm_pix=True, backend="triton"), (pred,))
    x = torch.randn(2, 2, 4, 4, 4, dtype=torch.float64, device=dev, requires_grad=True)
    w = torch.randn(3, 16, dtype=torch.float64, device=dev, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, device=dev, requires_grad=True)
    pos = torch.randn(8, 3, dtype=torch.float64, device=dev, requires_grad=True)
    keep = torch.tensor([[0, 5, 7], [1, 2, 6]], device=dev)
    torch.autograd.gradcheck(lambda *a: pyimputmae.patch_embed(*a, keep, patch=2, backend="triton"), (x, w, b, pos))

def bench(fn, name, nbytes=None, flops=None, **extra):
    ms = do_bench(fn, warmup=10, rep=50)
    rec = {"name": name, "ms": ms, **extra}
    msg = f"{name}: {ms * 1e3:8.1f} us"
    if nbytes:
        rec["gbps"] = nbytes / ms / 1e6; msg += f"  {rec['gbps']:7.0f} GB/s"
    if flops:
        rec["tflops"] = flops / ms / 1e9; msg += f"  {rec['tflops']:6.0f} TFLOP/s"
    print(msg, flush=True)
    res.setdefault("bench", []).append(rec)
    return ms

@section("bench copy")
def _():
    a = torch.empty(32 * 512 * 2048 * 4, device=dev); b_ = torch.empty_like(a)
    bench(lambda: b_.copy_(a), "d2d copy 512MB", nbytes=2 * a.numel() * 4)

@section("bench masked_mse")
def _():
    for label, B, C, S, p in [("large", 32, 4, 64, 8)]:
        x = torch.randn(B, C, S, S, S, device=dev)
        L = (S // p) ** 3; P = C * p ** 3
        pred = torch.randn(B, L, P, device=dev)
        w = (torch.rand(B, L, device=dev) > 0.5).float()
        nbytes = 3 * pred.numel() * 4
        one = torch.ones(1, device=dev)
        for npix in (False, True):
            for tile in (8192, 4096):
                KM.MAX_TILE = tile
                def ours():
                    loss, g = kernels.masked_mse_forward(pred, x, w, p, npix)
                    kernels.scale_grad_(g, one)
                bench(ours, f"mse {label} npix={npix} tile={tile}", nbytes=nbytes)
            KM.MAX_TILE = 8192
            # dense w: every row read (the bytes the roofline counts)
            wd = torch.ones(B, L, device=dev)
            bench(lambda: kernels.masked_mse_forward(pred, x, wd, p, npix), f"mse {label} npix={npix} all rows", nbytes=nbytes)
            def eager():
                pp = pred.detach().requires_grad_()
                t = patchify(x, p)
                if npix:
                    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
                loss = (((pp - t) ** 2).mean(-1) * w).sum() / w.sum()
                loss.backward()
            bench(eager, f"mse {label} npix={npix} eager", nbytes=nbytes)
        g = torch.randn(B, L, P, device=dev)
        bench(lambda: kernels.scale_grad_(g, one), f"scale_grad_ {label} scale=1")
        half = torch.full((1,), 0.5, device=dev)
        bench(lambda: kernels.scale_grad_(g, half), f"scale_grad_ {label} scale=0.5", nbytes=2 * g.numel() * 4)

@section("bench masking")
def _():
    for label, B, lengths, E in [("large", 64, [256] * 4, 384)]:
        keeps = [n // 2 for n in lengths]
        L, K = sum(lengths), sum(keeps)
        tok = torch.randn(B, L, E, device=dev)
        present = torch.rand(B, len(lengths), device=dev) > 0.2
        rng = torch.tensor([1, 2], device=dev)
        mt = torch.randn(E, device=dev)
        bench(lambda: kernels.select_keep(present, lengths, keeps, rng), f"select_keep {label}")
        ids, mask = kernels.select_keep(present, lengths, keeps, rng)
        bench(lambda: kernels.gather_visible(tok, ids, mask), f"gather_visible {label}", nbytes=2 * B * K * E * 4)
        vis = kernels.gather_visible(tok, ids, mask)
        bench(lambda: kernels.unshuffle_fill(vis, ids, mask, mt), f"unshuffle_fill {label}", nbytes=(B * K + B * L) * E * 4)
        bench(lambda: kernels.hidden_sum(tok, mask), f"hidden_sum {label}", nbytes=B * L * E * 4)
        def ours():
            i, m = kernels.select_keep(present, lengths, keeps, rng)
            v = kernels.gather_visible(tok, i, m)
            kernels.unshuffle_fill(v, i, m, mt)
        bench(ours, f"masking_fill fwd {label} (ours)", nbytes=(2 * B * K + B * K + B * L) * E * 4)
        def eager():
            noise = torch.rand(B, L, device=dev)
            shuf = torch.argsort(noise, 1); keep = shuf[:, :K]
            v = torch.gather(tok, 1, keep.unsqueeze(-1).expand(-1, -1, E))
            out = mt.expand(B, L, E).clone()
            out.scatter_(1, keep.unsqueeze(-1).expand(-1, -1, E), v)
        bench(eager, f"masking_fill fwd {label} eager")

@section("bench patch_embed")
def _():
    import torch.nn.functional as Fn
    for label, B, C, S, p, E in [("large", 32, 4, 64, 8, 384)]:
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(B, C, S, S, S, device=dev).to(dtype)
            L = (S // p) ** 3; F = C * p ** 3
            w = (torch.randn(E, F, device=dev) / F ** 0.5).to(dtype)
            b = torch.randn(E, device=dev).to(dtype); pos = torch.randn(L, E, device=dev).to(dtype)
            keep = torch.stack([torch.randperm(L, device=dev)[: L // 2].sort().values for _ in range(B)])
            flops = 2 * B * L * F * E
            bench(lambda: kernels.patch_embed_forward(x, w, b, pos, None, p), f"patch_embed {label} {dtype} ours", flops=flops)
            bench(lambda: kernels.patch_embed_forward(x, w, b, pos, keep, p), f"patch_embed {label} {dtype} keep50 ours", flops=flops / 2)
            eager = lambda: Fn.linear(patchify(x, p), w, b) + pos
            bench(eager, f"patch_embed {label} {dtype} eager", flops=flops)
            if dtype == torch.bfloat16 and time.time() - T0 < 200:
                comp = torch.compile(eager)
                comp()
                bench(comp, f"patch_embed {label} {dtype} compile", flops=flops)
            go = torch.randn(B, L, E, device=dev).to(dtype)
            bench(lambda: kernels.patch_embed_backward(go, x, w, None, p, True, True), f"patch_embed_bwd {label} {dtype} ours", flops=2 * flops)
            bench(lambda: RB.patch_embed_backward(go, x, w, None, p, True, True), f"patch_embed_bwd {label} {dtype} ref", flops=2 * flops)
            print("  best fwd config:", getattr(kernels.patch_embed._patch_embed_fwd_tuned, "best_config", None), flush=True)

res["ok"] = ok_all
res["wall_s"] = time.time() - T0
out = os.environ.get("OUT", "/tmp")
with open(os.path.join(out, "gpu_check.json"), "w") as fh:
    json.dump(res, fh, indent=1)
print("ALL OK" if ok_all else "SOME FAILED", f"{time.time() - T0:.0f}s")
