#!/usr/bin/env python
"""What the header limits cost: CPU per request through uvicorn's httptools protocol and through
HeaderLimitedProtocol, on one kept-alive connection in memory (no sockets, a trivial app), so
that the protocol's own work is most of what is measured.

    .venv/bin/python scripts/header_limit_cost.py [requests per round, default 20000]
    .venv/bin/python scripts/header_limit_cost.py --instructions [N, default 2000]

A GET with a browser's headers and a bearer token, and a POST with a JSON body in the same read,
each request whole in one read. CPU time is compared and rounds alternate, so a busy machine
blurs the figures less; the minimum over rounds is the least disturbed.

`--instructions` counts instructions instead, which a busy machine does not change: for each
protocol and request it runs this script's loop alone (`--loop`) under valgrind's callgrind for
N and for 2N requests, in fresh processes, and reports the difference of the two totals over N:
instructions per request, everything the process does for it (the protocol, httptools, the
trivial app, uvloop's scheduling), with start-up and the first requests' warm-up cancelled out.
Needs valgrind; takes a minute or two. Repeated runs agree to within a few hundred instructions.
"""

import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import uvicorn
import uvloop
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.platform.server.protocol import HeaderLimitedProtocol  # noqa: E402

TOKEN = b"eyJhbGciOiJIUzI1NiJ9." + b"x" * 120 + b"." + b"y" * 43
HEADERS = (
    b"Host: api.example.com\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64) Firefox/120.0\r\n"
    b"Accept: application/json\r\nAccept-Language: en-GB,en;q=0.5\r\n"
    b"Accept-Encoding: gzip, deflate, br\r\nAuthorization: Bearer " + TOKEN + b"\r\n"
    b"Origin: https://app.example.com\r\nConnection: keep-alive\r\n"
)
BODY = b'{"title": "Buy milk", "description": "two litres, semi-skimmed"}'
REQUESTS = {
    "GET": b"GET /api/user-1/tasks/42 HTTP/1.1\r\n" + HEADERS + b"\r\n",
    "POST": b"POST /api/user-1/tasks HTTP/1.1\r\n"
    + HEADERS
    + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(BODY)
    + BODY,
}


class Transport(asyncio.Transport):
    def write(self, data: Any) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5555), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def app(scope: Any, receive: Any, send: Any) -> None:
    if scope["method"] == "POST":
        await receive()
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    )
    await send({"type": "http.response.body", "body": b"ok"})


async def cpu_per_request(protocol_class: type[HttpToolsProtocol], request: bytes, n: int) -> float:
    config = uvicorn.Config(app, log_config=None)
    config.load()
    protocol = protocol_class(config, ServerState(), {}, asyncio.get_running_loop())
    protocol.connection_made(Transport())
    started = time.process_time()
    for _ in range(n):
        protocol.data_received(request)
        while not protocol.cycle.response_complete:
            await asyncio.sleep(0)
    elapsed = time.process_time() - started
    protocol.connection_lost(None)
    return elapsed / n * 1e6


async def main(n: int) -> None:
    for name, request in REQUESTS.items():
        figures: dict[str, list[float]] = {"uvicorn": [], "limited": []}
        for _ in range(7):
            figures["uvicorn"].append(await cpu_per_request(HttpToolsProtocol, request, n))
            figures["limited"].append(await cpu_per_request(HeaderLimitedProtocol, request, n))
        plain, limited = min(figures["uvicorn"]), min(figures["limited"])
        print(
            f"{name} ({len(request)} bytes): uvicorn {plain:.2f} µs, HeaderLimitedProtocol "
            f"{limited:.2f} µs per request ({limited - plain:+.2f} µs)"
        )


PROTOCOLS: dict[str, type[HttpToolsProtocol]] = {
    "uvicorn": HttpToolsProtocol,
    "limited": HeaderLimitedProtocol,
}


def instructions(protocol: str, method: str, n: int) -> int:
    """Instructions callgrind counts for a whole process running `--loop protocol method n`."""
    with tempfile.TemporaryDirectory() as directory:
        out = os.path.join(directory, "callgrind.out")
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable]
        command += [__file__, "--loop", protocol, method, str(n)]
        subprocess.run(command, check=True, capture_output=True)  # noqa: S603 - our own command
        with open(out) as totals:
            match = re.search(r"^(?:summary|totals): (\d+)", totals.read(), re.MULTILINE)
    assert match, "callgrind wrote no total"
    return int(match.group(1))


def report_instructions(n: int) -> None:
    runs = [(p, m, count) for m in REQUESTS for p in PROTOCOLS for count in (n, 2 * n)]
    with ThreadPoolExecutor(2) as pool:  # two valgrinds at a time: counts do not depend on it
        totals = dict(zip(runs, pool.map(lambda run: instructions(*run), runs), strict=True))
    for method, request in REQUESTS.items():
        per_request = {p: (totals[p, method, 2 * n] - totals[p, method, n]) / n for p in PROTOCOLS}
        plain, limited = per_request["uvicorn"], per_request["limited"]
        print(
            f"{method} ({len(request)} bytes): uvicorn {plain:,.0f}, HeaderLimitedProtocol "
            f"{limited:,.0f} instructions per request ({limited - plain:+,.0f})"
        )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--loop"]:  # one loop, for callgrind to count
        _, _, protocol, method, count = sys.argv
        uvloop.run(cpu_per_request(PROTOCOLS[protocol], REQUESTS[method], int(count)))
    elif sys.argv[1:2] == ["--instructions"]:
        report_instructions(int(sys.argv[2]) if len(sys.argv) > 2 else 2000)
    else:
        uvloop.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 20000))
