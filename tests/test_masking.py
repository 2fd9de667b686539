"""random_masking / random_keep / unshuffle_fill on every backend against the spec
(``pyimputmae.reference.masking``), plus the properties the spec promises: exact-k, missing
modalities fully masked, sorted ids, identical masks everywhere for one (seed, offset), uniformity.

The Triton interpreter spends ~0.15 s per (row, segment) program of the selection kernel on this
machine, so batches are small and each backend's selection of a layout is computed once
(``selection``) and shared by the tests that only need some ids and a mask.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import pytest
import torch
from op_testing import (
    HALF_DTYPES,
    assert_close,
    assert_no_worse_than_torch,
    backend_skip_reason,
    cuda_emu_ops,
    kernel_level_op,
)
from torch.utils._python_dispatch import TorchDispatchMode

from pyimputmae import _backends, random_keep, random_masking, unshuffle_fill
from pyimputmae.ops import _masking as masking_ops
from pyimputmae.reference import (
    gather_visible_reference,
    keep_counts,
    select_keep_reference,
    unshuffle_fill_reference,
)

FAMILIES = ("masking",)


@dataclass(frozen=True)
class Layout:
    lengths: tuple[int, ...]
    ratios: tuple[float, ...] | float
    batch: int

    @property
    def keeps(self) -> list[int]:
        return keep_counts(self.lengths, self.ratios)

    def segments(self):
        """``(m, token range, visible-slot range)`` of every modality."""
        o = q = 0
        for m, (n, k) in enumerate(zip(self.lengths, self.keeps)):
            yield m, range(o, o + n), range(q, q + k)
            o, q = o + n, q + k


LAYOUTS = {
    # four modalities of uneven lengths; modality 1 missing in every row, the last row has nothing
    "four_modalities": Layout((5, 3, 16, 7), 0.5, 3),
    "one_row": Layout((13,), 0.75, 1),
    # ratio 0 keeps a whole segment, ratio 1 keeps none of it (K_m = 0)
    "mixed_ratios": Layout((9, 33, 4, 6), (0.3, 0.5, 0.0, 1.0), 2),
    # one segment longer than the interpreter's 32-token tiles, last row missing
    "odd_length": Layout((37,), 0.5, 3),
}
RNGS = {
    "zero": (0, 0),
    "small": (12345, 7),
    "minus_one": (-1, -1),
    "large": (2**62 + 3, -(2**40) - 5),
}
DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WIDTH = 5


def _generator(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def make_present(layout: str, device: torch.device) -> torch.Tensor:
    lay = LAYOUTS[layout]
    B, M = lay.batch, len(lay.lengths)
    present = torch.rand(B, M, generator=_generator(layout)) < 0.75
    present[0, 0] = True
    if M > 1:
        present[:, 1] = False  # a modality missing in every row
    if B > 1:
        present[-1] = False  # a row missing every modality
    return present.to(device)


def make_rng(name: str, device: torch.device) -> torch.Tensor:
    return torch.tensor(RNGS[name], dtype=torch.int64, device=device)


def make_tokens(layout: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    lay = LAYOUTS[layout]
    t = torch.randn(lay.batch, sum(lay.lengths), WIDTH, generator=_generator(layout + "tokens"))
    return (t + 3.0).to(device, dtype)  # away from zero, so a zeroed slot can be told from a copied token


_SELECTIONS: dict = {}


def selection(backend: str, device: torch.device, layout: str) -> dict:
    """The backend's ``random_masking`` of the layout's fp32 tokens (rng "small"), computed once."""
    key = (backend, str(device), layout)
    if key not in _SELECTIONS:
        lay = LAYOUTS[layout]
        tokens, present = make_tokens(layout, torch.float32, device), make_present(layout, device)
        rng = make_rng("small", device)
        visible, ids_keep, mask = random_masking(tokens, lay.lengths, lay.ratios, present, rng, backend=backend)
        _SELECTIONS[key] = {"tokens": tokens, "present": present, "rng": rng, "visible": visible,
                            "ids_keep": ids_keep, "mask": mask}
    return _SELECTIONS[key]


def gather(tokens, ids_keep, mask, backend):
    """The backend's gather of visible tokens: the op random_masking runs after the selection."""
    return masking_ops._gather_visible(tokens, ids_keep, mask, backend)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_random_masking_is_identical_to_reference(backend, device, layout):
    """Same (seed, offset) → bit-identical ids_keep, mask and visible tokens on every backend and
    device (the spec runs on the CPU, so on a GPU machine this also checks CPU == CUDA)."""
    lay, sel = LAYOUTS[layout], selection(backend, device, layout)
    ids_keep, mask = sel["ids_keep"], sel["mask"]
    assert ids_keep.shape == (lay.batch, sum(lay.keeps)) and ids_keep.dtype == torch.int64
    assert mask.shape == (lay.batch, sum(lay.lengths)) and mask.dtype == torch.bool
    assert ids_keep.device == mask.device == sel["rng"].device
    want_ids, want_mask = select_keep_reference(sel["present"].cpu(), lay.lengths, lay.keeps, sel["rng"].cpu())
    assert torch.equal(ids_keep.cpu(), want_ids), f"{backend}: ids_keep differs from the spec"
    assert torch.equal(mask.cpu(), want_mask), f"{backend}: mask differs from the spec"
    assert torch.equal(sel["visible"].cpu(), gather_visible_reference(sel["tokens"].cpu(), want_ids, want_mask))


