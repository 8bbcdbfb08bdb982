"""Holders of GPU memory: a CUDA tensor's storage pointer is the block the plugin recorded,
so the epoch check names who keeps leaked device memory alive (the CPU tests cover the
search itself). Runs in its own interpreter (conftest)."""

from __future__ import annotations

from test_plugin_gpu import PRELUDE


def test_losses_kept_on_the_gpu_are_held_by_history(run_gpu_script):
    run_gpu_script(PRELUDE + """
from torchmem.epoch import epoch

prof.capture_stack_traces = True
model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(),
                            torch.nn.Linear(1024, 10)).cuda()
history = []
for _ in range(2):
    with epoch(profiler=prof) as e:
        for _ in range(3):
            x = torch.randn(64, 256, device="cuda")
            history.append(model(x).square().mean())  # keeps each graph
torch.cuda.synchronize()
gpu_sites = [g for g in e.leaks if g.site.device == 0]
assert gpu_sites, e.report()
for g in gpu_sites:
    top = g.holders[0]
    assert top.startswith("__main__."), e.report()  # history, or the global x for the last step
    assert top.root_kind == "module", top
assert any(g.holders[0].startswith("__main__.history[") for g in gpu_sites), e.report()
assert any("saved tensor" in g.holders[0] for g in gpu_sites), e.report()
print("OK")
""")
