"""The pytest plugin: markers pass and fail the right synthetic tests."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest

from torchmem.pytest_plugin import parse_size

pytest_plugins = ["pytester"]

# Once pyproject registers the pytest11 entry point, pytest loads the plugin
# by itself (and -p would register it twice).
_LOADED = any(ep.value == "torchmem.pytest_plugin" for ep in entry_points(group="pytest11"))
ARGS = [] if _LOADED else ["-p", "torchmem.pytest_plugin"]

SYNTHETIC = '''
import gc
import pytest
import torch

CACHE = []
GLOBAL = torch.ones(100)


@pytest.fixture
def weights():
    return torch.ones(1000)


@pytest.mark.torchmem_limit("1 MiB")
def test_small_passes():
    x = torch.zeros(1000)


@pytest.mark.torchmem_limit("1 MiB")
def test_big_fails():
    x = torch.zeros(512 * 1024)  # 2 MiB


@pytest.mark.torchmem_limit(8192, allocation_type="CPU")
def test_peak_exactly_at_limit_passes():
    x = torch.zeros(1024)
    for _ in range(10):
        x = torch.zeros(1024)  # the new one exists before the old one dies: peak 8192


@pytest.mark.torchmem_limit(8191, allocation_type="CPU")
def test_peak_one_byte_over_fails():
    x = torch.zeros(1024)
    for _ in range(10):
        x = torch.zeros(1024)


@pytest.mark.torchmem_limit("1 KiB", allocation_type="GPU")
def test_other_type_is_not_counted():
    x = torch.zeros(100000)


@pytest.mark.torchmem_no_leaks
def test_leak_fails():
    CACHE.append(torch.ones(256))  # 1024 bytes kept


@pytest.mark.torchmem_no_leaks(tolerance_bytes="1 KiB")
def test_leak_within_tolerance_passes():
    CACHE.append(torch.ones(256))


@pytest.mark.torchmem_no_leaks(tolerance=1024)  # the deprecated name
def test_leak_within_the_old_tolerance_passes():
    CACHE.append(torch.ones(256))


@pytest.mark.torchmem_no_leaks
def test_clean_passes():
    x = torch.ones(256)
    y = (x * 2).sum()


@pytest.mark.torchmem_no_leaks
def test_globals_and_fixtures_are_not_leaks(weights):
    y = GLOBAL + weights[:100]


@pytest.mark.torchmem_no_leaks
def test_cycles_are_collected_first():
    a = {"t": torch.ones(512)}
    a["self"] = a


def test_unmarked_is_untouched():
    CACHE.append(torch.ones(10))
'''


def test_markers_pass_and_fail_the_right_tests(pytester):
    pytester.makepyfile(test_synthetic=SYNTHETIC)
    result = pytester.runpytest(*ARGS, "-p", "no:cacheprovider")
    outcomes = {r.nodeid.split("::")[-1]: r.outcome
                for r in result.reprec.getreports("pytest_runtest_logreport") if r.when == "call"}
    assert outcomes == {
        "test_small_passes": "passed",
        "test_big_fails": "failed",
        "test_peak_exactly_at_limit_passes": "passed",
        "test_peak_one_byte_over_fails": "failed",
        "test_other_type_is_not_counted": "passed",
        "test_leak_fails": "failed",
        "test_leak_within_tolerance_passes": "passed",
        "test_leak_within_the_old_tolerance_passes": "passed",
        "test_clean_passes": "passed",
        "test_globals_and_fixtures_are_not_leaks": "passed",
        "test_cycles_are_collected_first": "passed",
        "test_unmarked_is_untouched": "passed",
    }
    out = result.stdout.str()
    assert "peak memory 2.00 MiB (2097152 bytes) exceeds the limit 1.00 MiB (1048576 bytes)" in out
    assert "peak CPU memory 8.00 KiB (8192 bytes) exceeds the limit 8.00 KiB (8191 bytes)" in out
    assert "the test left 1.00 KiB (1024 bytes) in 1 allocations live" in out
    line = SYNTHETIC.lstrip("\n").splitlines().index("    CACHE.append(torch.ones(256))  # 1024 bytes kept") + 1
    assert f"test_synthetic.py:{line} in test_leak_fails [CPU, host]" in out  # the top site
    assert "pluggy/_callers.py" not in out and "_pytest/python.py" not in out  # stacks end at the test
    assert "torchmem_no_leaks(tolerance=...) is deprecated" in out


def test_record_every_test_with_the_option(pytester):
    pytester.makepyfile(test_two='''
import torch
def test_a():
    x = torch.zeros(1 << 18)
def test_b():
    pass
''')
    result = pytester.runpytest_subprocess(*ARGS, "--torchmem", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*torchmem: tests by peak memory*",
                                 "*1.00 MiB peak*test_two.py::test_a*",
                                 "*0 B peak*test_two.py::test_b*"])


def test_a_bad_limit_is_a_usage_error(pytester):
    pytester.makepyfile(test_bad='''
import pytest
@pytest.mark.torchmem_limit("lots")
def test_x():
    pass
''')
    result = pytester.runpytest(*ARGS, "-p", "no:cacheprovider")
    assert "cannot read 'lots' as a size" in result.stdout.str()


def test_parse_size_is_a_deprecated_alias_of_parse_bytes():
    with pytest.warns(DeprecationWarning, match="torchmem.units.parse_bytes"):
        assert parse_size("2 MB") == 2_000_000
