"""A fake CUDA runtime, driver and libc10_cuda for CPU tests of the plugin's
CUDA backends (csrc/cuda_backends_cuda.cpp, csrc/cuda_runtime.cpp).

Three small shared libraries, built with the C compiler into a directory:

- ``libcudart.so.13`` (SONAME libcudart.so.13, installed under a name of
  its own so that only resolution through libc10_cuda finds it): the
  runtime functions the plugin resolves. Memory is malloc'ed; a device's
  primary context exists once cudaSetDevice or an allocation made it;
  streams carry their device in their value (``0x1000 * device + n``), and
  cudaEventRecord on a stream of another device than the current one fails
  as the real one does. Every call is logged (``fake_log``); errors set the
  thread's last error as the real runtime does.
- ``libcuda.so.1``: cuDeviceGet and cuDevicePrimaryCtxGetState over the
  runtime's context table.
- ``libc10_cuda.so``: nothing but a link to the fake runtime.

``run_with_fake_cuda(code)`` runs ``code`` in a fresh interpreter with the
three preloaded (the plugin resolves its runtime once per process).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

CUDART = r"""
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static char log_buf[1 << 16];
static size_t log_len = 0;
static __thread int current = 0;
static __thread int last_error = 0;
static int ctx[8];
static int fail_malloc = 0;
static int next_stream = 1;
static uint64_t reserved[8], used[8];

