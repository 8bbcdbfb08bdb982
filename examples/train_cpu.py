"""A small CPU training run under torchmem: the README's first command.

    python examples/train_cpu.py

It trains a two-layer MLP on synthetic data for a few epochs with
``torchmem.enable()`` at the top. Each epoch ends with a leak check; at exit
torchmem prints its summary (peaks by type and device, the top allocation
sites, leaks) and the path of the trace it wrote, which ``torchmem summary
PATH`` reads; the script also writes the HTML report beside the trace.
Runs in a few seconds on two cores without a GPU.
"""

from __future__ import annotations

import argparse
import os

import torch

import torchmem
from torchmem.epoch import epoch
from torchmem.export import export_html


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="steps per epoch")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--trace-dir", default=None, help="default: ./torchmem-traces")
    args = parser.parse_args()

    profiler = torchmem.enable(trace_dir=args.trace_dir)  # the one line torchmem needs

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(128, args.width), torch.nn.ReLU(),
        torch.nn.Linear(args.width, args.width), torch.nn.ReLU(),
        torch.nn.Linear(args.width, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = torch.randn(args.steps, 64, 128)
    labels = torch.randint(0, 10, (args.steps, 64))

    for ep in range(args.epochs):
        with epoch() as e:  # after epoch 1: reports any site whose live memory grew
            total = 0.0
            for i in range(args.steps):
                opt.zero_grad(set_to_none=True)
                loss = torch.nn.functional.cross_entropy(model(data[i]), labels[i])
                loss.backward()
                opt.step()  # also advances torchmem's step counter
                total += loss.item()
        stats = profiler.get_statistics()
        print(f"epoch {ep + 1}: loss {total / args.steps:.4f}, live "
              f"{stats.current_usage_bytes / 2**20:.2f} MiB, peak "
              f"{stats.peak_usage_bytes / 2**20:.2f} MiB, "
              f"{'baseline' if ep == 0 else f'{len(e.leaks)} growing sites'}")
    # The self-contained HTML report (charts, top sites, leaks, GC pauses);
    # torchmem prints its text summary and the trace's path at exit.
    trace = torchmem.trace_path()
    report = (os.path.splitext(trace)[0] if trace else "torchmem-report") + ".html"
    export_html(profiler, report)
    print(f"HTML report: {os.path.abspath(report)}")


if __name__ == "__main__":
    main()
