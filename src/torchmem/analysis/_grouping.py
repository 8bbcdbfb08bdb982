"""Live bytes grouped at many moments at once: what ``breakdown`` says at one
moment, for every step's peak of a long run in one pass.

One moment is a mask over the segments (``_Moments.groups``); a thousand
moments that way cost a thousand passes (52 s for 2,500 steps of a 1M-event
trace). Here the segments' starts (+size) and ends (-size) are sorted once by
(key, seq), and each key's running sum is read at every moment by binary
search.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .categories import CATEGORIES, NO_MODULE

__all__ = ["keyed", "groups_at", "labelled"]


def keyed(m: Any, by: str) -> tuple[np.ndarray, Callable[[int], str]]:
    """Each segment's key for ``by`` (of ``m.segments``, a _Moments'), and a key's label."""
    seg, lt = m.segments, m.lt
    if by == "category":
        return seg.category, CATEGORIES.__getitem__
    if by == "module":
        return seg.module_ctx, lambda k: m.context(k)[0] or NO_MODULE
    idx = seg.alloc
    if by == "phase":
        return lt.alloc_ctx[idx].astype(np.int64), lambda k: m.context(k)[1]
    if by == "site":
        return lt.stack_id[idx].astype(np.int64), m.site
    if by == "type":
        return lt.type_id[idx].astype(np.int64), m.profiler.type_name
    return lt.device[idx].astype(np.int64), lambda d: "host" if d < 0 else f"cuda:{d}"


def labelled(keys: np.ndarray, sizes: np.ndarray, label: Callable[[int], str]) -> dict[str, int]:
    """Bytes per label (keys whose labels are equal add up), largest first."""
    out: dict[str, int] = {}
    if len(keys):
        uniq, inverse = np.unique(keys, return_inverse=True)
        sums = np.zeros(len(uniq), np.int64)
        np.add.at(sums, inverse, sizes)
        for k, v in zip(uniq.tolist(), sums.tolist()):
            name = label(k)
            out[name] = out.get(name, 0) + v  # stacks that differ inside torch: one line
    return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))


def groups_at(m: Any, seqs: np.ndarray, by: str) -> list[dict[str, int]]:
    """For each moment in ``seqs`` (right after that event), ``m.groups(seq, by)``
    without the groups of zero bytes (a zero-size allocation cannot be told
    from none here)."""
    seqs = np.asarray(seqs, np.int64)
    seg = m.segments
    keys, label = keyed(m, by)
    size = m.lt.size[seg.alloc].astype(np.int64)
    sel = np.ones(len(keys), bool) if m.device is None else m.lt.device[seg.alloc] == m.device
    keys, size, start, end = keys[sel], size[sel], seg.start[sel], seg.end[sel]
    when = np.concatenate([start, end]).astype(np.int64)
    key2 = np.concatenate([keys, keys]).astype(np.int64)
    delta = np.concatenate([size, -size])
    order = np.lexsort((when, key2))
    when, key2, delta = when[order], key2[order], delta[order]
    bounds = np.flatnonzero(np.r_[True, key2[1:] != key2[:-1], True]) if len(key2) else [0]
    at = np.zeros((max(len(bounds) - 1, 0), len(seqs)), np.int64)
    ukeys = []
    for j, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        cum = np.r_[0, np.cumsum(delta[a:b])]
        at[j] = cum[np.searchsorted(when[a:b], seqs, side="right")]
        ukeys.append(int(key2[a]))
    labels = [label(k) for k in ukeys]
    out = []
    for col in at.T:
        d: dict[str, int] = {}
        for j in np.flatnonzero(col).tolist():
            d[labels[j]] = d.get(labels[j], 0) + int(col[j])
        out.append(dict(sorted(((k, v) for k, v in d.items() if v),
                               key=lambda kv: (-kv[1], kv[0]))))
    return out
