"""The CUDA plugin on a real GPU: training, peaks, OOM, record_stream, and
the history fallback. Each case runs in its own interpreter (conftest)."""

from __future__ import annotations

# Shared by the cases: a profiler fed by the plugin from the first CUDA
# allocation on, and every CUDA tensor storage Python can reach.
PRELUDE = """
import gc, sys, warnings
import torch
import torchmem
from torchmem import _native, cuda as tcuda

assert not torch.cuda.is_initialized()
prof = torchmem.MemoryProfiler(auto_snapshot=False)
rec = tcuda.start_gpu_recording(prof, "plugin")
assert rec.choice.source == "plugin", rec.choice
assert tcuda.is_installed()

def tensor_storages():
    seen = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.is_cuda:
            st = obj.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return seen

def settle():
    torch.cuda.synchronize()
    gc.collect()
    # cuBLAS keeps a workspace allocated through the allocator; it is not a tensor.
    if hasattr(torch._C, "_cuda_clearCublasWorkspaces"):
        torch._C._cuda_clearCublasWorkspaces()

def check_counters():
    gpu = prof.get_statistics_for_type("GPU")
    storages = tensor_storages()
    live = {int(r["address"]): int(r["size"]) for r in prof.live_allocations()}
    # Every tensor's storage is a live block of exactly its size ...
    missing = {a: n for a, n in storages.items() if live.get(a) != n}
    assert not missing, ("tensor storages not live", missing)
    # ... and what is not a tensor is a library workspace (cuBLAS / cuBLASLt)
    # that torch could not release: report it, allow at most two.
    others = {a: n for a, n in live.items() if a not in storages}
    assert len(others) <= 2, ("non-tensor blocks", others)
    if others:
        print("non-tensor blocks (workspaces):", others)
    assert gpu.current_usage_bytes == sum(storages.values()) + sum(others.values())
    assert torch.cuda.memory_allocated() == gpu.current_usage_bytes
    assert torch.cuda.max_memory_allocated() == gpu.peak_usage_bytes
    assert torch.cuda.memory_stats()["allocated_bytes.all.peak"] == gpu.peak_usage_bytes
    assert prof.anomalies["total"] == 0, prof.anomalies
    return gpu
"""


def test_mlp_training_live_bytes_and_peak(run_gpu_script):
    run_gpu_script(PRELUDE + """
model = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.ReLU(),
                            torch.nn.Linear(2048, 10)).cuda()
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
for step in range(5):
    x = torch.randn(256, 512, device="cuda")
    y = torch.randint(0, 10, (256,), device="cuda")
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    prof.step()
del x, y, loss
settle()
gpu = check_counters()
params = sum(p.numel() * p.element_size() for p in model.parameters())
assert gpu.current_usage_bytes >= 3 * params  # weights + Adam's two moments
assert gpu.peak_usage_bytes > gpu.current_usage_bytes
torch.cuda.reset_peak_memory_stats()
assert torch.cuda.max_memory_allocated() == torch.cuda.memory_allocated()
events = prof.get_events()
assert all(e.allocation_type == "GPU" and e.device == 0 for e in events)
assert max(e.step for e in events) == 5
print("OK")
""")


def test_transformer_block_training(run_gpu_script):
    run_gpu_script(PRELUDE + """
block = torch.nn.TransformerEncoderLayer(d_model=256, nhead=4, dim_feedforward=1024,
                                         batch_first=True).cuda()
opt = torch.optim.AdamW(block.parameters(), lr=1e-4)
for step in range(4):
    x = torch.randn(8, 128, 256, device="cuda")
    block(x).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
del x
settle()
check_counters()
print("OK")
""")


def test_deliberate_oom_is_reported(run_gpu_script):
    run_gpu_script(PRELUDE + """
free_b, total_b = torch.cuda.mem_get_info()
huge = 2 * total_b
try:
    torch.empty(huge, dtype=torch.uint8, device="cuda")
except RuntimeError as exc:  # torch wraps the plugin's error as RuntimeError
    msg = str(exc)
else:
    raise AssertionError("no OOM")
gib = huge / 2**30
assert f"CUDA out of memory. Tried to allocate {gib:.2f} GiB on device 0." in msg, msg
[oom] = prof.oom_events
assert oom.requested_bytes == huge and oom.device == 0
assert oom.device_total_bytes == total_b
assert tcuda.plugin_stats(0)["oom_count"] == 1
x = torch.ones(1024, device="cuda")  # the allocator still works
assert x.sum().item() == 1024
print("OK")
""")


def test_record_stream_on_a_side_stream(run_gpu_script):
    run_gpu_script(PRELUDE + """
n = 1 << 24
side = torch.cuda.Stream()
x = torch.ones(n, device="cuda")
ptr = x.data_ptr()
side.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(side):
    torch.cuda._sleep(200_000_000)  # keep the side stream busy
    y = x * 2
x.record_stream(side)
del x  # freed on the default stream, fenced after the side stream's work
z = torch.zeros(n, device="cuda")  # may reuse x's memory on the default stream
torch.cuda.synchronize()
assert bool((y == 2).all()), "x was reused before the side stream finished"
assert z.sum().item() == 0
print("OK")
""")


def test_stacks_on_gpu_allocations(run_gpu_script):
    run_gpu_script(PRELUDE + """
_native.set_stack_capture(True, 10)
prof.capture_stack_traces = True
def make():
    return torch.empty(1000, device="cuda")
t = make()
ev = [e for e in prof.get_events() if e.size_bytes == 4000][-1]
assert ev.stack_trace is not None and ev.stack_trace.frames[0][2] == "make", ev.stack_trace
print("OK")
""")


def test_history_fallback_when_cuda_is_initialised(run_gpu_script):
    run_gpu_script("""
import warnings
import torch
import torchmem
from torchmem import cuda as tcuda

first = torch.ones(1000, device="cuda")  # CUDA initialised before torchmem
prof = torchmem.MemoryProfiler(auto_snapshot=False)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    rec = tcuda.start_gpu_recording(prof, history_interval_s=0)
assert rec.choice.source == "history" and rec.choice.fallback
assert any("already initialised" in str(w.message) for w in caught)
xs = [torch.empty(1 << 20, device="cuda") for _ in range(4)]
del xs[1:3]
torch.cuda.synchronize()
rec.history.poll()
gpu = prof.get_statistics_for_type("GPU")
requested = torch.cuda.memory_stats()["requested_bytes.all.current"]  # sizes asked for
assert gpu.current_usage_bytes == requested == 4000 + 2 * 4 * 2**20, (
    gpu.current_usage_bytes, requested)
assert gpu.allocation_count == 5 and gpu.deallocation_count == 2
try:
    torch.empty(4 * torch.cuda.mem_get_info()[1], dtype=torch.uint8, device="cuda")
except torch.cuda.OutOfMemoryError:
    pass
assert len(prof.oom_events) == 1
rec.history.stop()
print("OK")
""")
