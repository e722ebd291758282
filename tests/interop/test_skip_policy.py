"""Outside CI the interop tests skip, saying why, only when a tool is truly absent; in CI
(INTEROP_REQUIRED=1, set by .ci/run) the same absence is a failure."""

import pytest

from tests.interop import conftest as interop

MISSING = "no-such-tool-4f9c2b"


def test_a_missing_tool_skips_with_its_reason_outside_ci(monkeypatch):
    monkeypatch.setattr(interop, "REQUIRED", False)
    with pytest.raises(pytest.skip.Exception, match=f"{MISSING} is not installed: needed here"):
        interop.require_tool(MISSING, "needed here")


def test_a_missing_tool_fails_in_ci(monkeypatch):
    monkeypatch.setattr(interop, "REQUIRED", True)
    with pytest.raises(pytest.fail.Exception, match="CI must not skip"):
        interop.require_tool(MISSING, "needed here")


def test_a_present_tool_is_found(monkeypatch):
    monkeypatch.setattr(interop, "REQUIRED", True)
    assert interop.require_tool("sh", "always there").endswith("/sh")
