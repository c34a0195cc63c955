"""Client-side encryption: AES-256-GCM in authenticated chunks.

Every encrypted object is self-describing::

    header  MAGIC "PGDRAEAD" | version (1) | key id length (1) | key id
            | wrap nonce (12) | wrapped data key (32 + 16 tag) | salt (16) | chunk size (4, big-endian)
    chunks  AES-256-GCM(ciphertext + 16-byte tag) of ``chunk size`` plaintext bytes each;
            the last chunk is shorter (possibly empty) and marked final

The data key is random: one per backup (shared by its parts) and one per WAL
object. It is wrapped (AES-256-GCM) by the master key named by the key id, and
only the wrapped form is stored. Each object's chunks use a key derived from
the data key and the object's random salt (HKDF-SHA256), and nonce = chunk
index, so no (key, nonce) pair ever repeats. Each chunk's associated data
binds the header, the object's *context* (what it is: ``<label>/<part name>``
of a backup, the WAL file name), the chunk index and the final flag: flipping,
moving, dropping or appending a byte, a chunk or the end is detected, and so is
an encrypted object put in another one's place.

Master keys never enter the repository. They come from a *keyring*: text of
``id:base64key`` entries separated by commas or newlines, the last one being
the key new objects use (add a key at the end to rotate; keep old ones while
backups that need them are retained). The keyring arrives in an environment
variable (``PGDR_KEYRING`` by default; ``file:/path`` in it reads a file) or,
under Airflow, from a connection's password.

Records that stay readable (``manifest.json``, ``verify.json``) are
*authenticated* instead: HMAC-SHA256, keyed by a key derived (HKDF-SHA256)
from the master key, over a canonical serialization of every field and the
record's key in the repository, recorded with the master key's id
(:func:`sign_record`, :func:`check_record`). A rewritten checksum, size, file
list or status, or a record moved to another backup, fails.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import struct
from dataclasses import dataclass
from typing import Iterable, Iterator

from pgdr.errors import IntegrityError, PgdrError, UsageError

MAGIC = b"PGDRAEAD"
VERSION = 1
CHUNK = 1 << 20
TAG = 16
KEY_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
DEFAULT_ENV = "PGDR_KEYRING"
CIPHER = "aes-256-gcm"
AUTH = "hmac-sha256"


class KeyUnavailable(PgdrError):
    """An encrypted object needs a master key this process does not hold."""

    exit_code = 2
    kind = "key_unavailable"


@dataclass(frozen=True)
class MasterKey:
    key_id: str
    key: bytes

    def __repr__(self) -> str:  # never print key material
        return f"MasterKey({self.key_id!r})"


class Keyring:
    """Master keys by id; the last one listed encrypts new objects."""

    def __init__(self, keys: Iterable[MasterKey] = (), source: str = "no keyring"):
        self.keys = list(keys)
        self.by_id = {k.key_id: k for k in self.keys}
        self.source = source

    def __bool__(self) -> bool:
        return bool(self.keys)

    def __repr__(self) -> str:
        return f"Keyring({[k.key_id for k in self.keys]}, from {self.source})"

    @classmethod
    def parse(cls, text: str, source: str) -> "Keyring":
        keys = []
        for n, entry in enumerate(e for e in re.split(r"[,\s]+", text.strip()) if e):
            key_id, sep, b64 = entry.partition(":")
            if not sep or not KEY_ID.fullmatch(key_id):
                raise UsageError(f"{source}: entry {n + 1} is not 'id:base64key' (ids are letters, digits, '.', "
                                 "'_' and '-')")
            try:
                key = base64.b64decode(b64, validate=True)
            except ValueError:
                raise UsageError(f"{source}: key {key_id!r} is not valid base64") from None
            if len(key) != 32:
                raise UsageError(f"{source}: key {key_id!r} is {len(key)} bytes; AES-256 needs 32 "
                                 "(make one with 'pgdr keygen')")
            if any(k.key_id == key_id for k in keys):
                raise UsageError(f"{source}: key id {key_id!r} is listed twice")
            keys.append(MasterKey(key_id, key))
        return cls(keys, source)

    @classmethod
    def from_env(cls, name: str = DEFAULT_ENV) -> "Keyring":
        """The keyring in ``$name`` (or in the file ``file:/path`` there names); empty when unset."""
        text = os.environ.get(name, "")
        if text.startswith("file:"):
            path = text[len("file:"):]
            try:
                text = open(path).read()
            except OSError as e:
                raise UsageError(f"${name} names keyring file {path}, which cannot be read: {e.strerror}") from None
            return cls.parse(text, f"keyring file {path} (from ${name})")
        return cls.parse(text, f"${name}") if text.strip() else cls([], f"${name} (unset)")

    def serialize(self) -> str:
        return ",".join(f"{k.key_id}:{base64.b64encode(k.key).decode()}" for k in self.keys)

    def current(self) -> MasterKey:
        if not self.keys:
            raise KeyUnavailable(f"encryption is on for this repository but no master key is available from "
                                 f"{self.source}: set {DEFAULT_ENV} (or the configured variable/connection) to "
                                 "'id:base64key' (make one with 'pgdr keygen')")
        return self.keys[-1]

    def get(self, key_id: str, what: str) -> MasterKey:
        try:
            return self.by_id[key_id]
        except KeyError:
            have = ", ".join(self.by_id) or "none"
            raise KeyUnavailable(f"{what} is encrypted with master key {key_id!r}, which is not in the keyring "
                                 f"(keys from {self.source}: {have}); add {key_id!r} back to restore or verify it"
                                 ) from None

    def new_data_key(self) -> "DataKey":
        master = self.current()
        dek = os.urandom(32)
        nonce = os.urandom(12)
        wrapped = _aead(master.key).encrypt(nonce, dek, _wrap_aad(master.key_id))
        return DataKey(master.key_id, dek, nonce + wrapped)


def generate_key(key_id: str) -> str:
    """A new keyring entry: ``id:base64key``."""
    if not KEY_ID.fullmatch(key_id):
        raise UsageError(f"key id {key_id!r}: use letters, digits, '.', '_' and '-' (at most 64)")
    return f"{key_id}:{base64.b64encode(os.urandom(32)).decode()}"


@dataclass(frozen=True)
class DataKey:
    key_id: str
    key: bytes
    wrapped: bytes  # wrap nonce + AES-GCM(master, key)

    def __repr__(self) -> str:
        return f"DataKey({self.key_id!r})"


def _aead(key: bytes):
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key)


def _wrap_aad(key_id: str) -> bytes:
    return MAGIC + bytes([VERSION]) + key_id.encode()


def _object_key(dek: bytes, salt: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=b"pgdr object key v1").derive(dek)


def _chunk_aad(header_hash: bytes, index: int, final: bool) -> bytes:
    return header_hash + struct.pack(">QB", index, 1 if final else 0)


def seal(chunks: Iterable[bytes], data_key: DataKey, context: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
    """Encrypt a byte stream into one self-describing object; ``context`` names what it is."""
    kid = data_key.key_id.encode()
    salt = os.urandom(16)
    header = MAGIC + bytes([VERSION, len(kid)]) + kid + data_key.wrapped + salt + struct.pack(">I", chunk_size)
    yield header
    hh = hashlib.sha256(header + context.encode()).digest()
    aead = _aead(_object_key(data_key.key, salt))
    buf = bytearray()
    index = 0
    for chunk in chunks:
        if not buf and len(chunk) == chunk_size:  # the common case: no copying at all
            yield aead.encrypt(index.to_bytes(12, "big"), chunk, _chunk_aad(hh, index, False))
            index += 1
            continue
        buf += chunk
        if len(buf) < chunk_size:
            continue
        off = 0
        with memoryview(buf) as view:
            while len(buf) - off >= chunk_size:
                # A full chunk is never the final one: the end is always a short (maybe empty) chunk.
                yield aead.encrypt(index.to_bytes(12, "big"), view[off:off + chunk_size],
                                   _chunk_aad(hh, index, False))
                off += chunk_size
                index += 1
        del buf[:off]
    yield aead.encrypt(index.to_bytes(12, "big"), bytes(buf), _chunk_aad(hh, index, True))


def is_sealed(head: bytes) -> bool:
    return head.startswith(MAGIC)


def key_id_of(head: bytes) -> str | None:
    """The master key id in an object's first bytes, or None when it is not encrypted."""
    if not is_sealed(head) or len(head) < 10:
        return None
    n = head[9]
    return head[10:10 + n].decode(errors="replace")


