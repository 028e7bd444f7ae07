"""`stepd serve` wiring that needs no process: the listening socket and the first-start token."""

from __future__ import annotations

import io
import socket
from pathlib import Path

import pytest

from daemon.config import Config
from daemon.service import bind, with_tokens


def test_the_listening_socket_is_tcp_with_nodelay():
    # asyncio sets TCP_NODELAY on accepted sockets only when the protocol says TCP;
    # without it, answers on kept-alive connections wait for the client's delayed ACK.
    sock = bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        sock.close()


def test_bind_reports_a_port_in_use():
    first = bind("127.0.0.1", 0)
    first.listen()
    try:
        with pytest.raises(OSError):
            bind("127.0.0.1", first.getsockname()[1])
    finally:
        first.close()


def test_first_start_token_is_printed_once(tmp_path: Path):
    out = io.StringIO()
    cfg = with_tokens(Config(state_dir=tmp_path, db_path=tmp_path / "s.db"), out=out)
    assert "export TOKEN=stepd_" in out.getvalue()
    assert cfg.tokens[0].name == "admin" and cfg.tokens[0].permissions == ("workflow",)
    again = io.StringIO()
    assert with_tokens(Config(state_dir=tmp_path), out=again).tokens == cfg.tokens
    assert again.getvalue() == ""
