"""The trace tracker on a real GPU: torch's own caching allocator recorded
natively, its totals equal to torch.cuda.memory_stats, the segment model
equal to torch's reserved bytes and segments, stacks, OOM, graphs, and
torchmem.enable() picking it by default. Each case runs in its own
interpreter (conftest)."""

from __future__ import annotations

PRELUDE = """
import gc, sys, warnings
import torch
import torchmem
from torchmem import cuda as tcuda
from torchmem.sources import cuda_tracker as ct

def start(stacks=False):
    prof = torchmem.MemoryProfiler(auto_snapshot=False, capture_stack_traces=stacks)
    rec = tcuda.start_gpu_recording(prof)
    assert rec.choice.source == "tracker", rec.choice
    return prof, rec

def check_against_torch(prof):
    torch.cuda.synchronize()
    stats = torch.cuda.memory_stats()
    gpu = prof.get_statistics_for_type("GPU")
    state = ct.gpu_memory_state(0)
    # The recorder's live bytes are the requested sizes torch counts.
    assert gpu.current_usage_bytes == stats["requested_bytes.all.current"], (
        gpu.current_usage_bytes, stats["requested_bytes.all.current"])
    assert state.allocated_bytes == stats["requested_bytes.all.current"]
    assert state.block_count == stats["allocation.all.current"]
    assert state.reserved_bytes == stats["reserved_bytes.all.current"], (
        state.reserved_bytes, stats["reserved_bytes.all.current"])
    assert state.segment_count <= stats["segment.all.current"]  # expandable ranges coalesce
    assert 0 <= state.largest_free_bytes <= state.free_bytes <= state.reserved_bytes
    assert prof.anomalies["total"] == 0, prof.anomalies
    return stats, gpu, state
"""


def test_enable_picks_the_tracker_and_leaves_cuda_uninitialised(run_gpu_script):
    run_gpu_script(PRELUDE + """
prof = torchmem.enable(trace=False, summary=False, oom_report=False, host=False)
assert not torch.cuda.is_initialized(), "torchmem initialised CUDA"
model = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.ReLU(),
                            torch.nn.Linear(2048, 10)).cuda()
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
for step in range(5):
    x = torch.randn(256, 512, device="cuda")
    torch.nn.functional.cross_entropy(model(x), torch.randint(0, 10, (256,), device="cuda")).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
stats, gpu, state = check_against_torch(prof)
assert gpu.allocation_count == stats["allocation.all.allocated"]
assert gpu.deallocation_count == stats["allocation.all.freed"]
assert torch.cuda.memory.get_allocator_backend() == "native"  # torch's allocator, unchanged
print("OK")
""")


def test_blocks_from_before_the_start_are_adopted(run_gpu_script):
    run_gpu_script(PRELUDE + """
before = [torch.empty(n, dtype=torch.uint8, device="cuda") for n in (1000, 3 << 20, 40 << 20)]
prof, rec = start()
assert rec.tracker.attached and rec.tracker.adopted_blocks == 3
after = torch.empty(5 << 20, dtype=torch.uint8, device="cuda")
check_against_torch(prof)
del before[1]
check_against_torch(prof)
print("OK")
""")


def test_segments_and_fragmentation_match_torchs_snapshot(run_gpu_script):
    run_gpu_script(PRELUDE + """
prof, rec = start()
keep = []
for i in range(40):  # interleaved sizes, every other one freed: holes
    t = torch.empty((1 + i % 5) << 20, dtype=torch.uint8, device="cuda")
    if i % 2:
        keep.append(t)
torch.cuda.synchronize()
check_against_torch(prof)
snap = torch.cuda.memory._snapshot()
segs = [s for s in snap["segments"] if s["device"] == 0]
assert {s["address"] for s in segs} == {s.address for s in ct.gpu_segments(0)}
largest = max(b["size"] for s in segs for b in s["blocks"] if b["state"] == "inactive")
# The model knows requested sizes (rounded to 512 bytes): its free ranges can
# only be as large or larger than torch's inactive blocks.
assert ct.gpu_memory_state(0).largest_free_bytes >= largest
assert ct.fragmented_bytes(64 << 20, 0) == ct.gpu_memory_state(0).free_bytes
print("OK")
""")


def test_stacks_are_recorded_and_torchs_snapshot_still_works(run_gpu_script):
    run_gpu_script(PRELUDE + """
from torchmem import _native
prof, rec = start(stacks=True)
_native.set_stack_capture(True, 10)
def make():
    return torch.empty(1000, device="cuda")
t = make()
ev = [e for e in prof.get_events() if e.size_bytes == 4000][-1]
assert ev.stack_trace is not None and ev.stack_trace.frames[0][2] == "make", ev.stack_trace
snap = torch.cuda.memory._snapshot()  # the stash returns no context: torch's snapshot is unchanged
assert snap["segments"]
print("OK")
""")


def test_oom_is_recorded_with_the_segment_state(run_gpu_script):
    run_gpu_script(PRELUDE + """
prof, rec = start()
x = torch.empty(1 << 20, device="cuda")
total = torch.cuda.mem_get_info()[1]
try:
    torch.empty(2 * total, dtype=torch.uint8, device="cuda")
except torch.OutOfMemoryError:
    pass
[oom] = prof.oom_events
assert oom.requested_bytes >= 2 * total and oom.device == 0
assert oom.device_total_bytes == total
state = ct.last_oom_state()
assert state is not None and state.requested_bytes == oom.requested_bytes
assert state.reserved_bytes == torch.cuda.memory_reserved()
print("OK")
""")


def test_expandable_segments(run_gpu_script):
    run_gpu_script(PRELUDE + """
prof, rec = start()
xs = [torch.empty(n << 20, dtype=torch.uint8, device="cuda") for n in (3, 7, 30, 2)]
del xs[1]
check_against_torch(prof)
assert any(s.expandable for s in ct.gpu_segments(0))
print("OK")
""", env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})


def test_cuda_graphs_work_unchanged(run_gpu_script):
    run_gpu_script(PRELUDE + """
prof, rec = start()
model = torch.nn.Linear(256, 256).cuda()
static_x = torch.randn(64, 256, device="cuda")
s = torch.cuda.Stream()
s.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(s):
    model(static_x)
torch.cuda.current_stream().wait_stream(s)
g = torch.cuda.CUDAGraph()
with torch.cuda.graph(g):
    static_y = model(static_x)
g.replay()
torch.cuda.synchronize()
assert torch.allclose(static_y, model(static_x), atol=1e-5)
check_against_torch(prof)
print("OK")
""")
