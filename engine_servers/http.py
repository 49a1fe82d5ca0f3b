"""JSON over HTTP to an engine server, with the server's own reason on an error (the standard
library's client: no `requests`, no torch). The servers started here use it, and so do the
library's engine clients that reach a server by its URL (`megatron_lora/sync/engines/`)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request


def post(url: str, endpoint: str, body: dict | None = None, timeout: float = 300.0) -> dict:
    """POST `body` as JSON to `url/endpoint`; the JSON answer ({} if empty, `{"text": ...}` if
    not JSON). An HTTP error raises `RuntimeError` with the server's own reason."""
    request = urllib.request.Request(f"{url.rstrip('/')}/{endpoint}",
                                     data=json.dumps(body or {}).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read().decode()
    except urllib.error.HTTPError as error:
        raise RuntimeError(f"POST {url}/{endpoint}: HTTP {error.code}: "
                           f"{error.read().decode(errors='replace')[:2000]}") from None
    try:
        return json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {"text": text}