@pytest.mark.parametrize("rng", RNGS)
def test_random_keep_follows_the_spec_for_any_int64_seed_and_offset(backend, device, rng):
    """Negative and large int64 values are read as unsigned 64-bit numbers, as the spec does."""
    lay = LAYOUTS["odd_length"]
    present, r = make_present("odd_length", device), make_rng(rng, device)
    ids_keep, mask = random_keep(present, lay.lengths, lay.ratios, r, backend=backend)
    want_ids, want_mask = select_keep_reference(present.cpu(), lay.lengths, lay.keeps, r.cpu())
    assert torch.equal(ids_keep.cpu(), want_ids), f"{backend}: ids_keep differs from the spec for rng {RNGS[rng]}"
    assert torch.equal(mask.cpu(), want_mask), f"{backend}: mask differs from the spec for rng {RNGS[rng]}"


def test_a_strided_rng_and_present_are_read_as_their_values(backend, device):
    """An rng that is a view with a stride (a column of a table of states) and a present that is
    not contiguous give the mask of their contiguous copies."""
    lay = LAYOUTS["four_modalities"]
    present, rng = make_present("four_modalities", device), make_rng("small", device)
    table = torch.stack([rng, rng + 1000]).t().contiguous()  # (2, 2): column 0 is rng
    wide = torch.zeros(present.shape[0], 2 * present.shape[1], dtype=torch.bool, device=device)
    wide[:, ::2] = present
    assert not table[:, 0].is_contiguous() and not wide[:, ::2].is_contiguous()
    got = random_keep(wide[:, ::2], lay.lengths, lay.ratios, table[:, 0], backend=backend)
    want = random_keep(present, lay.lengths, lay.ratios, rng, backend=backend)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_random_keep_equals_the_choice_of_random_masking(backend, device):
    lay, sel = LAYOUTS["four_modalities"], selection(backend, device, "four_modalities")
    ids_keep, mask = random_keep(sel["present"], lay.lengths, lay.ratios, sel["rng"], backend=backend)
    assert torch.equal(ids_keep, sel["ids_keep"]) and torch.equal(mask, sel["mask"])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_exactly_k_kept_per_present_modality(backend, device, layout):
    lay, sel = LAYOUTS[layout], selection(backend, device, layout)
    present, ids_keep, mask = sel["present"].cpu(), sel["ids_keep"].cpu(), sel["mask"].cpu()
    for m, tok, slots in lay.segments():
        kept = (~mask[:, tok.start:tok.stop]).sum(1)
        want = torch.where(present[:, m], len(slots), 0)
        assert torch.equal(kept, want), f"modality {m}: kept {kept.tolist()}, want {want.tolist()}"
        seg_ids = ids_keep[:, slots.start:slots.stop]
        assert ((seg_ids >= tok.start) & (seg_ids < tok.stop)).all(), f"modality {m}: id outside its segment"
        for b in range(lay.batch):
            assert len(set(seg_ids[b].tolist())) == len(slots), f"row {b}, modality {m}: repeated id"
            if present[b, m]:
                assert not mask[b, seg_ids[b]].any(), f"row {b}, modality {m}: a kept id is marked hidden"


@pytest.mark.parametrize("layout", ["four_modalities", "mixed_ratios", "odd_length"])
def test_missing_modality_is_fully_masked(backend, device, layout):
    lay, sel = LAYOUTS[layout], selection(backend, device, layout)
    present, ids_keep, mask, visible = sel["present"], sel["ids_keep"], sel["mask"], sel["visible"]
    mask_token = torch.randn(WIDTH, device=device)
    filled = unshuffle_fill(visible, ids_keep, mask, mask_token, backend=backend)
    missing = 0
    for m, tok, slots in lay.segments():
        for b in range(lay.batch):
            if present[b, m]:
                continue
            missing += 1
            assert mask[b, tok.start:tok.stop].all(), f"row {b}, modality {m}: missing but not fully masked"
            assert ids_keep[b, slots.start:slots.stop].tolist() == list(tok)[:len(slots)], (
                f"row {b}, modality {m}: ids_keep must hold the segment's first K_m positions")
            assert (visible[b, slots.start:slots.stop] == 0).all(), f"row {b}, modality {m}: visible slot not zero"
            assert (filled[b, tok.start:tok.stop] == mask_token).all(), f"row {b}, modality {m}: not mask_token"
    assert missing > 0


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ids_keep_sorted_within_each_segment(backend, device, layout):
    lay, ids_keep = LAYOUTS[layout], selection(backend, device, layout)["ids_keep"].cpu()
    for m, _, slots in lay.segments():
        seg = ids_keep[:, slots.start:slots.stop]
        assert (seg[:, 1:] > seg[:, :-1]).all(), f"modality {m}: ids_keep not strictly increasing"


def test_different_seed_or_offset_gives_a_different_mask(backend, device):
    present = torch.ones(2, 1, dtype=torch.bool, device=device)

    def mask_for(seed: int, offset: int) -> torch.Tensor:
        return random_keep(present, (64,), 0.5, torch.tensor([seed, offset], device=device), backend=backend)[1]

    base = mask_for(7, 100)
    assert torch.equal(base, mask_for(7, 100)), "the same (seed, offset) gave another mask"
    for seed, offset in [(8, 100), (7, 101), (-7, 100), (7, 100 + 2**32)]:
        assert not torch.equal(base, mask_for(seed, offset)), f"rng ({seed}, {offset}) repeats rng (7, 100)"
    assert not torch.equal(base[0], base[1]), "rows 0 and 1 got the same mask"


