"""What tifffile says while it reads one file, caught and turned into that file's error or warnings.

tifffile reports damaged and inconsistent files through its "tifffile" logger ("invalid page
offset", "corrupted file", "Missing data are zeroed") and a few Python warnings ("reading array
from closed file"), and then often returns what it could read. While protloc reads a file, every
such record and warning is caught here, whatever level the "tifffile" logger was set to, and
none reaches stderr on its own:

- a record at ERROR level, or any message saying that data are missing or zeroed, makes the file
  an error: `FILE: truncated or corrupt TIFF (tifffile: ...)`;
- other records (WARNING level) and Python warnings become the file's warnings, `FILE: ...`, one
  each, repeats dropped; they travel with the image to the main process, which logs them
  (loader workers never print).

Developer-facing warnings (deprecations, unclosed resources) are not about the file and are dropped.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings

from protloc.errors import ProtlocError

_MISSING = re.compile(r"missing|zeroed", re.IGNORECASE)
_PREFIX = re.compile(r"^<tifffile\.[^>]*>\s*")  # tifffile's "<tifffile.TiffFile 'x.tif'> " names the file again
_NOT_ABOUT_THE_FILE = (DeprecationWarning, PendingDeprecationWarning, FutureWarning, ResourceWarning, ImportWarning)
_LONGEST = 300  # characters of tifffile's text quoted in one error line


class TiffMessages:
    """The errors and warnings of one file; `capture()` collects them while the file is read."""

    def __init__(self, path: str):
        self.path = path
        self.errors: dict[str, None] = {}  # ordered sets: a repeated message counts once
        self._warnings: dict[str, None] = {}
        self._ignored: tuple[str, ...] = ()

    def ignore(self, prefix: str) -> None:
        """Drop records whose text, raw or after tifffile's `<tifffile...>` prefix, starts with `prefix`
        (a probe tifffile makes of every file of a kind, or a message about another file)."""
        self._ignored += (prefix,)

    def add(self, text: str, error: bool) -> None:
        said = " ".join(_PREFIX.sub("", text).split())
        if text.startswith(self._ignored) or said.startswith(self._ignored):
            return
        (self.errors if error else self._warnings).setdefault(said, None)

    @property
    def warnings(self) -> list[str]:
        """One line per warning: `FILE: what tifffile said`."""
        return [f"{self.path}: {w} (tifffile)" for w in self._warnings]

    def raise_errors(self) -> None:
        """Raise the file's error if tifffile reported data it could not read."""
        if self.errors:
            said = "; ".join(self.errors)
            said = said if len(said) <= _LONGEST else said[:_LONGEST - 3] + "..."
            raise ProtlocError(f"{self.path}: truncated or corrupt TIFF (tifffile: {said})")

    @contextlib.contextmanager
    def capture(self):
        """Collect tifffile's records and Python warnings raised inside the block."""
        logger = logging.getLogger("tifffile")
        handler = _Collect(self)
        level, propagate = logger.level, logger.propagate
        logger.addHandler(handler)
        logger.propagate = False  # never printed raw by a handler further up
        if logger.getEffectiveLevel() > logging.WARNING:
            logger.setLevel(logging.WARNING)  # whatever a caller set: warnings must be seen
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                yield self
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate
            for w in caught:
                if not issubclass(w.category, _NOT_ABOUT_THE_FILE):
                    self.add(f"{w.category.__name__}: {w.message}", error=False)


class _Collect(logging.Handler):
    def __init__(self, messages: TiffMessages):
        super().__init__(logging.WARNING)
        self.messages = messages

    def emit(self, record):
        text = record.getMessage()
        self.messages.add(text, error=record.levelno >= logging.ERROR or bool(_MISSING.search(text)))
