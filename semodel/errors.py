"""The one exception type that the CLI turns into a one-line message and a non-zero exit."""


class SemodelError(Exception):
    """A problem with the user's input (config, data, checkpoint, image) that needs no traceback."""