# chi-square critical value for 15 degrees of freedom at p = 0.001 (used when scipy is absent)
CHI2_CRITICAL_15DOF_P001 = 37.697


def test_selection_is_uniform_over_positions(backend, device):
    """Over many rows in ONE launch every position of a 16-token segment is kept half the time
    (chi-square), and no two positions are kept together more or less often than chance.

    Under the Triton interpreter 4000 rows would take ~10 minutes here, so it gets 64 rows (the
    statistic stays valid, expected count 32); it must match the spec bit for bit anyway, and the
    spec's uniformity is tested with 4000 rows on the reference backend."""
    interpreted = backend == "triton" and device.type == "cpu"
    B, n, k = (64 if interpreted else 4000), 16, 8
    present = torch.ones(B, 1, dtype=torch.bool, device=device)
    rng = torch.tensor([2024, 5], device=device)
    _, mask = random_keep(present, (n,), 0.5, rng, backend=backend)
    kept = (~mask).cpu().to(torch.float64)
    assert torch.equal(kept.sum(1), torch.full((B,), float(k), dtype=torch.float64))
    counts = kept.sum(0)
    expected = B * k / n
    stat = float(((counts - expected) ** 2 / expected).sum())
    try:
        from scipy.stats import chisquare
    except ImportError:
        assert stat < CHI2_CRITICAL_15DOF_P001, f"chi-square {stat:.1f} for counts {counts.tolist()}"
    else:
        pvalue = chisquare(counts.numpy()).pvalue
        assert pvalue > 1e-3, f"chi-square {stat:.1f} (p = {pvalue:.2e}) for counts {counts.tolist()}"
    # a uniform k-subset gives every pair of indicators the correlation -1/(n-1); its standard
    # error is about 1/sqrt(B), so 4.5 of them bound the worst of the 120 pairs
    corr = torch.corrcoef(kept.T)
    off_diagonal = corr[~torch.eye(n, dtype=torch.bool)]
    worst = (off_diagonal + 1 / (n - 1)).abs().max().item()
    assert worst < 4.5 / B**0.5, f"pairs of positions are correlated: worst deviation {worst:.3f} from -1/15"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_unshuffle_fill_inverts_random_masking(backend, device, layout):
    """unshuffle_fill(random_masking(t)) == t on visible positions and mask_token on hidden ones."""
    sel = selection(backend, device, layout)
    tokens, mask = sel["tokens"], sel["mask"]
    mask_token = torch.randn(WIDTH, device=device)
    out = unshuffle_fill(sel["visible"], sel["ids_keep"], mask, mask_token, backend=backend)
    assert out.shape == tokens.shape and out.dtype == tokens.dtype
    expected = torch.where(mask.unsqueeze(-1), mask_token, tokens)
    wrong = (out != expected).any(-1).nonzero().tolist()
    assert not wrong, f"{backend}: (row, position) pairs not restored: {wrong[:10]}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["four_modalities", "mixed_ratios", "odd_length"])
def test_gather_then_fill_round_trips_in_every_dtype(backend, device, layout, dtype):
    """The same invariant with the backend's gather and fill in fp64, fp32, bf16 and fp16 (pure data
    movement: exact)."""
    sel = selection(backend, device, layout)
    tokens = make_tokens(layout, DTYPES[dtype], device)
    ids_keep, mask = sel["ids_keep"], sel["mask"]
    visible = gather(tokens, ids_keep, mask, backend)
    assert visible.dtype == tokens.dtype
    assert torch.equal(visible.cpu(), gather_visible_reference(tokens.cpu(), ids_keep.cpu(), mask.cpu()))
    mask_token = torch.randn(WIDTH).to(device, tokens.dtype)
    out = unshuffle_fill(visible, ids_keep, mask, mask_token, backend=backend)
    assert out.dtype == tokens.dtype
    assert torch.equal(out, torch.where(mask.unsqueeze(-1), mask_token, tokens))


