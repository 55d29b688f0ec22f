"""The one exception type for mistakes a user can fix; the CLI prints it as one line and exits 2."""


class UserError(Exception):
    """A bad config, path or data set. The message names the key or file and what would be valid."""
