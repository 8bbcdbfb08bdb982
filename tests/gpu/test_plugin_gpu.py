"""The CUDA plugin on a real GPU: training, peaks, torch's own statistics and
snapshot, OOM as torch.OutOfMemoryError, cuDNN benchmark mode, CUDA graphs,
record_stream, multi-GPU, and the fallbacks. Each case runs in its own
interpreter (conftest): the allocator swap is once per process."""

from __future__ import annotations

from _gpu_helpers import two_gpus

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
assert tcuda.installed_kind() == "class", "the compiled allocator class did not build"

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


def test_deliberate_oom_is_torch_out_of_memory_error(run_gpu_script):
    run_gpu_script(PRELUDE + """
seen = []
torch._C._cuda_attach_out_of_memory_observer(lambda *a: seen.append(a))
free_b, total_b = torch.cuda.mem_get_info()
huge = 2 * total_b
try:
    torch.empty(huge, dtype=torch.uint8, device="cuda")
except torch.OutOfMemoryError as exc:  # c10::OutOfMemoryError, as cuDNN's retry catches it
    msg = str(exc)
else:
    raise AssertionError("no OOM")
gib = huge / 2**30
assert f"CUDA out of memory. Tried to allocate {gib:.2f} GiB on device 0." in msg, msg
[oom] = prof.oom_events
assert oom.requested_bytes == huge and oom.device == 0
assert oom.device_total_bytes == total_b
assert tcuda.plugin_stats(0)["oom_count"] == 1
assert torch.cuda.memory_stats()["num_ooms"] == 1
assert len(seen) == 1 and seen[0][0] == 0, seen  # torch's OOM observers are called
x = torch.ones(1024, device="cuda")  # the allocator still works
assert x.sum().item() == 1024
print("OK")
""")


def test_cudnn_benchmark_convolutions(run_gpu_script):
    # cuDNN's benchmark mode sizes its workspace with cacheInfo, then retries
    # a smaller one on c10::OutOfMemoryError; a memory limit makes it work
    # for its workspaces.
    run_gpu_script(PRELUDE + """
torch.backends.cudnn.benchmark = True
net = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.ReLU(),
                          torch.nn.Conv2d(64, 128, 3, padding=1), torch.nn.ReLU(),
                          torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                          torch.nn.Linear(128, 10)).cuda()
opt = torch.optim.SGD(net.parameters(), lr=0.01)
for fraction in (None, 0.05):
    if fraction:
        torch.cuda.set_per_process_memory_fraction(fraction)
        assert torch.cuda.get_per_process_memory_fraction() == fraction
    for step in range(3):
        x = torch.randn(32, 3, 64, 64, device="cuda")
        torch.nn.functional.cross_entropy(net(x), torch.randint(0, 10, (32,), device="cuda")).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
torch.cuda.synchronize()
assert tcuda.largest_free_block(0) > 0
# Workspace allocations over the limit are c10::OutOfMemoryError, which cuDNN
# catches and retries with a smaller workspace: training went on. How many
# there were depends on the card and cuDNN's plans (for the record).
print("cudnn workspace OOMs caught:", tcuda.plugin_stats(0)["oom_count"])
del x
settle()
check_counters()
print("OK")
""")


def test_torch_statistics_are_the_plugins(run_gpu_script):
    run_gpu_script(PRELUDE + """
xs = [torch.empty(n, dtype=torch.uint8, device="cuda") for n in (1000, 2**20, 3 * 2**20)]
del xs[1]
s = tcuda.plugin_stats(0)
stats = torch.cuda.memory_stats()
assert stats["allocated_bytes.all.current"] == s["current"] == 1000 + 3 * 2**20 + \
    prof.get_statistics_for_type("GPU").current_usage_bytes - (1000 + 3 * 2**20)
assert torch.cuda.memory_allocated() == s["current"]
assert torch.cuda.max_memory_allocated() == s["peak"]
assert torch.cuda.memory_reserved() == s["reserved"]
assert stats["allocation.all.current"] == s["live_blocks"]
assert stats["allocation.all.peak"] == s["peak_live_blocks"]
# torch.accelerator and every C++ caller of getDeviceStats get the same.
if hasattr(torch, "accelerator") and hasattr(torch.accelerator, "memory_allocated"):
    assert torch.accelerator.memory_allocated() == s["current"]
    assert torch.accelerator.max_memory_allocated() == s["peak"]
torch.cuda.reset_peak_memory_stats()
assert torch.cuda.max_memory_allocated() == torch.cuda.memory_allocated()
torch.cuda.reset_accumulated_memory_stats()
assert torch.cuda.memory_stats()["allocation.all.allocated"] == 0
assert "Allocated memory" in torch.cuda.memory_summary()
assert torch.cuda.memory.get_allocator_backend() == "torchmem"
print("OK")
""")


def test_memory_snapshot_under_the_plugin(run_gpu_script):
    run_gpu_script(PRELUDE + """
import os, pickle, tempfile
x = torch.empty(4 * 2**20, dtype=torch.uint8, device="cuda")
snap = torch.cuda.memory._snapshot()
segs = {s["address"]: s for s in snap["segments"]}
seg = segs[x.data_ptr()]
assert seg["total_size"] == 4 * 2**20 and seg["device"] == 0
assert seg["blocks"][0]["state"] == "active_allocated"
assert sum(s["total_size"] for s in snap["segments"]) == torch.cuda.memory_allocated()
path = os.path.join(tempfile.mkdtemp(), "snap.pickle")
torch.cuda.memory._dump_snapshot(path)  # what memory_viz reads
with open(path, "rb") as f:
    assert pickle.load(f)["segments"]
print("OK")
""")