def scrambled_mask(ids_keep: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A mask that disagrees with ids_keep: a kept position hidden, some never-named ones visible."""
    out = mask.clone()
    out[:, ids_keep[0, 0]] = True
    named = torch.zeros_like(mask).scatter_(1, ids_keep, True)
    unnamed_hidden = (~named & mask).nonzero()
    out[unnamed_hidden[::2, 0], unnamed_hidden[::2, 1]] = False
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_unshuffle_fill_and_gather_follow_the_spec_when_mask_and_ids_disagree(backend, device, dtype):
    """A slot whose position is hidden is neither written nor read (zero), and a visible position
    that no id names is zero: the kernel-level contract, beyond what random_masking produces."""
    sel = selection(backend, device, "four_modalities")
    tokens = make_tokens("four_modalities", DTYPES[dtype], device)
    ids_keep = sel["ids_keep"]
    mask = scrambled_mask(ids_keep, sel["mask"])
    x = torch.randn(ids_keep.shape[0], ids_keep.shape[1], WIDTH).to(device, tokens.dtype)
    mask_token = torch.randn(WIDTH).to(device, tokens.dtype)
    out = unshuffle_fill(x, ids_keep, mask, mask_token, backend=backend)
    assert torch.equal(out.cpu(), unshuffle_fill_reference(x.cpu(), ids_keep.cpu(), mask.cpu(), mask_token.cpu()))
    gathered = gather(tokens, ids_keep, mask, backend)
    assert torch.equal(gathered.cpu(), gather_visible_reference(tokens.cpu(), ids_keep.cpu(), mask.cpu()))


@pytest.mark.parametrize("dtype", DTYPES)
def test_tokenless_fill_and_fill_backward_follow_the_spec(backend, device, dtype):
    """The two calls the backwards make on a backend module: a fill with no token (the gather's
    backward) writes zeros where hidden, and ``fill_backward`` equals the gather and the hidden sum
    of the same gradient — also where mask and ids disagree, which takes every branch of the kernels."""
    kernels = _backends.module(backend)
    sel = selection(backend, device, "four_modalities")
    ids_keep = sel["ids_keep"]
    for mask in (sel["mask"], scrambled_mask(ids_keep, sel["mask"])):
        x = torch.randn(ids_keep.shape[0], ids_keep.shape[1], WIDTH).to(device, DTYPES[dtype])
        zeros = torch.zeros(WIDTH, dtype=x.dtype)
        out = kernels.unshuffle_fill(x, ids_keep, mask, None)
        assert torch.equal(out.cpu(), unshuffle_fill_reference(x.cpu(), ids_keep.cpu(), mask.cpu(), zeros))
        grad = torch.randn(mask.shape[0], mask.shape[1], WIDTH).to(device, x.dtype)
        grad_x, grad_token = kernels.fill_backward(grad, ids_keep, mask)
        assert torch.equal(grad_x.cpu(), gather_visible_reference(grad.cpu(), ids_keep.cpu(), mask.cpu()))
        assert grad_token.shape == (WIDTH,) and grad_token.dtype == x.dtype
        # (not always hidden_sum's bits: Triton's one pass for select_keep's own pair adds in another order)
        expected = (grad.to(torch.float64) * mask.unsqueeze(-1)).sum((0, 1))
        if x.dtype in (torch.float64, torch.float32):
            assert_close(grad_token, expected, what=f"{backend} fill_backward sum")
        else:
            assert_no_worse_than_torch(grad_token, (grad * mask.unsqueeze(-1)).sum((0, 1)), expected,
                                       what=f"{backend} fill_backward sum")


@pytest.mark.parametrize("dtype", ["fp64", "fp32"])
def test_hidden_sum_matches_reference(backend, device, dtype):
    grad = torch.randn(3, 41, 7, dtype=DTYPES[dtype], device=device)
    mask = torch.rand(3, 41, device=device) < 0.6
    out = masking_ops._hidden_sum(grad, mask, backend)
    assert out.shape == (7,) and out.dtype == grad.dtype
    assert_close(out, (grad * mask.unsqueeze(-1)).sum((0, 1)), what=f"{backend} hidden_sum")


@pytest.mark.parametrize("half", HALF_DTYPES)
def test_hidden_sum_half_is_no_worse_than_plain_torch(backend, device, half):
    grad = torch.randn(4, 300, 6, device=device)
    mask = torch.rand(4, 300, device=device) < 0.5
    g16 = grad.to(half)
    out = masking_ops._hidden_sum(g16, mask, backend)
    assert_no_worse_than_torch(out, (g16 * mask.unsqueeze(-1)).sum((0, 1)),
                               (g16.float() * mask.unsqueeze(-1)).sum((0, 1)), what=f"{backend} hidden_sum")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["four_modalities", "mixed_ratios"])
def test_gradients_match_reference(backend, device, layout, dtype):
    """Backward of gather → encoder → fill: gather and fill transpose each other, and the
    mask_token gradient sums the hidden positions."""
    sel = selection(backend, device, layout)
    ids_keep, mask = sel["ids_keep"], sel["mask"]
    tokens = make_tokens(layout, DTYPES[dtype], device)
    token0 = torch.randn(WIDTH).to(device, tokens.dtype)
    scale = torch.randn(WIDTH).to(device, tokens.dtype)
    g = torch.randn(tokens.shape).to(device, tokens.dtype)

    t_ours, m_ours = tokens.clone().requires_grad_(True), token0.clone().requires_grad_(True)
    unshuffle_fill(gather(t_ours, ids_keep, mask, backend) * scale, ids_keep, mask, m_ours,
                   backend=backend).backward(g)
    t_ref, m_ref = tokens.clone().requires_grad_(True), token0.clone().requires_grad_(True)
    unshuffle_fill_reference(gather_visible_reference(t_ref, ids_keep, mask) * scale, ids_keep, mask,
                             m_ref).backward(g)

    # the tokens' gradient is g·scale moved back and forth: exact in every dtype
    assert torch.equal(t_ours.grad, t_ref.grad), f"{backend}: tokens gradient differs"
    if tokens.dtype in (torch.bfloat16, torch.float16):
        fp32_sum = (g.float() * mask.unsqueeze(-1)).sum((0, 1))
        assert_no_worse_than_torch(m_ours.grad, m_ref.grad, fp32_sum, what=f"{backend} mask_token grad")
    else:
        assert_close(m_ours.grad, m_ref.grad, what=f"{backend} mask_token grad")


TINY = Layout((3, 4), 0.5, 2)


def test_gradcheck_random_masking_wrt_tokens(backend, device):
    present = torch.tensor([[True, True], [False, True]], device=device)
    rng = make_rng("small", device)
    tokens = torch.randn(2, 7, 2, dtype=torch.float64, device=device, requires_grad=True)

    def fn(t):
        return random_masking(t, TINY.lengths, TINY.ratios, present, rng, backend=backend)[0]

    assert torch.autograd.gradcheck(fn, (tokens,), fast_mode=True)


def test_gradcheck_unshuffle_fill_wrt_x_and_mask_token(backend, device):
    present = torch.tensor([[True, False], [True, True]], device=device)
    ids_keep, mask = select_keep_reference(present, TINY.lengths, TINY.keeps, make_rng("small", device))
    x = torch.randn(2, sum(TINY.keeps), 3, dtype=torch.float64, device=device, requires_grad=True)
    mask_token = torch.randn(3, dtype=torch.float64, device=device, requires_grad=True)

    def fn(x, token):
        return unshuffle_fill(x, ids_keep, mask, token, backend=backend)

    assert torch.autograd.gradcheck(fn, (x, mask_token), fast_mode=True)


def test_opcheck_public_masking_ops(backend, device):
    """opcheck of the four user-facing custom ops behind random_keep, random_masking and unshuffle_fill."""
    present = torch.tensor([[True, False]], device=device)
    torch.library.opcheck(masking_ops._select_keep, (present, [5, 6], [2, 3], make_rng("small", device), backend))
    sel = selection(backend, device, "four_modalities")
    ids_keep, mask = sel["ids_keep"], sel["mask"]
    tokens = sel["tokens"].clone().requires_grad_(True)
    x = torch.randn(ids_keep.shape[0], ids_keep.shape[1], WIDTH, device=device, requires_grad=True)
    mask_token = torch.randn(WIDTH, device=device, requires_grad=True)
    torch.library.opcheck(masking_ops._gather_visible, (tokens, ids_keep, mask, backend))
    torch.library.opcheck(masking_ops._unshuffle_fill, (x, ids_keep, mask, mask_token, backend))
    torch.library.opcheck(masking_ops._hidden_sum, (torch.randn_like(sel["tokens"]), mask, backend))


@pytest.mark.parametrize("name", ["select_keep", "gather_visible", "unshuffle_fill", "hidden_sum", "fill_backward"])
def test_opcheck_kernel_level_ext_op(device, name):
    """The compiled op against its schema and its fake kernel (``pyimputmae/_ext_fakes.py``)."""
    op, reason = kernel_level_op(name, device)
    if op is None:
        pytest.skip(reason)
    lay = LAYOUTS["four_modalities"]
    present, rng = make_present("four_modalities", device), make_rng("small", device)
    ids_keep, mask = select_keep_reference(present, lay.lengths, lay.keeps, rng)
    tokens = make_tokens("four_modalities", torch.float32, device)
    args = {
        "select_keep": (present, list(lay.lengths), lay.keeps, rng),
        "gather_visible": (tokens, ids_keep, mask),
        "unshuffle_fill": (torch.randn(lay.batch, ids_keep.shape[1], WIDTH, device=device), ids_keep, mask,
                           torch.randn(WIDTH, device=device)),
        "hidden_sum": (tokens, mask),
        "fill_backward": (tokens, ids_keep, mask),
    }[name]
    torch.library.opcheck(op, args)


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_rng_is_never_read_on_the_host(backend, device):
    """The (seed, offset) tensor stays on the device: no .item() (aten._local_scalar_dense) anywhere
    in the backend's selection. A C++ kernel is one opaque call for a dispatch mode, so "ext" is
    covered on a GPU machine by the CUDA-synchronisation test below."""
    if backend == "ext":
        pytest.skip("ext: the C++ kernel is one opaque call for a dispatch mode; see the CUDA sync test")
    present, rng = make_present("one_row", device), make_rng("small", device)
    kernels = _backends.module(backend)
    with _RecordOps() as rec:
        kernels.select_keep(present, [13], [3], rng)
    assert rec.ops, "the dispatch mode saw no operation at all"
    host_reads = [op for op in rec.ops if "_local_scalar_dense" in op or op.startswith("aten.item")]
    assert not host_reads, f"{backend}: select_keep reads tensors on the host: {host_reads}"


@pytest.mark.gpu
def test_random_masking_does_not_synchronise_cuda(backend):
    lay = LAYOUTS["four_modalities"]
    device = torch.device("cuda")
    tokens = make_tokens("four_modalities", torch.float32, device).requires_grad_(True)
    present, rng = make_present("four_modalities", device), make_rng("small", device)
    mask_token = torch.zeros(WIDTH, device=device, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        vis, ids_keep, mask = random_masking(tokens, lay.lengths, lay.ratios, present, rng, backend=backend)
        unshuffle_fill(vis, ids_keep, mask, mask_token, backend=backend).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_masking_rejects_bad_arguments_with_a_clear_message():
    tokens = torch.zeros(2, 7, 3)
    present = torch.ones(2, 2, dtype=torch.bool)
    rng = torch.tensor([0, 0])
    with pytest.raises(ValueError, match=r"sum to 8, but the tokens have L = 7"):
        random_masking(tokens, (4, 4), 0.5, present, rng)
    with pytest.raises(ValueError, match=r"present must be \(B, M\) = \(2, 2\)"):
        random_masking(tokens, (3, 4), 0.5, present[:, :1], rng)
    with pytest.raises(ValueError, match="rng must be a"):
        random_masking(tokens, (3, 4), 0.5, present, rng.to(torch.int32))
    with pytest.raises(ValueError, match="mask ratio of segment 1"):
        random_masking(tokens, (3, 4), (0.5, 1.5), present, rng)


def test_unshuffle_fill_refuses_ids_that_are_not_int64_or_outside_the_mask(backend):
    """int32 ids ran on the reference and Triton backends but failed inside ext (the CPU default);
    an id outside [0, L) was a bare index error (reference) or silently dropped (Triton)."""
    x, mask_token = torch.randn(2, 3, 4), torch.randn(4)
    ids = torch.tensor([[0, 1, 2], [4, 3, 2]])
    mask = torch.tensor([[0, 0, 0, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    with pytest.raises(ValueError, match=r"ids_keep must be int64 .*got torch\.int32"):
        unshuffle_fill(x, ids.to(torch.int32), mask, mask_token, backend=backend)
    for bad in (-1, 5):
        ids_bad = ids.clone()
        ids_bad[1, 2] = bad
        with pytest.raises(ValueError, match=rf"ids_keep\[1, 2\] = {bad} is outside \[0, 5\) \(mask has L = 5"):
            unshuffle_fill(x, ids_bad, mask, mask_token, backend=backend)


@pytest.mark.parametrize("name", ["ids_keep", "mask", "mask_token"])
def test_unshuffle_fill_refuses_an_argument_on_another_device_by_name(name):
    args = {"x": torch.randn(2, 3, 4), "ids_keep": torch.tensor([[0, 1, 2], [4, 3, 2]]),
            "mask": torch.zeros(2, 5, dtype=torch.bool), "mask_token": torch.randn(4)}
    args[name] = args[name].to("meta")
    with pytest.raises(ValueError, match=rf"{name} is on meta but x is on cpu: move it there"):
        unshuffle_fill(*args.values())


def test_random_masking_refuses_present_on_another_device():
    with pytest.raises(ValueError, match=r"present is on meta but tokens is on cpu"):
        random_masking(torch.randn(2, 5, 3), [2, 3], 0.5, torch.ones(2, 2, dtype=torch.bool, device="meta"),
                       torch.tensor([1, 2]))


def test_one_ratio_for_all_segments_may_be_a_numpy_scalar():
    """np.float32 is no Python float: it failed with "object of type 'numpy.float32' has no len()"."""
    import numpy as np

    assert keep_counts([4, 6], np.float32(0.5)) == keep_counts([4, 6], 0.5) == [2, 3]
    tokens, present, rng = torch.randn(2, 10, 3), torch.ones(2, 2, dtype=torch.bool), torch.tensor([1, 2])
    got = random_masking(tokens, [4, 6], np.float32(0.5), present, rng)
    for a, b in zip(got, random_masking(tokens, [4, 6], 0.5, present, rng)):
        assert torch.equal(a, b)


class _CountedLaunches:
    """Stands in for a ``@triton.jit`` function: counts its launches (``kernel[grid](...)``)."""

    def __init__(self, kernel) -> None:
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.fixture(params=["triton"])
def triton_launches(request, device, monkeypatch):
    """Every ``@triton.jit`` kernel of the Triton masking module (``_*_kernel``), counting its
    launches: name → :class:`_CountedLaunches`. (A parameter, so that the tests' ids name the
    backend: ``tools/gpu_validated.py`` counts a GPU case toward the backend its id names.)"""
    reason = backend_skip_reason(request.param, device, FAMILIES)
    if reason:
        pytest.skip(reason)
    module = _backends.module(request.param).masking
    counted = {name: _CountedLaunches(kernel) for name, kernel in vars(module).items()
               if name.startswith("_") and name.endswith("_kernel")}
    for name, kernel in counted.items():
        monkeypatch.setattr(module, name, kernel)
    return counted


class _CountedFills:
    """Stands in for the ext backend's ``_ops``: counts the fills that were given no inverse map."""

    def __init__(self, ops) -> None:
        self._ops, self.launches = ops, 0

    def __getattr__(self, name):
        return getattr(self._ops, name)

    def unshuffle_fill(self, x, ids_keep, mask, mask_token, inverse=None):
        self.launches += inverse is None
        return self._ops.unshuffle_fill(x, ids_keep, mask, mask_token, inverse)


@pytest.fixture(params=["triton", "ext", "cuda_emu"])
def map_builds(request, device, monkeypatch):
    """(backend name, counter): ``counter.launches`` counts the fills that built their own inverse
    map — the Triton inverse-index kernel's launches, or the ext backend's fills (C++, or the CUDA
    kernels under the emulator) given no map."""
    reason = backend_skip_reason(request.param, device, FAMILIES)
    if reason:
        pytest.skip(reason)
    if request.param == "triton":
        module = _backends.module("triton").masking
        counter = _CountedLaunches(module._inverse_index_kernel)
        monkeypatch.setattr(module, "_inverse_index_kernel", counter)
        return "triton", counter
    ext = _backends.module("ext")
    counter = _CountedFills(cuda_emu_ops() if request.param == "cuda_emu" else ext._ops)
    monkeypatch.setattr(ext, "_ops", counter)
    return "ext", counter


def _masking_step(tokens, mask_token, backend, *, edit=None):
    """random_masking → unshuffle_fill → backward of a weighted sum → (output, the gradients of the
    tokens, or of the visible tokens when ``edit(ids_keep, mask)`` changes the pair in place between
    the masking and the fill (autograd refuses the masking's backward then), and of mask_token)."""
    lay = LAYOUTS["four_modalities"]
    present = make_present("four_modalities", tokens.device)
    t, m = tokens.clone().requires_grad_(edit is None), mask_token.clone().requires_grad_(True)
    visible, ids_keep, mask = random_masking(t, lay.lengths, lay.ratios, present, make_rng("small", tokens.device),
                                             backend=backend)
    if edit is not None:
        edit(ids_keep, mask)
        visible.requires_grad_(True)
    out = unshuffle_fill(visible, ids_keep, mask, m, backend=backend)
    weights = torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)
    (out * weights).sum().backward()
    return out.detach(), (t if edit is None else visible).grad, m.grad


