"""The one exception type for mistakes a user can make (config, data, resources).

The CLI prints its message as a single line and exits with code 2, without a traceback;
anything else that escapes is a bug in orchestrator and keeps its traceback.
"""

import sys

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem in the user's config, data or cluster: the message says what, where and what to do."""


def report_user_error(message: str) -> int:
    """A CLI's end on a UserError: `error: <message>` on stderr, no traceback. Returns EXIT_USER_ERROR, the code to
    exit with (a main() returns it, or the caller passes it to sys.exit)."""
    sys.stderr.write(f"error: {message}\n")
    return EXIT_USER_ERROR