def check_key(head: bytes, keyring: Keyring | None, name: str) -> str:
    """Open the data key in an object's first bytes; raise KeyUnavailable unless this keyring can. Returns the id."""
    for _ in unseal([head], keyring, "", name, header_only=True):
        pass
    return key_id_of(head) or ""


class _Reader:
    def __init__(self, chunks: Iterable[bytes]):
        self._it = iter(chunks)
        self._pieces: list[bytes] = []
        self._have = 0
        self._off = 0  # consumed bytes of the first piece

    def take(self, n: int) -> bytes:
        """Up to n bytes: fewer only at the end of the stream."""
        while self._have < n:
            chunk = next(self._it, None)
            if chunk is None:
                break
            if chunk:
                self._pieces.append(chunk)
                self._have += len(chunk)
        first = self._pieces[0] if self._pieces else b""
        if len(first) - self._off >= n:  # within one piece: at most one copy
            out = first[self._off:self._off + n] if (self._off or len(first) != n) else first
            self._off += n
        else:
            parts, need = [], n
            while need and self._pieces:
                piece = self._pieces[0]
                part = piece[self._off:self._off + need]
                parts.append(part)
                need -= len(part)
                self._off += len(part)
                if self._off == len(piece):
                    self._pieces.pop(0)
                    self._off = 0
            out = b"".join(parts)
            self._have -= len(out)
            return out
        if self._off == len(first):
            self._pieces.pop(0)
            self._off = 0
        self._have -= len(out)
        return out


