"""The layout of the report's allocation timeline, the memory_viz way: every
allocation a band, stacked in the order they were made, so a band drops when
one below it is freed and the top edge is the live bytes.

A trace of a million events cannot become a million polygons in a file that
opens in seconds, so the layout works on sampled moments (the report's
timeline samples: per bucket of events, the moment of its highest live bytes,
so no peak falls between two points): the largest allocations live at some
sample are drawn one by one, each polygon keeping only the samples where its
offset changes; the rest are one band on top (live bytes minus the drawn
ones), so the top edge is exact at every sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Bands", "layout_bands"]


@dataclass
class Bands:
    """Polygons of the drawn allocations and of the rest.

    ``index``: the allocation (position in the arrays given) of each band, in
    stack order (bottom first); ``xs`` / ``ys``: each band's polygon (x: event
    seq, y: bytes; the bottom edge left to right, then the top edge back);
    ``rest_x`` / ``rest_bottom`` / ``rest_top``: the band of the allocations not
    drawn one by one, at every sample; ``rest_count``: how many allocations
    live at some sample it holds."""

    index: np.ndarray
    xs: list[np.ndarray]
    ys: list[np.ndarray]
    rest_x: np.ndarray
    rest_bottom: np.ndarray
    rest_top: np.ndarray
    rest_count: int


def _offsets(k0: np.ndarray, k1: np.ndarray, size: np.ndarray, n_samples: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """Per band (stack order) its bottom at every sample, and the drawn bytes per sample."""
    k = np.arange(n_samples)
    live = (k0[:, None] <= k) & (k < k1[:, None])
    contrib = np.where(live, size[:, None], 0)
    above = np.cumsum(contrib, axis=0)
    return above - contrib, above[-1] if len(size) else np.zeros(n_samples, np.int64)


def _vertices(offset: np.ndarray, k0: int, k1: int) -> np.ndarray:
    """The samples of a band's life where its offset changes (both sides of each change)."""
    off = offset[k0:k1]
    if len(off) <= 2:
        return np.arange(k0, k1)
    change = off[1:] != off[:-1]
    keep = np.zeros(len(off), bool)
    keep[[0, -1]] = True
    keep[1:] |= change
    keep[:-1] |= change
    return k0 + np.flatnonzero(keep)


def layout_bands(alloc_seq: np.ndarray, free_seq: np.ndarray, size: np.ndarray,
                 sample_seq: np.ndarray, sample_bytes: np.ndarray, *, max_bands: int = 2000,
                 max_vertices: int = 400_000) -> Bands:
    """Bands of the allocations (alloc_seq <= s < free_seq: live right after event s)
    at the sampled moments ``sample_seq`` (ascending), whose live bytes are
    ``sample_bytes``. At most ``max_bands`` bands, and about ``max_vertices``
    polygon vertices in all (the largest allocations first)."""
    alloc_seq = np.asarray(alloc_seq, np.int64)
    free_seq = np.asarray(free_seq, np.int64)
    size = np.asarray(size, np.int64)
    s = np.asarray(sample_seq, np.int64)
    total = np.asarray(sample_bytes, np.int64)
    k0 = np.searchsorted(s, alloc_seq, side="left")
    k1 = np.searchsorted(s, free_seq, side="left")
    seen = np.flatnonzero((k1 > k0) & (size > 0))
    by_size = seen[np.lexsort((alloc_seq[seen], -size[seen]))][:max_bands]
    chosen = np.sort(by_size)  # stack order: the order they were made (ties: input order)
    chosen = chosen[np.argsort(alloc_seq[chosen], kind="stable")]
    for attempt in range(3):  # drop the smallest bands past the vertex budget, twice at most
        bottom, drawn = _offsets(k0[chosen], k1[chosen], size[chosen], len(s))
        kept = [_vertices(bottom[b], int(k0[i]), int(k1[i])) for b, i in enumerate(chosen)]
        counts = np.array([2 * (len(v) + 2) for v in kept], np.int64)
        if counts.sum() <= max_vertices or attempt == 2:
            break
        rank = np.argsort(np.lexsort((alloc_seq[chosen], -size[chosen])))  # 0: the largest
        budget = np.cumsum(counts[np.argsort(rank)])  # in size order
        chosen = chosen[rank < int(np.searchsorted(budget, max_vertices, side="right"))]
    first = float(s[0]) if len(s) else 0.0
    last = float(s[-1]) if len(s) else 0.0
    xs, ys = [], []
    for b, i in enumerate(chosen):
        ks = kept[b]
        x = np.concatenate([[max(float(alloc_seq[i]), first)], s[ks].astype(float),
                            [min(float(free_seq[i]), last)]])
        low = bottom[b][ks].astype(float)
        low = np.concatenate([low[:1], low, low[-1:]])
        xs.append(np.concatenate([x, x[::-1]]))
        ys.append(np.concatenate([low, (low + float(size[i]))[::-1]]))
    return Bands(index=chosen, xs=xs, ys=ys, rest_x=s.astype(float),
                 rest_bottom=drawn.astype(float), rest_top=total.astype(float),
                 rest_count=int(len(seen) - len(chosen)))
