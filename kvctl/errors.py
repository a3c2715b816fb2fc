"""The exceptions kvctl raises on purpose; anything else is a bug."""

from __future__ import annotations


class KvctlError(Exception):
    """Base class. `exit_code` is what the CLI exits with."""

    exit_code = 1


class ConfigError(KvctlError):
    """The config file is invalid. Holds every problem found, one line each."""

    exit_code = 2

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class UsageError(KvctlError):
    exit_code = 2


class SupervisorError(KvctlError):
    """supervisord could not be started, reached or controlled. `fault` is supervisord's
    fault code (supervisor.xmlrpc.Faults) when it refused a call."""

    def __init__(self, message: str, fault: int | None = None) -> None:
        self.fault = fault
        super().__init__(message)


class NotRunningError(SupervisorError):
    """No supervisord is running for this config."""

    exit_code = 3


class StartupError(KvctlError):
    """A program did not become healthy. `log_tail` holds the last lines of its log."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        self.log_tail = log_tail
        super().__init__(message)


class EngineError(KvctlError):
    """An engine answered an admin call (sleep, wake, ...) with a failure."""


class EngineTimeout(EngineError):
    """An engine admin call did not answer in time."""
