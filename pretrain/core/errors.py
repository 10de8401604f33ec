"""The one exception type for mistakes a user can make (bad path, bad value, bad shard).

The CLI prints its message as one paragraph and exits with status 2, without a traceback;
every other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake the user can fix; the message names the problem and the fix."""
