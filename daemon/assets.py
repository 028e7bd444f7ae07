"""Page templates and static files, read into memory when the daemon starts.

Nothing is read from the package directory after start-up, so reinstalling or
upgrading the package under a running daemon (`pip install` into its venv) cannot
break the pages it serves; the new files take effect at the next start.
"""

from __future__ import annotations

import hashlib
import mimetypes
from importlib import resources
from importlib.abc import Traversable

from jinja2 import DictLoader
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response


def read_files(package: str, folder: str) -> dict[str, bytes]:
    """Every file under `package`/`folder`, by its path relative to the folder."""
    out: dict[str, bytes] = {}

    def walk(node: Traversable, prefix: str) -> None:
        for entry in node.iterdir():
            if entry.is_dir():
                walk(entry, f"{prefix}{entry.name}/")
            elif entry.is_file():
                out[prefix + entry.name] = entry.read_bytes()

    walk(resources.files(package).joinpath(folder), "")
    return out


def template_loader(package: str, folder: str) -> DictLoader:
    """A Jinja2 loader over the package's templates, all read now."""
    return DictLoader({name: data.decode() for name, data in read_files(package, folder).items()})


class StaticFiles:
    """Files served from memory, with an ETag (their hash) for conditional requests."""

    def __init__(self, package: str, folder: str) -> None:
        self.files = read_files(package, folder)
        self.etags = {n: f'"{hashlib.sha256(d).hexdigest()[:16]}"' for n, d in self.files.items()}
        self.version = hashlib.sha256(
            b"".join(self.files[name] for name in sorted(self.files))
        ).hexdigest()[:10]

    async def serve(self, request: Request) -> Response:
        """The file named in the path, or 404."""
        name = request.path_params["name"]
        data = self.files.get(name)
        if data is None:
            return PlainTextResponse("not found", status_code=404)
        headers = {"ETag": self.etags[name], "X-Content-Type-Options": "nosniff"}
        if request.headers.get("if-none-match") == headers["ETag"]:
            return Response(status_code=304, headers=headers)
        media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        return Response(data, media_type=media_type, headers=headers)
