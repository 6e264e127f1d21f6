"""Test environment: vLLM in-process on the CPU backend, offline, quiet; Hypothesis profiles;
parser internal errors as failures; the parity tests' worst gaps in the summary."""

import logging
import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import contextlib

import pytest
from hypothesis import settings

import harness
from vllm_laguna.parser_errors import LOGGER_NAME

# Hypothesis: "ci" (the default) explores the same cases on every run, so a red run can be
# rerun; "wide" explores new random cases, ten times as many, to look for bugs locally:
#   HYPOTHESIS_PROFILE=wide python -m pytest tests/test_tool_parser.py tests/test_reasoning_parser.py
# (or `--hypothesis-profile wide`). Tests set no max_examples of their own, so both apply.
settings.register_profile("ci", max_examples=60, derandomize=True, database=None, deadline=None)
settings.register_profile("wide", max_examples=600, derandomize=False, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def default_vllm_config():
    """A default VllmConfig set as current, for tests that build vLLM layers directly."""
    from vllm.config import VllmConfig, set_current_vllm_config

    with set_current_vllm_config(VllmConfig()):
        yield


class ParserInternalError(AssertionError):
    """A parser caught an error of its own code (see ``vllm_laguna.parser_errors``)."""


class _ParserErrorWatch(logging.Handler):
    """Turns every record of the parsers' error logger into a test failure, raised where the
    parser logs it (so Hypothesis shrinks to the failing output), unless a test expects it."""

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.unexpected: list[logging.LogRecord] = []
        self.expected: list[logging.LogRecord] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.expected is not None:
            self.expected.append(record)
            return
        self.unexpected.append(record)
        raise ParserInternalError(f"a parser caught an internal error: {record.getMessage()}")

    @contextlib.contextmanager
    def expect(self):
        """Collects the records logged inside the block instead of failing."""
        self.expected = []
        try:
            yield self.expected
        finally:
            self.expected = None


@pytest.fixture(autouse=True)
def parser_errors():
    """Every test fails on a parser's logged internal error; a test that plants one on
    purpose uses ``with parser_errors.expect() as records``."""
    watch = _ParserErrorWatch()
    logger = logging.getLogger(LOGGER_NAME)
    logger.addHandler(watch)
    try:
        yield watch
    finally:
        logger.removeHandler(watch)
    # the raise above may have been caught by the caller of the parser (vLLM's serving code)
    if watch.unexpected:
        pytest.fail(f"{len(watch.unexpected)} parser internal error(s): {watch.unexpected[0].getMessage()}")


def pytest_terminal_summary(terminalreporter):
    """The worst top-5 logprob gap of each parity comparison (``harness.assert_parity``), and
    how far turning each covered feature off moves transformers' own output."""
    sections = [
        (harness.PARITY_GAPS, f"parity: worst top-5 logprob gap per test (bound {harness.LOGPROB_ATOL:g})"),
        (
            harness.FEATURE_EFFECTS,
            f"features: change of transformers' top-5 logprobs when off (at least {harness.FEATURE_EFFECT:g})",
        ),
    ]
    for values, title in sections:
        if values:
            terminalreporter.section(title)
            for test, value in sorted(values.items()):
                terminalreporter.write_line(f"{value:9.2e}  {test}")
