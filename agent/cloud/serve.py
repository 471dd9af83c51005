"""``car-agent serve``: the owner's cloud service -- ingest, store and HTTP API in one process.

:class:`Service` wires them: the store is opened (schema migrated), the ingest subscribes and
reads the retained state, and uvicorn serves :func:`agent.cloud.api.create_app` on
``http.listen`` (HTTPS with ``http.cert``/``http.key``). A non-loopback listen address without
TLS is refused unless ``http.insecure: true`` (TLS ends at a proxy in front).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn

from agent.cloud.api import create_app
from agent.cloud.config import CloudConfig, load_cloud_config
from agent.cloud.ingest import Ingest
from agent.cloud.metrics import ServeMetrics
from agent.cloud.owners import OwnerDirectory, RateLimiter
from agent.cloud.store import Store, open_store
from agent.errors import ConfigError
from agent.uplink.tlsdiag import _short

log = logging.getLogger("car_agent.serve")

#: Longest a refresh waits for the car's snapshot (issue 9: at most 5 s).
REFRESH_TIMEOUT_S = 5.0


def check_listen(config: CloudConfig) -> None:
    """Refuse plain HTTP on a non-loopback address (one line naming the keys)."""
    http = config.http
    if not http.loopback and http.cert is None and not http.insecure:
        raise ConfigError(f"{config.file}: http.listen: {http.host}:{http.port} is not a loopback "
                          "address: set http.cert and http.key (HTTPS), or http.insecure: true "
                          "if TLS ends at a proxy in front")
    for name, path in (("cert", http.cert), ("key", http.key)):
        if path is not None and not path.is_file():
            raise ConfigError(f"{config.file}: http.{name}: {path}: file not found")
    if http.cert is not None:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(http.cert,
                                                                               http.key)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ConfigError(f"{config.file}: http.cert/key: {http.cert}, {http.key}: cannot "
                              f"load the certificate and key, or they do not match "
                              f"({_short(exc)})") from None


class Service:
    """One ``serve`` instance. :meth:`start` returns once HTTP listens (``port`` is then the
    bound port, also for ``http.listen: 127.0.0.1:0``); :meth:`stop` ends everything."""

    def __init__(self, config: CloudConfig, *, name: str | None = None) -> None:
        check_listen(config)
        self.config = config
        self.metrics = ServeMetrics()
        self.owners = OwnerDirectory(config.owners)
        self.store: Store = open_store(config.store.url, config.file.parent,
                                       config.store.history)
        try:
            self.ingest = Ingest(config, self.store, self.metrics, name=name)
        except BaseException:
            self.store.close()
            raise
        limiter = RateLimiter(config.http.rate, config.http.burst)
        app = create_app(self.store, self.owners, limiter, self.metrics,
                         refresh=lambda vid: self.ingest.refresh(vid, REFRESH_TIMEOUT_S),
                         healthy=self._health)
        http = config.http
        self.server = uvicorn.Server(uvicorn.Config(
            # log_config=None: uvicorn's lines go through our logging (format, journald).
            app, host=http.host, port=http.port, log_level="warning", access_log=False,
            log_config=None,
            ssl_certfile=str(http.cert) if http.cert else None,
            ssl_keyfile=str(http.key) if http.key else None,
            lifespan="off", http="h11", h11_max_incomplete_event_size=16 * 1024))
        self.server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self._thread: threading.Thread | None = None
        self._http_error: str | None = None
        self.port = http.port

    def _health(self) -> dict[str, Any]:
        return {"broker": self.ingest.watcher.connected.is_set(),
                "retained_read": self.ingest.ready.is_set()}

    def start(self, timeout: float = 15.0) -> "Service":
        try:
            self._try_bind()
        except ConfigError:
            self.stop()
            raise
        self.ingest.start()
        self._thread = threading.Thread(target=self._serve_http, name="serve-http", daemon=True)
        self._thread.start()
        if not _wait(lambda: self.server.started or not self._thread.is_alive(), timeout) \
                or not self.server.started:
            self.stop()
            why = self._http_error or "in use, or not an address of this host"
            raise ConfigError(f"{self.config.file}: http.listen: cannot listen on "
                              f"{self.config.http.host}:{self.config.http.port} ({why})")
        sockets = [s for server in self.server.servers for s in server.sockets]
        if sockets:
            self.port = sockets[0].getsockname()[1]
        return self

    def _try_bind(self) -> None:
        """A port in use or a foreign address as one line, before uvicorn logs its own."""
        http = self.config.http
        try:
            infos = socket.getaddrinfo(http.host, http.port, type=socket.SOCK_STREAM)
            with socket.socket(infos[0][0], socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(infos[0][4])
        except OSError as exc:
            raise ConfigError(f"{self.config.file}: http.listen: cannot listen on "
                              f"{http.host}:{http.port} ({(exc.strerror or str(exc)).lower()})"
                              ) from None

    def _serve_http(self) -> None:
        try:
            asyncio.run(self.server.serve())
        except OSError as exc:   # bind failed: start() reports it as one line
            self._http_error = exc.strerror or str(exc)
        except SystemExit:      # uvicorn's own exit after logging why
            self._http_error = None

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self.ingest.stop()
        self.store.close()

    @property
    def url(self) -> str:
        scheme = "https" if self.config.http.cert else "http"
        host = self.config.http.host
        return f"{scheme}://{f'[{host}]' if ':' in host else host}:{self.port}"


def _wait(condition: Any, timeout: float) -> bool:
    """Look at ``condition()`` every 50 ms until it holds (True) or ``timeout`` s pass."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def serve_main(config_path: str | Path) -> int:
    """``car-agent serve``: runs until SIGINT/SIGTERM; 0 on a clean stop."""
    config = load_cloud_config(config_path)
    service = Service(config)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        service.start()
        if config.owners is None:
            log.warning("%s: no owners file (owners:): every /v1 request is refused (401); add "
                        "one with car-agent owner add", config.file)
        log.info("serving %s (store %s, owners %s)%s", service.url,
                    config.store.url.split("@")[-1], config.owners,
                    f", share group {config.share_group}" if config.share_group else "")
        while not stop.wait(1.0):
            if service.owners.problem:
                log.error("%s (keeping the owners read before)", service.owners.problem)
                service.owners.problem = None
            if service._thread is not None and not service._thread.is_alive():
                log.error("the HTTP server stopped")
                return 1
    finally:
        service.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0
