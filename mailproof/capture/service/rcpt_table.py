"""The recipient index's hash table: the newest record of each recipient, in one array of slots.

Most captured messages have one lower-case recipient, and most recipients get one message. A dict
entry (24 B amortised to some 50 B) and an int seq (28 B) per message were a fifth of what a
retained 143-byte message cost, so for those records the index is this table instead:

- open addressing with linear probing over an ``array('I')`` of 4-byte slots (a power of two, at
  most half full; halved when under an eighth full), each 0 (empty) or 1 + the record's position;
- sized up front for the store's cap (up to ``PRESIZE_SLOTS``, 2 MB: the default 200,000-message
  cap fits), never shrunk below that: a resize is a loop in Python (some 50 ms for 131,072 keys, where
  a dict takes a few), and it would run in the SMTP DATA handler, before the 250;
- a position is "absolute": column index plus every slot ``Records`` compaction has dropped, so
  compaction moves nothing here (``rebase`` brings them back under 32 bits, once in a billion
  messages);
- the table stores no key: a slot matches when the record's own stored recipient bytes (which are
  the key, ``records.index_key``) equal the key; bytes cache their hash, so probing and resizing
  rehash nothing;
- deletion shifts the probe chain back (no tombstones), so a lookup stops at the first empty slot.

Older records to the same recipient are found through ``Records``' per-record "previous" column,
not here. ``HASH`` and ``MIN_SLOTS`` are module globals so tests can force keys into one probe
chain or a tiny table.
"""

from __future__ import annotations

from array import array

HASH = hash  # the slot of a key: hash(key) & mask
MIN_SLOTS = 1024  # 8 KB: the smallest table
PRESIZE_SLOTS = 1 << 19  # the largest table made up front for an expected count (2 MB)


def slots_for(expected: int) -> int:
    """The table a count of ``expected`` keys needs up front: a power of two, at least twice it."""
    size = MIN_SLOTS
    while size < 2 * expected and size < PRESIZE_SLOTS:
        size *= 2
    return size


class RcptTable:
    """Key (bytes) -> absolute position of the newest record with that key.

    Every method takes ``keys`` (the records' recipient column) and ``dropped`` (how many column
    slots compaction has removed): the key of position ``p`` is ``keys[p - dropped]``. Every
    position held must be a retained record whose ``keys`` item is its key."""

    __slots__ = ("slots", "mask", "count", "floor", "limit")

    def __init__(self, expected: int = 0) -> None:
        self.floor = slots_for(expected)  # never shrunk below this
        self._allocate(self.floor)
        self.count = 0

    def clear(self) -> None:
        if self.count or len(self.slots) != self.floor:  # else empty already: every slot is 0
            self._allocate(self.floor)
        self.count = 0

    def _allocate(self, size: int) -> None:
        self.slots = array("I", (0,)) * size
        self.mask = size - 1
        self.limit = size // 2  # at most half full
    def __len__(self) -> int:
        return self.count

    def find(self, key: bytes, keys: list, dropped: int) -> int:
        """The position held for ``key``, or -1."""
        slots, mask = self.slots, self.mask
        i = HASH(key) & mask
        while True:
            held = slots[i]
            if not held:
                return -1
            if keys[held - 1 - dropped] == key:
                return held - 1
            i = (i + 1) & mask

    def put(self, key: bytes, pos: int, keys: list, dropped: int) -> int:
        """Hold ``pos`` for ``key``; return the position it replaces, or -1 for a new key."""
        slots, mask = self.slots, self.mask
        i = HASH(key) & mask
        while True:
            held = slots[i]
            if not held:
                break
            if keys[held - 1 - dropped] == key:
                slots[i] = pos + 1
                return held - 1
            i = (i + 1) & mask
        slots[i] = pos + 1
        self.count += 1
        if self.count > self.limit:
            self._resize(len(slots) * 2, keys, dropped)
        return -1

    def remove(self, key: bytes, pos: int, keys: list, dropped: int) -> bool:
        """Forget ``key`` if the position held for it is ``pos`` (a newer one stays); True if so."""
        slots, mask = self.slots, self.mask
        i = HASH(key) & mask
        mine = pos + 1
        while True:
            held = slots[i]
            if held == mine:  # positions are unique: no need to compare keys
                break
            if not held or keys[held - 1 - dropped] == key:
                return False  # not held, or a newer record to it is the head
            i = (i + 1) & mask
        # Backward shift: move each later entry of the probe chain into the hole unless its home
        # slot lies cyclically in (hole, its slot], where a lookup would never reach the hole.
        j = i
        while True:
            j = (j + 1) & mask
            held = slots[j]
            if not held:
                break
            home = HASH(keys[held - 1 - dropped]) & mask
            if (i < home <= j) if i <= j else (i < home or home <= j):
                continue
            slots[i] = held
            i = j
        slots[i] = 0
        self.count -= 1
        if self.count * 8 < len(slots) and len(slots) > self.floor:
            self._resize(len(slots) // 2, keys, dropped)
        return True

    def rebase(self, dropped: int) -> None:
        """Positions count from ``dropped`` on now (the caller resets its count to 0): O(slots)."""
        self.slots = array("I", (held - dropped if held else 0 for held in self.slots))

    def _resize(self, size: int, keys: list, dropped: int) -> None:
        # O(slots), amortised O(1) per put or remove (the count doubled or fell to a quarter since).
        old = self.slots
        self._allocate(size)
        new, mask = self.slots, self.mask
        for held in filter(None, old):  # the empty slots skipped in C
            i = HASH(keys[held - 1 - dropped]) & mask
            while new[i]:
                i = (i + 1) & mask
            new[i] = held
