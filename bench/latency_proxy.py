"""A small HTTP proxy that adds latency to every request: real S3 has 20-50 ms per request, a local moto
server has none, so sequential transfers look as fast as parallel ones until this sits in between.

    python bench/latency_proxy.py --upstream http://127.0.0.1:5000 --port 5001 --latency-ms 30

Point the repository's ``endpoint_url`` at the proxy. With ``--tls`` it speaks HTTPS (a self-signed
certificate for 127.0.0.1, made with the openssl command): pgBackRest's S3 client speaks nothing else
(``repo1-storage-verify-tls=n``); pgdr verifies it (``AWS_CA_BUNDLE`` names the certificate). Every request waits ``latency`` before it is
forwarded (as a far-away server's first byte would). The proxy counts requests and the most it ever had
in flight at once (``stats()``), which the tests use to see that transfers overlap, and stay bounded.
"""

from __future__ import annotations

import argparse
import http.client
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te", "trailer"}


class LatencyProxy:
    def __init__(self, upstream: str, latency: float = 0.03, host: str = "127.0.0.1", port: int = 0,
                 before_forward=None, tls: tuple[str, str] | None = None):
        u = urlsplit(upstream)
        self.upstream = (u.hostname, u.port or 80)
        self.latency = latency
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.requests = 0
        self.by_method: dict[str, int] = {}
        # Tests: called with (method, path) before a request is forwarded (it may block: a request held in
        # flight), and every answered request is recorded, in order, in ``answered`` as (method, path, status).
        self.before_forward = before_forward
        self.answered: list[tuple[str, str, int]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # A response's head and body are two writes: with Nagle's algorithm the body would wait for the
            # client's delayed ACK of the head (40 ms a request, on top of the latency asked for).
            disable_nagle_algorithm = True

            def log_message(self, *args):
                pass

            def _forward(self):
                with proxy.lock:
                    proxy.in_flight += 1
                    proxy.requests += 1
                    proxy.by_method[self.command] = proxy.by_method.get(self.command, 0) + 1
                    proxy.max_in_flight = max(proxy.max_in_flight, proxy.in_flight)
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                    body = self.rfile.read(length) if length else None
                    time.sleep(proxy.latency)
                    if proxy.before_forward is not None:
                        proxy.before_forward(self.command, self.path)
                    conn = http.client.HTTPConnection(*proxy.upstream, timeout=300)
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status, resp.reason)
                    head = self.command == "HEAD"
                    for k, v in resp.getheaders():
                        if k.lower() not in HOP and (head or k.lower() != "content-length"):
                            self.send_header(k, v)
                    if not head:
                        self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                    conn.close()
                    with proxy.lock:
                        proxy.answered.append((self.command, self.path, resp.status))
                finally:
                    with proxy.lock:
                        proxy.in_flight -= 1

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        if tls:  # (certificate, key): each connection's handshake happens in its own thread, on first read
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*tls)
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True, do_handshake_on_connect=False)
        self.url = f"{'https' if tls else 'http'}://{host}:{self.server.server_address[1]}"
        self._thread: threading.Thread | None = None

    def start(self) -> "LatencyProxy":
        self._thread = threading.Thread(target=self.server.serve_forever, name="latency-proxy", daemon=True)
        self._thread.start()
        return self

    def reset(self) -> None:
        with self.lock:
            self.max_in_flight = self.requests = 0
            self.by_method = {}

    def stats(self) -> dict:
        with self.lock:
            return {"requests": self.requests, "max_in_flight": self.max_in_flight, "by_method": dict(self.by_method)}

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def self_signed(directory) -> tuple[str, str]:
    """(certificate, key) files for 127.0.0.1 in ``directory``, valid for a day."""
    cert, key = f"{directory}/proxy-cert.pem", f"{directory}/proxy-key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", key,
                    "-out", cert, "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--latency-ms", type=float, default=30)
    ap.add_argument("--tls", metavar="DIR", help="speak HTTPS, with a self-signed certificate made in DIR")
    args = ap.parse_args()
    p = LatencyProxy(args.upstream, args.latency_ms / 1000, port=args.port,
                     tls=self_signed(args.tls) if args.tls else None)
    print(p.url, flush=True)
    p.server.serve_forever()


if __name__ == "__main__":
    main()
