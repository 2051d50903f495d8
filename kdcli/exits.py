"""How a command ends: its exit code, and the one `error:` line every failure prints (see docs/errors.md)."""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
import traceback

import typer
from rich.console import Console

from kdcli import distributed
from kdcli.errors import Interrupted, KdcliError, QualityGateFailed, SignalReceived, clip, is_out_of_memory, printable

err_console = Console(stderr=True)


def report_error(message: str, then: str = "") -> None:
    """One `error:` line: control characters escaped (a newline in a file name cannot split it), cut to 400
    characters (an error never echoes a whole input); `then` (the command that resumes) is kept whole after it."""
    err_console.print(clip(f"error: {printable(message)}") + printable(then), markup=False, highlight=False,
                      soft_wrap=True)


def _one_line(err: KdcliError) -> str:
    message = str(err)
    if "Original Traceback" in message:  # raised in a DataLoader worker: torch re-raises it wrapped in a traceback
        message = message.strip().splitlines()[-1].partition(": ")[2]
    return message


def _usage_error(err: typer.TyperException) -> str:
    """click's three-line usage box as one line: what is wrong; the usage; where the help is."""
    message = " ".join(err.format_message().split()).rstrip(".")
    message = message[:1].lower() + message[1:]
    ctx = getattr(err, "ctx", None)
    if ctx is None:
        return message
    usage = " ".join(ctx.get_usage().split()).removeprefix("Usage: ")
    return f"{message}; usage: {usage} (see {ctx.command_path} --help)"


def _resume_hint(args: list[str]) -> str:
    """'; resume with: kdcli ... --resume' (without --force), unless the command is too long to repeat, or has
    no --resume (demo runs its three trainings afresh)."""
    if next((arg for arg in args if not arg.startswith("-")), None) not in ("distill", "train", "ablate"):
        return ""
    again = shlex.join(["kdcli", *[a for a in args if a != "--force"], *([] if "--resume" in args else ["--resume"])])
    return f"; resume with: {again}" if len(again) <= 600 else "; resume: rerun the same command with --resume"


class _Signals:
    """For the whole command, SIGINT and SIGTERM raise SignalReceived wherever it is (training installs its own
    graceful handlers on top); a signal thus always ends the command through main's handlers, with one line."""

    def __enter__(self) -> _Signals:
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._raise)
        return self

    @staticmethod
    def _raise(signum, _frame) -> None:
        raise SignalReceived(signum)

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def run(app: typer.Typer, argv: list[str] | None = None) -> int:
    """Run the app and map how it ended to an exit code (0 ok, 1 gate failed, 2 bad input, 3 internal error,
    130 interrupted), each failure as one `error:` line on stderr. Under torchrun every process ends with the
    same line and exit code: the first failed rank's (kdcli/distributed.py)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("KDCLI_DEBUG") == "1"
    args = [a for a in args if a != "--debug"]
    if hasattr(sys.stdout, "reconfigure"):  # a path that is not UTF-8 is printed escaped, never a crash
        sys.stdout.reconfigure(errors="backslashreplace")
    with _Signals():
        try:
            distributed.join(next((a for a in args if not a.startswith("-")), None))
        except KdcliError as err:
            report_error(str(err))
            return err.exit_code
        try:
            with distributed.quiet():
                message, then, code = _ending(app, args, debug)
            message, then, code = distributed.conclude((message, then, code), failed=code != 0)
            if message is not None:
                report_error(message, then)
            return code
        finally:
            distributed.leave()


def _ending(app: typer.Typer, args: list[str], debug: bool) -> tuple[str | None, str, int]:
    """(the error line or None, what follows it kept whole, the exit code) of running the command."""
    try:
        code = app(args=args, prog_name="kdcli", standalone_mode=False)
        code = code if isinstance(code, int) else 0
        return ("interrupted", "", code) if code == 130 else (None, "", code)  # typer turned ^C into Exit(130)
    except KdcliError as err:
        if debug:
            traceback.print_exc()
        return _one_line(err), "", err.exit_code
    except QualityGateFailed as err:
        return str(err), "", err.exit_code
    except Interrupted as err:
        return str(err), _resume_hint(args) if err.resumable else "", err.exit_code
    except distributed.PeerFailed as err:  # another process failed first: end as it did
        return err.ending
    except typer.Exit as err:
        return None, "", err.exit_code
    except typer.TyperException as err:  # click's usage errors: unknown command or option, missing argument, ...
        if type(err).__name__ == "NoArgsIsHelpError":  # `kdcli` or `kdcli recipe` alone: the help
            print(err.ctx.get_help())
            return None, "", 0
        return _usage_error(err), "", 2
    except (SignalReceived, KeyboardInterrupt, typer.Abort) as err:
        name = signal.Signals(err.signum).name if isinstance(err, SignalReceived) else "SIGINT"
        return f"interrupted ({name})", "", 130
    except Exception as err:  # a bug in kdcli, not the user's input
        if debug:
            traceback.print_exc()
        if is_out_of_memory(err):
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            return (f"out of memory ({reason}); lower data.batch_size or data.image_size (eval: --batch-size), "
                    "or use a machine with more memory"), "", 2
        return f"internal error: {type(err).__name__}: {err} (rerun with --debug for the traceback, and report it)", "", 3
