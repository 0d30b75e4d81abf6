"""Runs last (file name order): the host looks exactly as it did before the suite."""
import json
import os
import subprocess
import sys

from conftest import HOST

HERE = os.path.dirname(os.path.abspath(__file__))


def test_host_state_unchanged_by_the_whole_suite():
    net, mnt = HOST["net"], HOST["mnt"]
    now = subprocess.run(
        ["nsenter", f"--net=/proc/self/fd/{net}", f"--mount=/proc/self/fd/{mnt}",
         sys.executable, os.path.join(HERE, "host_state.py")],
        pass_fds=(net, mnt), capture_output=True, text=True, check=True).stdout
    assert json.loads(now) == HOST["before"]
