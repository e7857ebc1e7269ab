"""Shared test fixtures."""

from __future__ import annotations

import os

import pytest

# The one place a machine declares which sandbox isolation layers it cannot provide (comma-separated,
# e.g. "landlock,seccomp" on a kernel without them). A test that needs a layer missing here FAILS
# with the reason unless the layer is declared; declared layers skip, and say so.
SANDBOX_UNAVAILABLE_ENV = "RR_SANDBOX_UNAVAILABLE_LAYERS"


@pytest.fixture(scope="session")
def sandbox_layers() -> frozenset[str]:
    """The isolation layers the sandbox reports in force on this machine."""
    from rr.tasks.sandbox import run_in_sandbox

    result = run_in_sandbox("x = 1", "assert x == 1")
    assert result.passed, result
    return frozenset(result.layers)


@pytest.fixture(scope="session")
def require_sandbox_layers(sandbox_layers):
    """require_sandbox_layers("seccomp", ...): fail (or skip, if declared unable) when a layer is missing."""
    declared = {name.strip() for name in os.environ.get(SANDBOX_UNAVAILABLE_ENV, "").split(",") if name.strip()}

    def require(*names: str) -> None:
        missing = [name for name in names if name not in sandbox_layers]
        undeclared = [name for name in missing if name not in declared]
        if undeclared:
            pytest.fail(f"sandbox layer(s) {', '.join(undeclared)} not in force on this machine (in force: "
                        f"{', '.join(sorted(sandbox_layers)) or 'none'}); fix the kernel/privileges or declare "
                        f"the machine unable with {SANDBOX_UNAVAILABLE_ENV}={','.join(undeclared)}")
        if missing:
            pytest.skip(f"declared unavailable in {SANDBOX_UNAVAILABLE_ENV}: {', '.join(missing)}")

    return require
