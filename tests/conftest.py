"""Test environment: vLLM in-process on the CPU backend, offline, quiet; Hypothesis profiles;
parser internal errors as failures; the parity tests' worst gaps in the summary; the imported
heap frozen out of the garbage collector's reach. Engines size their KV cache through
``harness.engine_kwargs`` (servers: ``serving.py``)."""

import logging
import os


def _share_the_cores_among_workers() -> None:
    """Under pytest-xdist (``-n``, on by default in pyproject.toml), worker ``i`` of ``n``
    runs its torch ops on one thread and its vLLM servers' engines on CPU ``i`` (mod the
    CPUs it may use). Most engine work here is single-threaded Python, so two workers use
    two cores where one process used 1.2 of them; with several OpenMP threads per worker,
    their spinning threads would fight over the same cores. Tests that run a tensor- or
    pipeline-parallel engine bind its ranks themselves."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        return
    cpus = sorted(os.sched_getaffinity(0))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", str(cpus[int(worker.removeprefix("gw")) % len(cpus)]))


_share_the_cores_among_workers()
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import contextlib
import gc

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


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto``: one worker per CPU this process may use, at least 1 and at most 4 (each
    worker holds its own vLLM, transformers and engines in memory; more workers than 4 were
    never measured)."""
    return max(1, min(len(os.sched_getaffinity(0)), 4))


def pytest_collection_finish(session) -> None:
    """Freezes the heap the imports built (torch, transformers, vLLM: ~700k objects) out of
    the garbage collector's reach for the rest of the session.

    vLLM runs a full ``gc.collect()`` seven times an engine (start, KV-cache profiling,
    shutdown), and unfreezes the whole heap at shutdown. Over the imported heap each pass
    takes ~0.5 s on these machines: 3.5 of a tiny engine's 5 s. Frozen, a pass covers only
    what the tests and the engines create since (their cycles are still collected, so an
    engine's memory still comes back at shutdown); vLLM's own freeze and unfreeze become
    no-ops in this process, so that the frozen heap stays frozen. Only the collector's
    reach changes: no test observes what vLLM freezes, and processes that vLLM or a test
    spawns (servers, TP/PP ranks) keep vLLM's behaviour."""
    gc.collect()
    gc.freeze()
    gc.freeze = gc.unfreeze = lambda: None


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


#: the figures the summary prints, by kind and test, gathered from every worker's reports
_FIGURES: dict[str, dict[str, float]] = {"parity_gap": {}, "feature_effect": {}}


@pytest.fixture(autouse=True)
def report_figures(request):
    """Moves what ``harness`` recorded during the test (parity gaps, feature effects) into
    the test's report, which pytest-xdist carries from the worker to the main process."""
    yield
    for kind, recorded in (("parity_gap", harness.PARITY_GAPS), ("feature_effect", harness.FEATURE_EFFECTS)):
        for test, value in recorded.items():
            request.node.user_properties.append((kind, [test, value]))
        recorded.clear()


def pytest_runtest_logreport(report):
    """Gathers the figures of every report (in the main process, those of all workers)."""
    for kind, figure in report.user_properties:
        if kind in _FIGURES:
            test, value = figure
            _FIGURES[kind][test] = max(value, _FIGURES[kind].get(test, 0.0))


def pytest_terminal_summary(terminalreporter):
    """The worst top-5 logprob gap of each parity comparison (``harness.assert_parity``), and
    how far turning each covered feature off moves transformers' own output."""
    sections = [
        ("parity_gap", f"parity: worst top-5 logprob gap per test (bound {harness.LOGPROB_ATOL:g})"),
        (
            "feature_effect",
            f"features: change of transformers' top-5 logprobs when off (at least {harness.FEATURE_EFFECT:g})",
        ),
    ]
    for kind, title in sections:
        if _FIGURES[kind]:
            terminalreporter.section(title)
            for test, value in sorted(_FIGURES[kind].items()):
                terminalreporter.write_line(f"{value:9.2e}  {test}")
