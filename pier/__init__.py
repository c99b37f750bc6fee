"""Pier: per-tenant MCP stdio servers over HTTP.

Subpackages live in the repository's component folders: ``pier.sidecar`` (``sidecar/``),
``pier.router`` (``router/``) and ``pier.operator`` (``operator/``).
"""

__version__ = "0.1.0"
