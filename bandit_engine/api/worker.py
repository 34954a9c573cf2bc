"""The gunicorn worker ``bandit-engine serve`` runs: gunicorn's sync worker, except that the
requests gunicorn itself refuses (a garbled request line, a header line over 8 KiB, an invalid
header name, an unsupported transfer coding, ...) are answered in the API's JSON error shape,
not with gunicorn's HTML page. Those never reach Flask, so the app's error handlers cannot.

gunicorn keeps deciding the status and logging the refusal: its page is rendered into a buffer,
and its status line and message are sent back as ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import html
import json
import re
from typing import Any

from gunicorn import util
from gunicorn.workers.sync import SyncWorker

_MESSAGE = re.compile(rb"</h1>\s*(.*?)\s*</body>", re.S)


class _Page:
    """Stands in for the client socket while gunicorn writes its error page."""

    def __init__(self) -> None:
        self.data = b""

    def gettimeout(self) -> float:
        return 0.0

    def sendall(self, data: bytes) -> None:
        self.data += data


def json_error(page: bytes) -> bytes:
    """gunicorn's HTML error response as a JSON one: same status, ``code`` from the reason.

    >>> raw = (b"HTTP/1.1 431 Request Header Fields Too Large\\r\\nContent-Type: text/html\\r\\n\\r\\n"
    ...        b"<html><body><h1><p>Request Header Fields Too Large</p></h1>\\n"
    ...        b"Error parsing headers: &#x27;limit request headers fields&#x27;\\n</body></html>")
    >>> print(json_error(raw).decode().replace("\\r", ""))
    HTTP/1.1 431 Request Header Fields Too Large
    Connection: close
    Content-Type: application/json
    Content-Length: 155
    <BLANKLINE>
    {"error": {"code": "request_header_fields_too_large", "message": "Request Header Fields Too Large: Error parsing headers: 'limit request headers fields'"}}
    """
    status_line = page.split(b"\r\n", 1)[0].decode("latin-1")
    _, status, reason = (status_line.split(" ", 2) + ["", ""])[:3]
    if not status.isdigit():
        status, reason = "500", "Internal Server Error"
    found = _MESSAGE.search(page)
    detail = html.unescape(found.group(1).decode("latin-1")) if found else ""
    message = f"{reason}: {detail}" if detail else reason
    code = re.sub(r"[^a-z0-9]+", "_", reason.lower()).strip("_") or "error"
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


class JsonErrorWorker(SyncWorker):  # type: ignore[misc]
    """gunicorn's sync worker with JSON error pages (see the module's docstring)."""

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        page = _Page()
        super().handle_error(req, page, addr, exc)  # gunicorn's status, log line and page
        if page.data:
            try:
                util.write_nonblock(client, json_error(page.data))
            except Exception:  # the client went away: nothing to tell it (as gunicorn does)
                self.log.debug("Failed to send error message.")


__all__ = ["JsonErrorWorker", "json_error"]
