"""The quality benchmark's measurements: pure functions of uint8 (H, W, 3) images and (H, W) bool
masks, compared with an exactly known expected image.

- SSIM: scikit-image's `structural_similarity` (its defaults: 7×7 uniform window, data range
  255), per channel and averaged over RGB. Whole image: scikit-image's mean (which leaves out a
  3-pixel border); a region: the mean of the SSIM map over the region's pixels.
- Colour-histogram distance: the total-variation distance ½·Σ|p − q| of two joint RGB histograms
  (8 bins per channel), 0 for equal colour distributions, 1 for disjoint ones.
- Object segmentation: a pixel is the object's when its colour is within `tolerance` of some
  colour of the object in the expected image and nearer to the object's colours than to every
  other colour of the expected image; the object is the largest 8-connected set of such pixels.
- Point tracking: the best-matching patch (least squared difference), refined to sub-pixel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree
from skimage.metrics import structural_similarity

from ..geometry import Point, dilate
from ..model_report import centroid

HISTOGRAM_BINS = 8
"""Bins per RGB channel of the colour histograms."""
OBJECT_TOLERANCE = 40.0
"""Largest RGB distance from an object colour that still counts as the object: a VAE round trip
shifts flat colours by a few levels, the nearest background colour is ≥ 60 away in every scene."""


def ssim(a: np.ndarray, b: np.ndarray) -> tuple[float, np.ndarray]:
    """(mean SSIM, (H, W) SSIM map averaged over RGB) of two uint8 (H, W, 3) images."""
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    value, full = structural_similarity(a, b, channel_axis=2, data_range=255, full=True)
    return float(value), full.mean(axis=2)


def mean_over(values: np.ndarray, where: np.ndarray) -> float:
    """Mean of an (H, W) map over the pixels where the mask is True; NaN when it selects none."""
    return float(values[where].mean()) if where.any() else math.nan


def colour_histogram(pixels: np.ndarray, bins: int = HISTOGRAM_BINS) -> np.ndarray:
    """The normalised joint RGB histogram (bins³,) of uint8 pixels (N, 3)."""
    q = pixels.astype(np.int64) * bins // 256
    index = (q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]
    counts = np.bincount(index, minlength=bins**3).astype(np.float64)
    return counts / counts.sum()


def histogram_distance(a: np.ndarray, b: np.ndarray, bins: int = HISTOGRAM_BINS) -> float:
    """Total-variation distance in [0, 1] of the colour histograms of pixels a and b (N, 3);
    NaN when either is empty."""
    if len(a) == 0 or len(b) == 0:
        return math.nan
    return 0.5 * float(np.abs(colour_histogram(a, bins) - colour_histogram(b, bins)).sum())


def erode(mask: np.ndarray, margin: int) -> np.ndarray:
    """The mask shrunk by `margin` pixels (a square neighbourhood)."""
    return ~dilate(~mask, margin)


@dataclass(frozen=True)
class ObjectColours:
    """What colour the object has, told apart from every other colour of the expected image.

    object_colours (K, 3) and other_colours (L, 3): distinct RGB colours; tolerance: RGB distance.
    """

    object_colours: np.ndarray
    other_colours: np.ndarray
    tolerance: float = OBJECT_TOLERANCE

    @classmethod
    def of(
        cls, truth: np.ndarray, mask: np.ndarray, tolerance: float = OBJECT_TOLERANCE
    ) -> ObjectColours:
        """The colours of the object at `mask` in the expected image `truth`.

        The object's colours come from its pixels one pixel in from its edge (edges blend with
        what is behind), the others from the pixels one pixel out of it.
        """
        inner = erode(mask, 1)
        inner = inner if inner.any() else mask
        outer = ~dilate(mask, 1)
        return cls(
            np.unique(truth[inner].reshape(-1, 3), axis=0),
            np.unique(truth[outer].reshape(-1, 3), axis=0),
            tolerance,
        )

    def matches(self, image: np.ndarray) -> np.ndarray:
        """(H, W) bool: pixels of the image whose colour is the object's."""
        pixels = image.reshape(-1, 3).astype(np.float64)
        d_object = _nearest(self.object_colours, pixels)
        d_other = _nearest(self.other_colours, pixels)
        found = (d_object <= self.tolerance) & (d_object < d_other)
        return found.reshape(image.shape[:2])