def unseal(chunks: Iterable[bytes], keyring: Keyring | None, context: str, name: str = "object",
           header_only: bool = False) -> Iterator[bytes]:
    """Decrypt and authenticate an object written by :func:`seal`, chunk by chunk.

    Raises KeyUnavailable naming the key id when the keyring lacks it, and
    IntegrityError for anything that fails authentication.
    """
    from cryptography.exceptions import InvalidTag

    r = _Reader(chunks)
    fixed = r.take(10)
    if not fixed.startswith(MAGIC) or len(fixed) < 10:
        raise IntegrityError(f"{name}: not an encrypted pgdr object (no {MAGIC.decode()} header), "
                             "but it should be: replaced or damaged")
    if fixed[8] != VERSION:
        raise IntegrityError(f"{name}: encryption format version {fixed[8]} is not one this pgdr reads ({VERSION})")
    kid_b = r.take(fixed[9])
    rest = r.take(12 + 48 + 16 + 4)
    if len(kid_b) != fixed[9] or len(rest) != 80:
        raise IntegrityError(f"{name}: encryption header is truncated")
    key_id = kid_b.decode(errors="replace")
    header = fixed + kid_b + rest
    wrap_nonce, wrapped, salt = rest[:12], rest[12:60], rest[60:76]
    (chunk_size,) = struct.unpack(">I", rest[76:80])
    if not 0 < chunk_size <= 64 << 20:
        raise IntegrityError(f"{name}: encryption header names an impossible chunk size {chunk_size}")
    master = (keyring or Keyring()).get(key_id, name)
    try:
        dek = _aead(master.key).decrypt(wrap_nonce, wrapped, _wrap_aad(key_id))
    except InvalidTag:
        raise KeyUnavailable(f"{name}: master key {key_id!r} from {(keyring or Keyring()).source} does not open "
                             "this object's data key: wrong key material under that id, or a tampered header"
                             ) from None
    if header_only:
        return
    hh = hashlib.sha256(header + context.encode()).digest()
    aead = _aead(_object_key(dek, salt))
    index = 0
    while True:
        block = r.take(chunk_size + TAG)
        final = len(block) < chunk_size + TAG
        if final and len(block) < TAG:
            raise IntegrityError(f"{name}: encrypted object is truncated (chunk {index})")
        try:
            plain = aead.decrypt(index.to_bytes(12, "big"), block, _chunk_aad(hh, index, final))
        except InvalidTag:
            raise IntegrityError(f"{name}: chunk {index} fails authentication (AES-256-GCM): tampered with, "
                                 "truncated, or another object put in its place") from None
        if plain:
            yield plain
        if final:
            if r.take(1):
                raise IntegrityError(f"{name}: bytes after the final encrypted chunk")
            return
        index += 1


