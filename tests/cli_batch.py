"""Run many ``python -m <module> <args>`` commands, each in a fork of one warm interpreter.

    python tests/cli_batch.py commands.json

``commands.json`` lists ``{"module", "args", "cwd", "stderr"}``; each command runs in a child
forked from this process after it imported torch, Lightning and Hydra (seconds that a fresh
interpreter would spend again for every command), exactly as ``python -m`` runs a module
(``runpy.run_module(..., run_name="__main__")``), with its file descriptor 2 on the file
``stderr``. A fork starts from this process's state, not from the previous command's, so
commands cannot leak caches or handlers into each other. Prints the exit codes as JSON.
Used by the tests of bad command-line input, which need many short commands.
"""

import json
import os
import runpy
import sys
import traceback

PRELOADED = ("torch", "lightning", "hydra", "omegaconf", "matplotlib.pyplot", "flows.cli",
             "flows.lit.module", "flows.data.datamodules", "flows.runs")


def exit_code(error: SystemExit) -> int:
    """What the interpreter would exit with: a message is printed and gives 1."""
    if error.code is None or isinstance(error.code, int):
        return error.code or 0
    print(error.code, file=sys.stderr)
    return 1


def run_in_fork(module: str, args: list[str], cwd: str, stderr: str) -> int:
    pid = os.fork()
    if pid:
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    code = 1
    try:
        os.dup2(os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        os.chdir(cwd)
        sys.argv = [module, *args]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as error:
        code = exit_code(error)
    except BaseException:  # noqa: BLE001 - reported as the interpreter would
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    for name in PRELOADED:
        __import__(name)
    with open(sys.argv[1]) as file:
        commands = json.load(file)
    print(json.dumps([run_in_fork(**command) for command in commands]))


if __name__ == "__main__":
    main()