def test_fill_of_random_masking_output_takes_the_inverse_select_keep_wrote(device, map_builds):
    """Forward fill and the gather's backward (a fill) read select_keep's inverse map: none built,
    and the same output and gradients as the reference backend."""
    backend, builds = map_builds
    tokens, mask_token = make_tokens("four_modalities", torch.float32, device), torch.randn(WIDTH, device=device)
    ours = _masking_step(tokens, mask_token, backend)
    assert builds.launches == 0, "the fill recomputed the inverse select_keep had written"
    for got, want, what in zip(ours, _masking_step(tokens, mask_token, "reference"), ("output", "grad", "token grad")):
        assert_close(got, want, what=f"{backend} {what}")


def _swap_first_two_kept(ids_keep, mask):
    ids_keep[0, :2] = ids_keep[0, :2].flip(0).clone()


def _reveal_a_hidden_position(ids_keep, mask):
    mask[0, int(mask[0].nonzero()[0])] = False


@pytest.mark.parametrize("edit", [_swap_first_two_kept, _reveal_a_hidden_position])
def test_fill_recomputes_the_inverse_after_ids_or_mask_change_in_place(device, map_builds, edit):
    """An in-place change of ids_keep or mask after random_masking (their version counters move) makes
    the fill build the inverse from what it is given, as the reference does."""
    backend, builds = map_builds
    tokens, mask_token = make_tokens("four_modalities", torch.float32, device), torch.randn(WIDTH, device=device)
    ours = _masking_step(tokens, mask_token, backend, edit=edit)
    assert builds.launches == 1, "the fill must rebuild the inverse of the changed pair"
    for got, want, what in zip(ours, _masking_step(tokens, mask_token, "reference", edit=edit),
                               ("output", "grad", "token grad")):
        assert_close(got, want, what=f"{backend} {what}")


