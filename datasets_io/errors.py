"""Errors a user can act on. The CLI prints them as one message and exits 2 (never a bare traceback)."""


class LauncherError(RuntimeError):
    """A failure the user can act on: bad device, unreadable checkpoint, unreachable tracking server, ..."""
