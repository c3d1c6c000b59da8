"""The one exception a user can cause.

Library code raises `ProtlocError` for problems with the user's input (a file that is not a
TIFF, a channel-count mismatch, a labels file that names no image). The CLI turns it into one
line on stderr and exit code 1; anything else is a bug and keeps its traceback under --debug.
"""


class ProtlocError(Exception):
    """An error in the user's input or environment, with a message that names the culprit."""
