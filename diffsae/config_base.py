"""The base of every configuration section: unknown keys refused, values checked on assignment too."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A configuration problem, reported as one line."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
