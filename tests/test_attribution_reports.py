"""Attribution in the reports: the summary opens with the peak, the OOM report says
what was live at the failure, memory_viz entries carry their category, events their
module and phase, and possible-leak lists leave out what is alive by design."""

from __future__ import annotations

import torch
from torch import nn

import torchmem
from torchmem import oom
from torchmem.analysis.summary import growing_sites
from torchmem.export.memory_viz import to_memory_viz
from torchmem.reports.summary import format_summary

from _attribution_helpers import MLP, attributed, batches, train


def test_the_summary_opens_with_the_peak_and_its_breakdown():
    with attributed(capture_stack_traces=True) as prof:
        train(MLP, torch.optim.Adam, batches((8, 16), 4), prof)
        text = format_summary(prof)
        peak = prof.peak_report().overall
    first, second = text.splitlines()[:2]
    assert first == f"torchmem summary: {peak.headline()}"
    assert first.startswith("torchmem summary: peak ") and " at step 0, optimizer: " in first
    assert "optimizer_state" in first and "gradient" in first and "%" in first
    assert second.startswith("  by module at the peak: MLP.fc1 ")


class Inner(nn.Module):
    def __init__(self, prof):
        super().__init__()
        self.prof = prof

    def forward(self, x):
        self.prof.track_allocation(0x9000, 6 << 20, "GPU", 0)  # a 6 MiB activation
        self.prof.record_oom(1 << 30, 0, 0, 1 << 20, 1 << 34, "GPU")
        return x


class Net(nn.Module):
    def __init__(self, prof):
        super().__init__()
        self.inner = Inner(prof)

    def forward(self, x):
        return self.inner(x)


def test_the_oom_report_shows_the_breakdown_at_the_failure(tmp_path):
    with attributed() as prof:
        prof.track_allocation(0x1000, 2 << 20, "GPU", 0)  # made outside any module
        Net(prof)(torch.zeros(1))
        rep = oom.write_report(prof, prof.oom_events[0], directory=str(tmp_path), quiet=True)
    a = rep.data["attribution"]
    assert (a["running_module"], a["running_phase"]) == ("Net.inner", "forward")
    assert a["by_module"] == {"Net.inner": 6 << 20, "(none)": 2 << 20}
    assert a["by_phase"] == {"forward": 6 << 20, "other": 2 << 20}
    assert sum(a["by_category"].values()) == 8 << 20
    assert "At the failure (forward of Net.inner was running), live: " in rep.text
    assert "by module: Net.inner 6.00 MiB (75%), (none) 2.00 MiB (25%)" in rep.text
    page = open(rep.html_path).read()
    assert "What was live at the failure" in page and "Net.inner" in page


def test_memory_viz_allocations_carry_their_category():
    with attributed(capture_stack_traces=True) as prof:
        train(MLP, torch.optim.Adam, batches((8, 16), 4), prof)
        snap = to_memory_viz(prof)
    allocs = [e for trace in snap["device_traces"] for e in trace if e["action"] == "alloc"]
    assert allocs and all("category" in e for e in allocs)
    seen = {e["category"] for e in allocs}
    assert {"parameter", "gradient", "optimizer_state", "activation", "temporary",
            "input"} <= seen


def test_events_carry_module_and_phase():
    got = []
    publisher = torchmem.EventPublisher()
    publisher.subscribe(got.extend)
    with attributed(publisher=publisher) as prof:
        train(MLP, torch.optim.Adam, batches((8, 16), 4, 1), prof)
        events = prof.get_events()
        prof.flush()
    publisher.close()
    where = {(e.module, e.phase) for e in events}
    assert {("MLP.fc1", "forward"), ("MLP.fc1", "backward"), ("", "optimizer")} <= where
    assert [(e.module, e.phase) for e in got] == [(e.module, e.phase) for e in events]


def test_possible_leaks_in_the_summary_leave_out_model_state():
    with attributed(capture_stack_traces=True) as prof:
        torch.manual_seed(0)
        model = MLP()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        kept = []
        for x, y in batches((8, 16), 4, 4):
            opt.zero_grad(set_to_none=False)  # .grad lives through every step
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            prof.step()
            kept.append(torch.ones(64))  # the leak: one tensor per step
        sites = growing_sites(prof)
    assert [(nbytes, count) for _, nbytes, count in sites] == [(4 * 64 * 4, 4)]


def test_step_category_breakdowns_equal_breakdown_at_each_step():
    from torchmem.analysis.run_moments import step_category_breakdowns
    from _attribution_helpers import MLP, attributed, batches, train

    with attributed() as p:
        train(MLP, lambda ps: torch.optim.Adam(ps, lr=1e-3), batches((8, 16), 4, n=5), p)
        steps = sorted({int(s) for s in p.read_rows()["step"]})
        one_pass = step_category_breakdowns(p)
        assert sorted(one_pass) == steps
        for s in steps:
            assert one_pass[s] == p.breakdown(by="category", at=s)
            assert list(one_pass[s]) == list(p.breakdown(by="category", at=s))
        assert sum(one_pass[0].values()) > 0
