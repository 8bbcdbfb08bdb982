"""Two gloo ranks on the CPU: each writes its own trace, rank 0 gathers both."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

WORKER = textwrap.dedent("""
    import json, sys
    import torch
    import torch.distributed as dist
    import torchmem
    from torchmem import _session
    import torchmem.distributed as tmd

    prof = _session.enable(trace_dir=sys.argv[1], summary=False, auto_snapshot=False)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    keep = [torch.zeros(1024 * (rank + 1))]  # rank 0: 4096 bytes, rank 1: 8192 bytes
    out = tmd.summary(print_summary=(rank == 0))
    if rank == 0:
        print("JSON" + json.dumps([s.__dict__ for s in out]))
    else:
        assert out is None
    dist.destroy_process_group()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_gather_to_rank_0(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    traces = tmp_path / "traces"
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               WORLD_SIZE="2")
    procs = [subprocess.Popen([sys.executable, str(script), str(traces)],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    line = next(x for x in outs[0][0].splitlines() if x.startswith("JSON"))
    ranks = json.loads(line[4:])
    assert [r["rank"] for r in ranks] == [0, 1]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["current_by_type"]["CPU"] for r in ranks] == [4096, 8192]
    assert [r["peak_by_type_device"]["CPU:-1"] >= c for r, c in zip(ranks, (4096, 8192))] == [True] * 2
    assert ranks[0]["pid"] != ranks[1]["pid"]
    names = [os.path.basename(r["trace_path"]) for r in ranks]
    assert names[0].endswith("-rank0.db") and names[1].endswith("-rank1.db")
    assert sorted(p.name for p in traces.glob("*.db")) == sorted(names)
    assert "torchmem: 2 rank(s)" in outs[0][1] and "rank 1" in outs[0][1]

    from torchmem.storage import load

    for r in ranks:
        saved = load(r["trace_path"])
        assert saved.trace_metadata["rank"] == r["rank"]
        assert saved.trace_metadata["world_size"] == 2
