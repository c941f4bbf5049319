"""The retained records, kept by column: a message costs little more than its raw bytes.

A record is read as the 11-field tuple ``Record`` (CapturedMail's field order: SEQ, FROM, RCPTS,
DATA, AT, PEER, HELO, SMTPUTF8, TLS, AUTH_USER, MAIL_OPTIONS), built when it is read. It is
stored as a few machine words (docs/performance.md, "Memory"):

- the seq is implicit while seqs are dense (the sink counts them one by one), an array otherwise;
- the arrival time and the peer's port are array items (8 and 2 bytes, not a float and an int);
- one recipient is kept as its UTF-8 bytes (16 B less than the str; a 1-tuple would cost 48 B
  more), and those very bytes are the recipient index's key when the address is lower-case;
- such a record (one lower-case str recipient: nearly every message of a rehearsal) is indexed
  here, in ``RcptTable`` (rcpt_table.py: a slot array holding the newest record of each key) and
  a 4-byte column "how many records back is the previous one to the same recipient", so a
  recipient's mail is a chain newest to oldest; eviction is always of the oldest, so a chain
  simply ends at the oldest retained record, and only evicting a chain's head touches the table.
  Any other record (several recipients, a mixed-case or non-str one) is left to the caller's dict
  index: ``append`` returns the keys it must hold, ``evict`` those it must forget;
- what one application's messages share (sender, HELO, peer host, SMTPUTF8, TLS, AUTH user, MAIL
  options) is one tuple interned by value: thousands of messages point at the same one. (Kept
  once per run of records instead, it would cost nothing per message only while the MAIL options
  are constant; a client's SIZE=n changes with every message size.)

Garbage collector: the columns are a few lists of bytes, strs and tuples of atomic values (which
the collector untracks), so retained mail adds nothing to what a full collection examines but
the list items themselves.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right

from mailproof.capture.service.rcpt_table import RcptTable

Record = tuple
SEQ, FROM, RCPTS, DATA, AT, PEER, HELO, SMTPUTF8, TLS, AUTH_USER, MAIL_OPTIONS = range(11)

NO_PORT = 0  # the peer is stored whole (None, IPv6 4-tuple, port 0...): no port split off
PORT_MAX = 65535
ENVELOPES_INTERNED = 4096  # distinct shared envelopes remembered; past that the table starts over
COMPACT_AFTER = 1024  # evicted slots tolerated at the head before the columns are shifted
REBASE_AFTER = 1 << 30  # positions compaction dropped before the table's are rebased (32-bit slots)


def index_key(recipient: str) -> bytes:
    """The recipient index's key: the address lower-cased, as UTF-8 (any str round-trips)."""
    return recipient.lower().encode("utf-8", "surrogatepass")


def index_keys(rcpts) -> set:
    """The recipient index's keys of ``rcpts``, one per distinct address."""
    return {index_key(str(r)) for r in rcpts}


_BOOLS = (bool, bool)


