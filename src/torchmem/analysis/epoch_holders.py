"""The holders of an epoch check's growing sites: which allocations to search, one search for all.

A site's live bytes can only grow through allocations made since the previous
epoch end (older ones were counted there), so those are the ones searched:
the site's live allocations newer than the previous check. One holder search
(``holders.find_holders``) covers every growing site; each site gets its own
holders, most leaked bytes first.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from .holders import DEFAULT_BUDGET_S, DEFAULT_MAX_HOLDERS, Holder, HolderSearch, holders_by_group

__all__ = ["site_holders"]


def site_holders(live: np.ndarray, keys: np.ndarray, growing: Iterable[int], after_seq: int, *,
                 budget_s: float = DEFAULT_BUDGET_S, max_holders: int = DEFAULT_MAX_HOLDERS,
                 ) -> tuple[dict[int, list[Holder]], HolderSearch]:
    """Holders per growing site: ({site key: holders}, the search).

    ``live`` is a LIVE_DTYPE array and ``keys`` its site keys (one per row);
    ``growing`` the keys of the sites that grew; ``after_seq`` the largest
    seq live at the previous check (-1: none), so rows above it are new.
    """
    growing = list(growing)
    wanted = np.isin(keys, np.array(growing, dtype=np.uint64))
    new = wanted & (live["seq"].astype(np.int64) > after_seq)
    groups: dict[int, dict[int, int]] = {}
    for key, address, size in zip(keys[new].tolist(), live["address"][new].tolist(),
                                  live["size"][new].tolist()):
        groups.setdefault(key, {})[address] = size
    rest = set(growing).difference(groups)  # grew with no new allocation: search all of it
    if rest:
        for key, address, size in zip(keys[wanted].tolist(), live["address"][wanted].tolist(),
                                      live["size"][wanted].tolist()):
            if key in rest:
                groups.setdefault(key, {})[address] = size
    return holders_by_group(groups, budget_s=budget_s, max_holders=max_holders)
