"""The web pages under /ui: sign in with a token, then decide gates and watch workflows."""

from __future__ import annotations

from starlette.routing import BaseRoute, Mount

from daemon.web import actions, defactions, defpages, pages, schedactions, schedpages


def routes() -> list[BaseRoute]:
    """One Mount of plain routes, so `request.app` stays the main app."""
    return [
        Mount(
            "/ui",
            routes=[
                *pages.ROUTES,
                *defpages.ROUTES,
                *schedpages.ROUTES,
                *actions.ROUTES,
                *schedactions.ROUTES,  # before defactions: /definitions/{id}/schedules
                *defactions.ROUTES,
                *pages.FALLBACK,
            ],
        )
    ]
