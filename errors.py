"""
A user's mistake is said in one line; a traceback is for a bug in srpo. Every check of what a user
gives (options, data files, model files, the run's folder, a checkpoint to resume) raises UserError
with a message that names the option, or the file with its line and field. The scripts a user runs
catch it once, at the top, in exit_on_user_error: `srpo: error: ...` on stderr, exit status 2 (as
argparse does for a bad option). SRPO_DEBUG=1 in the environment shows the traceback as well.
"""
import os
import sys
import traceback


class UserError(ValueError):
    """Something the user gave is wrong (not a bug in srpo). A ValueError, as the checks raised before."""


class MissingFile(UserError, FileNotFoundError):
    """A file or folder the user named is not there."""


def one_line(e: BaseException) -> str:
    """The message on one line: a message that spans lines (a memory plan, a validation report) joined."""
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip())


def exit_on_user_error(prog: str, fn, *args, **kwargs) -> int:
    """fn(*args, **kwargs), returning its exit status; a UserError instead returns 2 after one line
    `prog: error: ...` on stderr. Under torchrun every rank raises the same error (common.raise_together):
    rank 0 alone says it. Any other exception propagates with its traceback: that is a bug."""
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":
            if os.environ.get("SRPO_DEBUG", "") not in ("", "0"):
                traceback.print_exc()
            print(f"{prog}: error: {one_line(e)}", file=sys.stderr, flush=True)
        return 2