def test_cuda_graph_capture_and_replay(run_gpu_script):
    run_gpu_script(PRELUDE + """
model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU()).cuda()
static_x = torch.randn(64, 256, device="cuda")
older = torch.randn(1024, device="cuda")  # allocated before the capture
s = torch.cuda.Stream()
s.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(s):
    for _ in range(3):
        model(static_x)
torch.cuda.current_stream().wait_stream(s)
g = torch.cuda.CUDAGraph()
with torch.cuda.graph(g):
    static_y = model(static_x)
    del older  # freed during capture: must wait until the capture ends
assert tcuda.plugin_stats(-1)["deferred_frees"] == 0
for _ in range(3):
    static_x.copy_(torch.randn(64, 256, device="cuda"))
    g.replay()
    torch.cuda.synchronize()
    assert torch.allclose(static_y, model(static_x), atol=1e-5)
print("OK")
""")


def test_cuda_graph_capture_refused_by_the_sync_backend(run_gpu_script):
    run_gpu_script(PRELUDE + """
static_x = torch.randn(64, device="cuda")
g = torch.cuda.CUDAGraph()
try:
    with torch.cuda.graph(g):
        y = static_x * 2
except RuntimeError as exc:
    assert "gpu_source='tracker'" in str(exc) and "'async'" in str(exc), str(exc)
else:
    raise AssertionError("capture was not refused")
print("OK")
""", env={"TORCHMEM_CUDA_BACKEND": "sync"})


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


@two_gpus
def test_record_stream_across_devices(run_gpu_script):
    run_gpu_script(PRELUDE + """
x = torch.ones(1 << 20, device="cuda:0")
other = torch.cuda.Stream(device=1)
with torch.cuda.stream(other):
    y = x.to("cuda:1", non_blocking=True)
x.record_stream(other)
del x
torch.cuda.synchronize(0); torch.cuda.synchronize(1)
assert tcuda.plugin_stats(-1)["unfenced_blocks"] == 0
assert float(y.sum()) == float(1 << 20)
print("OK")
""")


@two_gpus
def test_peer_copies_of_pool_memory(run_gpu_script):
    run_gpu_script(PRELUDE + """
a = torch.arange(1 << 20, device="cuda:0", dtype=torch.float32)
b = a.to("cuda:1")
c = b.to("cuda:0")
assert torch.equal(a, c)
print("OK")
""")


@two_gpus
def test_no_context_is_made_on_gpu_0_by_frees_in_other_threads(run_gpu_script):
    run_gpu_script(PRELUDE + """
import threading
torch.cuda.set_device(1)
x = torch.empty(1 << 20, device="cuda:1")
assert not torch._C._cuda_hasPrimaryContext(0)
t = threading.Thread(target=lambda: globals().pop("x"))
t.start(); t.join()
torch.cuda.synchronize(1)
assert not torch._C._cuda_hasPrimaryContext(0), "a context was made on GPU 0"
print("OK")
""")


def test_plugin_asked_for_after_cuda_init_falls_back_to_the_tracker(run_gpu_script):
    run_gpu_script("""
import warnings
import torch
import torchmem
from torchmem import cuda as tcuda

first = torch.ones(1000, device="cuda")  # CUDA initialised before torchmem
prof = torchmem.MemoryProfiler(auto_snapshot=False)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    rec = tcuda.start_gpu_recording(prof, "plugin")
assert rec.choice.source == "tracker" and rec.choice.fallback, rec.choice
assert any("already initialised" in str(w.message) for w in caught)
xs = [torch.empty(1 << 20, device="cuda") for _ in range(4)]
del xs[1:3]
torch.cuda.synchronize()
gpu = prof.get_statistics_for_type("GPU")
requested = torch.cuda.memory_stats()["requested_bytes.all.current"]  # sizes asked for
assert gpu.current_usage_bytes == requested == 4000 + 2 * 4 * 2**20, (
    gpu.current_usage_bytes, requested)
assert gpu.allocation_count == 5 and gpu.deallocation_count == 2
rec.stop()
print("OK")
""")


def test_history_source_on_request(run_gpu_script):
    run_gpu_script("""
import torch
import torchmem
from torchmem import cuda as tcuda

first = torch.ones(1000, device="cuda")
prof = torchmem.MemoryProfiler(auto_snapshot=False)
rec = tcuda.start_gpu_recording(prof, "history", history_interval_s=0)
assert rec.choice.source == "history" and not rec.choice.fallback, rec.choice
xs = [torch.empty(1 << 20, device="cuda") for _ in range(4)]
del xs[1:3]
torch.cuda.synchronize()
rec.history.poll()
gpu = prof.get_statistics_for_type("GPU")
requested = torch.cuda.memory_stats()["requested_bytes.all.current"]
assert gpu.current_usage_bytes == requested == 4000 + 2 * 4 * 2**20
try:
    torch.empty(4 * torch.cuda.mem_get_info()[1], dtype=torch.uint8, device="cuda")
except torch.cuda.OutOfMemoryError:
    pass
assert len(prof.oom_events) == 1
rec.history.stop()
print("OK")
""")
