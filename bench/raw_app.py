"""The ceiling for any Python endpoint under the same server: no framework at all. It reads the
body, parses it (orjson) and answers 202 with a body of the API's shape; a GET gets 200. The
benchmark reports the API's accept rate and CPU per request as ratios of this one's.

    uvicorn bench.raw_app:app
"""

import uuid

import orjson
from starlette.types import Receive, Scope, Send


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    if scope["method"] == "POST":
        purchase_id = str(uuid.uuid4())
        payload = orjson.dumps(
            {"purchase_id": purchase_id, **orjson.loads(body), "status": "pending"}
        )
        status, extra = 202, [(b"location", f"/purchases/{purchase_id}".encode())]
    else:
        payload, status, extra = b'{"status": "ok"}', 200, []
    headers = [
        *extra,
        (b"content-length", str(len(payload)).encode()),
        (b"content-type", b"application/json"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
