"""Engine exceptions. A backdoor found is a *result* (a verdict), never an exception."""

from __future__ import annotations


class DRMGuardError(Exception):
    """Base of every error the engine raises on purpose; messages say what is wrong and what to do."""


class ConfigError(DRMGuardError, ValueError):
    """A configuration value is out of range or inconsistent."""


class DataError(DRMGuardError, ValueError):
    """A dataset (images/labels) has the wrong shape, dtype, range or contains NaN/Inf."""


class UnsupportedModelError(DRMGuardError):
    """A submitted model cannot be read or does not have the shape we accept (F then one linear layer H)."""


class InspectionError(DRMGuardError):
    """A scan or mitigation could not finish (for example numerical failure)."""


class CancelledError(DRMGuardError):
    """A scan or mitigation was cancelled through its cancel event."""
