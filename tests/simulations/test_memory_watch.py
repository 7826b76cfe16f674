"""The scale benchmark's memory watch: per-process roles and their PSS."""

import os
import subprocess
import sys
import time

from bouquet.simulations.bench_scale import MemoryWatch, process_role
from bouquet.simulations.proctools import TAG_VARIABLE


def test_watch_attributes_a_tagged_process_to_its_role():
    tag = f"memory-watch-{os.getpid()}"
    # A process whose command line names the data build, holding ~64 MiB.
    holder = (
        "import sys, time; block = bytearray(64 * 2**20); "
        "block[::4096] = b'x' * len(block[::4096]); time.sleep(30)"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", holder, "bouquet.tasks.data"],
        env={**os.environ, TAG_VARIABLE: tag},
    )
    try:
        deadline = time.monotonic() + 10  # until the forked child has exec'd
        while process_role(child.pid) == "other" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process_role(child.pid) == "data build (child of the ServerApp)"
        with MemoryWatch(tag) as watch:
            deadline = time.monotonic() + 20
            while watch.peak_pss_mb < 64 and time.monotonic() < deadline:
                time.sleep(0.2)
    finally:
        child.kill()
        child.wait()
    role = watch.peak_roles["data build (child of the ServerApp)"]
    assert role["processes"] == 1 and role["pss-mb"] >= 64
    assert watch.role_peaks_mb["data build (child of the ServerApp)"] >= 64
    assert 64 <= watch.peak_pss_mb <= watch.peak_rss_mb + 1
    assert process_role(child.pid) == "gone"
