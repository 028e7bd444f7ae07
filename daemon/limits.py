"""Fixed limits on what a client may send or be shown, in one place.

The configurable ones ([server] max_body_bytes, [limits] ...) are in daemon.config; these
do not change with the configuration. Each module that checks one imports it from here.
"""

from __future__ import annotations

MAX_BODY_DEPTH = 64  # nesting of arrays and objects in a request body
MAX_IDEMPOTENCY_KEY = 200  # characters of an Idempotency-Key (API and web forms)
MAX_REASON = 2000  # characters of a decision's reason or comment (kept with the step)
MAX_ERROR = 4000  # characters of an error message kept with a step or a workflow
PRETTY_LIMIT = 20_000  # characters of one JSON value shown on a page
