"""Loaded into bare ``mitmdump`` with ``-s``: the one thing the gateway does that the comparison
needs too, the ``server_connect`` address mapping of :mod:`nhi_gateway.addons.routing` (so the
upstream is reached on loopback while URL, Host and SNI stay graph.microsoft.com), plus a ready
file with the bound port. Nothing else: this is the baseline the gateway is measured against.

    mitmdump -q -s bare_mitmdump.py --listen-port 0 \\
        --set nhi_bench_resolve=graph.microsoft.com=127.0.0.1:PORT --set nhi_bench_ready_file=FILE
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Sequence
from pathlib import Path

from mitmproxy import ctx, exceptions

from nhi_gateway.addons.routing import Routing
from nhi_gateway.egress import parse_resolve


class BenchRouting:
    def __init__(self) -> None:
        self.routing = Routing({})
        self._announce: asyncio.Task | None = None

    def load(self, loader) -> None:
        loader.add_option("nhi_bench_resolve", Sequence[str], [],
                          "HOST=ADDR:PORT: connect to ADDR:PORT for HOST, keeping URL, Host and SNI")
        loader.add_option("nhi_bench_ready_file", str | None, None,
                          "write the bound listen address here as JSON once listening")

    def configure(self, updated) -> None:
        if "nhi_bench_resolve" in updated:
            try:
                self.routing = Routing(parse_resolve(list(ctx.options.nhi_bench_resolve)))
            except ValueError as e:
                raise exceptions.OptionsError(str(e)) from e

    def running(self) -> None:
        if ctx.options.nhi_bench_ready_file:
            self._announce = asyncio.get_running_loop().create_task(self._write_ready())

    async def _write_ready(self) -> None:
        proxyserver = ctx.master.addons.get("proxyserver")
        while not proxyserver.listen_addrs():
            await asyncio.sleep(0.02)
        host, port = proxyserver.listen_addrs()[0][:2]
        ready = Path(ctx.options.nhi_bench_ready_file)
        tmp = ready.with_suffix(".tmp")
        tmp.write_text(json.dumps({"host": host, "port": port, "pid": os.getpid()}))
        tmp.replace(ready)

    def server_connect(self, data) -> None:
        self.routing.server_connect(data)


addons = [BenchRouting()]
