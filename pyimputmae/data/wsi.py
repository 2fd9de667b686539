"""Whole-slide images (OpenSlide): tissue detection, tiling at a set resolution, tile scoring.

One slide → the ``n_keep`` best tiles as ``uint8`` arrays, decoded once at preprocessing time and
never again per training step:

1. **tissue**: a thumbnail (each tile covers ≥ ~16 thumbnail pixels, the longer side ≤ 2048 px),
   HSV saturation, Otsu's threshold (floored at ``min_saturation``: a blank slide is not tissue);
2. **grid**: non-overlapping tiles of ``tile_px`` pixels at ``mpp`` µm/px, read from the pyramid
   level just finer than that and resized; tiles whose thumbnail tissue fraction is ≥
   ``min_tissue`` are candidates, the ``n_candidates`` most covered (ties in a seeded,
   deterministic order spread over the slide) are read;
3. **score** = mean over the tile's pixels of ``tissue · saturation / 255`` (tissue by the slide's
   threshold): dense, well-stained tissue first; the best ``n_keep`` are kept, best first.

**Resolution.** The slide's µm/px at level 0 is, in this order: ``force_mpp`` when set (for a
cohort whose files record wrong resolutions); else what the file records (``openslide.mpp-x``/``-y``:
Aperio's ``MPP``, a TIFF's ``XResolution``/``ResolutionUnit``, …) when that is plausible, i.e.
within :data:`PLAUSIBLE_MPP`; else ``default_mpp``, with a note naming the slide when the file
recorded an implausible value; else the slide fails. Brightfield scanners work at ~0.1 µm/px (100×
oil) to ~10 µm/px (overview scans); values outside :data:`PLAUSIBLE_MPP` come from export defaults
such as a TIFF resolution of 72 dpi (352.8 µm/px), 96 dpi (264.6), 300 dpi (84.7) or 1 pixel/cm
(10,000), or from a resolution in other units, and tiling at them would read the wrong scale.

Training may draw among the kept tiles; inference uses the best one or the mean of all (see
:mod:`pyimputmae.data.store`). An unreadable slide raises :class:`SlideError` naming the file and
the patient.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._fields import check_fields


class SlideError(RuntimeError):
    """A slide that cannot be tiled; the message names the file and the patient."""


#: the level-0 µm/px a file may record and be believed (inclusive); see the module docstring
PLAUSIBLE_MPP = (0.05, 20.0)

#: how to set a slide's resolution by hand, for messages
_MPP_FLAGS = ("set --wsi-force-mpp (WsiConfig.force_mpp) to the slides' true µm/px at level 0, or --wsi-default-mpp "
              "(WsiConfig.default_mpp) for the slides whose resolution is unrecorded or implausible")


@dataclass
class WsiConfig:
    """tile_px: tile side in pixels; mpp: µm per pixel of the tiles; n_candidates: tiles read and
    scored per slide; n_keep: best tiles stored; min_tissue: thumbnail tissue fraction of a
    candidate; min_saturation: floor of the Otsu threshold (0–255); default_mpp: the slide's
    µm/px at level 0 when the file records none, or a value outside :data:`PLAUSIBLE_MPP`
    (``None``: such a slide is an error); force_mpp: the µm/px at level 0 of every slide, instead
    of what the files record (``None``: believe the files); seed: tie order."""

    tile_px: int = 256
    mpp: float = 0.5
    n_candidates: int = 100
    n_keep: int = 10
    min_tissue: float = 0.5
    min_saturation: float = 15.0
    default_mpp: float | None = None
    force_mpp: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self, "WsiConfig.")
        if self.tile_px < 8 or self.mpp <= 0 or self.n_keep < 1 or self.n_candidates < self.n_keep:
            raise ValueError(f"WsiConfig needs tile_px ≥ 8, mpp > 0, 1 ≤ n_keep ≤ n_candidates; got {self}")
        for name in ("default_mpp", "force_mpp"):
            value = getattr(self, name)
            if value is not None and value <= 0:  # NaN and infinity: refused by check_fields
                raise ValueError(f"WsiConfig.{name} (--wsi-{name.replace('_', '-')}) must be a positive number of "
                                 f"µm/px, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SlideTiles:
    """tiles: ``(k, 3, tile_px, tile_px)`` uint8, best first (k ≤ n_keep); scores: ``(k,)``;
    coords: ``(k, 2)`` level-0 ``(x, y)`` of each tile's corner; slide_mpp: the slide's µm/px
    at level 0 the tiles were cut at; mpp_source: where it came from (see
    :class:`SlideResolution`); recorded_mpp: what the file records (``None``: nothing usable);
    threshold: the saturation threshold; n_tissue: grid tiles that passed ``min_tissue``;
    warnings: notes for the report (a recorded resolution that was not believed)."""

    tiles: np.ndarray
    scores: np.ndarray
    coords: np.ndarray
    slide_mpp: float
    threshold: float
    n_tissue: int
    mpp_source: str = "file"
    recorded_mpp: float | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass
class SlideResolution:
    """A slide's µm/px at level 0 and where it came from. mpp: the value tiling uses; source:
    ``"file"`` (recorded by the file and plausible), ``"force_mpp"`` or ``"default_mpp"`` (the
    settings); recorded: what the file records (the mean of ``openslide.mpp-x``/``-y``; ``None``:
    nothing, or not a number); note: why the file's value was not used, for the report."""

    mpp: float
    source: str
    recorded: float | None
    note: str | None = None


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of uint8 ``values`` (any shape): the cut maximising between-class variance."""
    hist = np.bincount(values.ravel().astype(np.int64), minlength=256)[:256].astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0.0
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)
    m0 = np.cumsum(hist * levels)
    w1 = total - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (m0[-1] * w0 - total * m0) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1.0
    return float(np.argmax(between))


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation of ``(H, W, 3)`` uint8 RGB, as uint8 0–255."""
    rgb = rgb.astype(np.int32)
    mx = rgb.max(axis=-1)
    mn = rgb.min(axis=-1)
    return np.where(mx > 0, (mx - mn) * 255 // np.maximum(mx, 1), 0).astype(np.uint8)


def _rgb(region: Any) -> np.ndarray:
    """An RGBA PIL image from OpenSlide → RGB uint8, transparent (outside the scan) as white."""
    a = np.asarray(region, dtype=np.uint8)
    if a.shape[-1] == 4:
        alpha = a[..., 3:4].astype(np.uint16)
        a = ((a[..., :3].astype(np.uint16) * alpha + 255 * (255 - alpha)) // 255).astype(np.uint8)
    return a


def slide_resolution(slide: Any, config: WsiConfig, where: str) -> SlideResolution:
    """The slide's µm/px at level 0: ``config.force_mpp``; else the file's ``openslide.mpp-x``/``-y``
    (their mean) when within :data:`PLAUSIBLE_MPP`; else ``config.default_mpp``, with a note when the
    file records a positive number outside that range (352.8 from a 72-dpi TIFF, …; 0, a negative
    number or NaN count as unrecorded, as Aperio's ``MPP = 0``); else a :class:`SlideError` naming
    ``where`` (the file and patient), the recorded value and the settings to use."""
    props = slide.properties
    raw = (props.get("openslide.mpp-x"), props.get("openslide.mpp-y"))
    try:
        mean = float(raw[0]) * 0.5 + float(raw[1]) * 0.5
    except (TypeError, ValueError):
        mean = math.nan
    recorded = mean if math.isfinite(mean) else None
    if config.force_mpp is not None:
        return SlideResolution(float(config.force_mpp), "force_mpp", recorded)
    low, high = PLAUSIBLE_MPP
    if recorded is not None and low <= recorded <= high:
        return SlideResolution(recorded, "file", recorded)
    implausible = recorded is not None and recorded > 0  # a number, but not a slide's (0 and NaN: unrecorded)
    if raw == (None, None):
        what = "does not record its resolution"
    else:
        tags = ""
        if props.get("openslide.vendor") == "generic-tiff" and props.get("tiff.XResolution") is not None:
            tags = (f", from the TIFF tags XResolution = {props['tiff.XResolution']} per "
                    f"{props.get('tiff.ResolutionUnit', '?')}")
        found = f"openslide.mpp-x/-y = {raw[0]!r}/{raw[1]!r}{tags}"
        if implausible:
            value = f"{recorded:.4g}" if recorded < 1e4 else f"{recorded:,.0f}"
            why = "a TIFF resolution left at an export default such as 72 dpi?" if recorded > high else \
                "a resolution in other units?"
            what = (f"records {value} µm/px ({found}), outside the {low:g}–{high:g} µm/px of a whole-slide image at "
                    f"level 0 ({why})")
        else:
            what = f"records an unusable resolution ({found})"
    if config.default_mpp is None:
        raise SlideError(f"{where}: the slide {what}; {_MPP_FLAGS}")
    note = f"{where}: the slide {what}; tiled as {config.default_mpp} µm/px (--wsi-default-mpp)" if implausible \
        else None
    return SlideResolution(float(config.default_mpp), "default_mpp", recorded, note)


def slide_mpp(slide: Any, config: WsiConfig, where: str) -> float:
    """The slide's µm/px at level 0 (:func:`slide_resolution`'s value)."""
    return slide_resolution(slide, config, where).mpp


def tile_slide(path: str | Path, config: WsiConfig | None = None, patient: str | None = None) -> SlideTiles:
    """Tissue detection, tiling and scoring of one slide; see the module docstring."""
    import openslide

    cfg = config or WsiConfig()
    where = f"{path} (patient {patient!r})" if patient else str(path)
    try:
        slide = openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError as e:
        raise SlideError(f"{where}: not a slide OpenSlide can read (unsupported or damaged file): {e}") from e
    except (openslide.OpenSlideError, OSError) as e:
        raise SlideError(f"{where}: cannot open the slide: {e}") from e
    try:
        return _tile_open_slide(slide, cfg, where)
    except (openslide.OpenSlideError, OSError, ValueError) as e:
        raise SlideError(f"{where}: cannot read the slide (damaged or truncated?): {e}") from e
    finally:
        slide.close()


def _tile_open_slide(slide: Any, cfg: WsiConfig, where: str) -> SlideTiles:
    from PIL import Image

    res = slide_resolution(slide, cfg, where)
    mpp0 = res.mpp
    if cfg.mpp < 0.95 * mpp0:
        origin = {"file": "recorded by the file", "force_mpp": "--wsi-force-mpp",
                  "default_mpp": "--wsi-default-mpp"}[res.source]
        raise SlideError(f"{where}: the slide's resolution {mpp0:.3f} µm/px ({origin}) is coarser than the "
                         f"requested {cfg.mpp} µm/px (--wsi-mpp)")
    width0, height0 = slide.dimensions
    tile0 = cfg.tile_px * cfg.mpp / mpp0  # tile side in level-0 pixels
    nx, ny = int(width0 // tile0), int(height0 // tile0)
    if nx == 0 or ny == 0:
        raise SlideError(f"{where}: slide of {width0}×{height0} px is smaller than one {tile0:.0f} px tile")

    # tissue mask on a thumbnail; the thumbnail's own scale per axis (it keeps the aspect ratio)
    side = int(min(2048, math.ceil(max(width0, height0) * 16 / tile0)))
    thumb = _rgb(slide.get_thumbnail((side, side)).convert("RGBA"))
    sat = saturation(thumb)
    threshold = max(otsu_threshold(sat), cfg.min_saturation)
    tissue = sat > threshold
    sy, sx = tissue.shape[0] / height0, tissue.shape[1] / width0
    integral = np.pad(tissue.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    xs = np.arange(nx) * tile0
    ys = np.arange(ny) * tile0
    x0 = np.clip(np.floor(xs * sx).astype(int), 0, tissue.shape[1] - 1)
    x1 = np.clip(np.ceil((xs + tile0) * sx).astype(int), x0 + 1, tissue.shape[1])
    y0 = np.clip(np.floor(ys * sy).astype(int), 0, tissue.shape[0] - 1)
    y1 = np.clip(np.ceil((ys + tile0) * sy).astype(int), y0 + 1, tissue.shape[0])
    covered = (integral[y1][:, x1] - integral[y0][:, x1] - integral[y1][:, x0] + integral[y0][:, x0])
    frac = covered / ((y1 - y0)[:, None] * (x1 - x0)[None, :])  # (ny, nx)
    cells = np.flatnonzero(frac.ravel() >= cfg.min_tissue)
    if cells.size == 0:
        raise SlideError(f"{where}: no tissue found (no {cfg.tile_px} px tile at {cfg.mpp} µm/px has ≥ "
                         f"{cfg.min_tissue:.0%} tissue; saturation threshold {threshold:.0f})")
    order = np.random.default_rng(cfg.seed).permutation(cells.size)  # ties: spread, deterministic
    cells = cells[order]
    cells = cells[np.argsort(-frac.ravel()[cells], kind="stable")][: cfg.n_candidates]

    level = slide.get_best_level_for_downsample(cfg.mpp / mpp0)
    down = slide.level_downsamples[level]
    read = max(1, round(tile0 / down))
    tiles, scores, coords = [], [], []
    for c in cells:
        x, y = round(xs[c % nx]), round(ys[c // nx])
        region = slide.read_region((x, y), level, (read, read)).convert("RGBA")
        if read != cfg.tile_px:
            region = region.resize((cfg.tile_px, cfg.tile_px), Image.Resampling.BOX if read > cfg.tile_px
                                   else Image.Resampling.BILINEAR)
        rgb = _rgb(region)
        s = saturation(rgb).astype(np.float32)
        scores.append(float(np.mean((s > threshold) * s) / 255.0))
        tiles.append(rgb.transpose(2, 0, 1))
        coords.append((x, y))
    best = np.argsort(-np.asarray(scores), kind="stable")[: cfg.n_keep]
    return SlideTiles(
        tiles=np.ascontiguousarray(np.stack([tiles[i] for i in best])),
        scores=np.asarray([scores[i] for i in best], dtype=np.float32),
        coords=np.asarray([coords[i] for i in best], dtype=np.int64),
        slide_mpp=mpp0, threshold=float(threshold), n_tissue=int((frac >= cfg.min_tissue).sum()),
        mpp_source=res.source, recorded_mpp=res.recorded, warnings=[res.note] if res.note else [],
    )
