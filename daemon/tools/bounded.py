"""Reading an HTTP response body with a bound on its size, decoded bytes included.

The body is streamed and decoded here, never by httpx: httpx's decoders inflate a
whole network chunk at once, and 64 KiB of gzip can inflate to 64 MiB. Each zlib
step here yields at most STEP bytes, and reading stops as soon as either the bytes
received or the bytes decoded pass the limit. Reading yields to the event loop at
least every YIELD_S: a body sent in a million one-byte chunks arrives without the
loop ever waiting, and would otherwise hold it for seconds.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Iterator, Sequence

import httpx

ACCEPT_ENCODING = "gzip, deflate"  # what can be decoded with a bound; sent by default
STEP = 65536  # most bytes one decoding step yields
MAX_ENCODINGS = 4  # "gzip, gzip, ..." layers accepted
YIELD_S = 0.002  # longest the reader runs without letting the event loop serve others


class BodyTooLarge(Exception):
    """The body passed the limit; reading stopped there."""


class UnsupportedEncoding(Exception):
    """A Content-Encoding this reader cannot decode with a bound (br, zstd, compress...)."""


class _Inflate:
    """A zlib decoder (gzip, zlib or raw deflate) that yields at most STEP bytes a step."""

    def __init__(self, encoding: str) -> None:
        self.gzip = encoding in ("gzip", "x-gzip")
        self.raw_fallback = not self.gzip  # "deflate" is zlib-wrapped, but some send it raw
        self.d = self._new()

    def _new(self) -> zlib._Decompress:
        return zlib.decompressobj(zlib.MAX_WBITS | 16 if self.gzip else zlib.MAX_WBITS)

    def feed(self, data: bytes) -> Iterator[bytes]:
        while True:
            try:
                out = self.d.decompress(data, STEP)
            except zlib.error:
                if not self.raw_fallback:
                    raise
                self.raw_fallback = False
                self.d = zlib.decompressobj(-zlib.MAX_WBITS)
                continue
            self.raw_fallback = False
            if out:
                yield out
            data = self.d.unconsumed_tail
            if self.gzip and self.d.eof and self.d.unused_data[:2] == b"\x1f\x8b":
                data, self.d = self.d.unused_data, self._new()  # the next gzip member
            elif not data and len(out) < STEP:
                return  # all input consumed and no output pending (data after the end
                # of a gzip stream that starts no new member is ignored, as by zlib)


def decoders(content_encoding: Sequence[str]) -> list[_Inflate]:
    """Decoders for a Content-Encoding list, outermost (last applied) first."""
    names = [e.strip().lower() for e in content_encoding if e.strip()]
    names = [n for n in names if n != "identity"]
    if len(names) > MAX_ENCODINGS:
        raise UnsupportedEncoding(f"{len(names)} layers of Content-Encoding")
    for name in names:
        if name not in ("gzip", "x-gzip", "deflate"):
            raise UnsupportedEncoding(f"Content-Encoding '{name}' is not supported "
                                      "(identity, gzip and deflate are)")  # fmt: skip
    return [_Inflate(n) for n in reversed(names)]


def _through(layers: Sequence[_Inflate], chunk: bytes) -> Iterator[bytes]:
    if not layers:
        yield chunk
        return
    for out in layers[0].feed(chunk):
        yield from _through(layers[1:], out)


async def read(response: httpx.Response, limit: int) -> bytes:
    """The decoded body of a streamed response; BodyTooLarge past `limit` bytes, received
    or decoded, UnsupportedEncoding for what cannot be bounded, zlib.error when corrupt."""
    layers = decoders(response.headers.get_list("content-encoding", split_commas=True))
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"Content-Length is {declared}")
    body, received = bytearray(), 0
    turn_ends = time.perf_counter() + YIELD_S
    async for raw in response.aiter_raw():
        received += len(raw)
        if received > limit:
            raise BodyTooLarge(f"more than {limit} bytes received")
        for piece in _through(layers, raw):
            if len(body) + len(piece) > limit:
                raise BodyTooLarge(f"more than {limit} bytes once decoded")
            body += piece
        if time.perf_counter() > turn_ends:
            await asyncio.sleep(0)  # the loop's turn (and the tool's timeout's)
            turn_ends = time.perf_counter() + YIELD_S
    return bytes(body)