static void logf_(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
#include <stdarg.h>
static void logf_(const char* fmt, ...) {
  pthread_mutex_lock(&mu);
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(log_buf + log_len, sizeof log_buf - log_len, fmt, ap);
  va_end(ap);
  if (n > 0 && log_len + n + 1 < sizeof log_buf) {
    log_len += n;
    log_buf[log_len++] = '\n';
    log_buf[log_len] = 0;
  }
  pthread_mutex_unlock(&mu);
}
static int fail(int err) { last_error = err; return err; }
static int dev_of(void* s) { return s ? (int)(((uintptr_t)s) / 0x1000) : current; }

/* controls */
const char* fake_log(void) { return log_buf; }
void fake_clear(void) { pthread_mutex_lock(&mu); log_len = 0; log_buf[0] = 0; pthread_mutex_unlock(&mu); }
void fake_set_pending_error(int e) { last_error = e; }
void fake_fail_malloc(int n) { fail_malloc = n; }
int fake_ctx(int d) { return ctx[d]; }
int fake_current(void) { return current; }

int cudaGetDevice(int* d) { *d = current; return 0; }
int cudaSetDevice(int d) { logf_("SetDevice %d", d); current = d; ctx[d] = 1; return 0; }
int cudaGetLastError(void) { int e = last_error; last_error = 0; logf_("GetLastError -> %d", e); return e; }
int cudaPeekAtLastError(void) { return last_error; }
const char* cudaGetErrorString(int e) { return e == 2 ? "out of memory" : "fake error"; }
int cudaMemGetInfo(size_t* f, size_t* t) { *f = 1u << 30; *t = 2u << 30; return 0; }
int cudaDeviceGetAttribute(int* v, int attr, int d) { (void)d; *v = attr == 115; return 0; }
int cudaMalloc(void** p, size_t n) {
  if (fail_malloc > 0) { fail_malloc--; logf_("Malloc %zu -> oom", n); return fail(2); }
  *p = malloc(n); ctx[current] = 1; logf_("Malloc %zu dev=%d", n, current); return 0;
}
int cudaFree(void* p) { free(p); logf_("Free dev=%d", current); return 0; }
int cudaMallocAsync(void** p, size_t n, void* s) {
  if (fail_malloc > 0) { fail_malloc--; logf_("MallocAsync %zu -> oom", n); return fail(2); }
  *p = malloc(n); ctx[current] = 1; used[current] += n; if (used[current] > reserved[current]) reserved[current] = used[current];
  logf_("MallocAsync %zu stream=%#lx dev=%d", n, (unsigned long)(uintptr_t)s, current); return 0;
}
int cudaFreeAsync(void* p, void* s) { free(p); logf_("FreeAsync stream=%#lx dev=%d", (unsigned long)(uintptr_t)s, current); return 0; }
int cudaDeviceGetDefaultMemPool(void** pool, int d) { *pool = (void*)(uintptr_t)(0x5000 + d); return 0; }
int cudaMemPoolSetAttribute(void* pool, int a, void* v) { (void)pool; (void)a; (void)v; return 0; }
int cudaMemPoolGetAttribute(void* pool, int a, void* v) {
  int d = (int)((uintptr_t)pool - 0x5000);
  *(uint64_t*)v = (a == 5 || a == 6) ? reserved[d] + (64u << 20) : used[d];
  return 0;
}
int cudaMemPoolTrimTo(void* pool, size_t keep) { (void)pool; (void)keep; logf_("Trim"); return 0; }
int cudaMemPoolSetAccess(void* pool, const int* desc, size_t n) {
  logf_("MemPoolSetAccess pool=%#lx type=%d id=%d flags=%d n=%zu", (unsigned long)(uintptr_t)pool,
        desc[0], desc[1], desc[2], n);
  return 0;
}
int cudaDeviceCanAccessPeer(int* can, int d, int p) { (void)d; (void)p; *can = 1; return 0; }
int cudaDeviceEnablePeerAccess(int p, unsigned f) { (void)f; logf_("EnablePeerAccess dev=%d peer=%d", current, p); return 0; }
int cudaEventCreateWithFlags(void** ev, unsigned f) { (void)f; *ev = malloc(8); return 0; }
int cudaEventRecord(void* ev, void* s) {
  (void)ev;
  if (dev_of(s) != current) { logf_("EventRecord stream=%#lx dev=%d -> invalid", (unsigned long)(uintptr_t)s, current); return fail(400); }
  logf_("EventRecord stream=%#lx dev=%d", (unsigned long)(uintptr_t)s, current); return 0;
}
int cudaEventSynchronize(void* ev) { (void)ev; logf_("EventSynchronize"); return 0; }
int cudaEventDestroy(void* ev) { free(ev); return 0; }
int cudaStreamWaitEvent(void* s, void* ev, unsigned f) { (void)ev; (void)f; logf_("StreamWaitEvent stream=%#lx", (unsigned long)(uintptr_t)s); return 0; }
int cudaStreamSynchronize(void* s) { logf_("StreamSynchronize stream=%#lx", (unsigned long)(uintptr_t)s); return 0; }
int cudaDeviceSynchronize(void) { logf_("DeviceSynchronize dev=%d", current); return 0; }
int cudaStreamCreateWithFlags(void** s, unsigned f) {
  pthread_mutex_lock(&mu); int n = next_stream++; pthread_mutex_unlock(&mu);
  *s = (void*)(uintptr_t)(0x1000 * current + 0x800 + n);
  logf_("StreamCreate dev=%d flags=%u -> %#lx", current, f, (unsigned long)(uintptr_t)*s); return 0;
}
int cudaStreamGetDevice(void* s, int* d) { *d = dev_of(s); return 0; }
"""

CUDA_DRIVER = r"""
int fake_ctx(int d);
int cuDeviceGet(int* dev, int ordinal) { *dev = ordinal; return 0; }
int cuDevicePrimaryCtxGetState(int dev, unsigned* flags, int* active) {
  *flags = 0; *active = fake_ctx(dev); return 0;
}
"""

C10_CUDA = "int fake_c10_cuda_marker(void) { return 1; }\n"


def build_fake_cuda(directory: Path) -> dict[str, Path]:
    """Builds the three libraries into ``directory``; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    cc = os.environ.get("CC") or "cc"
    rt_dir = directory / "runtime"  # a name the plugin's name search would not find
    rt_dir.mkdir(exist_ok=True)
    paths = {"cudart": rt_dir / "libcudart.so.13", "driver": directory / "libcuda.so.1",
             "c10_cuda": directory / "libc10_cuda.so"}
    sources = {"cudart": CUDART, "driver": CUDA_DRIVER, "c10_cuda": C10_CUDA}
    for key, path in paths.items():
        src = directory / f"{key}.c"
        src.write_text(sources[key])
        cmd = [cc, "-shared", "-fPIC", "-O1", "-o", str(path), str(src),
               f"-Wl,-soname,{path.name}", "-pthread"]
        if key != "cudart":  # linked even where nothing of it is called (as torch's is)
            cmd += ["-Wl,--no-as-needed", str(paths["cudart"])]
        subprocess.run(cmd, check=True, capture_output=True)
    return paths


PRELUDE = """
import ctypes, os, sys
paths = {paths!r}
rt = ctypes.CDLL(paths["cudart"], mode=ctypes.RTLD_GLOBAL)
ctypes.CDLL(paths["c10_cuda"], mode=ctypes.RTLD_GLOBAL)
ctypes.CDLL(paths["driver"], mode=ctypes.RTLD_GLOBAL)
rt.fake_log.restype = ctypes.c_char_p
def log():
    return rt.fake_log().decode().splitlines()
from torchmem import cuda as tcuda
from torchmem.sources._cuda_native import clib
lib = clib()
def alloc(size, device, stream, flags=0):
    out = ctypes.c_void_p()
    status = lib.torchmem_cuda_alloc(ctypes.byref(out), size, device, stream, flags)
    return status, out.value or 0
"""


def run_with_fake_cuda(code: str, paths: dict[str, Path], env: dict[str, str] | None = None) -> str:
    """Runs ``code`` after the prelude in a fresh Python; it must print OK."""
    script = PRELUDE.format(paths={k: str(v) for k, v in paths.items()}) + textwrap.dedent(code)
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env=full_env)
    if proc.returncode != 0 or "OK" not in proc.stdout.splitlines():
        raise AssertionError(f"fake-CUDA script failed (rc={proc.returncode})\n--- stdout\n"
                             f"{proc.stdout}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc.stdout
