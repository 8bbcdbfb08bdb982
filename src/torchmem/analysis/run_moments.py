"""What a report shows of a whole run, at a bounded set of moments, reading the
events twice a batch at a time: memory bounded by the moments and the keys,
not by the events (the HTML report of a 10M-event trace).

1. The first read finds the moments: per bucket of events the one of the
   highest live bytes (the timeline's points, as category_timeline picks
   them), each step's peak (analysis.steps.StepSeries), and the overall peak.
   Past ``max_steps`` steps, consecutive steps are shown together, by the
   one of them with the highest peak.
2. The second read (analysis.windows) gives every allocation its category and
   module once it is freed (or the run ends), and adds its bytes, by
   category, module and site, to the moments it was live at: a difference
   array per key over the moments, summed at the end. It also keeps the
   largest allocations live at a point (the bands), and what was live at the
   overall peak (the flame graph, the module table's column).

The values are the whole run's (breakdown, peak_report, category_timeline,
peak_stacks, allocation_categories), except a module's own peak, which is the
highest at these moments (at every moment when the run has at most
``points`` events).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .._events import EVENT_DTYPE
from .breakdown import Peak, PeakReport
from .categories import CATEGORIES, NO_MODULE, Lifetimes, _table
from .sites import site_name
from ._run_pass import first_pass
from .timeline import CategoryTimeline, ModuleRow, StackNode, stack_tree
from .windows import windows

__all__ = ["RunMoments", "StepBox", "run_moments", "step_category_breakdowns",
           "step_category_bytes"]

_INF = 2**62


@dataclass
class StepBox:
    """Steps shown together: events ``first_seq`` to ``end_seq`` (exclusive), the
    steps ``first_step`` to ``last_step``; ``peak``: the highest of theirs."""

    first_seq: int
    end_seq: int
    first_step: int
    last_step: int
    peak: Peak | None


@dataclass
class RunMoments:
    """A run for a report (see the module doc)."""

    timeline: CategoryTimeline
    report: PeakReport | None  # None when the peak is older than the events held
    stacks: StackNode
    modules: list[ModuleRow]
    bands: Lifetimes  # the largest allocations live at a timeline point, rows empty
    band_categories: list[str]  # each one's category when made
    boxes: list[StepBox] = field(default_factory=list)
    first_seq: int = 0  # the first event held
    n_events: int = 0


def _live_at(w: Any, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The final segments of window ``w`` live at one of the moments ``q`` (sorted):
    their indices, and for each the range [i0, i1) of those moments and its bytes."""
    seg = w.segments
    i0 = np.searchsorted(q, seg.start, side="left")
    i1 = np.searchsorted(q, seg.end, side="left")
    sel = np.flatnonzero(w.final[seg.alloc] & (i1 > i0))
    return sel, i0[sel], i1[sel], w.lt.size[seg.alloc[sel]].astype(np.int64)


