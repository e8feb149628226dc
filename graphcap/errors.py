"""User-facing errors: the CLI prints these as one line and exits non-zero, never a traceback."""


class UserError(ValueError):
    """A mistake in what the user asked for (bad path, bad value, unsupported model)."""
