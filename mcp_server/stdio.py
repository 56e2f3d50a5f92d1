"""stdin and stdout for the SDK's stdio transport, served on the event loop instead of threads.

The SDK reads stdin and writes stdout through worker threads: the reader cannot be interrupted,
so a server told to stop would wait for the client's next line, and every response pays two
thread hand-offs (write, flush) on its way out. These streams wait on the descriptors instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import selectors
import stat
import sys

import anyio


def pollable(fd: int) -> bool:
    """A pipe, socket or terminal, which the event loop can wait on. A regular file it cannot, nor
    /dev/null (a service manager's stdin): a character device like a terminal, but one epoll
    refuses, so the selector is asked."""
    if sys.platform == "win32":
        return False
    try:
        mode = os.fstat(fd).st_mode
    except (OSError, ValueError):
        return False
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode)):
        return False
    with selectors.DefaultSelector() as selector:
        try:
            selector.register(fd, selectors.EVENT_READ)
        except OSError:
            return False
    return True


def is_pipe(fd: int) -> bool:
    """A pipe or socket: its open file is the client's and ours alone, unlike a terminal's, which
    the shell shares, so switching it to non-blocking mode disturbs nobody else."""
    try:
        mode = os.fstat(fd).st_mode
    except (OSError, ValueError):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


class StdinLines:
    """stdin as lines; `close` ends the iteration at once, even while waiting for a line."""

    def __init__(self) -> None:
        self._fd = sys.stdin.fileno()
        os.set_blocking(self._fd, False)
        self._buffer = bytearray()
        self._closed = False
        self._waiting: anyio.CancelScope | None = None

    def restore(self) -> None:
        """Hand stdin back in blocking mode: the flag is shared with whoever else holds it (a shell)."""
        with contextlib.suppress(OSError):
            os.set_blocking(self._fd, True)

    def close(self) -> None:
        self._closed = True
        if self._waiting is not None:
            self._waiting.cancel()

    def __aiter__(self) -> StdinLines:
        return self

    async def __anext__(self) -> str:
        while (end := self._buffer.find(b"\n")) < 0:
            with anyio.CancelScope() as self._waiting:
                await anyio.wait_readable(self._fd)
            if self._closed:
                raise StopAsyncIteration
            try:
                chunk = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                continue
            if not chunk:
                if not self._buffer:
                    raise StopAsyncIteration
                end = len(self._buffer)
                self._buffer.extend(b"\n")
                break
            self._buffer.extend(chunk)
        line = bytes(self._buffer[: end + 1])
        del self._buffer[: end + 1]
        return line.decode("utf-8", errors="replace")


class StdoutPipe:
    """The protocol's stdout, written from the event loop.

    Like the SDK, it keeps the wire on a private descriptor and points fd 1 at stderr while
    serving, so a stray print from a library lands in the log instead of corrupting a message.
    A client slow to read makes a write wait on the loop, never block it.
    """

    def __init__(self) -> None:
        self._fd = fcntl.fcntl(1, fcntl.F_DUPFD_CLOEXEC, 3)
        os.dup2(2, 1)
        os.set_blocking(self._fd, False)

    def restore(self) -> None:
        with contextlib.suppress(OSError):
            os.set_blocking(self._fd, True)
            os.dup2(self._fd, 1)
            os.close(self._fd)

    async def write(self, text: str) -> None:
        """Write a frame whole; the SDK's one writer task writes one frame at a time."""
        data = memoryview(text.encode("utf-8"))
        while data:
            try:
                data = data[os.write(self._fd, data) :]
            except BlockingIOError:
                await anyio.wait_writable(self._fd)

    async def flush(self) -> None:
        """Every write goes straight to the descriptor; nothing is buffered."""