def step_category_bytes(profiler: Any, batch: int = 1 << 15
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``breakdown(by="category", at=step)`` for every step with events, as arrays:
    (steps ascending, bytes and allocation counts per CATEGORIES entry and step,
    each of shape (len(CATEGORIES), steps)); the events read twice a window at
    a time (memory: two integers per category and step, not the events)."""
    pass1 = first_pass(profiler, 1, batch)
    empty = np.zeros((len(CATEGORIES), 0), np.int64)
    if not pass1.n:
        return np.zeros(0, np.int64), empty, empty.copy()
    best = pass1.step_best.array()
    steps = best["key"].copy()
    q = best["seq"].copy()
    del pass1, best
    order = np.argsort(q, kind="stable")
    sums = _Sums(len(q), len(CATEGORIES))
    q = q[order]
    for w in windows(profiler, batch):
        sel, i0, i1, size = _live_at(w, q)
        sums.add(w.segments.category[sel].astype(np.int64), i0, i1, size)
    b, c = sums.finish()
    by_step = np.argsort(steps[order], kind="stable")  # moments back into step order
    cols = order[by_step]
    return steps[cols], b[:, by_step], c[:, by_step]


def step_category_breakdowns(profiler: Any, batch: int = 1 << 15) -> dict[int, dict[str, int]]:
    """``breakdown(by="category", at=step)`` for every step with events: step ->
    bytes by category (largest first), the same values (step_category_bytes
    as dicts: for a few steps; a long run's exports use the arrays)."""
    steps, b, c = step_category_bytes(profiler, batch)
    return {s: _grouped(list(CATEGORIES), b[:, j], c[:, j], keep_zero=True)
            for j, s in enumerate(steps.tolist())}


class _Sums:
    """Bytes and counts per key at each moment, as difference arrays."""

    def __init__(self, n_moments: int, n_keys: int = 0) -> None:
        self.n = n_moments
        self.bytes = np.zeros((n_keys, n_moments + 1), np.int64)
        self.count = np.zeros((n_keys, n_moments + 1), np.int64)

    def add(self, key: np.ndarray, i0: np.ndarray, i1: np.ndarray, size: np.ndarray) -> None:
        if not len(key):
            return
        need = int(key.max()) + 1
        if need > len(self.bytes):
            grow = max(need, 2 * len(self.bytes)) - len(self.bytes)
            self.bytes = np.vstack([self.bytes, np.zeros((grow, self.n + 1), np.int64)])
            self.count = np.vstack([self.count, np.zeros((grow, self.n + 1), np.int64)])
        for arr, v in ((self.bytes, size), (self.count, np.ones(len(key), np.int64))):
            np.add.at(arr, (key, i0), v)
            np.add.at(arr, (key, i1), -v)

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        for arr in (self.bytes, self.count):  # in place: a long run's steps are many moments
            np.cumsum(arr, axis=1, out=arr)
        return self.bytes[:, :-1], self.count[:, :-1]


class _Labels:
    """Label strings to small ints (keys whose labels are equal add up)."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}
        self.names: list[str] = []

    def __call__(self, name: str) -> int:
        i = self.index.get(name)
        if i is None:
            i = self.index[name] = len(self.names)
            self.names.append(name)
        return i


def _grouped(names: list[str], col_bytes: np.ndarray, col_count: np.ndarray, *,
             keep_zero: bool) -> dict[str, int]:
    """One moment's groups, largest first: ``keep_zero`` as breakdown (a key live
    with 0 bytes is named), else as _grouping.groups_at (it is not)."""
    keep = (col_count > 0) if keep_zero else (col_bytes != 0)
    d = {names[k]: int(col_bytes[k]) for k in np.flatnonzero(keep[:len(names)]).tolist()}
    return dict(sorted(d.items(), key=lambda kv: (-kv[1], kv[0])))


def run_moments(profiler: Any, points: int = 1000, top: int = 5, max_steps: int = 2000,
                max_bands: int = 1000, batch: int = 1 << 15,
                on_rows: Callable[[np.ndarray], None] | None = None) -> RunMoments:
    """The run at ``points`` timeline points and at most ``max_steps`` step peaks
    (see the module doc); ``top`` modules and sites per peak; the ``max_bands``
    largest allocations live at a point; ``batch`` events read at a time (32K:
    the SQLite reader makes a tuple per row of a batch). ``on_rows`` gets every
    batch of the first read (a report's other views share it)."""
    p = profiler
    pass1 = first_pass(p, points, batch, on_rows)
    s_seq, s_ts, s_step = pass1.samples()
    boxes = pass1.boxes(max_steps)
    peak_seq = p.peak_seq
    held = bool(pass1.n) and peak_seq is not None and peak_seq >= pass1.first - 1
    want = [s_seq, np.array([pass1.steps["peak_seq"][b[4]] for b in boxes], np.int64)]
    if held:
        want.append(np.array([peak_seq], np.int64))
    q = np.unique(np.concatenate(want)) if pass1.n else np.zeros(0, np.int64)

    contexts = p.context_table()
    modules, sites = _Labels(), _Labels()
    ctx_label: dict[int, int] = {}
    site_label: dict[int, int] = {}
    cats, mods, sts = _Sums(len(q), len(CATEGORIES)), _Sums(len(q)), _Sums(len(q))
    q_rows: dict[int, tuple[int, int, int, int]] = {}  # seq -> ctx, step, ts, usage
    at_peak: list[tuple[np.ndarray, ...]] = []
    bands = _table(0)
    band_cat = np.zeros(0, np.int64)
    for w in (windows(p, batch) if pass1.n else ()):
        lt, seg = w.lt, w.segments
        rows = w.lt.rows
        if len(rows):
            lo, hi = int(rows["seq"][0]), int(rows["seq"][-1])
            inside = q[(q >= lo) & (q <= hi)]
            r = rows[inside - lo]
            use = r["total_allocated"].astype(np.int64) - r["total_freed"].astype(np.int64)
            for s_, c_, st_, ts_, u_ in zip(inside.tolist(), r["context_id"].tolist(),
                                           r["step"].tolist(), r["timestamp_ns"].tolist(),
                                           use.tolist()):
                q_rows[s_] = (c_, st_, ts_, u_)
        sel, i0, i1, size = _live_at(w, q)
        a = seg.alloc[sel]
        for c in np.unique(seg.module_ctx[sel]).tolist():
            if c not in ctx_label:
                name = contexts[c][0] if 0 <= c < len(contexts) else ""
                ctx_label[c] = modules(name or NO_MODULE)
        for sid in np.unique(lt.stack_id[a]).tolist():
            if sid not in site_label:
                site_label[sid] = sites(site_name(p.resolve_stack(sid) if sid else None))
        mod_key = np.array([ctx_label[c] for c in seg.module_ctx[sel].tolist()], np.int64)
        site_key = np.array([site_label[s] for s in lt.stack_id[a].tolist()], np.int64)
        cats.add(seg.category[sel].astype(np.int64), i0, i1, size)
        mods.add(mod_key, i0, i1, size)
        sts.add(site_key, i0, i1, size)
        if held:
            live = (seg.start[sel] <= peak_seq) & (seg.end[sel] > peak_seq)
            at_peak.append((lt.stack_id[a[live]], size[live], mod_key[live],
                            seg.category[sel][live]))
        # Bands: the largest allocations live at a point, made in or carried into
        # this window and final now; each one's category when made.
        final_a = np.flatnonzero(w.final)
        k0 = np.searchsorted(s_seq, lt.alloc_seq[final_a], side="left")
        k1 = np.searchsorted(s_seq, lt.free_seq[final_a], side="left")
        cand = final_a[(k1 > k0) & (lt.size[final_a] > 0)]
        made = w.made_categories()
        made[made < 0] = CATEGORIES.index("other")  # made before the events held
        for name in bands:
            bands[name] = np.concatenate([bands[name], getattr(lt, name)[cand]])
        band_cat = np.concatenate([band_cat, made[cand]])
        keep = np.lexsort((bands["alloc_seq"], -bands["size"]))[:max_bands]
        keep = np.sort(keep)
        bands = {k: v[keep] for k, v in bands.items()}
        band_cat = band_cat[keep]

    cat_b, cat_c = cats.finish()
    mod_b, mod_c = mods.finish()
    site_b, site_c = sts.finish()
    cat_names = list(CATEGORIES)

    def peak_at(seq: int, by_phase: dict[str, int] | None, keep_zero: bool) -> Peak:
        j = int(np.searchsorted(q, seq))
        if j == len(q) or q[j] != seq:  # a step without a peak (seq -1): nothing live
            g = {"category": {}, "module": {}, "site": {}}
        else:
            g = {by: _grouped(names, b[:, j], c[:, j], keep_zero=keep_zero)
                 for by, names, b, c in (("category", cat_names, cat_b, cat_c),
                                         ("module", modules.names, mod_b, mod_c),
                                         ("site", sites.names, site_b, site_c))}
        row = q_rows.get(seq)
        ctx, step, ts, usage = row if row is not None else (0, 0, 0, 0)
        module, phase = contexts[ctx] if 0 <= ctx < len(contexts) else ("", "other")
        cut = lambda d: dict(list(d.items())[:top])  # noqa: E731
        return Peak(seq=seq, step=int(step), timestamp_ns=int(ts), phase=phase, module=module,
                    bytes=int(usage), by_category=g["category"], by_module=cut(g["module"]),
                    by_site=cut(g["site"]), by_phase=dict(by_phase or {}))

    idx = np.searchsorted(q, s_seq)
    timeline = CategoryTimeline(s_seq, s_ts, s_step,
                                {c: cat_b[i, idx] for i, c in enumerate(CATEGORIES)})
    step_peaks = {b[4]: peak_at(int(pass1.steps["peak_seq"][b[4]]), pass1.by_phase(b[4]), False)
                  for b in boxes}
    box_list = [StepBox(b[0], b[1], b[2], b[3], step_peaks[b[4]]) for b in boxes]
    parts = ([np.concatenate(x) for x in zip(*at_peak)] if at_peak
             else [np.zeros(0, np.int64)] * 4)
    stack_ids, sizes, mod_keys, cat_keys = parts
    report: PeakReport | None = None  # the peak's events are gone (a ring without storage)
    stacks = StackNode(None)
    if held:
        report = PeakReport(peak_at(int(peak_seq), None, True), [b.peak for b in box_list])
        stacks = stack_tree(p, stack_ids, sizes)
    elif not pass1.n or peak_seq is None:
        report = PeakReport(None, [b.peak for b in box_list])
    return RunMoments(timeline, report, stacks,
                      _module_rows(modules.names, mod_b, mod_keys, cat_keys, sizes),
                      Lifetimes(**bands, rows=np.zeros(0, EVENT_DTYPE)),
                      [CATEGORIES[c] for c in band_cat.tolist()], box_list,
                      max(pass1.first, 0), pass1.n)


def _module_rows(names: list[str], mod_b: np.ndarray, mod_keys: np.ndarray,
                 cat_keys: np.ndarray, sizes: np.ndarray) -> list[ModuleRow]:
    at_peak: dict[str, dict[str, int]] = {}
    for k, c, nbytes in zip(mod_keys.astype(np.int64).tolist(), cat_keys.astype(np.int64).tolist(),
                            sizes.astype(np.int64).tolist()):
        d = at_peak.setdefault(names[k], {})
        d[CATEGORIES[c]] = d.get(CATEGORIES[c], 0) + nbytes
    peaks = mod_b.max(axis=1) if mod_b.shape[1] else np.zeros(len(mod_b), np.int64)
    rows = [ModuleRow(name, int(peaks[i]), sum(at_peak.get(name, {}).values()),
                      dict(sorted(at_peak.get(name, {}).items(),
                                  key=lambda kv: (-kv[1], CATEGORIES.index(kv[0])))))
            for i, name in enumerate(names) if peaks[i] > 0]
    return sorted(rows, key=lambda r: (-r.at_peak_bytes, -r.peak_bytes, r.module))
