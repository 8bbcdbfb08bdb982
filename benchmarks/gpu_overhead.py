"""Step time on the GPU under five allocator / recording configurations.

Configurations, each in its own fresh interpreter (the allocator swap is
once per process and the env settings act at CUDA initialisation):
  (a) torch's caching allocator (the baseline)
  (b) torch's PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync
  (c) the torchmem plugin feeding a MemoryProfiler
  (d) the plugin with Python stacks captured for every allocation
  (e) torch's _record_memory_history(stacks="python") on the caching allocator
Workloads: a transformer block (forward, backward, AdamW step) and a
many-small-tensors loop (hundreds of tiny allocations per step).
Prints median ms per step and the ratio to (a). Without CUDA it says so and
exits 0.

    python benchmarks/gpu_overhead.py [--steps 30] [--warmup 5] [--budget 160] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CONFIGS = {
    "a": "torch caching allocator",
    "b": "torch backend:cudaMallocAsync",
    "c": "torchmem plugin",
    "d": "torchmem plugin + stacks",
    "e": "torch _record_memory_history(python)",
}
WORKLOADS = ("transformer_block", "small_tensors")


def build(workload: str):
    import torch

    if workload == "transformer_block":
        block = torch.nn.TransformerEncoderLayer(d_model=1024, nhead=16, dim_feedforward=4096,
                                                 batch_first=True).cuda()
        opt = torch.optim.AdamW(block.parameters(), lr=1e-4)
        x = torch.randn(16, 512, 1024, device="cuda")

        def step() -> None:
            block(x).float().square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    params = [torch.randn(256, device="cuda", requires_grad=True) for _ in range(64)]
    opt = torch.optim.SGD(params, lr=1e-3, foreach=False)

    def step() -> None:
        loss = 0
        for p in params:  # ~10 small allocations per parameter per step
            loss = loss + (p * 2 + 1).relu().sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def worker(config: str, workload: str, steps: int, warmup: int) -> dict:
    import torch

    if config in ("c", "d"):
        import torchmem
        from torchmem import _native
        from torchmem import cuda as tcuda

        prof = torchmem.MemoryProfiler(auto_snapshot=False, capture_stack_traces=config == "d")
        rec = tcuda.start_gpu_recording(prof, "plugin")
        assert rec.choice.source == "plugin", rec.choice.message
        if config == "d":
            _native.set_stack_capture(True, prof.max_stack_trace_depth)
    if config == "e":
        torch.cuda.memory._record_memory_history(enabled="all", context="all", stacks="python",
                                                 max_entries=100_000)
    step = build(workload)
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    out = {"config": config, "workload": workload, "median_ms": statistics.median(times),
           "min_ms": min(times), "device": torch.cuda.get_device_name(0),
           "torch": torch.__version__}
    if config in ("c", "d"):
        gpu = prof.get_statistics_for_type("GPU")
        out["events"] = gpu.allocation_count + gpu.deallocation_count
        out["stacks_on_events"] = config == "d"
    return out


def run_one(config: str, workload: str, steps: int, warmup: int, timeout: float) -> dict:
    env = dict(os.environ)
    for key in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "TORCHMEM_CUDA_BACKEND"):
        env.pop(key, None)
    if config == "b":
        env["PYTORCH_CUDA_ALLOC_CONF"] = "backend:cudaMallocAsync"
    cmd = [sys.executable, __file__, "--worker", config, "--workload", workload,
           "--steps", str(steps), "--warmup", str(warmup)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"config": config, "workload": workload, "error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"config": config, "workload": workload,
                "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=90.0, help="seconds per configuration")
    ap.add_argument("--budget", type=float, default=160.0,
                    help="seconds for all runs; runs that no longer fit are skipped")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--worker", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    ap.add_argument("--workload", choices=WORKLOADS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.workload, args.steps, args.warmup)))
        return 0

    import torch

    if not torch.cuda.is_available():
        print("gpu_overhead: CUDA is not available on this machine; nothing to measure.")
        return 0
    deadline = time.monotonic() + args.budget
    results = []
    for w in WORKLOADS:
        for c in CONFIGS:
            left = deadline - time.monotonic()
            if left < 10:
                results.append({"config": c, "workload": w, "error": "skipped (time budget)"})
                continue
            results.append(run_one(c, w, args.steps, args.warmup, min(args.timeout, left)))
    device = next((r["device"] for r in results if "device" in r), "?")
    print(f"gpu_overhead: {device}, torch {torch.__version__}, median of {args.steps} steps "
          f"after {args.warmup} warm-up")
    print(f"| workload | configuration | ms/step | ratio to (a) |")
    print(f"|---|---|---:|---:|")
    for w in WORKLOADS:
        base = next((r.get("median_ms") for r in results
                     if r["workload"] == w and r["config"] == "a"), None)
        for r in (r for r in results if r["workload"] == w):
            label = f"({r['config']}) {CONFIGS[r['config']]}"
            if "error" in r:
                print(f"| {w} | {label} | error: {r['error']} | |")
                continue
            ratio = f"{r['median_ms'] / base:.3f}" if base else "n/a"
            print(f"| {w} | {label} | {r['median_ms']:.2f} | {ratio} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
