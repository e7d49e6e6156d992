"""Errors a user can cause. The CLI prints their message (one sentence) and exits non-zero."""

from __future__ import annotations


class RaysftError(Exception):
    """Base for every error that is the user's to fix; the message is one clear sentence."""

    exit_code = 2


class ConfigError(RaysftError):
    """A config file, key, value or override is wrong."""


class DataError(RaysftError):
    """Input data is missing, unreadable or malformed beyond the allowed share of bad rows."""


class ModelError(RaysftError):
    """A model or tokenizer cannot be found, loaded or used as configured."""


class ClusterError(RaysftError):
    """The Ray cluster cannot be reached or cannot fit the requested resources."""


class CheckpointError(RaysftError):
    """A run folder or checkpoint cannot be used: another run's identity, incomplete files, no space to save."""
