"""nginx in front of several orchestrator hosts, for tests and benchmarks: deploy/nginx.conf's proxy settings,
with the upstream addresses, the listening port and every path of nginx's own made local.

    front = Nginx.start_front(workdir, [server_a.url, server_b.url])   # front.url reaches both
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
from pathlib import Path
from urllib.parse import urlsplit

from .processes import ROOT, HarnessError, Process, free_port, wait_until

DEPLOY_CONF = ROOT / "deploy" / "nginx.conf"


class NginxUnavailable(RuntimeError):
    """No nginx binary here (install Debian's `nginx`)."""


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if found is None:
        raise NginxUnavailable("nginx was not found: install it (apt-get install nginx)")
    return found


def site_config(upstreams: list[str], port: int) -> str:
    """deploy/nginx.conf with these upstream URLs and this port: the shipped proxy settings, tested as shipped."""
    conf = DEPLOY_CONF.read_text()
    servers = "".join(f"    server {urlsplit(url).netloc} max_fails=1 fail_timeout=5s;\n" for url in upstreams)
    conf, count = re.subn(r"(upstream orchestrator \{\n)(?:    server [^\n]*\n)+", lambda m: m.group(1) + servers,
                          conf)
    conf, listens = re.subn(r"listen 80;", f"listen 127.0.0.1:{port};", conf)
    if count != 1 or listens != 1:
        raise HarnessError("deploy/nginx.conf no longer has the upstream block and listen line this harness edits")
    return conf


class Nginx(Process):
    """An nginx master of our own (``daemon off``), its config, logs and temporary files in ``workdir``."""

    @classmethod
    def start_front(cls, workdir: Path, upstreams: list[str], port: int = 0) -> Nginx:
        port = port or free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        for sub in ("logs", "tmp"):
            (workdir / sub).mkdir(exist_ok=True)
        # As root, the workers would drop to `nobody`, which cannot read under pytest's private temp dirs.
        user = "user root;\n" if os.geteuid() == 0 else ""
        (workdir / "nginx.conf").write_text(
            f"{user}worker_processes 1;\npid {workdir}/nginx.pid;\nerror_log {workdir}/logs/error.log info;\n"
            "events { worker_connections 4096; }\n"
            "http {\n"
            f"    access_log {workdir}/logs/access.log;\n"
            f"    client_body_temp_path {workdir}/tmp/body;\n    proxy_temp_path {workdir}/tmp/proxy;\n"
            f"    fastcgi_temp_path {workdir}/tmp/fastcgi;\n    uwsgi_temp_path {workdir}/tmp/uwsgi;\n"
            f"    scgi_temp_path {workdir}/tmp/scgi;\n"
            + site_config(upstreams, port) + "}\n")
        front = cls("nginx", [nginx_binary(), "-p", str(workdir), "-c", str(workdir / "nginx.conf"),
                              "-g", "daemon off;"], workdir / "nginx.log")
        front.port = port
        Process.start(front)
        wait_until(front._listening, 20, 0.05, f"nginx on port {port} (log: {workdir}/logs/error.log)")
        return front

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _listening(self) -> bool:
        self.check_alive()
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGQUIT, timeout: float | None = 10) -> int | None:
        # SIGQUIT is nginx's graceful stop; SIGTERM its fast one.
        return super().stop(sig, timeout)
