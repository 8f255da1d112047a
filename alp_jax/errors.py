"""The library's user-facing error types, importable without any optional dependency.

``ConfigError`` lives here rather than in ``alp_jax.config`` because pure-function
modules (``losses``, ``data``) raise it, and they must import where ``ml_collections``
is absent (e.g. the GPU benchmark image).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config or command-line value is invalid; the message names it and what is valid.

    The programs (``cli.run_program``) print the message alone, not a traceback.
    """