def test_fill_with_another_mask_object_recomputes_the_inverse(device, map_builds):
    """Only the mask select_keep returned goes with its inverse: an equal copy, or a different mask with
    the same ids, is read as given."""
    backend, builds = map_builds
    sel = selection(backend, device, "four_modalities")
    ids_keep, mask, visible = sel["ids_keep"], sel["mask"], sel["visible"]
    mask_token = torch.randn(WIDTH, device=device)
    for other in (mask.clone(), scrambled_mask(ids_keep, mask)):
        before = builds.launches
        got = unshuffle_fill(visible, ids_keep, other, mask_token, backend=backend)
        assert builds.launches == before + 1
        assert torch.equal(got, unshuffle_fill_reference(visible, ids_keep, other, mask_token))


def test_masking_under_inference_mode(device, map_builds):
    """Inference tensors have no version counter: their fill always builds the inverse, and is right."""
    backend, builds = map_builds
    lay = LAYOUTS["four_modalities"]
    tokens, present = make_tokens("four_modalities", torch.float32, device), make_present("four_modalities", device)
    mask_token = torch.randn(WIDTH, device=device)
    with torch.inference_mode():
        visible, ids_keep, mask = random_masking(tokens, lay.lengths, lay.ratios, present,
                                                 make_rng("small", device), backend=backend)
        out = unshuffle_fill(visible, ids_keep, mask, mask_token, backend=backend)
    assert builds.launches == 1
    assert torch.equal(out, torch.where(mask.unsqueeze(-1), mask_token, tokens))


