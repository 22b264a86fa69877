"""One writer per output folder: a second process is refused in one line while the first runs,
the first finishes byte-identical, and a killed writer leaves no stale lock."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from typer.testing import CliRunner

from helpers import checkpoint_bytes
from make_tiny_model import make_tiny
from streamq.cli import app
from streamq.errors import OutputError
from streamq.journal import lock, writer_of

ARGS = ["--n-samples", "4", "--seqlen", "32", "--group-size", "64", "--device", "cpu", "--shard-size", "60KB"]


def streamq(*args, env=None, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "streamq", *map(str, args)], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def finished(*args):
    """The command line in this process (the writer it meets is another process)."""
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line(result, match: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("streamq: error:")]
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert len(lines) == 1 and match in lines[0], result.stderr
    return lines[0]


def test_a_second_process_is_refused_while_the_first_runs_and_the_first_finishes_intact(tmp_path):
    """The issue's reproduction: a run of 8 blocks is stopped (SIGSTOP) inside block 1 while it
    holds the folder; a second run, a resume, a run with --overwrite, ppl and convert of it are
    each refused in one line naming the writer; continued, the first run exits 0 with the bytes
    of an uninterrupted run."""
    model = make_tiny(tmp_path / "opt8", "opt", hidden=64, ffn=128, layers=8, seed=5)
    out = tmp_path / "out"
    first = streamq("run", "--model", model, "--output", out, *ARGS, env={"STREAMQ_KILL_AT": "block1:search:SIGSTOP"})
    try:
        _, status = os.waitpid(first.pid, os.WUNTRACED)  # returns once it has stopped itself
        assert os.WIFSTOPPED(status)
        who = writer_of(out)
        assert who is not None and who.pid == first.pid and who.host == socket.gethostname()
        assert who.command.startswith(f"streamq run --model {model} --output {out}")
        busy = f"{out} is being written by streamq pid {first.pid} on {who.host} since "
        line = one_line(finished("run", "--model", model, "--output", out, *ARGS), busy)
        assert line.endswith(f"; wait for it, or stop it and run: streamq resume {out}")
        assert "interrupted run" not in line
        one_line(finished("run", "--model", model, "--output", out, *ARGS, "--overwrite"), busy)
        one_line(finished("resume", out, "--device", "cpu"), busy)
        one_line(finished("ppl", "--model", out, "--device", "cpu"), f"{out} is not finished: it is being written by "
                 f"streamq pid {first.pid}")
        one_line(finished("convert", out, tmp_path / "ct", "--format", "compressed-tensors"), "is not finished")
        assert not (tmp_path / "ct").exists()
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    whole = finished("run", "--model", model, "--output", tmp_path / "whole", *ARGS)
    assert whole.exit_code == 0, whole.output

    assert checkpoint_bytes(out) == checkpoint_bytes(tmp_path / "whole")
    assert writer_of(out) is None


def test_a_killed_writer_leaves_no_stale_lock(tmp_path):
    """The kernel drops the lock with its process: after kill -9 the folder can be taken."""
    (tmp_path / "out").mkdir()
    code = ("import sys; from streamq.journal import lock; lock(sys.argv[1]).acquire(); "
            "print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "out")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    assert writer_of(tmp_path / "out").pid == holder.pid
    with pytest.raises(OutputError, match=f"is being written by streamq pid {holder.pid} on "):
        lock(tmp_path / "out").acquire()
    holder.kill()
    holder.wait()
    assert writer_of(tmp_path / "out") is None
    taken = lock(tmp_path / "out").acquire()
    assert writer_of(tmp_path / "out") is None  # this process's own lock is not another writer
    taken.release()
