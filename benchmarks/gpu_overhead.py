"""Step time on the GPU under torchmem's GPU sources and torch's own recording.

Configurations, each in its own fresh interpreter (the allocator swap is
once per process and the env settings act at CUDA initialisation):
  (a) torch's caching allocator (the baseline)
  (b) (a) + the torchmem trace tracker feeding a MemoryProfiler (the default source)
  (c) the tracker with Python stacks captured for every allocation
  (d) the torchmem plugin (the compiled allocator class, async backend)
  (e) the plugin with Python stacks
  (f) torch's PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync (the plugin's own baseline)
  (g) torch's _record_memory_history(stacks="python") on the caching allocator
Workloads, both in each interpreter: a transformer block (forward, backward,
AdamW step) and a small conv net under cudnn.benchmark (SGD step).
Prints median ms per step and the ratio to (a). Without CUDA it says so and
exits 0.

    python benchmarks/gpu_overhead.py [--steps 20] [--warmup 5] [--budget 50] [--json out.json]
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
    "b": "torchmem tracker",
    "c": "torchmem tracker + stacks",
    "d": "torchmem plugin",
    "e": "torchmem plugin + stacks",
    "f": "torch backend:cudaMallocAsync",
    "g": "torch _record_memory_history(python)",
}
WORKLOADS = ("transformer_block", "conv_net")


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

    torch.backends.cudnn.benchmark = True
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
        torch.nn.Conv2d(64, 128, 3, padding=1, stride=2), torch.nn.BatchNorm2d(128),
        torch.nn.ReLU(), torch.nn.Conv2d(128, 256, 3, padding=1, stride=2), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(256, 10)).cuda()
    opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.9)
    x = torch.randn(64, 3, 64, 64, device="cuda")
    y = torch.randint(0, 10, (64,), device="cuda")

    def step() -> None:
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def worker(config: str, steps: int, warmup: int) -> list[dict]:
    import torch

    prof = None
    if config in "bcde":
        import torchmem
        from torchmem import _native
        from torchmem import cuda as tcuda

        stacks = config in "ce"
        prof = torchmem.MemoryProfiler(auto_snapshot=False, capture_stack_traces=stacks)
        want = "tracker" if config in "bc" else "plugin"
        rec = tcuda.start_gpu_recording(prof, want)
        assert rec.choice.source == want, rec.choice.message
        if want == "plugin":
            assert tcuda.installed_kind() == "class", tcuda.installed_kind()
        if stacks:
            _native.set_stack_capture(True, prof.max_stack_trace_depth)
    if config == "g":
        torch.cuda.memory._record_memory_history(enabled="all", context="all", stacks="python",
                                                 max_entries=100_000)
    out = []
    for workload in WORKLOADS:
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
        row = {"config": config, "workload": workload, "median_ms": statistics.median(times),
               "q1_ms": statistics.quantiles(times, n=4)[0],
               "q3_ms": statistics.quantiles(times, n=4)[2],
               "device": torch.cuda.get_device_name(0), "torch": torch.__version__}
        if prof is not None:
            gpu = prof.get_statistics_for_type("GPU")
            row["events"] = gpu.allocation_count + gpu.deallocation_count
        out.append(row)
    return out


def run_one(config: str, steps: int, warmup: int, timeout: float) -> list[dict]:
    env = dict(os.environ)
    for key in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "TORCHMEM_CUDA_BACKEND"):
        env.pop(key, None)
    if config == "f":
        env["PYTORCH_CUDA_ALLOC_CONF"] = "backend:cudaMallocAsync"
    cmd = [sys.executable, __file__, "--worker", config, "--steps", str(steps),
           "--warmup", str(warmup)]
    failed = [{"config": config, "workload": w} for w in WORKLOADS]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [dict(r, error=f"timed out after {timeout:.0f} s") for r in failed]
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        return [dict(r, error=why) for r in failed]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=90.0, help="seconds per configuration")
    ap.add_argument("--budget", type=float, default=50.0,
                    help="seconds for all runs; runs that no longer fit are skipped")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--worker", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.warmup)))
        return 0

    import torch

    if not torch.cuda.is_available():
        print("gpu_overhead: CUDA is not available on this machine; nothing to measure.")
        return 0
    deadline = time.monotonic() + args.budget
    results = []
    for c in CONFIGS:
        left = deadline - time.monotonic()
        if left < 5:
            results += [{"config": c, "workload": w, "error": "skipped (time budget)"}
                        for w in WORKLOADS]
            continue
        results += run_one(c, args.steps, args.warmup, min(args.timeout, left))
    device = next((r["device"] for r in results if "device" in r), "?")
    print(f"gpu_overhead: {device}, torch {torch.__version__}, median of {args.steps} steps "
          f"after {args.warmup} warm-up")
    print("| workload | configuration | ms/step (median) | quartiles | ratio to (a) |")
    print("|---|---|---:|---:|---:|")
    for w in WORKLOADS:
        base = next((r.get("median_ms") for r in results
                     if r["workload"] == w and r["config"] == "a"), None)
        for r in (r for r in results if r["workload"] == w):
            label = f"({r['config']}) {CONFIGS[r['config']]}"
            if "error" in r:
                print(f"| {w} | {label} | error: {r['error']} | | |")
                continue
            ratio = f"{r['median_ms'] / base:.3f}" if base else "n/a"
            print(f"| {w} | {label} | {r['median_ms']:.2f} | {r['q1_ms']:.2f}-{r['q3_ms']:.2f} "
                  f"| {ratio} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
