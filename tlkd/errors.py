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


class BadImageError(TlkdError):
    """An image file that cannot be read. DataLoader workers re-raise an exception in the main
    process as ``type(message_with_traceback)``; keep only the original one-line message."""

    def __init__(self, message: str) -> None:
        if "Original Traceback" in message:
            last = [line for line in message.splitlines() if line.strip()][-1]
            message = last.split("BadImageError: ", 1)[-1]
        super().__init__(message)


STOP_EXIT_CODES = (130, 143)  # a run stopped by SIGINT / SIGTERM (tlkd.engine.trainer)


def is_stop(err: BaseException) -> bool:
    """Whether ``err`` is a stop signal's (Ctrl-C, SIGTERM): loops over runs end there."""
    return isinstance(err, KeyboardInterrupt) or getattr(err, "exit_code", None) in STOP_EXIT_CODES


def first_line(err: BaseException, limit: int = 300) -> str:
    """A third-party exception's first line (onnxruntime, MLflow, SQLAlchemy print pages),
    for a one-line error message."""
    lines = str(err).strip().splitlines()
    return (lines[0] if lines else type(err).__name__)[:limit]
