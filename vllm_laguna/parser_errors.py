"""What the Laguna parsers do when their own code fails on some model output.

Model output is arbitrary text, and a parser bug the tests never reached must not cost a
user the response (an exception here ends the stream or fails the request). So each text
entry point of the two parsers catches its own errors, reports them through
:class:`FailSafe` and falls back to the text unparsed, as content. The first error of a
parser instance (one instance per request) is logged once, with its traceback, on the
``vllm_laguna.parser_errors`` logger; a streaming parser that failed passes every later
delta through as content and logs nothing more. The test suite turns every record of that
logger into a test failure (``tests/conftest.py``), so the fallback hides nothing there.
"""

from __future__ import annotations

import logging

LOGGER_NAME = __name__
logger = logging.getLogger(LOGGER_NAME)


class FailSafe:
    """The error state of one parser instance."""

    def __init__(self, parser: str):
        self.parser = parser
        #: an internal error happened; streaming entry points pass text through from now on
        self.failed = False

    def record(self, entry_point: str) -> None:
        """Call from the ``except`` block of ``entry_point``: logs the first error, with
        its traceback, and marks the instance failed."""
        if not self.failed:
            logger.exception(
                "%s.%s failed on the model output; this request's remaining text is returned "
                "unparsed, as content (please report this with the output)",
                self.parser,
                entry_point,
            )
        self.failed = True
