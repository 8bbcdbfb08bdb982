"""fork() while a native thread is inside the recorder must not deadlock the child.

Python callers hold the GIL while inside the recorder, so fork() from Python
can only catch the lock held by a thread without the GIL: the CUDA plugin's
entry points, driven here from a ctypes call (which releases the GIL) with
the host backend, in a subprocess because the backend choice is per process.
"""

import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import ctypes, os, threading, time
    import torchmem, torchmem.cuda
    from torchmem import _native
    torchmem.cuda.set_backend("host")
    p = torchmem.MemoryProfiler(auto_snapshot=False, retention_events=1 << 14)
    _native.set_gpu_recorder(p)
    lib = ctypes.CDLL(torchmem.cuda.plugin_path())
    lib.torchmem_plugin_bench.restype = ctypes.c_uint64
    lib.torchmem_plugin_bench.argtypes = (ctypes.c_uint64,)
    t = threading.Thread(target=lib.torchmem_plugin_bench, args=(3_000_000,))
    t.start()
    time.sleep(0.05)
    hung = 0
    for _ in range(50):
        pid = os.fork()
        if pid == 0:
            p.track_allocation(0xF0000, 7)   # takes the recorder lock
            os._exit(0)
        for _ in range(300):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.01)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            hung += 1
    t.join()
    print("hung", hung)
""")


def test_fork_while_native_thread_records():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-2:] == ["hung", "0"], out.stdout + out.stderr
