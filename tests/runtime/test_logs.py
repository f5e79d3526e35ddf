"""llm-neo's log handler writes to the stderr of the moment, never to a stream closed since."""

from __future__ import annotations

import io
import logging
import sys

from llm_neo.runtime.logs import setup_logging


def test_lines_go_to_the_current_stderr_after_the_first_one_is_closed(monkeypatch):
    first, second = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    try:
        monkeypatch.setattr(sys, "stderr", first)
        setup_logging()
        logging.getLogger("llm_neo.test").info("one")
        first.close()  # as pytest closes a test's capture, or an application its redirect
        monkeypatch.setattr(sys, "stderr", second)
        logging.getLogger("llm_neo.test").info("two")  # a plain StreamHandler fails here
    finally:
        for handler in [h for h in root.handlers if h not in before[0]]:
            root.removeHandler(handler)
        root.setLevel(before[1])
    assert second.getvalue().strip().endswith("two")
    assert "one" not in second.getvalue()
