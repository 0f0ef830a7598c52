"""Rows read straight from SQLite's table-leaf pages, for caches SQLite itself can no longer walk.

A truncated cache (a copy cut short, a disk that lost its tail) keeps most of its rows on pages that are
still whole, but SQLite reaches them through interior pages that may be gone, so no query returns them.
This reader walks every page of the file (and of its WAL, whose frames hold the newest committed copies) and
decodes the cells of table-leaf pages with the record format of SQLite's file-format document: a varint
payload size, a varint rowid, a header of serial types, then the values. Cells whose payload spills onto
overflow pages are followed when those pages exist and skipped otherwise. Nothing here writes.
"""
from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

_LEAF_TABLE = 0x0D
_WAL_MAGIC = (0x377F0682, 0x377F0683)


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    """(value, next offset) of the big-endian base-128 varint at ``buf[i]`` (at most 9 bytes)."""
    value = 0
    for k in range(8):
        byte = buf[i + k]
        value = (value << 7) | (byte & 0x7F)
        if byte < 0x80:
            return value, i + k + 1
    return (value << 8) | buf[i + 8], i + 9


def _value(serial: int, buf: bytes, i: int):
    """(decoded value, size in bytes) of one record value of ``serial`` type at ``buf[i]``."""
    sizes = {1: 1, 2: 2, 3: 3, 4: 4, 5: 6, 6: 8}
    if serial == 0:
        return None, 0
    if serial in sizes:
        n = sizes[serial]
        return int.from_bytes(buf[i:i + n], "big", signed=True), n
    if serial == 7:
        return struct.unpack(">d", buf[i:i + 8])[0], 8
    if serial in (8, 9):
        return serial - 8, 0
    if serial >= 12:
        n = (serial - 12) // 2
        raw = bytes(buf[i:i + n])
        if len(raw) < n:
            raise ValueError("value runs past the payload")
        return (raw if serial % 2 == 0 else raw.decode("utf-8")), n
    raise ValueError(f"reserved serial type {serial}")


def _record(payload: bytes) -> tuple:
    header_size, i = _varint(payload, 0)
    serials = []
    while i < header_size:
        serial, i = _varint(payload, i)
        serials.append(serial)
    values, j = [], header_size
    for serial in serials:
        value, n = _value(serial, payload, j)
        values.append(value)
        j += n
    return tuple(values)


class _Pages:
    """Page ``n`` (1-based) of the database file, the WAL's last copy winning."""

    def __init__(self, path: Path):
        data = path.read_bytes()
        if len(data) < 100 or not data.startswith(b"SQLite format 3\x00"):
            raise ValueError("no SQLite header")
        size = int.from_bytes(data[16:18], "big")
        self.size = 65536 if size == 1 else size
        self.usable = self.size - data[20]
        self.pages = {n + 1: data[n * self.size:(n + 1) * self.size]
                      for n in range(len(data) // self.size)}  # a torn last page is left out
        wal = Path(f"{path}-wal")
        if wal.is_file():
            self._read_wal(wal.read_bytes())

    def _read_wal(self, wal: bytes) -> None:
        if len(wal) < 32 or int.from_bytes(wal[:4], "big") not in _WAL_MAGIC:
            return
        if int.from_bytes(wal[8:12], "big") != self.size:
            return
        frame = 24 + self.size
        for start in range(32, len(wal) - frame + 1, frame):
            number = int.from_bytes(wal[start:start + 4], "big")
            if number:
                self.pages[number] = wal[start + 24:start + frame]

    def payload(self, page: bytes, offset: int) -> tuple[int, bytes] | None:
        """(rowid, whole payload) of the table-leaf cell at ``offset``, or None when its overflow is lost."""
        total, i = _varint(page, offset)
        rowid, i = _varint(page, i)
        u = self.usable
        x = u - 35
        if total <= x:
            return rowid, bytes(page[i:i + total])
        m = ((u - 12) * 32 // 255) - 23
        k = m + (total - m) % (u - 4)
        local = k if k <= x else m
        parts, left = [bytes(page[i:i + local])], total - local
        nxt = int.from_bytes(page[i + local:i + local + 4], "big")
        seen = set()
        while left > 0:
            if nxt in seen or nxt not in self.pages:
                return None
            seen.add(nxt)
            over = self.pages[nxt]
            chunk = over[4:4 + min(left, u - 4)]
            parts.append(bytes(chunk))
            left -= len(chunk)
            nxt = int.from_bytes(over[:4], "big")
        return rowid, b"".join(parts)


def leaf_records(path: str | Path) -> Iterator[tuple[int, tuple | None]]:
    """(rowid, values) of every cell on every table-leaf page of ``path`` (any table, stale copies on freed
    pages included: the caller validates and deduplicates); values are None for a cell that cannot be
    decoded (damaged bytes, overflow pages lost), so the caller can count it."""
    pages = _Pages(Path(path))
    for number, page in pages.pages.items():
        head = 100 if number == 1 else 0
        if len(page) < head + 8 or page[head] != _LEAF_TABLE:
            continue
        cells = int.from_bytes(page[head + 3:head + 5], "big")
        for c in range(cells):
            at = head + 8 + 2 * c
            offset = int.from_bytes(page[at:at + 2], "big")
            try:
                found = pages.payload(page, offset)
                decoded = (found[0], _record(found[1])) if found is not None else (-1, None)
            except (IndexError, ValueError, struct.error):  # a damaged cell costs only itself
                decoded = (-1, None)
            yield decoded
