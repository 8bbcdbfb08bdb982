"""Analysis: what the recorded allocations mean (sites, epoch leaks, summaries, OOM, GC,
categories, breakdowns and peaks). Every function takes a profiler (live or loaded)
and reads it through its public read API; nothing here starts profiling."""