def test_ext_inverse_map_of_select_keep_holds_the_slot_of_each_kept_position(backend, device):
    """The map the ext backend's select_keep (C++ or CUDA kernel) returns beside its pair: the slot
    ``k`` at the visible position ``ids_keep[b, k]`` names, -2 at every hidden position (a missing
    modality's included): the map its fill reads in place of building one."""
    if backend != "ext":
        pytest.skip("the ext backend's map")
    sel = selection(backend, device, "four_modalities")
    ids_keep, mask = sel["ids_keep"].cpu(), sel["mask"].cpu()
    inverse = _backends.module("ext")._INVERSES.lookup(sel["ids_keep"], sel["mask"])
    assert inverse is not None and inverse.dtype == torch.int32
    B, K = ids_keep.shape
    want = torch.full(mask.shape, -2, dtype=torch.int32)
    for b in range(B):
        for k in range(K):
            if not mask[b, ids_keep[b, k]]:
                want[b, ids_keep[b, k]] = k
    assert (mask.gather(1, ids_keep)).any(), "the layout must keep some hidden positions"
    assert torch.equal(inverse.cpu(), want)


def test_triton_inverse_map_of_select_keep_names_every_slot_once(device, triton_launches):
    """The map select_keep keeps beside its pair holds ``k + 1`` at the position ``ids_keep[b, k]``
    names, for every k (a missing modality's kept slots too), and 0 elsewhere: what lets the fill's
    backward write every row of its x gradient from one pass over the positions."""
    sel = selection("triton", device, "four_modalities")
    ids_keep, mask = sel["ids_keep"], sel["mask"]
    inverse = _backends.module("triton").masking._INVERSES.lookup(ids_keep, mask)
    assert inverse is not None
    B, K = ids_keep.shape
    want = torch.zeros(mask.shape, dtype=torch.int32)
    want.scatter_(1, ids_keep.cpu(), torch.arange(1, K + 1, dtype=torch.int32).expand(B, K).contiguous())
    assert (mask.cpu().gather(1, ids_keep.cpu())).any(), "the layout must keep some hidden positions"
    assert torch.equal(inverse.cpu(), want)


