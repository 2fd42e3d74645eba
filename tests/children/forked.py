"""Run a piece of work in a forked child whose output goes to a log file, as the fault laboratories do: the parent
has imported the heavy modules once, every scenario starts from that state, and a kill (from the scenario or
from outside) ends only the child.

The child's exit is what the command line's would be: the work's exit code, a SystemExit's code, a Ctrl-C ending
the process by SIGINT (after its traceback, as the interpreter does), any other exception a traceback and 99.
"""
from __future__ import annotations

import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path


def run_forked(log: Path, work: Callable[[], int]) -> int:
    """``work()`` in a forked child writing to ``log``; its exit code (negative: the signal that ended it)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            code = work()
        except SystemExit as e:
            code = e.code
        except KeyboardInterrupt:
            traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        except BaseException:
            traceback.print_exc()
            code = 99
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code if isinstance(code, int) else 1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)
