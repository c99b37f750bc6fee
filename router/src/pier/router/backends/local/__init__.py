"""Local sessions: the pool (`pool`: capacity, eviction, reaping) and how each bridge runs (`runtimes`)."""

from pier.router.backends.local.pool import LocalBackend

__all__ = ["LocalBackend"]
