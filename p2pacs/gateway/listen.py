"""A pynetdicom association server on a listening socket it did not open.

The site's main process opens and listens on the DICOM port once; every gateway worker process
inherits that socket and accepts from it. Whichever worker is free first takes the next
association (a busy worker is slower to reach ``accept``, which spreads the load), and the
kernel's queue of pending connections belongs to the socket, not to a worker: a worker that
dies loses only the associations it was serving, never ones waiting to be accepted.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer

__all__ = ["InheritedServer", "serve_inherited"]


class InheritedServer(ThreadedAssociationServer):
    """``ThreadedAssociationServer`` that adopts ``listen_fd`` (class attribute set by
    ``make_class``) instead of binding: another worker may take a connection between this
    one's poll and its ``accept``, so the socket is non-blocking and a lost race is a no-op."""

    listen_fd = -1

    @classmethod
    def make_class(cls, fd: int) -> type[InheritedServer]:
        return type(f"InheritedServerOn{fd}", (cls,), {"listen_fd": fd})

    def server_bind(self) -> None:
        assert self.socket is not None
        self.socket.close()
        self.socket = socket.socket(fileno=self.listen_fd)
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        """Already listening (the main process called ``listen``)."""

    def get_request(self) -> tuple[socket.socket, Any]:
        client, address = super().get_request()
        client.setblocking(True)  # pynetdicom sets its own timeouts on the association socket
        return client, address

    def server_close(self) -> None:
        """Close our descriptor only: ``shutdown`` would stop the other workers' listener."""
        assert self.socket is not None
        self.socket.close()


def serve_inherited(ae: AE, fd: int, handlers: list[Any]) -> ThreadedAssociationServer:
    """What ``AE.start_server(block=False)`` does, on the inherited listening socket ``fd``."""
    server = ae.make_server(
        ("", 0), evt_handlers=handlers, server_class=InheritedServer.make_class(fd)
    )
    thread = threading.Thread(target=server.serve_forever, name="AcceptorServer", daemon=True)
    thread.start()
    ae._servers.append(server)  # ``shutdown`` takes it out again
    return server
