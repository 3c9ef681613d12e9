"""Event-driven reactors for pynetdicom's associations: block until there is work, never poll.

pynetdicom 3.0 polls on both of an association's threads. Its DUL thread
(``DULServiceProvider.run_reactor``) sleeps ``_run_loop_delay`` (1 ms) whenever it finds nothing
to do and looks at the socket with ``select(..., 0)``; the association's reactor
(``Association._run_reactor``) sleeps 1 ms before every look at its DIMSE queue. A request
waits up to a poll period on each side before anyone notices it, and an idle association wakes
its two threads ~2,000 times a second (10,000 with the 0.1 ms DUL delay p2pacs used to set).

``install`` replaces both loops, keeping everything they do, and changes only how they wait:

- **DUL thread**: waits in ``poll`` on the transport socket plus a wake-up file descriptor
  (``eventfd``), which is signalled whenever a primitive is queued for the DUL
  (``to_provider_queue``) or an event for its state machine (``event_queue``, e.g. the
  transport closed by another thread) and when the thread is told to stop (``kill_dul``,
  ``stop_dul``). The timeout is what is left of a running ARTIM timer, at most ``DUL_WAIT``.
  An SSL socket with decrypted bytes pending is read without waiting (``select`` cannot see
  them; pynetdicom #528). It wakes the writer only when it is about to sleep (``_Wakeup``), so
  a busy association makes no extra system calls.
- **Association reactor**: waits on a ``threading.Event`` set when a DIMSE message is queued
  for it (``dimse.msg_queue``), an ACSE primitive arrives (``dul.to_user_queue``: release or
  abort from the peer), the DUL thread ends or the association is killed; the timeout is what
  is left of the network idle timer, at most ``ASSOC_WAIT``. It counts as paused while it
  waits, so a ``send_*`` call from another thread need not wait for it, and it checks its
  checkpoint again after leaving the pause: a ``send_*`` that began meanwhile runs first, so
  the reactor never takes the response that call waits for (pynetdicom #875; p2pacs's
  ``scu._reactor_leaves_messages`` guard stays in place as well).

**Direct writes** (``gateway.rawsend``): while a sending thread reads a C-STORE response itself
it holds the writer's ``read_lock``, and what it reads that is not its response goes to the
writer's ``pushback`` for the DUL thread. The DUL thread does not sleep while bytes are pushed
back; while the lock is held it does not watch the socket (what arrives is the sender's to
read) and looks again every ``HANDOFF_WAIT``, so a pushed-back C-CANCEL or A-ABORT is handled
as soon as it was before (pynetdicom's own 1 ms poll).

The bounded timeouts keep a lost wake-up (a path of pynetdicom's this module does not know of)
a delay, never a hang.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import ssl
import threading
from typing import Any

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ

__all__ = ["ASSOC_WAIT", "DUL_WAIT", "HANDOFF_WAIT", "install", "installed"]

log = logging.getLogger(__name__)

DUL_WAIT = 0.05  # seconds the DUL thread sleeps at most with nothing to do (a safety net only)
ASSOC_WAIT = 0.05  # seconds the association reactor sleeps at most with nothing to do (ditto)
HANDOFF_WAIT = 0.001  # seconds, while a direct writer owns reading (rawsend): pynetdicom's poll
KILL_WAIT = 0.01  # seconds between looks at a DUL that has not reached Sta1 (pynetdicom's sleep)

_original_dul_init = DULServiceProvider.__init__
_original_assoc_init = Association.__init__
_lock = threading.Lock()


class _Wakeup:
    """An ``eventfd`` the DUL thread sleeps on; ``signal`` writes to it only while the thread
    sleeps (``sleeping``, set before its last look at the queues), so a busy DUL costs no
    system call. Closed when the DUL thread ends; a signal after that does nothing (the number
    may belong to another file by then)."""

    def __init__(self) -> None:
        self.sleeping = False
        self._lock = threading.Lock()
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def fileno(self) -> int:
        return self._fd

    def signal(self) -> None:
        if self.sleeping:
            with self._lock:
                if self._fd >= 0:
                    os.eventfd_write(self._fd, 1)

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._fd)

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:  # a DUL whose thread never ran (the association failed first)
        self.close()


class _SignallingQueue(queue.Queue[Any]):
    """A ``queue.Queue`` that calls ``signal`` after every put (pynetdicom's threads put from
    many places; the queue is the one spot they all pass)."""

    def __init__(self, signal: Any) -> None:
        super().__init__()
        self._signal = signal

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._signal()


def _dul_init(self: Any, assoc: Any) -> None:
    _original_dul_init(self, assoc)
    self.p2pacs_wakeup = wake = _Wakeup()
    # nothing can have been queued yet: the DUL thread has not started
    self.event_queue = _SignallingQueue(wake.signal)
    self.to_provider_queue = _SignallingQueue(wake.signal)


def _assoc_init(self: Any, *args: Any, **kwargs: Any) -> None:
    _original_assoc_init(self, *args, **kwargs)
    self.p2pacs_wake = ready = threading.Event()
    self.dimse.msg_queue = _SignallingQueue(ready.set)
    self.dul.to_user_queue = _SignallingQueue(ready.set)


def _kill(self: Any) -> None:
    """``Association.kill``: as pynetdicom's, but both threads are woken to see it at once, and
    the wait for the DUL thread to end is a ``join`` (it ends by itself once the association is
    killed and its state machine idle, Sta1) instead of 10 ms sleeps."""
    self._reactor_checkpoint.set()  # the reactor must run to exit
    self._kill = True
    self.is_established = False
    self._is_paused = True
    _wake_assoc(self)
    dul = self.dul
    _wake_dul(dul)
    if threading.current_thread() is dul:  # a handler run by the DUL thread: it ends by itself
        return
    while dul.is_alive() and not dul.stop_dul():
        dul.join(KILL_WAIT)


def _wake_assoc(assoc: Any) -> None:
    wake = getattr(assoc, "p2pacs_wake", None)
    if wake is not None:
        wake.set()


def _wake_dul(dul: Any) -> None:
    wakeup = getattr(dul, "p2pacs_wakeup", None)
    if wakeup is not None:
        wakeup.sleeping = True  # the thread may be about to sleep: write regardless
        wakeup.signal()


def _kill_dul(self: Any) -> None:
    self._kill_thread = True
    _wake_dul(self)


def _stop_dul(self: Any) -> bool:
    """``DULServiceProvider.stop_dul``: stop the thread if the state machine is idle (Sta1) and
    wait for it to end, woken instead of polled."""
    if self.state_machine.current_state != "Sta1":
        return False
    _kill_dul(self)
    if threading.current_thread() is not self:
        self.join()
    return True


def _timer_left(timer: Any) -> float | None:
    """Seconds until ``timer`` (a pynetdicom ``Timer``) expires; None if it is not running."""
    if timer.timeout is None or timer._start_time is None or timer._end_time is not None:
        return None
    return max(0.0, float(timer.remaining))


def _dul_wait(dul: Any, wakeup: _Wakeup) -> None:
    """Sleep until the socket is readable, the wake-up is signalled or a timer is due."""
    timeout = DUL_WAIT
    artim = _timer_left(dul.artim_timer)
    if artim is not None:
        timeout = min(timeout, artim)
    transport = dul.socket
    sock = getattr(transport, "socket", None) if transport is not None else None
    if sock is not None and not getattr(transport, "_is_connected", False):
        sock = None
    writer = getattr(dul.assoc, "p2pacs_writer", None)
    if writer is not None:
        if writer.pushback:
            return
        if writer.read_lock.locked():
            # the sending thread reads what arrives now: waking on it would only wait for
            # that thread's lock, at the very moment it needs the interpreter (measured: 4
            # concurrent C-GETs ~25 % slower); look for pushed-back bytes every HANDOFF_WAIT
            timeout = min(timeout, HANDOFF_WAIT)
            sock = None
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return
    wakeup.sleeping = True
    try:
        # a put after this look signals the eventfd (``sleeping`` is set): no lost wake-up
        if dul._kill_thread or dul.to_provider_queue.qsize() or dul.event_queue.qsize():
            return
        poller = select.poll()
        poller.register(wakeup.fileno(), select.POLLIN)
        if sock is not None:
            with contextlib.suppress(OSError, ValueError):  # closed under us: the next look says
                poller.register(sock, select.POLLIN)
        poller.poll(timeout * 1000.0)
    finally:
        wakeup.sleeping = False
        wakeup.drain()


def _dul_run_reactor(self: Any) -> None:
    """``DULServiceProvider.run_reactor`` with ``_dul_wait`` instead of ``time.sleep``."""
    wakeup: _Wakeup = self.p2pacs_wakeup
    self._idle_timer.start()
    try:
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
            if self._kill_thread:
                break
            if self.assoc._kill and self.state_machine.current_state == "Sta1":
                break  # what ``kill`` waits for (pynetdicom's ``stop_dul`` would stop it now)
            # the ARTIM timer first, so its event is queued ahead of any other this loop
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                # one of: encode and send a primitive, or read and decode one PDU
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:
                log.exception("Exception in the DUL reactor, aborting the association: %s", exc)
                # bypass the state machine, whose state can no longer be trusted (as pynetdicom)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                _dul_wait(self, wakeup)
                continue
            self.state_machine.do_action(event)
    finally:
        wakeup.close()
        _wake_assoc(self.assoc)  # its reactor watches ``dul.is_alive()``


def _assoc_wait(assoc: Any, wake: threading.Event) -> None:
    timeout = ASSOC_WAIT
    idle = _timer_left(assoc.dul._idle_timer)
    if idle is not None:
        timeout = min(timeout, idle)
    wake.wait(timeout)
    wake.clear()  # before the looks below: anything queued after them sets it again


def _assoc_run_reactor(self: Any) -> None:
    """``Association._run_reactor`` with a wait on ``p2pacs_wake`` instead of a 1 ms sleep."""
    wake: threading.Event = self.p2pacs_wake
    self._is_paused = False
    while not self._kill:
        # paused while waiting: a send_* from another thread proceeds without waiting for us
        self._is_paused = True
        _assoc_wait(self, wake)
        self._reactor_checkpoint.wait()
        self._is_paused = False
        if not self._reactor_checkpoint.is_set():
            # a send_* cleared the checkpoint after we passed it and may already have seen us
            # paused: let it finish first (it may be waiting for the very message we would take)
            wake.set()
            continue
        context_id, msg = self.dimse.get_msg(block=False)
        if msg:
            self._serve_request(msg, context_id)
            wake.set()  # one message per turn, as pynetdicom: look again before sleeping
        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            log.info("Association Released")
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return
        if self.acse.is_aborted():
            log.info(
                "Association Aborted%s", " (A-P-ABORT)" if self.acse.is_aborted("a-p-abort") else ""
            )
            self.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires for subscribers
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return
        if not self.dul.is_alive():
            self.kill()
            return
        if self.dul.idle_timer_expired():
            log.error("Network timeout reached")
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()
            self.kill()
            return


def install() -> None:
    """Replace pynetdicom's polling reactors with the event-driven ones, for every association
    created afterwards (idempotent; a DUL thread's loop is fixed when it is created)."""
    with _lock:
        if DULServiceProvider.run_reactor is _dul_run_reactor:
            return
        DULServiceProvider.__init__ = _dul_init  # type: ignore[method-assign]
        DULServiceProvider.run_reactor = _dul_run_reactor  # type: ignore[method-assign]
        DULServiceProvider.kill_dul = _kill_dul  # type: ignore[method-assign]
        DULServiceProvider.stop_dul = _stop_dul  # type: ignore[method-assign]
        Association.__init__ = _assoc_init  # type: ignore[method-assign]
        Association._run_reactor = _assoc_run_reactor  # type: ignore[method-assign]
        Association.kill = _kill  # type: ignore[method-assign]


def installed(assoc: Any) -> bool:
    """Whether ``assoc`` runs the event-driven reactors."""
    return getattr(assoc, "p2pacs_wake", None) is not None and hasattr(assoc.dul, "p2pacs_wakeup")
