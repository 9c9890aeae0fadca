"""The two kinds of failure the CLI reports as one line instead of a traceback."""


class TlkdError(Exception):
    """A failure while running (exit code 1): missing weights, unreadable files, ..."""

    exit_code = 1


class ConfigError(TlkdError):
    """The experiment cannot run as written (exit code 2). The message names the key."""

    exit_code = 2

    def __init__(self, key: str | None, message: str) -> None:
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)