def _record_key(master: MasterKey) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"pgdr record authentication v1").derive(master.key)


def _canonical(record: dict, context: str) -> bytes:
    body = {k: v for k, v in record.items() if k != "auth"}
    return (b"pgdr record v1\0" + context.encode() + b"\0"
            + json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode())


def sign_record(record: dict, keyring: Keyring | None, context: str) -> dict:
    """``record`` with an ``auth`` entry: HMAC-SHA256 over its canonical form and ``context`` (its key in the
    repository), keyed from the keyring's current master key."""
    master = (keyring or Keyring()).current()
    key = _record_key(master)
    mac = hmac.new(key, _canonical(record, context), hashlib.sha256).hexdigest()
    return {**{k: v for k, v in record.items() if k != "auth"},
            "auth": {"alg": AUTH, "key_id": master.key_id, "key_check": _key_check(key), "mac": mac}}


def _key_check(key: bytes) -> str:
    """Commits to the derived key, so a wrong key under the right id is told apart from a rewritten record."""
    return hmac.new(key, b"pgdr key check v1", hashlib.sha256).hexdigest()[:16]


def check_record(record: dict, keyring: Keyring | None, context: str, what: str, required: bool) -> bool:
    """Check a record written by :func:`sign_record`. True when it is authentic; False when it carries no
    authentication and none is ``required``. Raises IntegrityError when it fails (or is missing where
    required) and KeyUnavailable, naming the key id, when the keyring cannot check it."""
    auth = record.get("auth")
    if auth is None:
        if required:
            raise IntegrityError(
                f"{what} is not authenticated, but this repository is encrypted: rewritten, or written by a pgdr "
                "that did not authenticate it yet; refusing it (while migrating such backups, set "
                "encryption.accept_unencrypted: true)")
        return False
    if not (isinstance(auth, dict) and auth.get("alg") == AUTH and isinstance(auth.get("key_id"), str)
            and isinstance(auth.get("key_check"), str) and isinstance(auth.get("mac"), str)):
        raise IntegrityError(f"{what} fails authentication: its 'auth' entry is malformed ({auth!r:.200})")
    keyring = keyring or Keyring()
    if auth["key_id"] not in keyring.by_id:
        raise KeyUnavailable(f"{what} is authenticated with master key {auth['key_id']!r}, which is not in the "
                             f"keyring (keys from {keyring.source}: {', '.join(keyring.by_id) or 'none'}); add "
                             f"{auth['key_id']!r} to read it")
    key = _record_key(keyring.by_id[auth["key_id"]])
    if not hmac.compare_digest(_key_check(key), auth["key_check"]):
        raise KeyUnavailable(f"{what}: master key {auth['key_id']!r} from {keyring.source} does not open it (its "
                             "key check differs): wrong key material under that id, or a tampered record")
    expected = hmac.new(key, _canonical(record, context), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, auth["mac"]):
        raise IntegrityError(f"{what} fails authentication (HMAC-SHA256 keyed from master key "
                             f"{auth['key_id']!r}): rewritten or damaged; refusing it")
    return True
