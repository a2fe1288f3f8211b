"""How every command-line entry point fails: one line, a documented exit code, no traceback.

Library code raises; it never prints or exits. A tool's ``main`` is wrapped once::

    @cli_main("export")
    def main(argv=None) -> int: ...          # returns 0, or 1 when a check it ran failed

and whatever escapes it becomes **one line** on stderr, ``<prog>: error: <what>, <where>; fix:
<fix>`` (the message is the exception's, which names the file / key / tensor), and an exit code:

====  =====================================================================================
0     success
1     a check ran and failed (``verify_export`` FAIL, ``launch.py check`` problems, a
      non-finite training loss)
2     bad input: ``ValueError`` (``RecipeError``, ``CheckpointError``, JSON / YAML / UTF-8
      decoding errors are ValueErrors) or ``OSError`` (missing file, read-only / full /
      file-size-limited filesystem, no permission): the line names the path and the errno
3     internal error (anything else: a bug, or a failure of a library below us); the line says
      so and how to get the stack
130   interrupted (Ctrl-C)
====  =====================================================================================

The stack is printed only with ``--debug`` on the command line (before any ``--``) or
``INT4_QAT_DEBUG=1`` in the environment.

Under ``torchrun`` (``python -m int4_qat.train``) each rank runs the wrapper: rank 0 prints the
line, the other ranks stay quiet, and every rank writes the line to ``TORCHELASTIC_ERROR_FILE``
(torch/distributed/elastic/multiprocessing/errors/error_handler.py reads it), so torchrun's
single failure report names our message instead of asking for a traceback; ranks other than 0
wait a moment before exiting so that rank 0 (the one that printed) is the reported root cause.
When torchrun itself has ``TORCHELASTIC_ERROR_FILE`` set, the agent copies the root-cause file
there, with our exit code as ``errorCode``: ``tools/launch.py train`` uses that to end with the
same one line and exit code (:func:`read_torchelastic_error`).

Process groups the command created (Megatron's, and the default torch.distributed group) are
destroyed before it returns, on success and on failure, while the interpreter is fully alive.
A gloo group left to interpreter exit is freed during finalization; a worker thread that still
holds the last collective's work then needs the GIL to free its tensors, cannot get it, and the
process aborts ("terminate called without an active exception", SIGABRT) after the command
succeeded. (For the destroy to free the group, nothing may keep it alive: see
:func:`int4_qat.parallel.init_process_group`.) Before both fixes 11 of 72 ``tools/export.py
--nproc 2`` runs aborted so; after, 0 of 30. Groups that existed before the call (a caller's own
job) are left alone.
"""
from __future__ import annotations

import argparse
import errno
import functools
import json
import math
import os
import sys
import time
import traceback
from typing import Callable, Sequence

__all__ = [
    "EXIT_OK", "EXIT_CHECK_FAILED", "EXIT_BAD_INPUT", "EXIT_INTERNAL", "EXIT_INTERRUPTED",
    "DEBUG_ENV", "cli_main", "run_cli", "classify", "one_line", "describe_os_error",
    "positive_int", "positive_float", "add_debug_flag", "debug_requested", "read_torchelastic_error",
]

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130
DEBUG_ENV = "INT4_QAT_DEBUG"
MAX_CHARS = 2000          # an error line is bounded whatever the input (e.g. a YAML alias bomb)

# What to do about a filesystem error, by errno (the message already names the path).
_OS_FIX = {
    errno.ENOSPC: "free space on that filesystem or write somewhere else",
    errno.EDQUOT: "free space within your quota or write somewhere else",
    errno.EFBIG: "the file-size limit was hit (ulimit -f, or the filesystem's maximum file size): "
                 "raise it or write to another filesystem",
    errno.EROFS: "the filesystem is read-only: choose a writable location",
    errno.EACCES: "no permission: choose a location you can write, or fix its permissions",
    errno.EPERM: "operation not permitted (immutable file, or no permission): choose another "
                 "location, or fix its attributes / permissions",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a directory: check the path",
    errno.EISDIR: "the path is a directory where a file was expected: check the path",
    errno.EEXIST: "the path already exists: choose another one",
    errno.ENAMETOOLONG: "use a shorter path",
    errno.EMFILE: "too many open files: raise ulimit -n",
}


def one_line(msg: object, limit: int = MAX_CHARS) -> str:
    """``msg`` on one line: lines stripped and joined with ``"; "`` (a header ending in ``:``
    is joined with a space), cut at ``limit`` characters."""
    parts = [ln.strip() for ln in str(msg).splitlines() if ln.strip()]
    out = ""
    for p in parts:
        out += p if not out else ((" " if out.endswith(":") else "; ") + p)
    if len(out) > limit:
        out = out[:limit] + f"... ({len(out) - limit} more characters; --debug shows all)"
    return out


def describe_os_error(e: OSError) -> str:
    """``<strerror> (<ERRNO>): <path>[ -> <path2>]; fix: <what to do>``."""
    what = e.strerror or str(e) or type(e).__name__
    name = errno.errorcode.get(e.errno or -1, "")
    where = "" if e.filename is None else f": {e.filename}"
    if getattr(e, "filename2", None) is not None:
        where += f" -> {e.filename2}"
    fix = _OS_FIX.get(e.errno or -1)
    return f"{what}{f' ({name})' if name else ''}{where}" + (f"; fix: {fix}" if fix else "")


