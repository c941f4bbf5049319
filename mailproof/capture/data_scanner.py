"""SMTP DATA as a stream of chunks: find the lone dot, undo dot-stuffing, enforce the limits.

The sink reads DATA in chunks rather than lines (docs/performance.md, "Capture"), either from
its command loop's stream reader or straight from the bytes the connection receives; both feed
one :class:`DataScanner`, so there is one implementation of what a message's bytes are.
"""

from __future__ import annotations

import tempfile
from typing import Optional


class DataScanner:
    """Feed a DATA phase's bytes in chunks of any size; ``feed`` tells when the message ends.

    The stream is scanned for CRLF "." with a virtual CRLF before the first byte: followed by
    CRLF it is the end, otherwise the dot is a stuffed one and is dropped. ``pending`` holds the
    few bytes that cannot be decided yet (a CRLF or CRLF "." at a chunk's end).

    ``limit`` bounds the message as sent (stuffed dots included, aiosmtpd's measure; None or 0:
    unbounded), ``max_line`` a line without its CRLF (None: unbounded); past either the rest is
    read and discarded and :meth:`result` says which. Above ``spool_threshold`` bytes the message
    is kept in a temporary file (None or 0: never).
    """

    def __init__(self, limit: Optional[int], max_line: Optional[int], spool_threshold: Optional[int]) -> None:
        self.limit = limit
        self.max_line = max_line
        self.spool_threshold = spool_threshold
        self._out: Optional[tempfile.SpooledTemporaryFile] = None
        self._content: Optional[bytes] = None  # the whole message, when it came in one chunk
        self._pending = bytearray(b"\r\n")
        self._skip = 2  # the virtual CRLF is not content
        self._size = 0  # message bytes as sent, stuffed dots included, CRLF "." CRLF not
        self._line_len = 0  # length of the current (unfinished) line, for max_line (lines split at LF)
        self._cr = False  # the last byte measured was a CR (the next one may be its LF)
        self._fresh = True
        self.too_much = False
        self.too_long = False

    def feed(self, chunk: bytes) -> Optional[bytes]:
        """Take the next bytes. None while the message goes on; at its end the bytes after the
        final dot (a pipelining client's next commands; b"" if none)."""
        if self._fresh:
            self._fresh = False
            if self._whole(chunk):
                return b""
        pending = self._pending
        base = len(pending)  # undecided bytes of earlier chunks, already measured
        pending += chunk
        pos = 0
        while True:
            i = pending.find(b"\r\n.", pos)
            if i < 0:
                keep = max(pos, len(pending) - 2)  # a trailing CRLF may start CRLF "."
                self._emit(memoryview(pending)[pos:keep])
                del pending[:keep]
                break
            if len(pending) < i + 5:  # cannot tell the end from a stuffed dot yet
                self._emit(memoryview(pending)[pos:i])
                del pending[:i]
                break
            self._emit(memoryview(pending)[pos:i + 2])  # the CRLF ends the previous line
            if pending[i + 3:i + 5] == b"\r\n":
                self._measure(chunk[:i + 5 - base])  # the lines up to the dot's, not the commands after it
                if self.limit and self._size > self.limit:
                    self.too_much = True
                return bytes(pending[i + 5:])
            pos = i + 3  # drop the stuffed dot
            self._size += 1
        self._measure(chunk)
        if self.limit and self._size > self.limit:
            self.too_much = True
        if (self.too_much or self.too_long) and self._out is not None:
            self._out.seek(0)
            self._out.truncate()  # discard what we had: no memory pressure while draining
        return None

    def _measure(self, part: bytes) -> None:
        """Follow line lengths across chunks: lines end at LF, and a CR right before it is not
        counted (a line ended by a bare LF is measured whole)."""
        max_line = self.max_line
        if max_line is None or self.too_long or not part:
            return
        first = part.find(b"\n")
        if first < 0:
            self._line_len += len(part)
        else:
            cr = part[first - 1] == 13 if first else self._cr  # 13: CR, maybe the previous chunk's last byte
            if self._line_len + first - cr > max_line:
                self.too_long = True
            elif len(part) > max_line and any(len(line) - line.endswith(b"\r") > max_line
                                               for line in part.split(b"\n")[1:-1]):
                self.too_long = True  # a line inside the chunk (none can be longer than the chunk)
            self._line_len = len(part) - part.rfind(b"\n") - 1
        self._cr = part[-1] == 13
        if self._line_len - self._cr > max_line:  # the line so far, a CR at its end not counted
            self.too_long = True

    def _whole(self, chunk: bytes) -> bool:
        """The common case, a whole message in one chunk with no dot at a line's start but the
        final one: its content is the chunk without the dot line (one slice; no scan, no spool file)."""
        end = len(chunk) - 5
        if end < 0 or chunk[:1] == b"." or chunk.find(b"\r\n.") != end or chunk[end + 3:] != b"\r\n":
            return False
        if self.max_line is not None and len(chunk) > self.max_line:
            return False  # a line might be too long: the scan below measures them
        self._size = end + 2
        if self.limit and self._size > self.limit:
            self.too_much = True
        else:
            self._content = chunk[:end + 2]
        return True

    def _emit(self, part) -> None:
        if self._skip:
            cut = min(self._skip, len(part))
            part, self._skip = part[cut:], self._skip - cut
        self._size += len(part)
        if part and not (self.too_much or self.too_long):
            if self._out is None:
                self._out = tempfile.SpooledTemporaryFile(max_size=self.spool_threshold or 0)
            self._out.write(part)

    def result(self) -> tuple[Optional[bytes], bool, bool]:
        """(content, too_much, too_long) once ``feed`` has seen the end; content None past a limit."""
        if self.too_much or self.too_long:
            return None, self.too_much, self.too_long
        if self._content is not None:
            return self._content, False, False
        if self._out is None:
            return b"", False, False
        self._out.seek(0)
        return self._out.read(), False, False

    def close(self) -> None:
        """Release the spool file (a message read to its end, or abandoned with its connection)."""
        if self._out is not None:
            self._out.close()
            self._out = None
