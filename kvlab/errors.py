"""The one exception type kvlab raises for bad input: its message names the problem and the fix."""


class KVLabError(ValueError):
    """A user-facing error: wrong name, invalid config, missing package, bad tensor."""
