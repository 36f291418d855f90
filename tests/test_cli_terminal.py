"""`moe-edge chat` in a real pseudo-terminal: streaming, Ctrl-C mid-reply, Ctrl-D to leave."""

import os
import signal
import sys
import time
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect", reason="pexpect drives the terminal (the test extra)")

MOE_EDGE = str(Path(sys.executable).parent / "moe-edge")


@pytest.mark.skipif(not os.path.exists(MOE_EDGE), reason="the moe-edge script is not installed")
def test_chat_streams_stops_on_ctrl_c_and_exits_on_ctrl_d(tmp_path):
    env = {**os.environ, "MOE_EDGE_CACHE": str(tmp_path), "TERM": "dumb"}
    # Ctrl-C as in a user's terminal: a job started in the background of a script (as CI
    # may be) inherits SIGINT ignored, and Python keeps an ignored SIGINT ignored
    child = pexpect.spawn(MOE_EDGE, ["chat", "-n", "1500", "--temp", "1.0", "-s", "3"],
                          encoding="utf-8", timeout=120, env=env,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    log = []
    child.logfile_read = type("Log", (), {"write": lambda self, s: log.append(s), "flush": lambda self: None})()
    child.expect(">>> ")
    assert "tiny base model" in child.before and "expert cache 32/64" in child.before  # the demo, offloaded
    child.sendline("Write a function that adds two numbers.")
    child.expect("\n")  # the echoed line
    chunks, started = [], time.monotonic()
    while len(chunks) < 8 and time.monotonic() - started < 60:
        chunks.append(child.read_nonblocking(4096, timeout=60))
    assert len(chunks) >= 8 and ">>> " not in "".join(chunks)  # arriving piece by piece, still going
    child.sendintr()
    child.expect(r"\[stopped\]")
    child.expect(r"\[prompt \d+ tok.*experts \d+% hit.*\]")
    child.expect(">>> ")
    child.sendline("/show cache")
    child.expect(">>> ")
    assert "hits" in child.before and "misses" in child.before
    child.sendintr()  # at an empty prompt: a hint, not an exit
    child.expect("Use Ctrl-D or /bye to exit")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, "".join(log)
    assert "Traceback" not in "".join(log)