def classify(e: BaseException) -> tuple[int, str]:
    """``(exit code, one-line message)`` for an exception that escaped a tool's main."""
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted"
    if isinstance(e, OSError):
        return EXIT_BAD_INPUT, one_line(describe_os_error(e))
    if isinstance(e, ValueError):
        return EXIT_BAD_INPUT, one_line(e)
    if isinstance(e, ArithmeticError):     # FloatingPointError: a non-finite loss
        return EXIT_CHECK_FAILED, one_line(e)
    cause = e.__cause__ or e.__context__
    if isinstance(cause, OSError):         # a library wrapped a filesystem error (e.g. torch DCP)
        return EXIT_BAD_INPUT, one_line(describe_os_error(cause))
    return EXIT_INTERNAL, one_line(f"internal error: {type(e).__name__}: {e}; this is a bug or an "
                                   f"unexpected failure below int4_qat: rerun with --debug (or "
                                   f"{DEBUG_ENV}=1) for the stack and report it")


def debug_requested(argv: Sequence[str] | None) -> bool:
    """``--debug`` among the arguments (before any ``--``), or ``INT4_QAT_DEBUG=1``."""
    if os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no"):
        return True
    args = list(sys.argv[1:] if argv is None else argv)
    if "--" in args:
        args = args[:args.index("--")]
    return "--debug" in args


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help=f"on error, print the Python stack too (or set {DEBUG_ENV}=1)")


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _write_torchelastic_error(line: str, code: int) -> None:
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    # The layout torch's ErrorHandler.record_exception writes; "py_callstack" is what the agent
    # prints as the failure's "traceback" (error_handler.py / errors/__init__.py ProcessFailure).
    data = {"message": {"message": line, "extraInfo": {
        "py_callstack": f"{line} (exit {code}; rerun with --debug for the stack)",
        "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:
        pass


def read_torchelastic_error(path: str) -> tuple[int, str] | None:
    """``(exit code, line)`` from the error file torchrun copied for its root-cause worker, when
    that worker failed through :func:`run_cli`; ``None`` otherwise (file absent or foreign)."""
    try:
        with open(path) as f:
            data = json.load(f)
        msg = data["message"]
        line, code = msg["message"], int(msg.get("errorCode", data.get("errorCode", 1)))
        if not isinstance(line, str) or "(exit " not in msg["extraInfo"]["py_callstack"]:
            return None
        return code, line
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_cli(fn: Callable[[], int | None], prog: str, argv: Sequence[str] | None = None,
            distributed: bool = False) -> int:
    """Call ``fn()``; return its exit code, or print one line and return the code of the exception.

    ``distributed``: running under torchrun (see the module docstring for what changes)."""
    debug = debug_requested(argv)
    had_group = _process_group_initialized()
    try:
        rc = fn()
        return EXIT_OK if rc is None else int(rc)
    except SystemExit:
        raise
    except BaseException as e:    # noqa: BLE001 - the whole point: nothing escapes as a stack
        code, msg = classify(e)
        line = f"{prog}: error: {msg}"
        rank = _rank() if distributed else 0
        if debug and rank == 0:
            traceback.print_exc()
        if rank == 0:
            print(line, file=sys.stderr, flush=True)
        if distributed:
            if rank != 0 and code != EXIT_INTERRUPTED:
                # torchrun's root cause is the failure with the earliest error-file timestamp
                # (whole seconds): let rank 0, the one that printed, be it
                time.sleep(2.0)
            _write_torchelastic_error(line, code)
        return code
    finally:
        if not had_group:
            _destroy_process_groups()


def _process_group_initialized() -> bool:
    dist = sys.modules.get("torch.distributed")      # not imported yet: no group can exist
    return dist is not None and dist.is_available() and dist.is_initialized()


def _destroy_process_groups() -> None:
    """Destroy the groups a command created, while the interpreter is fully alive (module
    docstring). Megatron's first (they are subgroups of the default group), then the default."""
    if not _process_group_initialized():
        return
    ps = sys.modules.get("megatron.core.parallel_state")
    try:
        if ps is not None and ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        sys.modules["torch.distributed"].destroy_process_group()
    except Exception as e:   # noqa: BLE001 - the command's own result stands; say what was left
        print(f"warning: could not destroy the process group: {type(e).__name__}: {e}", file=sys.stderr)


def cli_main(prog: str) -> Callable:
    """Decorator for ``main(argv=None) -> int``: see :func:`run_cli` (``distributed`` when the
    command runs as a torchrun worker, e.g. ``tools/export.py --nproc N``)."""
    def deco(fn: Callable) -> Callable[..., int]:
        @functools.wraps(fn)
        def wrapped(argv: Sequence[str] | None = None) -> int:
            distributed = "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1
            return run_cli(lambda: fn(argv), prog, argv, distributed=distributed)
        return wrapped
    return deco


# ------------------------------------------------------------------ argparse value types
def _bounded(text: str, convert: Callable, expected: str, bound: str, ok: Callable):
    """``convert(text)``, refused with argparse's one-line message unless ``ok`` holds."""
    try:
        v = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(v):
        raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
    return v


def positive_int(text: str) -> int:
    """argparse ``type=``: an integer >= 1 (``--workers 0`` is refused, not silently odd)."""
    return _bounded(text, int, "an integer >= 1", ">= 1", lambda v: v >= 1)


def positive_float(text: str) -> float:
    """argparse ``type=``: a finite float > 0."""
    return _bounded(text, float, "a number > 0", "a finite number > 0", lambda v: math.isfinite(v) and v > 0)
