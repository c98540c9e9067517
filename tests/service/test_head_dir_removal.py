"""Removing a local Ray head's temp dir (`service.local_ray._remove_head_dir`) while processes
still write into it: a crash-soak CI run was left with a head's empty session folders, which a
dying Ray process had made again while the folder was being removed."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from service.local_ray import _remove_head_dir, pids_naming

# Makes `<dir>/session/logs/old` again and again, as a process that logs into the dir does.
WRITER = """
import os, sys, time
folder = sys.argv[1]
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    try:
        os.makedirs(os.path.join(folder, "session", "logs", "old"), exist_ok=True)
    except OSError:  # the folder itself is gone (reached through a link that now dangles)
        pass
    time.sleep(0.005)
"""


def test_a_writer_that_names_the_dir_is_stopped_and_the_dir_removed():
    folder = tempfile.mkdtemp(prefix="topkray-test-")
    writer = subprocess.Popen([sys.executable, "-c", WRITER, folder, "60"])
    try:
        while not Path(folder, "session", "logs", "old").exists():
            time.sleep(0.05)
        _remove_head_dir(folder)
        assert not Path(folder).exists()
        assert writer.wait(timeout=20) != 0  # killed, not finished
        assert pids_naming(folder) == []
    finally:
        writer.kill()


# Makes new folders in <dir> every millisecond, for argv[2] seconds, ignoring failures.
BUSY_WRITER = """
import os, sys, time
folder = sys.argv[1]
end = time.monotonic() + float(sys.argv[2])
n = 0
while time.monotonic() < end:
    n += 1
    try:
        os.mkdir(os.path.join(folder, f"worker-{n}"))
    except OSError:  # the folder itself is gone (reached through a link that now dangles)
        pass
    time.sleep(0.001)
"""


def test_a_writer_that_does_not_name_the_dir_is_outlasted():
    """A process whose command line does not name the dir cannot be found to be killed; it
    adds folders while the dir's 3,000 files are being removed (so one removal leaves the dir
    behind), for 2 s, and the removal ends with the dir gone."""
    folder = tempfile.mkdtemp(prefix="topkray-test-")
    for i in range(3000):
        Path(folder, f"log-{i}.txt").write_text("x")
    link = Path(tempfile.mkdtemp(prefix="head-link-")) / "head"
    link.symlink_to(folder)  # the writer reaches the dir through a path that does not name it
    writer = subprocess.Popen([sys.executable, "-c", BUSY_WRITER, str(link), "2"])
    try:
        while not Path(folder, "worker-1").exists():
            time.sleep(0.01)
        _remove_head_dir(folder)
        assert writer.wait(timeout=20) == 0  # not killed: it ran its course
        assert not Path(folder).exists()
    finally:
        writer.kill()
        link.unlink(missing_ok=True)
        link.parent.rmdir()
