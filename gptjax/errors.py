"""The one exception type for mistakes a user can fix.

The CLI turns a UserError into a single `error: ...` line and exit code 2 (no traceback unless
`--debug`); every other exception is a bug in gptjax and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input (config, files, flags) whose message says what to change."""
