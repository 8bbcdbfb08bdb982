"""Analysis: what the recorded allocations mean (sites, epoch leaks, summaries, OOM, GC)."""
