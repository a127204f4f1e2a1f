"""ultraedit.host_allocator: glibc asked to keep freed memory, unless the user chose otherwise."""
import sys

import pytest

from ultraedit.host_allocator import OPT_OUT, keep_freed_memory


class FakeGlibc:
    """Records ``mallopt`` calls; answers ``accept`` (1: glibc took the setting)."""

    def __init__(self, accept=1):
        self.calls, self.accept = [], accept

        def version():
            return b"2.99"

        self.gnu_get_libc_version = version

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return self.accept


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc is Linux's")


@linux_only
def test_asks_glibc_for_no_mmap_and_no_trim():
    libc = FakeGlibc()
    assert keep_freed_memory({}, libc) == "kept freed memory (glibc 2.99)"
    assert libc.calls == [(-4, 0), (-1, 2 ** 31 - 1)]   # M_MMAP_MAX, M_TRIM_THRESHOLD


@linux_only
def test_a_refused_setting_is_reported():
    assert keep_freed_memory({}, FakeGlibc(accept=0)) == "not applied: glibc 2.99 refused mallopt"


@pytest.mark.parametrize("environ, why", [
    ({OPT_OUT: "0"}, f"{OPT_OUT}=0"),
    ({OPT_OUT: "off"}, f"{OPT_OUT}=off"),
    ({"MALLOC_MMAP_THRESHOLD_": "65536"}, "MALLOC_MMAP_THRESHOLD_"),
    ({"MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_TOP_PAD_": "0"},
     "MALLOC_TRIM_THRESHOLD_, MALLOC_TOP_PAD_"),
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"}, "GLIBC_TUNABLES"),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "jemalloc is preloaded"),
    ({"LD_PRELOAD": "libtcmalloc_minimal.so.4"}, "tcmalloc is preloaded"),
])
def test_the_users_choice_is_left_alone(environ, why):
    libc = FakeGlibc()
    said = keep_freed_memory(environ, libc)
    assert said.startswith("not applied: ") and why in said
    assert libc.calls == []


@linux_only
def test_opting_in_explicitly_still_applies():
    libc = FakeGlibc()
    assert keep_freed_memory({OPT_OUT: "1"}, libc).startswith("kept freed memory")
    assert libc.calls


def test_the_process_itself():
    """On this machine: glibc takes the settings, or the reason it was not asked is named."""
    said = keep_freed_memory({})
    assert said.startswith("kept freed memory (glibc ") or said.startswith("not applied: ")
