"""Run ``python -m <module> <args>`` commands, each in a fork of one warm interpreter.

    python tests/warm_cli.py   # then one JSON command per line on stdin

Each line ``{"module", "args", "cwd", "stdout", "stderr"}`` runs in a child forked from this
process after it imported torch, Lightning and Hydra (seconds that a fresh interpreter would
spend again for every command), exactly as ``python -m`` runs a module
(``runpy.run_module(..., run_name="__main__")``), with file descriptors 1 and 2 on the files
``stdout`` and ``stderr``; the child's exit code comes back as one line. A fork starts from this
process's state, not from the previous command's, so commands cannot leak caches, handlers or
seeds into each other. The tests' ``run_cli`` uses it; ``tests/test_train.py`` checks it
against fresh interpreters.
"""

import atexit
import json
import os
import runpy
import sys
import traceback

PRELOADED = ("torch", "lightning", "hydra", "omegaconf", "matplotlib.pyplot", "flows.cli",
             "flows.lit.module", "flows.lit.callbacks", "flows.data.datamodules", "flows.runs")


def exit_code(error: SystemExit) -> int:
    """What the interpreter would exit with: a message is printed and gives 1."""
    if error.code is None or isinstance(error.code, int):
        return error.code or 0
    print(error.code, file=sys.stderr)
    return 1


def run_in_fork(module: str, args: list[str], cwd: str, stdout: str, stderr: str) -> int:
    pid = os.fork()
    if pid:
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    code = 1
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        os.dup2(os.open(stdout, flags), 1)
        os.dup2(os.open(stderr, flags), 2)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.chdir(cwd)
        sys.argv = [module, *args]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as error:
        code = exit_code(error)
    except BaseException:  # noqa: BLE001 - reported as the interpreter would
        traceback.print_exc()
    finally:
        atexit._run_exitfuncs()  # what interpreter shutdown runs (logging's flush, ...)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    for name in PRELOADED:
        __import__(name)
    for line in sys.stdin:
        print(run_in_fork(**json.loads(line)), flush=True)


if __name__ == "__main__":
    main()
