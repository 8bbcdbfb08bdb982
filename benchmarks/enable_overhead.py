"""What the one line costs: default ``torchmem.enable()`` against the same training without it.

Over 400 lines on purpose: the orchestrator, the child that trains, the
memory sampler and the tables are one benchmark, run as one script.

Time (the default mode). Workloads, each trained for a fixed number of
steps after a warm-up:
  small MLP, 1 thread / default threads (32-64-10, batch 16, ~0.6 ms a step),
  medium MLP, default threads (512 in, 3 hidden layers of 1024, batch 64),
  small CNN, default threads (two 3x3 convolutions on 3x32x32, batch 16).
Configurations: plain (torchmem not imported), ``enable()`` (default: stacks,
SQLite trace, GC monitor, snapshots), ``enable(trace=False)``,
``enable(capture_stack_traces=False)``, neither, and the peers where
installed: ``torch.profiler.profile(profile_memory=True)``, memray
(``memray.Tracker``, what ``memray run`` does), tracemalloc.

Each configuration runs in its own process, in a new shuffled order every
repetition; the headline is the **paired** ratio: a configuration's mean step
wall time over the plain run's in the same repetition, median over the
repetitions [quartiles]. Wall time is what a user sees, and on a shared
machine it is noisy, so each run also reports CPU time, which load moves
much less: the training thread's (``time.thread_time`` over the steps), the
whole process's, and the trace writer child's (during the steps, and in all,
read from /proc until it exits). The load average is printed with each run.
``--busy N`` starts N competing busy processes (a core each) for the whole
measurement. Before the next process starts, the previous run's writer child
must have exited (it may finish the trace after the training process).

Memory (``--memory``): the training process's RSS plus every writer child's
(RSS and PSS, sampled every 50 ms), against the plain run's peak RSS, on the
training loop of examples/train_cpu.py (same model and data, its epoch check
when torchmem is on) and on a small-MLP run of ``--events`` events (10M by
default); it prints the overhead at a quarter, half and the end of the run
to show whether it stays flat, each against the plain run's peak RSS up to
the same progress (the harness grows with the steps in both runs).

Run: python benchmarks/enable_overhead.py [--reps 5] [--busy 1] [--only small1,cnn]
     python benchmarks/enable_overhead.py --memory [--events 10000000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.abspath(__file__)

# name: (title, torch threads (0 = default), steps)
WORKLOADS = {
    "small1": ("small MLP, 1 thread", 1, 2000),
    "small": ("small MLP, default threads", 0, 2000),
    "medium": ("medium MLP (width 1024), default threads", 0, 40),
    "cnn": ("small CNN, default threads", 0, 200),
}
CONFIGS = ["plain", "enable", "trace=False", "no stacks", "neither",
           "torch.profiler", "memray", "tracemalloc"]
TORCHMEM_CONFIGS = {"enable": {}, "trace=False": {"trace": False},
                    "no stacks": {"capture_stack_traces": False},
                    "neither": {"trace": False, "capture_stack_traces": False}}
WARMUP_STEPS = 20


def installed(config: str) -> bool:
    if config == "memray":
        try:
            import memray  # noqa: F401
        except ImportError:
            return False
    return True


# -- the child: one configuration, one workload --------------------------------
def make_step(workload: str):
    import torch

    torch.manual_seed(0)
    if workload.startswith("small") or workload.startswith("events"):
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(),
                                    torch.nn.Linear(64, 10))
        x, y = torch.randn(16, 32), torch.randint(0, 10, (16,))
    elif workload == "medium":
        model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.ReLU(),
                                    torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
                                    torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
                                    torch.nn.Linear(1024, 10))
        x, y = torch.randn(64, 512), torch.randint(0, 10, (64,))
    elif workload == "cnn":
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                                    torch.nn.MaxPool2d(2),
                                    torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(),
                                    torch.nn.MaxPool2d(2), torch.nn.Flatten(),
                                    torch.nn.Linear(32 * 8 * 8, 10))
        x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    else:
        raise SystemExit(f"unknown workload {workload}")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def proc_cpu_s(pid: int) -> float | None:
    """utime + stime of a process from /proc, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_mem_bytes(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a process in bytes; (0, 0) once it is gone."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, pss


def writer_pids() -> list[int]:
    """The trace writer children of this process (SQLiteStorage's)."""
    if "torchmem" not in sys.modules:
        return []
    from torchmem.storage import sqlite as tm_sqlite

    return [s.writer_pid for s in list(tm_sqlite._live) if getattr(s, "writer_pid", None)]


def peer_context(config: str, tmp: str):
    import contextlib

    if config == "torch.profiler":
        from torch.profiler import ProfilerActivity, profile

        return profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    if config == "memray":
        import memray

        return memray.Tracker(os.path.join(tmp, "memray.bin"))
    if config == "tracemalloc":
        import tracemalloc

        @contextlib.contextmanager
        def traced():
            tracemalloc.start()
            try:
                yield
            finally:
                tracemalloc.stop()
        return traced()
    return contextlib.nullcontext()


class Sampler(threading.Thread):
    """Samples this process's and the writers' memory every ``period_s``."""

    def __init__(self, period_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.period_s, self.samples, self.stop_flag = period_s, [], threading.Event()
        self.progress = 0  # steps done, set by the training loop

    def run(self) -> None:
        me = os.getpid()
        while not self.stop_flag.wait(self.period_s):
            rss, pss = proc_mem_bytes(me)
            w_rss = w_pss = 0
            for pid in writer_pids():
                r, p = proc_mem_bytes(pid)
                w_rss, w_pss = w_rss + r, w_pss + p
            self.samples.append((self.progress, rss, pss, w_rss, w_pss))


def child(args: argparse.Namespace) -> None:
    config, workload = args.config, args.workload
    tmp = args.tmp
    threads = WORKLOADS[workload][1] if workload in WORKLOADS else 1
    import torch

    if threads:
        torch.set_num_threads(threads)
    prof = None
    if config in TORCHMEM_CONFIGS:
        import torchmem

        prof = torchmem.enable(trace_dir=tmp, summary=False, **TORCHMEM_CONFIGS[config])
    step = make_step("small" if workload == "train_cpu" else workload)
    sampler = Sampler() if args.sample else None
    if workload == "train_cpu":
        step = train_cpu_loop(prof)
    for _ in range(WARMUP_STEPS if workload != "train_cpu" else 0):
        step()
    steps = args.steps
    wall, cpu = [], 0.0
    cpu0 = os.times()
    w_pids = writer_pids()
    w0 = {p: proc_cpu_s(p) or 0.0 for p in w_pids}
    if sampler:
        sampler.start()
    with peer_context(config, tmp):
        for i in range(steps):
            t, c = time.perf_counter(), time.thread_time()
            step()
            wall.append(time.perf_counter() - t)
            cpu += time.thread_time() - c
            if sampler:
                sampler.progress = i + 1
    cpu1 = os.times()
    w_run = sum((proc_cpu_s(p) or 0.0) - w0[p] for p in w_pids)
    events = prof.next_seq if prof is not None else 0
    if sampler:
        sampler.stop_flag.set()
        sampler.join()
    med = statistics.median(wall)
    out = {"config": config, "workload": workload, "steps": steps,
           "mean_step_s": sum(wall) / steps, "median_step_s": med,
           "stalls": sum(1 for w in wall if w > med + 0.003),  # steps 3 ms over the median
           "thread_cpu_s": cpu / steps,
           "process_cpu_s": (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / steps,
           "writer_cpu_run_s": w_run / steps, "writer_pids": w_pids,
           "writer_cpu0_s": sum(w0.values()), "events": events,
           "samples": sampler.samples if sampler else [],
           "end_time": time.time()}
    print("RESULT " + json.dumps(out), flush=True)


def train_cpu_loop(prof):
    """examples/train_cpu.py's model, data and loop (width 128, 5 epochs of 20
    steps, an epoch check per epoch when torchmem is on), one call per step."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data, labels = torch.randn(20, 64, 128), torch.randint(0, 10, (20, 64))
    state = {"i": 0}

    def step() -> None:
        i = state["i"] % 20
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(data[i]), labels[i])
        loss.backward()
        opt.step()
        state["i"] += 1
        if prof is not None and i == 19:
            from torchmem.epoch import mark_epoch

            mark_epoch(prof)
    return step


# -- the orchestrator ------------------------------------------------------------
BASELINE_PYTHON = ""  # --baseline-python: runs the "base:" configurations


def run_one(config: str, workload: str, steps: int, tmp: str, sample: bool = False) -> dict:
    load = os.getloadavg()[0]
    python = sys.executable
    if config.startswith("base:"):  # the same configuration, another build of torchmem
        python, config = BASELINE_PYTHON, config[5:]
    cmd = [python, HERE, "--child", "--config", config, "--workload", workload,
           "--steps", str(steps), "--tmp", tmp] + (["--sample"] if sample else [])
    env = dict(os.environ, TORCHMEM_SUMMARY="0")
    env.pop("TORCHMEM", None)
    t0 = time.time()
    # stderr into a file, not a pipe: the writer child inherits it, and a
    # pipe would make this wait for the writer too, not for the training process.
    with tempfile.TemporaryFile("w+") as err:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        t_exit = time.time()
        err.seek(0)
        stderr = err.read()
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode or not line:
        raise SystemExit(f"{config} / {workload} failed ({p.returncode}):\n{stderr[-3000:]}")
    r = json.loads(line[-1][7:])
    if python != sys.executable:
        r["config"] = "base:" + r["config"]
    # Wait for the writer to finish the trace (it outlives the training
    # process when the trace is big); its CPU in all, read until it exits.
    w_total = 0.0  # NaN when a writer was gone before it could be read
    for pid in r["writer_pids"]:
        last = None
        while True:
            c = proc_cpu_s(pid)
            if c is None:
                break
            last = c
            time.sleep(0.02)
        w_total += last if last is not None else float("nan")
    r.update(load=load, teardown_s=t_exit - r["end_time"], process_s=t_exit - t0,
             writer_done_s=time.time() - r["end_time"],
             writer_cpu_total_s=w_total)
    for name in os.listdir(tmp):
        path = os.path.join(tmp, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return r


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def fmt_ratio(xs: list[float]) -> str:
    lo, med, hi = quartiles(xs)
    return f"{med:.2f}x [{lo:.2f}-{hi:.2f}]"


def time_mode(args: argparse.Namespace) -> None:
    configs = [c for c in CONFIGS if installed(c)]
    if args.configs:
        configs = ["plain"] + [c for c in args.configs.split(",") if c != "plain"]
    if args.baseline_python:
        configs += ["base:" + c for c in (args.baseline_configs or "enable").split(",")]
    workloads = args.only.split(",") if args.only else list(WORKLOADS)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(args.busy)]
    results: dict[str, dict[str, list[dict]]] = {w: {c: [] for c in configs} for w in workloads}
    loads = []
    try:
        with tempfile.TemporaryDirectory(prefix="torchmem-bench-") as tmp:
            for rep in range(args.reps):
                for w in workloads:
                    order = configs[:]
                    random.shuffle(order)
                    for c in order:
                        steps = max(1, int(WORKLOADS[w][2] * args.scale))
                        r = run_one(c, w, steps, tmp)
                        loads.append(r["load"])
                        results[w][c].append(r)
                        print(f"  rep {rep + 1} {w:7s} {c:15s} {r['mean_step_s'] * 1e3:8.3f} ms "
                              f"thread cpu {r['thread_cpu_s'] * 1e3:7.3f} ms load "
                              f"{r['load']:.1f}", file=sys.stderr, flush=True)
    finally:
        for b in busy:
            b.kill()
    print(f"\nenable_overhead: {args.reps} repetitions, {args.busy} competing busy "
          f"process(es), {os.cpu_count()} cores, load average {min(loads):.1f}-{max(loads):.1f} "
          f"(median {statistics.median(loads):.1f}), Python {sys.version.split()[0]}")
    print("\nmean step wall time, paired ratio to plain: median [quartiles]")
    print("| workload | plain ms/step | " + " | ".join(configs[1:]) + " |")
    print("|---|---:|" + "---:|" * (len(configs) - 1))
    for w in workloads:
        plain = results[w]["plain"]
        cells = []
        for c in configs[1:]:
            cells.append(fmt_ratio([r["mean_step_s"] / p["mean_step_s"]
                                    for r, p in zip(results[w][c], plain)]))
        base = statistics.median(p["mean_step_s"] for p in plain) * 1e3
        print(f"| {WORKLOADS[w][0]} | {base:.3f} | " + " | ".join(cells) + " |")
    print("\nCPU per step, paired ratio to plain: training thread / whole process + writer child "
          "during the steps")
    print("| workload | " + " | ".join(configs[1:]) + " |")
    print("|---|" + "---:|" * (len(configs) - 1))
    for w in workloads:
        plain = results[w]["plain"]
        cells = []
        for c in configs[1:]:
            rs = results[w][c]
            t = [r["thread_cpu_s"] / p["thread_cpu_s"] for r, p in zip(rs, plain)]
            a = [(r["process_cpu_s"] + r["writer_cpu_run_s"]) / p["process_cpu_s"]
                 for r, p in zip(rs, plain)]
            cells.append(f"{statistics.median(t):.2f}x / {statistics.median(a):.2f}x")
        print(f"| {WORKLOADS[w][0]} | " + " | ".join(cells) + " |")
    print("\nthe default enable() (and base:enable), per run: steps over median + 3 ms (plain in brackets), "
          "writer CPU per event during the steps / in all, time from the last step to the "
          "writer's exit (median)")
    for w, c in [(w, c) for w in workloads for c in ("enable", "base:enable")]:
        rs, plain = results[w].get(c, []), results[w]["plain"]
        if not rs:
            continue
        ev = [max(r["events"], 1) for r in rs]
        during = statistics.median(r["writer_cpu_run_s"] * r["steps"] / e * 1e9
                                   for r, e in zip(rs, ev))
        total = statistics.median((r["writer_cpu_total_s"] - r["writer_cpu0_s"]) / e * 1e9
                                  for r, e in zip(rs, ev))
        print(f"  {c} {WORKLOADS[w][0]}: stalls {[r['stalls'] for r in rs]} "
              f"({[p['stalls'] for p in plain]}), {statistics.median(ev):.0f} events, writer "
              f"{during:.0f} / {total:.0f} ns/event, writer done "
              f"{statistics.median(r['writer_done_s'] for r in rs):.2f} s after the last step, "
              f"process exit {statistics.median(r['teardown_s'] for r in rs):.2f} s after it")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f)


def memory_mode(args: argparse.Namespace) -> None:
    # ~110 events per small-MLP step (measured: 7,146,969 in 64,955 steps).
    runs = [("train_cpu", 100), (f"events{args.events}", max(args.events // 110, 1))]
    print(f"enable_overhead --memory: load average {os.getloadavg()[0]:.1f}, "
          f"{os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(prefix="torchmem-bench-") as tmp:
        for workload, steps in runs:
            plain = run_one("plain", workload, steps, tmp, sample=True)
            on = run_one("base:enable" if args.baseline_python else "enable", workload, steps,
                         tmp, sample=True)
            base = max(s[1] for s in plain["samples"]) if plain["samples"] else 0
            title = ("examples/train_cpu.py loop" if workload == "train_cpu"
                     else f"small MLP, {on['events']:,} events")
            print(f"\n{title}: plain peak RSS {base / 2**20:.1f} MiB; enable(): "
                  f"{on['events']:,} events, load {on['load']:.1f}")
            print("| progress | plain RSS | training RSS growth | writer RSS | writer PSS | "
                  "added (RSS) | added (growth + writer PSS) |")
            print("|---|---:|---:|---:|---:|---:|---:|")
            samples = on["samples"]
            for frac in (0.25, 0.5, 1.0):
                upto = [s for s in samples if s[0] <= frac * steps] or samples[:1]
                peak = max(upto, key=lambda s: s[1] + s[3])
                # Against the plain run at the same progress: the harness itself
                # grows with the steps (a float per step in `wall`, the samples),
                # in both runs; the plain run's final peak would count that
                # growth as torchmem's between a quarter and the end.
                plain_upto = [s for s in plain["samples"] if s[0] <= frac * steps]
                base = max(s[1] for s in plain_upto) if plain_upto else base
                grow = max(s[1] for s in upto) - base
                w_rss = max(s[3] for s in upto)
                w_pss = max(s[4] for s in upto)
                print(f"| {frac:.0%} | {base / 2**20:.1f} MiB | {grow / 2**20:.1f} MiB | "
                      f"{w_rss / 2**20:.1f} MiB | "
                      f"{w_pss / 2**20:.1f} MiB | "
                      f"{(peak[1] + peak[3] - base) / 2**20:.1f} MiB "
                      f"({(peak[1] + peak[3] - base) / base:.1%}) | "
                      f"{(grow + w_pss) / 2**20:.1f} MiB ({(grow + w_pss) / base:.1%}) |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--busy", type=int, default=0, help="competing busy processes")
    ap.add_argument("--only", default="", help="workloads, comma-separated: " + ",".join(WORKLOADS))
    ap.add_argument("--configs", default="", help="configurations, comma-separated")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every step count")
    ap.add_argument("--json", default="", help="write every run's figures here")
    ap.add_argument("--baseline-python", default="",
                    help="an interpreter with another torchmem build: adds base:CONFIG runs")
    ap.add_argument("--baseline-configs", default="enable",
                    help="the configurations run with --baseline-python")
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--workload", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    ap.add_argument("--sample", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global BASELINE_PYTHON
    BASELINE_PYTHON = args.baseline_python
    if args.child:
        child(args)
    elif args.memory:
        memory_mode(args)
    else:
        time_mode(args)


if __name__ == "__main__":
    main()
