"""The plugin's CUDA backends and runtime resolution on a fake CUDA runtime
(tests/_fake_cuda.py): which libcudart is used, the current device a thread
is left with, which errors are cleared, the unifying free stream, peer
access of pools, cacheInfo, and the sync backend's refusal of capture. Each
case runs in a fresh interpreter: the plugin resolves its runtime once."""

from __future__ import annotations

import shutil

import pytest

from _fake_cuda import build_fake_cuda, run_with_fake_cuda


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    if not shutil.which("cc"):
        pytest.skip("no C compiler")
    return build_fake_cuda(tmp_path_factory.mktemp("fakecuda"))


def test_the_runtime_is_the_one_libc10_cuda_links(fake):
    # The fake runtime lives under a directory no name search looks in; only
    # following libc10_cuda.so's own link finds it.
    run_with_fake_cuda(f"""
        desc = tcuda.runtime_description()
        assert desc == {str(fake["cudart"])!r}, desc
        print("OK")
    """, fake)


def test_restoring_the_device_never_creates_a_context_on_gpu_0(fake):
    # A thread that never used CUDA reports device 0 without a context there.
    # Freeing (or allocating) on device 1 switches to 1; switching back would
    # create a context (about 500 MB) on GPU 0.
    run_with_fake_cuda("""
        import threading
        tcuda.set_backend("async")
        status, p = alloc(4096, 1, 0x1000 * 1 + 5)
        assert status == 0
        def fresh_thread():
            rt.fake_clear()
            lib.torchmem_cuda_free(p)
        t = threading.Thread(target=fresh_thread)
        t.start(); t.join()
        sets = [l for l in log() if l.startswith("SetDevice")]
        assert sets == ["SetDevice 1"], log()
        assert rt.fake_ctx(0) == 0, "a context was created on device 0"
        # A thread working on device 0 (a context there) gets it back.
        seen = {}
        def device_0_thread():
            rt.cudaSetDevice(0)
            rt.fake_clear()
            status, r = alloc(64, 1, 0x1005)
            seen["sets"] = [l for l in log() if l.startswith("SetDevice")]
            seen["current"] = rt.fake_current()
            lib.torchmem_cuda_free(r)
        t = threading.Thread(target=device_0_thread)
        t.start(); t.join()
        assert seen == {"sets": ["SetDevice 1", "SetDevice 0"], "current": 0}, seen
        print("OK")
    """, fake)


def test_errors_torch_has_not_checked_are_left_alone(fake):
    run_with_fake_cuda("""
        tcuda.set_backend("async")
        rt.fake_set_pending_error(719)   # a kernel launch of torch's failed, unchecked
        status, p = alloc(4096, 0, 0)
        lib.torchmem_cuda_free(p)
        tcuda.empty_cache(); tcuda.reset_peak(0); tcuda.plugin_stats(0)
        assert not any(l.startswith("GetLastError") for l in log()), log()
        assert ctypes.CDLL(paths["cudart"]).cudaPeekAtLastError() == 719
        # A failure of ours is cleared, and only then.
        rt.fake_set_pending_error(0)
        rt.fake_fail_malloc(2)
        rt.fake_clear()
        status, p = alloc(4096, 0, 0)
        assert status == 1, status
        assert log().count("GetLastError -> 2") == 2, log()
        assert "out of memory" in tcuda.last_message()
        print("OK")
    """, fake)


def test_record_stream_frees_on_a_unifying_stream_across_devices(fake):
    run_with_fake_cuda("""
        tcuda.set_backend("async")
        alloc_stream, copy_stream, other_device_stream = 0x0005, 0x0006, 0x1007
        status, p = alloc(8192, 0, alloc_stream)
        lib.torchmem_cuda_record_stream(p, copy_stream, 0)
        lib.torchmem_cuda_record_stream(p, other_device_stream, 1)
        rt.fake_clear()
        lib.torchmem_cuda_free(p)
        got = [l for l in log() if not l.startswith("SetDevice 0")]
        unifying = [l for l in got if l.startswith("StreamCreate")]
        assert len(unifying) == 1 and "dev=0" in unifying[0], got
        u = unifying[0].split("-> ")[1]
        assert got[1:] == [
            "EventRecord stream=0x5 dev=0", f"StreamWaitEvent stream={u}",
            "EventRecord stream=0x6 dev=0", f"StreamWaitEvent stream={u}",
            "SetDevice 1",  # the other device's stream is recorded on its own device
            "EventRecord stream=0x1007 dev=1", f"StreamWaitEvent stream={u}",
            f"FreeAsync stream={u} dev=0"], got
        # The allocation stream never waited for the others.
        assert not any(l == "StreamWaitEvent stream=0x5" for l in got)
        print("OK")
    """, fake)


def test_a_stream_torch_did_not_give_a_device_for_is_found(fake):
    # torch's C-function interface passes no stream device: the runtime says.
    run_with_fake_cuda("""
        tcuda.set_backend("async")
        status, p = alloc(512, 0, 0x5)
        lib.torchmem_record_stream(p, 0x1009)
        rt.fake_clear()
        lib.torchmem_cuda_free(p)
        assert "EventRecord stream=0x1009 dev=1" in log(), log()
        assert not any("invalid" in l for l in log()), log()
        print("OK")
    """, fake)


def test_peer_access_opens_the_peers_pool(fake):
    run_with_fake_cuda("""
        tcuda.set_backend("async")
        assert lib.torchmem_cuda_enable_peer_access(0, 1) == 0, tcuda.last_message()
        got = log()
        assert "EnablePeerAccess dev=0 peer=1" in got, got
        # Device 0 may read and write device 1's pool (type 1 = device, flags 3 = rw).
        assert "MemPoolSetAccess pool=0x5001 type=1 id=0 flags=3 n=1" in got, got
        print("OK")
    """, fake)


def test_cache_info_adds_the_pools_unused_bytes(fake):
    run_with_fake_cuda("""
        tcuda.set_backend("async")
        status, p = alloc(1 << 20, 0, 0)
        # device free 1 GiB + pool reserved (1 MiB used + 64 MiB) - used 1 MiB
        assert tcuda.largest_free_block(0) == (1 << 30) + (64 << 20), tcuda.largest_free_block(0)
        lib.torchmem_cuda_free(p)
        print("OK")
    """, fake)


def test_the_sync_backend_refuses_capture_and_names_the_alternatives(fake):
    run_with_fake_cuda("""
        tcuda.set_backend("sync")
        assert lib.torchmem_cuda_capture_begin(0) == -1
        msg = tcuda.last_message()
        assert "'sync' CUDA backend" in msg and "gpu_source='tracker'" in msg, msg
        assert "set_backend('async')" in msg, msg
        print("OK")
    """, fake, env={"TORCHMEM_CUDA_BACKEND": "sync"})
