"""A Fleet-only gateway: SuperNodes reach the SuperLink's Fleet API through it, and nothing else.

Flower 1.41 serves its Fleet API (what SuperNodes call), Control API (``flwr run``, ``flwr supernode
register``: no login in open-source Flower) and Runtime API (the ServerApp's) on one port with one TLS
configuration, so a network on which nodes can reach the SuperLink is a network on which they can start
runs. This gateway terminates TLS with its own certificate, forwards only ``POST /v1/fleet/<method>``
(the requests Flower's SuperNode makes; its signed node-authentication headers pass unchanged) to the
SuperLink over TLS, verified against the federation's CA, and answers 403 to every other request. The
SuperLink itself then listens on a loopback the nodes cannot reach (``docker/compose.yaml``: inside its
container's network namespace, shared with the ServerApp, this gateway and the deployer's tools only).

    python -m fed_ser.deployment.gateway --listen 0.0.0.0:9443 --upstream 127.0.0.1:8000 \\
        --certfile gateway.pem --keyfile gateway.key --ca ca.crt
"""

from __future__ import annotations

import argparse
import re
import ssl

import httpx

#: the only requests forwarded: Flower's Fleet API methods (``flwr/supernode/fleet_http_client.py``)
FLEET_PATH = re.compile(r"/v1/fleet/[a-z][a-z-]*")
#: per-connection headers, never forwarded (RFC 9110 section 7.6.1), and those the gateway sets itself
_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
        "transfer-encoding", "upgrade", "host", "content-length"}


def allowed(method: str, path: str, query: bytes = b"") -> bool:
    """Whether the gateway forwards this request: a POST to one Fleet API method, nothing more."""
    return method == "POST" and FLEET_PATH.fullmatch(path) is not None and not query


class FleetGateway:
    """The gateway as an ASGI application (served by uvicorn with TLS: :func:`main`)."""

    def __init__(self, upstream: str, ca: str | None) -> None:
        self.upstream = f"https://{upstream}" if ca else f"http://{upstream}"
        self.verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca) if ca else False
        self.client: httpx.AsyncClient | None = None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._forward(scope, receive, send)

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.client = httpx.AsyncClient(verify=self.verify, timeout=httpx.Timeout(60.0, read=None))
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.client is not None:
                    await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _forward(self, scope, receive, send) -> None:
        if not allowed(scope["method"], scope["path"], scope.get("query_string", b"")):
            await _respond(send, 403, b"this gateway serves the Fleet API only\n")
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"] if k.decode("latin-1").lower() not in _HOP]
        if self.client is None:
            self.client = httpx.AsyncClient(verify=self.verify, timeout=httpx.Timeout(60.0, read=None))
        request = self.client.build_request("POST", self.upstream + scope["path"], content=body, headers=headers)
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            await _respond(send, 502, f"the SuperLink did not answer ({type(exc).__name__})\n".encode())
            return
        try:
            out = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers.multi_items() if k.lower() not in _HOP]
            await send({"type": "http.response.start", "status": response.status_code, "headers": out})
            async for chunk in response.aiter_raw():  # as sent: content-encoding untouched
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()


async def _respond(send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fed_ser.deployment.gateway", description=__doc__.splitlines()[0])
    p.add_argument("--listen", required=True, help="HOST:PORT the nodes connect to")
    p.add_argument("--upstream", required=True, help="the SuperLink's HOST:PORT")
    p.add_argument("--certfile", required=True, help="the gateway's TLS certificate (signed by the federation's CA)")
    p.add_argument("--keyfile", required=True)
    p.add_argument("--ca", required=True, help="the CA the SuperLink's certificate is checked against")
    a = p.parse_args(argv)
    import uvicorn  # the server loads only where the gateway runs

    host, _, port = a.listen.rpartition(":")
    uvicorn.run(FleetGateway(a.upstream, a.ca), host=host, port=int(port), ssl_certfile=a.certfile, ssl_keyfile=a.keyfile,
                log_level="warning", access_log=False, lifespan="on")


if __name__ == "__main__":
    main()
