"""The one exception type for mistakes a user can make (config, data, resources).

The CLI prints its message as a single line and exits with code 2, without a traceback;
anything else that escapes is a bug in orchestrator and keeps its traceback.
"""

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem in the user's config, data or cluster: the message says what, where and what to do."""