@pytest.mark.parametrize("layout", ["four_modalities", "mixed_ratios"])
def test_triton_fill_backward_of_random_masking_output_is_one_pass(device, triton_launches, layout):
    """The fill's backward, given random_masking's own pair, is one pass over the gradient (then the
    token's fixed-order sum): the x gradient equals the reference's exactly (a copy, zero at kept
    slots of a missing modality), the token gradient within tolerance."""
    lay = LAYOUTS[layout]
    tokens, present = make_tokens(layout, torch.float32, device), make_present(layout, device)
    visible, ids_keep, mask = random_masking(tokens, lay.lengths, lay.ratios, present, make_rng("small", device),
                                             backend="triton")
    before = {name: kernel.launches for name, kernel in triton_launches.items()}
    x = visible.detach().requires_grad_(True)
    token = torch.randn(WIDTH, generator=_generator(layout + "token")).to(device).requires_grad_(True)
    out = unshuffle_fill(x, ids_keep, mask, token, backend="triton")
    grad = torch.randn(out.shape, generator=_generator(layout + "grad")).to(device)
    out.backward(grad)
    launched = {name: kernel.launches - before[name] for name, kernel in triton_launches.items()}
    assert {name: n for name, n in launched.items() if n} == {
        "_unshuffle_fill_kernel": 1, "_hidden_sum_partial_kernel": 1, "_sum_rows_kernel": 1}
    x_ref, token_ref = visible.detach().requires_grad_(True), token.detach().clone().requires_grad_(True)
    unshuffle_fill_reference(x_ref, ids_keep, mask, token_ref).backward(grad)
    assert torch.equal(x.grad, x_ref.grad), "x gradient differs from the reference"
    assert_close(token.grad, token_ref.grad, what="token gradient")


def test_ext_masking_and_fill_forward_backward_calls(backend, device):
    """On the ext backend (C++ or CUDA kernels) one forward + backward of random_masking →
    unshuffle_fill is five calls into the extension — the selection, the gather, the fill, the
    fill's backward (gather and token sum in one call), the gather's backward (a fill with no
    token) — and no PyTorch fill of zeros."""
    if backend != "ext":
        pytest.skip("counts the calls into the compiled extension")
    lay = LAYOUTS["four_modalities"]
    tokens = make_tokens("four_modalities", torch.float32, device).requires_grad_(True)
    present, rng = make_present("four_modalities", device), make_rng("small", device)
    mask_token = torch.randn(WIDTH, device=device, requires_grad=True)
    with _RecordOps() as recorded:
        visible, ids_keep, mask = random_masking(tokens, lay.lengths, lay.ratios, present, rng, backend=backend)
        unshuffle_fill(visible, ids_keep, mask, mask_token, backend=backend).backward(torch.ones(tokens.shape,
                                                                                                  device=device))
    calls = [op.split(".")[1] for op in recorded.ops if op.startswith("pyimputmae")]
    assert sorted(calls) == sorted(["select_keep", "gather_visible", "unshuffle_fill", "fill_backward",
                                    "unshuffle_fill"]), calls
    zeroing = [op for op in recorded.ops
               if op.startswith("aten") and any(word in op for word in ("zero", "fill_", "full"))]
    assert not zeroing, f"PyTorch zero fills in the step: {zeroing}"
    expected = torch.ones(tokens.shape)
    expected[mask.cpu()] = 0  # every visible token's gradient is 1, through the fill and the gather
    assert torch.equal(tokens.grad.cpu(), expected)
    assert torch.equal(mask_token.grad.cpu(), torch.full((WIDTH,), float(mask.sum())))


def test_triton_masking_and_fill_forward_backward_launches(device, triton_launches):
    """One forward + backward of random_masking → unshuffle_fill is six Triton launches — the
    selection, the gather, the fill, the fill's one-pass backward and its token sum, the gather's
    backward (a fill with no token) — and no PyTorch fill of zeros."""
    lay = LAYOUTS["four_modalities"]
    tokens = make_tokens("four_modalities", torch.float32, device).requires_grad_(True)
    present, rng = make_present("four_modalities", device), make_rng("small", device)
    mask_token = torch.randn(WIDTH, device=device, requires_grad=True)
    grad = torch.ones(tokens.shape, device=device)
    with _RecordOps() as recorded:
        visible, ids_keep, mask = random_masking(tokens, lay.lengths, lay.ratios, present, rng, backend="triton")
        unshuffle_fill(visible, ids_keep, mask, mask_token, backend="triton").backward(grad)
    launched = {name: kernel.launches for name, kernel in triton_launches.items() if kernel.launches}
    assert launched == {"_select_keep_kernel": 1, "_gather_visible_kernel": 1, "_unshuffle_fill_kernel": 2,
                        "_hidden_sum_partial_kernel": 1, "_sum_rows_kernel": 1}
    zeroing = [op for op in recorded.ops if any(word in op for word in ("zero", "fill_", "full"))]
    assert not zeroing, f"PyTorch zero fills in the step: {zeroing}"
