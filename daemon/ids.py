"""Ids in URL paths: `{name:id}` routes take digits and never fail to convert.

Starlette's `int` convertor calls int() on any run of digits, which raises for more
than 4,300 of them (Python's guard against quadratic conversions): a 500. An id
longer than any SQLite integer converts to MAX_ID + 1 instead, which every route
treats as an id that cannot exist (404).
"""

from __future__ import annotations

from starlette.convertors import Convertor, register_url_convertor

MAX_ID = (1 << 63) - 1  # SQLite integers; larger ids cannot exist
_MAX_DIGITS = len(str(MAX_ID))


class IdConvertor(Convertor[int]):
    regex = "[0-9]+"

    def convert(self, value: str) -> int:
        digits = value.lstrip("0")
        if len(digits) > _MAX_DIGITS:
            return MAX_ID + 1
        return int(digits or "0")

    def to_string(self, value: int) -> str:
        return str(int(value))


register_url_convertor("id", IdConvertor())
