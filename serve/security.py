"""API keys and the audit log.

Why hashes: a leaked key file or a memory dump must not hand out working keys, so only sha256 digests
are kept, and a presented key is hashed and compared with ``hmac.compare_digest`` against every stored
digest (no early exit that would time-leak which prefix matched).

Why the audit log holds hashes, not inputs: it must prove which model version scored which request
without ever becoming a store of patient data. The input hash is an HMAC when ``MASML_SERVE_AUDIT_KEY``
is set, so that low-entropy lab panels cannot be recovered by hashing guesses.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import os
import sys
import time
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
        self._formats: dict[tuple[str, ...], bytes] = {}  # one line's format per set of output names
        # a hash (or HMAC, key pads already hashed) to copy per row: see input_hashes
        self._hash = hmac.new(self.key, digestmod=hashlib.sha256) if self.key else hashlib.sha256()

    def input_hashes(self, x32: np.ndarray) -> list[str]:
        """Per row of ``x32``: the first 32 hex digits of sha256 (or HMAC-SHA256 with the audit key) of
        the row's float32 bytes.

        Why one prepared hash copied per row: creating an HMAC hashes its key pads again, which costs
        more than hashing one 140-byte row; ``copy()`` starts each row from the prepared state (the
        same digest as ``hmac.new(key, row, "sha256")``, ~25% cheaper for 1,000 rows). Why slices of
        one bytes object: a numpy row view and its ``tobytes()`` per row cost more than the hash itself
        (1,000 rows of 35 inputs: 0.9 against 1.5 ms)."""
        data = memoryview(np.ascontiguousarray(x32, dtype=np.float32).tobytes())
        width = x32.shape[1] * 4
        copy, out = self._hash.copy, []
        for start in range(0, len(data), width):
            h = copy()
            h.update(data[start : start + width])
            out.append(h.hexdigest()[:32])
        return out

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
        common = {
            "time": f"{self._stamp}.{int(now * 1000) % 1000:03d}Z",
            "request_id": request_id,
            "endpoint": endpoint,
            "model": model.name,
            "task": model.task,
            "version": model.version,
            "sha256": model.sha256,
            "key": principal,
            "n": int(x32.shape[0]),
        } | (extra or {})  # e.g. the explainer's sha256 on explain requests (explanations are not logged)
        head = self.encoder.encode(common)[:-1] + b',"index":'  # the shared fields, once per request
        enc = self.encoder.encode
        # each output column encoded in one call and cut at its commas (numbers and null hold none), so
        # a line is one bytes format, not one dict and one encode per patient
        names = tuple(outputs)
        fmt = self._formats.get(names)
        if fmt is None:
            keys = b",".join(enc(k).replace(b"%", b"%%") + b":%s" for k in names)
            fmt = self._formats[names] = b'%s%d,"input_sha256":"%s","outputs":{' + keys + b"}}\n"
        columns = [
            enc(v)[1:-1].split(b",") if v and _numbers(v) else list(map(enc, v)) for v in outputs.values()
        ]
        lines = [
            fmt % (head, i, h.encode(), *values)
            for i, (h, *values) in enumerate(zip(self.input_hashes(x32), *columns, strict=True))
        ]
        data = b"".join(lines)
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
