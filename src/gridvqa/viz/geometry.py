"""Where grid cells lie on the original image, and attention over cells as a heat map in its pixels.

The network sees the image resized to (rh, rw) (fixed size, or shortest side with a cap) and padded
bottom/right; feature cell (i, j) at stride s covers resized pixels [j*s, (j+1)*s) x [i*s, (i+1)*s).
Only the ceil(rh/s) x ceil(rw/s) cells touching real pixels are valid (the last row/column partially).
Mapped back, cell (i, j) covers original pixels [j*s*W/rw, min((j+1)*s, rw)*W/rw) horizontally, and
likewise vertically with H/rh. numpy only: no model and no matplotlib here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gridvqa.errors import ConfigError

SMOOTH_MODES = ("bilinear", "nearest")


@dataclass(frozen=True)
class GridGeometry:
    """A grid of `grid_hw` valid cells on an image of `orig_hw` pixels seen at `resized_hw` with `stride`.

    `uniform(grid_hw, orig_hw)` is the fallback when the resize rule is unknown: equal cells over the image.
    """

    grid_hw: tuple[int, int]
    orig_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    stride: float

    def __post_init__(self) -> None:
        for name in ("grid_hw", "orig_hw", "resized_hw"):
            v = tuple(int(x) for x in getattr(self, name))
            if len(v) != 2 or min(v) <= 0:
                raise ConfigError(f"GridGeometry: {name} must be two positive sizes, got {v}")
            object.__setattr__(self, name, v)
        if not self.stride > 0:
            raise ConfigError(f"GridGeometry: stride must be positive, got {self.stride}")
        need = self.expected_grid(self.resized_hw, self.stride)
        if any(g > n for g, n in zip(self.grid_hw, need, strict=True)):
            raise ConfigError(
                f"GridGeometry: a {self.grid_hw} grid does not fit a {self.resized_hw} input at stride "
                f"{self.stride} (at most {need} cells touch the image)"
            )

    @classmethod
    def uniform(cls, grid_hw: tuple[int, int], orig_hw: tuple[int, int]) -> GridGeometry:
        return cls(grid_hw, orig_hw, grid_hw, 1)

    @staticmethod
    def expected_grid(resized_hw: tuple[int, int], stride: float) -> tuple[int, int]:
        """Cells that see real pixels: ceil(size / stride) per axis (as `data.images.feature_mask`)."""
        return tuple(math.ceil(s / stride - 1e-9) for s in resized_hw)  # type: ignore[return-value]

    @property
    def num_cells(self) -> int:
        return self.grid_hw[0] * self.grid_hw[1]

    def _edges(self, axis: int) -> np.ndarray:
        """Cell boundaries along one axis (0: y, 1: x) in original pixels, the last clipped to the image."""
        n, resized, orig = self.grid_hw[axis], self.resized_hw[axis], self.orig_hw[axis]
        edges = np.minimum(np.arange(n + 1, dtype=np.float64) * self.stride, resized)
        return edges * (orig / resized)

    def cell_rect(self, row: int, col: int) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) in original pixels of cell (row, col); [x0, x1) x [y0, y1)."""
        h, w = self.grid_hw
        if not (0 <= row < h and 0 <= col < w):
            raise IndexError(f"cell ({row}, {col}) is outside the {h}x{w} grid")
        ys, xs = self._edges(0), self._edges(1)
        return float(xs[col]), float(ys[row]), float(xs[col + 1]), float(ys[row + 1])

    def cell_rects(self) -> np.ndarray:
        """[h*w, 4] (x0, y0, x1, y1) per cell in original pixels, row-major like the model's tokens."""
        ys, xs = self._edges(0), self._edges(1)
        y0, x0 = np.meshgrid(ys[:-1], xs[:-1], indexing="ij")
        y1, x1 = np.meshgrid(ys[1:], xs[1:], indexing="ij")
        return np.stack([x0, y0, x1, y1], axis=-1).reshape(-1, 4)

    def _interp_matrix(self, axis: int, mode: str) -> np.ndarray:
        """[orig, cells] weights that read one axis of the cell grid at every original pixel centre.

        Hand-written because the grid overhangs the image (partial last cell): F.interpolate cannot map
        the image's pixels onto only part of the last cell, and a 1-D matrix per axis is exact and cheap.
        """
        n, resized, orig = self.grid_hw[axis], self.resized_hw[axis], self.orig_hw[axis]
        # pixel centre -> resized coordinate -> position in cells (cell k spans [k, k+1))
        pos = (np.arange(orig, dtype=np.float64) + 0.5) * (resized / orig) / self.stride
        m = np.zeros((orig, n), dtype=np.float64)
        rows = np.arange(orig)
        if mode == "nearest":
            m[rows, np.clip(np.floor(pos).astype(int), 0, n - 1)] = 1.0
            return m
        g = np.clip(pos - 0.5, 0, n - 1)  # between cell centres, held flat beyond the outer centres
        lo = np.floor(g).astype(int)
        hi = np.minimum(lo + 1, n - 1)
        frac = g - lo
        np.add.at(m, (rows, lo), 1.0 - frac)
        np.add.at(m, (rows, hi), frac)
        return m

    def heatmap(self, weights: np.ndarray, mode: str = "bilinear") -> np.ndarray:
        """Per-cell weights ([h*w] row-major or [h, w]) -> float32 [H, W] map over the original image.

        `nearest` paints each cell's exact rectangle; `bilinear` interpolates between cell centres.
        """
        if mode not in SMOOTH_MODES:
            raise ConfigError(f"heat map mode {mode!r}: expected one of {SMOOTH_MODES}")
        w = np.asarray(weights, dtype=np.float64)
        if w.size != self.num_cells:
            raise ConfigError(f"{w.size} attention weights for a {self.grid_hw[0]}x{self.grid_hw[1]} grid")
        w = w.reshape(self.grid_hw)
        return (self._interp_matrix(0, mode) @ w @ self._interp_matrix(1, mode).T).astype(np.float32)