class Records:
    """Retained records in seq order: ``append`` a CapturedMail, ``popleft`` the oldest, index
    (``[i]``, ``seq_at(i)``), iterate or reverse them. Not thread-safe (the service's one loop)."""

    __slots__ = ("_head", "_base", "_seqs", "_ats", "_ports", "_datas", "_rcpts", "_envs", "_interned", "_prev",
                 "_dropped", "_table")

    def __init__(self, expected: int = 0) -> None:
        """``expected``: how many records are usually retained (the cap): the recipient table is
        sized for it up front."""
        self._interned: dict[tuple, tuple] = {}
        self._table = RcptTable(expected)
        self.clear()

    def clear(self) -> None:
        self._head = 0  # column index of the oldest retained record (those before it are evicted)
        self._base = 0  # seq of column index 0 while seqs are dense (``_seqs`` is None)
        self._seqs: "array | None" = None
        self._ats = array("d")
        self._ports = array("H")
        self._datas: list = []
        self._rcpts: list = []
        self._envs: list = []
        # Per record: how many columns back the previous record to the same recipient is (0: none,
        # or not indexed here). A distance, not a position, so compaction leaves it valid; it is
        # at most the retained count, far below 2**32.
        self._prev = array("I")
        self._dropped = 0  # column slots compaction removed: a record's position is this + its index
        self._table.clear()

    # -- writing -----------------------------------------------------------------------------

    def append(self, msg) -> "tuple | set":
        """Retain ``msg`` (a ``CapturedMail``) as the newest record. Returns the index keys the
        caller's own index must hold for it: none when it is indexed here (one lower-case
        recipient), else those of its recipients."""
        peer, port = msg.peer, NO_PORT
        if type(peer) is tuple and len(peer) == 2 and type(peer[1]) is int and 0 < peer[1] <= PORT_MAX:
            peer, port = peer
        options = msg.mail_options
        if type(options) is not tuple:
            options = tuple(options)
        env = (msg.mail_from, peer, msg.helo, msg.smtputf8, msg.tls, msg.auth_user, options)
        env = self._intern(env, (type(msg.smtputf8), type(msg.tls)))
        rcpts = msg.rcpt_tos
        here = False
        if len(rcpts) == 1 and type(rcpts[0]) is str:
            r = rcpts[0]
            lower = r.lower()
            rcpt = r.encode("utf-8", "surrogatepass")
            if lower == r:
                here, keys = True, ()
            else:
                keys = (lower.encode("utf-8", "surrogatepass"),)
        else:
            rcpt = tuple(rcpts)
            keys = index_keys(rcpts)
        at = msg.received_at
        seq = msg.seq
        count = len(self._datas)
        if count == 0:  # empty columns: dense again from this seq
            self._seqs, self._base = None, seq
        elif self._seqs is not None:
            self._seqs.append(seq)
        elif seq != self._base + count:  # a gap: from now on every seq is stored
            self._seqs = array("q", range(self._base, self._base + count))
            self._seqs.append(seq)
        self._ats.append(at)
        self._ports.append(port)
        self._datas.append(msg.data)
        self._rcpts.append(rcpt)
        self._envs.append(env)
        if here:
            pos = self._dropped + count
            newest = self._table.put(rcpt, pos, self._rcpts, self._dropped)
            self._prev.append(pos - newest if newest >= 0 else 0)
        else:
            self._prev.append(0)
        return keys

    def _intern(self, env: tuple, flag_types: tuple) -> tuple:
        # Flags that are not both bools put their types in the key: True == 1 and they hash alike,
        # but they are not the same field value (interning must never merge distinct values).
        key = env if flag_types == _BOOLS else env + flag_types
        interned = self._interned
        try:
            shared = interned.get(key)
        except TypeError:  # an unhashable field: kept as it is, not shared
            return env
        if shared is not None:
            return shared
        if len(interned) >= ENVELOPES_INTERNED:
            interned.clear()  # records keep their own; later ones share afresh
        interned[key] = env
        return env

    def popleft(self) -> Record:
        """Remove and return the oldest record (``evict`` says which keys the caller must forget)."""
        if self._head >= len(self._datas):
            raise IndexError("popleft from empty Records")
        rec = self._record(self._head)
        self.evict()
        return rec

    def evict(self) -> tuple[int, int, "set | tuple"]:
        """Remove the oldest record; return its seq, its size and the keys the caller's index must
        forget for it (what eviction needs, without building the record)."""
        head = self._head
        if head >= len(self._datas):
            raise IndexError("evict from empty Records")
        seq = self._base + head if self._seqs is None else self._seqs[head]
        size = len(self._datas[head])
        rcpt = self._rcpts[head]
        if type(rcpt) is not bytes:
            keys = index_keys(rcpt)
        elif self._table.remove(rcpt, self._dropped + head, self._rcpts, self._dropped):
            keys = ()  # its recipient's newest record, indexed here (the usual case)
        else:
            if rcpt.isascii():
                key = rcpt.lower()  # for ASCII the same as str.lower
            else:
                key = index_key(rcpt.decode("utf-8", "surrogatepass"))
            # Lower-case: indexed here, and a newer record to it heads the chain. Else the caller's.
            keys = () if key == rcpt else (key,)
        self._datas[head] = self._rcpts[head] = self._envs[head] = None
        self._head = head = head + 1
        if head == len(self._datas):
            self.clear()
        elif head >= COMPACT_AFTER and head * 2 >= len(self._datas):
            self._compact()
        return seq, size, keys

    def _compact(self) -> None:
        """Drop the evicted head slots (amortised O(1): at most as many as remain are moved)."""
        head = self._head
        for column in (self._ats, self._ports, self._datas, self._rcpts, self._envs, self._prev):
            del column[:head]
        if self._seqs is not None:
            del self._seqs[:head]
        else:
            self._base += head
        self._dropped += head  # the table's positions stay valid
        if self._dropped >= REBASE_AFTER:
            self._table.rebase(self._dropped)
            self._dropped = 0
        self._head = 0

    # -- reading -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._datas) - self._head

    def _index(self, i: int) -> int:
        count = len(self._datas) - self._head
        if i < 0:
            i += count
        if not 0 <= i < count:
            raise IndexError("Records index out of range")
        return self._head + i

    def seq_at(self, i: int) -> int:
        """The seq of the ``i``-th retained record (0: the oldest, -1: the newest)."""
        j = self._index(i)
        return self._base + j if self._seqs is None else self._seqs[j]

    def count_to(self, seq: int) -> int:
        """How many retained records have a seq of at most ``seq`` (seqs only ever grow; with gaps
        too: a binary search of the seq column, not arithmetic)."""
        head, end = self._head, len(self._datas)
        if self._seqs is None:
            return min(max(0, seq - (self._base + head) + 1), end - head)
        return bisect_right(self._seqs, seq, head, end) - head

    def __getitem__(self, i: int) -> Record:
        return self._record(self._index(i))

    def _record(self, j: int) -> Record:
        mail_from, peer, helo, smtputf8, tls, auth_user, options = self._envs[j]
        port = self._ports[j]
        if port != NO_PORT:
            peer = (peer, port)
        rcpt = self._rcpts[j]
        seq = self._base + j if self._seqs is None else self._seqs[j]
        if type(rcpt) is bytes:
            rcpt = (rcpt.decode("utf-8", "surrogatepass"),)
        return (seq, mail_from, rcpt, self._datas[j], self._ats[j], peer, helo, smtputf8, tls, auth_user, options)

    def __iter__(self):
        for j in range(self._head, len(self._datas)):
            yield self._record(j)

    def __reversed__(self):
        for j in range(len(self._datas) - 1, self._head - 1, -1):
            yield self._record(j)

    def slice(self, start: int, stop: int) -> list[Record]:
        """Records ``start`` to ``stop`` (oldest first, clipped to what is retained)."""
        head = self._head
        count = len(self._datas) - head
        return [self._record(head + i) for i in range(max(0, start), min(stop, count))]

    def data_at(self, i: int) -> bytes:
        return self._datas[self._index(i)]

    def seqs_to(self, key: bytes, since: int = 0) -> list[int]:
        """Seqs > ``since`` of the records indexed here under ``key``, oldest first (the caller's
        own index holds the rest)."""
        pos = self._table.find(key, self._rcpts, self._dropped)
        if pos < 0:
            return []
        head, prev, seqs = self._head, self._prev, self._seqs
        j = pos - self._dropped
        found = []
        while j >= head:  # the chain's tail before the oldest retained record is evicted mail
            seq = self._base + j if seqs is None else seqs[j]
            if seq <= since:
                break
            found.append(seq)
            back = prev[j]
            if not back:
                break
            j -= back
        found.reverse()
        return found
