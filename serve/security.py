"""API keys and the audit log.

Why hashes: a leaked key file or a memory dump must not hand out working keys, so only sha256 digests
are kept, and a presented key is hashed and compared with ``hmac.compare_digest`` against every stored
digest (no early exit that would time-leak which prefix matched).

Why the audit log holds hashes, not inputs: it must prove which model version scored which request
without ever becoming a store of patient data. The input hash is an HMAC when ``MASML_SERVE_AUDIT_KEY``
is set, so that low-entropy lab panels cannot be recovered by hashing guesses.
"""

from __future__ import annotations

import binascii
import functools
import hashlib
import hmac
import ipaddress
import os
import sys
import time
from collections.abc import Iterable
from itertools import chain, repeat
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

ROLES = ("user", "admin")


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Keys:
    """Entries: ``KEY[:role]`` from ``MASML_SERVE_API_KEYS`` (comma-separated), or lines of a key file as
    ``KEY [role]`` or ``sha256:HEX [role]`` (already hashed, so the file can hold no secret at all)."""

    def __init__(self, entries: list[tuple[str, str]]) -> None:
        self.hashes: list[tuple[bytes, str]] = [(bytes.fromhex(h), role) for h, role in entries]

    @property
    def enabled(self) -> bool:
        return bool(self.hashes)

    @classmethod
    def load(cls, env: str | None, file: str | Path | None) -> Keys:
        entries: list[tuple[str, str]] = []
        for item in (env or "").split(","):
            item = item.strip()
            if item:
                key, _, role = item.partition(":") if item.endswith((":admin", ":user")) else (item, "", "")
                entries.append((digest(key), role or "user"))
        if file:
            for n, line in enumerate(Path(file).read_text().splitlines(), 1):
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                parts = line.split()
                role = parts[1] if len(parts) > 1 else "user"
                if role not in ROLES or len(parts) > 2:
                    raise ValueError(f"{file}:{n}: expected 'KEY [user|admin]' or 'sha256:HEX [user|admin]'")
                h = parts[0][7:] if parts[0].startswith("sha256:") else digest(parts[0])
                if len(h) != 64:
                    raise ValueError(f"{file}:{n}: a sha256 digest has 64 hex digits")
                entries.append((h.lower(), role))
        return cls(entries)

    def role(self, authorization: str | None) -> str | None:
        """The presented key's role, or None; constant time over the stored digests."""
        if not authorization or not authorization[:7].lower() == "bearer ":
            return None
        presented = hashlib.sha256(authorization[7:].strip().encode()).digest()
        found = None
        for h, role in self.hashes:
            if hmac.compare_digest(presented, h) and found != "admin":
                found = role
        return found


class Audit:
    """One JSON line per prediction (per patient scored): who/what/when, the input's hash and the
    outputs, never the inputs.

    Why one ``os.write`` per request on an ``O_APPEND`` descriptor: several server workers may share the
    file, and a single append is not interleaved with another process's, so every line stays whole
    without a lock; a 1,000-patient batch costs one system call, not a thousand.
    """

    def __init__(self, path: str | None) -> None:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        self.fd = os.open(path, flags, 0o640) if path else sys.stderr.fileno()
        key = os.environ.get("MASML_SERVE_AUDIT_KEY")
        self.key = key.encode() if key else None
        self.encoder = msgspec.json.Encoder()
        self._second, self._stamp = -1, ""  # the time stamp to the second, made once per second
        # a hash (or HMAC, key pads already hashed) to copy per row: see input_hashes
        self._hash = hmac.new(self.key, digestmod=hashlib.sha256) if self.key else hashlib.sha256()

    def input_hashes(self, x32: np.ndarray) -> list[bytes]:
        """Per row of ``x32``: the first 32 hex digits of sha256 (or HMAC-SHA256 with the audit key) of
        the row's float32 bytes, as ASCII bytes.

        Why one prepared hash copied per row: creating an HMAC hashes its key pads again, which costs
        more than hashing one 140-byte row; ``copy()`` starts each row from the prepared state (the
        same digest as ``hmac.new(key, row, "sha256")``, ~25% cheaper for 1,000 rows). Why slices of
        one bytes object: a numpy row view and its ``tobytes()`` per row cost more than the hash itself
        (1,000 rows of 35 inputs: 0.9 against 1.5 ms). Why the digests joined and turned to hex in one
        call: a ``hexdigest()`` per row, cut and encoded, costs ~0.1 ms more per 1,000 rows."""
        data = memoryview(np.ascontiguousarray(x32, dtype=np.float32).tobytes())
        width = x32.shape[1] * 4
        copy, digests = self._hash.copy, []
        for start in range(0, len(data), width):
            h = copy()
            h.update(data[start : start + width])
            digests.append(h.digest()[:16])
        hexed = binascii.hexlify(b"".join(digests))
        return [hexed[i : i + 32] for i in range(0, len(hexed), 32)]

    def write(
        self,
        request_id: str,
        endpoint: str,
        model: Any,
        x32: np.ndarray,
        outputs: dict[str, list],
        principal: str | None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """``outputs``: per output name, one value per patient (row order of ``x32``)."""
        now = time.time()
        second = int(now)
        if second != self._second:  # strftime costs ~4 µs: once per second, not once per request
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        n = int(x32.shape[0])
        if n == 0:
            return
        common = {
            "time": f"{self._stamp}.{int(now * 1000) % 1000:03d}Z",
            "request_id": request_id,
            "endpoint": endpoint,
            "model": model.name,
            "task": model.task,
            "version": model.version,
            "sha256": model.sha256,
            "key": principal,
            "n": n,
        } | (extra or {})  # e.g. the explainer's sha256 on explain requests (explanations are not logged)
        enc = self.encoder.encode
        # A line is its pieces in turn: the shared head, the index, the hash, each output's value, the
        # end. Each column is encoded in one call and cut at its commas (numbers and null hold none),
        # and the pieces are interleaved and joined in C: no dict, no encode, no format per patient
        # (1,000 patients: ~0.25 ms less than one bytes format per line, the same bytes).
        columns = [enc(list(range(n)))[1:-1].split(b","), self.input_hashes(x32)]
        columns += [
            enc(v)[1:-1].split(b",") if v and _numbers(v) else list(map(enc, v)) for v in outputs.values()
        ]
        if any(len(c) != n for c in columns):  # zip below stops at the shortest: no line may go missing
            raise ValueError(f"audit: {n} rows but outputs of lengths {[len(v) for v in outputs.values()]}")
        keys = [(b"," if i else b"") + enc(k) + b":" for i, k in enumerate(outputs)]
        pieces: list[Iterable[bytes]] = [repeat(enc(common)[:-1] + b',"index":'), columns[0]]
        pieces += [repeat(b',"input_sha256":"'), columns[1], repeat(b'","outputs":{')]
        for key, column in zip(keys, columns[2:], strict=True):
            pieces += [repeat(key), column]
        pieces.append(repeat(b"}}\n"))
        data = b"".join(chain.from_iterable(zip(*pieces, strict=False)))  # repeat() pieces are endless
        while data:  # a regular file takes it in one call; a pipe (stderr) may take it in parts
            data = data[os.write(self.fd, data) :]


def _numbers(values: list) -> bool:
    """True when every value is a float, an int or None: their JSON texts hold no comma."""
    return set(map(type, values)) <= {float, int, type(None)}


@functools.lru_cache(maxsize=1024)  # asked on every request without keys; parsing an address is not free
def is_loopback(host: str | None) -> bool:
    if host in (None, "localhost"):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback  # type: ignore[arg-type]
    except ValueError:
        return False
