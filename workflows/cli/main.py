"""The ``wf`` program: quiet native output, run the CLI, and turn every error into one line
with its exit code (2: bad input or settings; 1: a failed run or a bug; ``--debug`` adds the
traceback)."""

from __future__ import annotations

import os
import sys


def main() -> None:
    """Entry point: every error is one line on stderr with its exit code."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from workflows.settings import worker_env

    os.environ.update(worker_env())
    import typer

    # typer vendors click: its usage errors are typer._click's (no public name for them).
    from typer._click.exceptions import ClickException, NoArgsIsHelpError

    from workflows.cli.app import app, state
    from workflows.cli.console import err, out, say

    try:
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except NoArgsIsHelpError as error:
        out.print(error.ctx.get_help() if error.ctx else "", markup=False)
        sys.exit(0)
    except ClickException as error:  # a wrong option or argument: one line, as the others
        command = error.ctx.command_path if getattr(error, "ctx", None) else "wf"
        command = command.replace("python -m workflows.cli", "wf")
        say("error", f"{error.format_message()} (see {command} --help)")
        sys.exit(error.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        err.print("interrupted")
        sys.exit(130)
    except Exception as error:  # the one place errors become messages
        from workflows.cli.console import show_error

        sys.exit(show_error(error, state.debug))
