"""DATA content read in chunks, with exactly the rules of a line-by-line reader.

The session reads DATA with ``readuntil(b".\\r\\n")`` (or what the stream buffer holds,
when a chunk passes its limit) instead of one ``readuntil(b"\\r\\n")`` per line: one await
per chunk of up to 64 KiB instead of one per line (about 57 per 4 KiB of mail). A chunk
never reaches past the end of data, so nothing the client pipelined after it is consumed.

:class:`ContentReader` gets the chunks and applies the rules in line order, the first
broken rule deciding the reply (RFC 5321 §4.2.5: it still reads to the final dot):

* only CRLF ends a line; a bare CR or LF, or a NUL, is refused (SMTP smuggling);
* a leading dot is removed (transparency, RFC 5321 §4.5.2);
* a line (without its transparency dot, with CRLF) is at most ``max_line`` octets;
* the content is at most ``max_size`` octets.

Chunks of complete lines without any of those problems (nearly all mail) are checked
with a few byte-string scans; only a chunk with a problem is split line by line, to find
the first one.
"""

from __future__ import annotations

__all__ = ["SMUGGLING_REPLY_END", "SMUGGLING_REPLY_START", "ContentReader", "line_too_long"]

SMUGGLING_REPLY_START = "550 5.6.0 Message contains"
SMUGGLING_REPLY_END = "refused (SMTP smuggling protection)"


def line_too_long(max_line: int) -> str:
    return f"500 5.6.0 Line too long: at most {max_line} octets including CRLF (RFC 5321 4.5.3.1.6)"


class ContentReader:
    """DATA content, fed chunk by chunk as read; see the module docstring."""

    def __init__(self, max_size: int, max_line: int) -> None:
        self.max_size = max_size
        self.max_line = max_line
        self.refusal: str | None = None
        self._parts: list[bytes] = []
        self._size = 0
        self._carry = b""  # the start of a line whose CRLF has not come yet
        self._overlong = False  # inside a line already refused as too long

    @property
    def content(self) -> bytes:
        """The content as accepted (empty when refused)."""
        return b"".join(self._parts)

    def feed(self, chunk: bytes) -> bool:
        """Take the next chunk; True once the end of data (``<CRLF>.<CRLF>``) was read."""
        data = self._carry + chunk if self._carry else chunk
        self._carry = b""
        if self._overlong:
            end = data.find(b"\r\n")
            if end < 0:
                self._carry = data[-1:] if data.endswith(b"\r") else b""
                return False
            data = data[end + 2 :]  # the tail of a line already refused
            self._overlong = False
        if data == b".\r\n":
            return True
        if data.endswith(b"\r\n.\r\n"):
            self._lines(data[:-3])
            return True
        end = data.rfind(b"\r\n")
        complete, rest = (b"", data) if end < 0 else (data[: end + 2], data[end + 2 :])
        if complete:
            self._lines(complete)
        if len(rest) > self.max_line:
            # Longer than any line may be whatever follows: refuse now, keep no more of it
            # (a CR at the end may be the first half of its CRLF).
            self._refuse(line_too_long(self.max_line))
            self._overlong = True
            rest = rest[-1:] if rest.endswith(b"\r") else b""
        self._carry = rest
        return False

    def _lines(self, block: bytes) -> None:
        """Complete lines (``block`` ends with CRLF, starts at a line's start)."""
        if self.refusal is not None:
            return
        crlf = block.count(b"\r\n")
        if b"\x00" not in block and block.count(b"\r") == crlf and block.count(b"\n") == crlf:
            unstuffed = block.replace(b"\r\n.", b"\r\n")
            if unstuffed.startswith(b"."):
                unstuffed = unstuffed[1:]
            if self._lines_fit(unstuffed) and self._size + len(unstuffed) <= self.max_size:
                self._parts.append(unstuffed)
                self._size += len(unstuffed)
                return
        for line in block[:-2].split(b"\r\n"):
            if not self._line(line + b"\r\n"):
                return

    def _lines_fit(self, block: bytes) -> bool:
        """Whether every line of ``block`` (CRLF line ends only), with its CRLF, is at most
        ``max_line`` octets: without a bytes object per line for nearly all mail.

        A line of ``max_line - 1`` octets or more before its CRLF is a run of at least
        ``max_line`` octets without LF (its CR included), which holds a whole window of
        ``window`` octets at a multiple of ``window`` (2 × window - 1 ≤ max_line); so if
        every such window has an LF, every line fits. Otherwise the lines are measured.
        """
        window = self.max_line // 2
        if window > 0 and all(
            block.find(b"\n", start, start + window) >= 0
            for start in range(0, len(block) - window + 1, window)
        ):
            return True
        return max(map(len, block.split(b"\r\n"))) + 2 <= self.max_line

    def _line(self, line: bytes) -> bool:
        """Check and keep one line; False if it is refused."""
        if b"\r" in line[:-2] or b"\n" in line[:-2]:
            return self._refuse(f"{SMUGGLING_REPLY_START} bare LF or CR; {SMUGGLING_REPLY_END}")
        if b"\x00" in line:
            # A next hop that drops NUL would read <CRLF>NUL.<CRLF> as the end of data
            # and run what follows as commands from us; RFC 5321 2.3.8 allows no NUL.
            return self._refuse(f"{SMUGGLING_REPLY_START} NUL; {SMUGGLING_REPLY_END}")
        if line.startswith(b"."):
            line = line[1:]  # RFC 5321 4.5.2 transparency
        if len(line) > self.max_line:
            return self._refuse(line_too_long(self.max_line))
        self._size += len(line)
        if self._size > self.max_size:
            return self._refuse(
                f"552 5.3.4 Message size exceeds fixed maximum message size ({self.max_size} octets)"
            )
        self._parts.append(line)
        return True

    def _refuse(self, reply: str) -> bool:
        """Refuse the message with ``reply`` unless refused already; always False."""
        self.refusal = self.refusal or reply
        self._parts.clear()
        return False