def _nearest(colours: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """Distance from each pixel (N, 3) to the nearest of the colours (K, 3); inf when K = 0."""
    if len(colours) == 0:
        return np.full(len(pixels), np.inf)
    return cKDTree(colours.astype(np.float64)).query(pixels)[0]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected part of the mask (the first one on a tie); empty if it is."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return np.zeros_like(mask)
    sizes = np.bincount(labels.ravel())[1:]
    return labels == 1 + int(np.argmax(sizes))


def segment(image: np.ndarray, colours: ObjectColours) -> np.ndarray:
    """(H, W) bool: the object in the image, the largest connected part of its colour."""
    return largest_component(colours.matches(image))


def centroid_error(found: np.ndarray, expected: np.ndarray) -> float:
    """Distance in pixels between the centroids of two masks; NaN when `found` is empty."""
    (x0, y0), (x1, y1) = centroid(found), centroid(expected)
    return math.hypot(x1 - x0, y1 - y0)


def ghost_fraction(image: np.ndarray, vacated: np.ndarray, colours: ObjectColours) -> float:
    """Share of the vacated pixels that still show the object's colour; NaN when none vacated."""
    return mean_over(colours.matches(image).astype(np.float64), vacated)


def _parabola_peak(below: float, centre: float, above: float) -> float:
    """Offset in [-0.5, 0.5] of the minimum of the parabola through three equally spaced values."""
    curvature = below - 2.0 * centre + above
    if curvature <= 0:
        return 0.0
    return float(np.clip(0.5 * (below - above) / curvature, -0.5, 0.5))


def track_point(
    before: np.ndarray,
    after: np.ndarray,
    point: Point,
    search_centre: Point,
    patch_radius: int,
    search_radius: int,
) -> Point:
    """Where the content at `point` of `before` lies in `after`.

    The (2·patch_radius + 1)² patch of `before` around the pixel holding `point` is compared
    with every patch of `after` whose centre pixel lies within `search_radius` pixels (per axis)
    of the pixel holding `search_centre`; the least squared difference wins and is refined to
    sub-pixel by a parabola through its neighbours along each axis. Images are edge-padded, so
    points near the border work. Returns `point` moved by the found displacement.
    """
    r, s = patch_radius, search_radius
    pad = r + s + 1
    a = np.pad(before.astype(np.float64), ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    b = np.pad(after.astype(np.float64), ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    h, w = before.shape[:2]
    px = min(max(math.floor(point[0]), 0), w - 1)
    py = min(max(math.floor(point[1]), 0), h - 1)
    cx = min(max(math.floor(search_centre[0]), 0), w - 1)
    cy = min(max(math.floor(search_centre[1]), 0), h - 1)
    template = a[py + pad - r : py + pad + r + 1, px + pad - r : px + pad + r + 1]
    region = b[cy + pad - s - r : cy + pad + s + r + 1, cx + pad - s - r : cx + pad + s + r + 1]
    # cost[i, j]: squared difference of the template and the patch centred at search cell (i, j),
    # summed one template pixel at a time (memory stays at the size of the search window).
    n = 2 * s + 1
    cost = np.zeros((n, n))
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            cost += ((region[dy : dy + n, dx : dx + n] - template[dy, dx]) ** 2).sum(axis=2)
    iy, ix = np.unravel_index(int(np.argmin(cost)), cost.shape)
    fx = _parabola_peak(*cost[iy, ix - 1 : ix + 2]) if 0 < ix < 2 * s else 0.0
    fy = _parabola_peak(*cost[iy - 1 : iy + 2, ix]) if 0 < iy < 2 * s else 0.0
    return (point[0] + cx - s + ix + fx - px, point[1] + cy - s + iy + fy - py)


def point_errors(
    before: np.ndarray,
    after: np.ndarray,
    source: np.ndarray,
    target: np.ndarray,
    patch_radius: int,
) -> np.ndarray:
    """Distance in pixels between where each source point's content is found in `after` and its
    known target; source and target (N, 2). Each search window is centred on the target and
    reaches 1.5 × the point's displacement plus a patch radius, so it also holds the source."""
    errors = []
    for p, q in zip(source, target, strict=True):
        reach = math.ceil(1.5 * math.hypot(*(q - p))) + patch_radius
        x, y = track_point(before, after, tuple(p), tuple(q), patch_radius, reach)
        errors.append(math.hypot(x - q[0], y - q[1]))
    return np.array(errors)
