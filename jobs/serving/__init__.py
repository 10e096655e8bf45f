"""``sharecl serve``: a Ray Serve application answering for every task of a tagged version from one model.

``build_app(namespace, redis_url, tag="prod", **options)`` (in ``jobs.serving.app``) returns the
``serve.Application``; ``engine.Engine`` is what each replica runs (usable without Serve);
``model.ServedModel`` the one model a version is installed into; ``requests`` reads request bodies.
"""

from __future__ import annotations

from typing import Any


def build_app(namespace: str, redis_url: str, tag: str = "prod", **options: Any) -> Any:
    """``jobs.serving.app.build_app`` (imported on use: Ray Serve is heavy)."""
    from .app import build_app as build

    return build(namespace, redis_url, tag, **options)


__all__ = ["build_app"]
