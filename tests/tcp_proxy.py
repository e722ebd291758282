"""A TCP proxy in front of PostgreSQL that a test controls: cut it, stall it, refuse, restore.

What each fault looks like to the service (psycopg2 behind the proxy):
- cut():     every open connection is torn down at once (a dropped network, Neon suspending);
             new connections still go through.
- refuse():  open connections torn down and the port closed: connecting is refused.
- stall():   the network goes silent: bytes are accepted and never forwarded, either way, on
             open connections and on new ones. Nothing fails; everything waits. Only a
             client-side deadline notices.
- restore(): back to forwarding; connections that were stalled are torn down, so nothing sent
             into the silence arrives late.
"""

import socket
import threading
from collections.abc import Callable


class _Pair:
    """One client connection and, unless it was accepted while stalled, its upstream."""

    def __init__(self, client: socket.socket, upstream: socket.socket | None) -> None:
        self.client, self.upstream = client, upstream
        self.closed = False
        self.lock = threading.Lock()

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
        for sock in (self.client, self.upstream):
            if sock is None:
                continue
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv()
            except OSError:
                pass  # already disconnected by the peer: nothing left to shut down
            sock.close()


class TcpProxy:
    def __init__(self, connect_upstream: Callable[[], socket.socket]) -> None:
        self._connect_upstream = connect_upstream
        self.port = 0
        self._pairs: set[_Pair] = set()
        self._lock = threading.Lock()
        self._flowing = threading.Event()
        self._flowing.set()
        self._listener: socket.socket | None = None
        self._listen()

    # --- faults ---------------------------------------------------------------------------------

    def cut(self) -> None:
        self._close_all()

    def refuse(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes accept(); close() alone would not
            except OSError:
                pass  # not listening any more: nothing to wake
            listener.close()
        self._close_all()

    def stall(self) -> None:
        self._flowing.clear()

    def restore(self) -> None:
        if not self._flowing.is_set():
            self._close_all()  # what was said into the silence is lost, as on a real network
            self._flowing.set()
        if self._listener is None:
            self._listen()

    def close(self) -> None:
        self.refuse()
        self._flowing.set()

    @property
    def open_connections(self) -> int:
        with self._lock:
            return sum(1 for pair in self._pairs if not pair.closed)

    # --- plumbing -------------------------------------------------------------------------------

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _close_all(self) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, set()
        for pair in pairs:
            pair.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # the listener was closed: refuse() or close()
            if not self._flowing.is_set():
                self._track(_Pair(client, None))  # accepted, then silence
                continue
            try:
                upstream = self._connect_upstream()
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            pair = self._track(_Pair(client, upstream))
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(
                    target=self._pump, args=(pair, source, target), daemon=True
                ).start()

    def _track(self, pair: _Pair) -> _Pair:
        with self._lock:
            self._pairs.add(pair)
        return pair

    def _pump(self, pair: _Pair, source: socket.socket, target: socket.socket) -> None:
        while not pair.closed:
            try:
                data = source.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            # While stalled, hold the bytes; a later restore() closes this pair and drops them.
            while not self._flowing.wait(0.05):
                if pair.closed:
                    return
            if pair.closed:
                return
            try:
                target.sendall(data)
            except OSError:
                break
        pair.close()
        with self._lock:
            self._pairs.discard(pair)
