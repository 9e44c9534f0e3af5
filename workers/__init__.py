"""popvault workers: scheduled, parallel polling with Celery and Redis.

``celery -A workers worker`` / ``celery -A workers beat`` find :data:`app` here. It is
imported lazily, because building it reads the configuration: the Redis building blocks
(:mod:`workers.locks`, :mod:`workers.limits`, :mod:`workers.schedule`, ...) import without one.
"""

from __future__ import annotations

from typing import Any

__all__ = ["app"]


def __getattr__(name: str) -> Any:
    if name == "app":
        from workers.app import app

        return app
    raise AttributeError(f"module 'workers' has no attribute {name!r}")
