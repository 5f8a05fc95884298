"""Read R lazy-load databases (``.rdx`` index + ``.rdb`` values) and XDR-serialised R objects, in pure Python.

R packages ship their datasets as a lazy-load database: ``Rdata.rdx`` is a gzip-compressed serialised list
``(variables, references, compressed)`` where ``variables`` maps each dataset name to an ``(offset, length)``
pair into ``Rdata.rdb``; each value there is a 4-byte big-endian uncompressed length, (for
``compressed`` 2 or 3) a one-byte method tag, then the compressed serialisation (zlib, bzip2 or xz).

The serialisation format ("X\\n" XDR, versions 2 and 3) is a tree of items, each starting with a 32-bit flags
word: SEXP type in the low byte, the "is object", "has attributes" and "has tag" bits 8-10, and general
purpose "levels" (string encoding for CHARSXP) from bit 12. This reader returns plain Python values:

- character vectors -> ``RVector(list[str | None])``; logical/integer/double vectors -> ``RVector`` of
  Python numbers (``None`` for NA); raw -> ``bytes``; lists -> ``RVector`` of items;
- pairlists -> ``RPairList`` (tags and values); symbols -> ``RSymbol``; environments -> ``REnvironment``;
- attributes (names, class, ...) travel on ``RVector.attributes`` as a dict.

Only what datasets use is decoded; closures and byte code raise an error naming the type, since a data
package never needs them.
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from dataclasses import dataclass, field

# SEXP types.
NILSXP, SYMSXP, LISTSXP, CLOSXP, ENVSXP, PROMSXP, LANGSXP = 0, 1, 2, 3, 4, 5, 6
SPECIALSXP, BUILTINSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, CPLXSXP = 7, 8, 9, 10, 13, 14, 15
STRSXP, DOTSXP, VECSXP, EXPRSXP, BCODESXP, EXTPTRSXP, WEAKREFSXP = 16, 17, 19, 20, 21, 22, 23
RAWSXP, S4SXP = 24, 25
# Pseudo-types of the serialisation stream.
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP, MISSINGARG_SXP = 255, 254, 253, 252, 251
BASENAMESPACE_SXP, NAMESPACESXP, PACKAGESXP, PERSISTSXP = 250, 249, 248, 247
EMPTYENV_SXP, BASEENV_SXP, ATTRLANGSXP, ATTRLISTSXP, ALTREP_SXP = 242, 241, 240, 239, 238

_NA_INTEGER = -(2 ** 31)
_LATIN1_MASK = 1 << 2
_BYTES_MASK = 1 << 1


class RDataError(ValueError):
    """The stream is not an R serialisation this reader understands."""


class RVector(list):
    """An R atomic vector or list; ``attributes`` holds names, class, dim, ... ."""

    def __init__(self, items=(), rtype: int = VECSXP, attributes: dict | None = None):
        super().__init__(items)
        self.rtype = rtype
        self.attributes = attributes or {}

    @property
    def names(self) -> list | None:
        n = self.attributes.get("names")
        return list(n) if n is not None else None


@dataclass
class RSymbol:
    name: str


@dataclass
class RPairList:
    """A pairlist (or language object): parallel tags (str or None) and values."""

    tags: list = field(default_factory=list)
    values: list = field(default_factory=list)
    rtype: int = LISTSXP
    attributes: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {t: v for t, v in zip(self.tags, self.values)}


@dataclass
class REnvironment:
    frame: dict = field(default_factory=dict)
    locked: bool = False
    name: str = ""


class _Reader:
    def __init__(self, data: bytes, where: str):
        self.data = data
        self.pos = 0
        self.where = where
        self.refs: list = []

    def _take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise RDataError(f"{self.where}: serialisation truncated at byte {self.pos} (wanted {n} more bytes)")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def int(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two more ints, upper and lower halves
            hi, lo = struct.unpack(">II", self._take(8))
            return (hi << 32) | lo
        if n < 0:
            raise RDataError(f"{self.where}: negative vector length {n} at byte {self.pos - 4}")
        return n

    def header(self) -> None:
        fmt = self._take(2)
        if fmt != b"X\n":
            raise RDataError(f"{self.where}: not an XDR R serialisation (starts with {fmt!r}; "
                             f"only the 'X' format is supported)")
        version = self.int()
        self.int()  # writer's R version
        self.int()  # minimal reader R version
        if version == 3:
            self._take(self.int())  # native encoding name
        elif version != 2:
            raise RDataError(f"{self.where}: serialisation version {version} (known: 2, 3)")

    def _attributes(self, has_attr: bool) -> dict:
        if not has_attr:
            return {}
        attr = self.item()
        if isinstance(attr, RPairList):
            return attr.as_dict()
        return {}

    def _string_vec(self) -> list:
        if self.int() != 0:
            raise RDataError(f"{self.where}: malformed string vector in a persistent reference")
        return [self.item() for _ in range(self.length())]

    def item(self):
        flags = self.int()
        t = flags & 0xFF
        levels = flags >> 12
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))

        if t in (NILVALUE_SXP, NILSXP):
            return None
        if t in (EMPTYENV_SXP, BASEENV_SXP, GLOBALENV_SXP, BASENAMESPACE_SXP):
            return REnvironment(name={EMPTYENV_SXP: "emptyenv", BASEENV_SXP: "baseenv",
                                      GLOBALENV_SXP: "globalenv", BASENAMESPACE_SXP: "base"}[t])
        if t in (UNBOUNDVALUE_SXP, MISSINGARG_SXP):
            return None
        if t == REFSXP:
            idx = flags >> 8
            if idx == 0:
                idx = self.int()
            if not 1 <= idx <= len(self.refs):
                raise RDataError(f"{self.where}: reference {idx} to an object not yet read")
            return self.refs[idx - 1]
        if t == PERSISTSXP:
            obj = RVector(self._string_vec(), rtype=PERSISTSXP)
            self.refs.append(obj)
            return obj
        if t == SYMSXP:
            name = self.item()
            sym = RSymbol(name if isinstance(name, str) else "")
            self.refs.append(sym)
            return sym
        if t in (PACKAGESXP, NAMESPACESXP):
            env = REnvironment(name=":".join(s for s in self._string_vec() if s))
            self.refs.append(env)
            return env
        if t == ENVSXP:
            env = REnvironment(locked=bool(self.int()))
            self.refs.append(env)  # registered before its contents: they may refer back to it
            self.item()  # enclosing environment
            frame = self.item()
            hashtab = self.item()
            self.item()  # attributes of the environment: not needed for data
            if isinstance(frame, RPairList):
                env.frame.update(frame.as_dict())
            if isinstance(hashtab, RVector):
                for bucket in hashtab:
                    if isinstance(bucket, RPairList):
                        env.frame.update(bucket.as_dict())
            return env
        if t in (LISTSXP, LANGSXP, CLOSXP, PROMSXP, DOTSXP, ATTRLANGSXP, ATTRLISTSXP):
            if t == CLOSXP:
                raise RDataError(f"{self.where}: R function (closure) found; only data objects are supported")
            # A pairlist is a linked list; read it iteratively so long lists do not exhaust the stack.
            out = RPairList(rtype=t)
            while True:
                attrs = self._attributes(has_attr)
                if attrs and not out.attributes:
                    out.attributes = attrs
                tag = self.item() if has_tag else None
                out.tags.append(tag.name if isinstance(tag, RSymbol) else tag)
                out.values.append(self.item())
                nxt = self.int()
                nt = nxt & 0xFF
                if nt in (LISTSXP, LANGSXP, DOTSXP, ATTRLANGSXP, ATTRLISTSXP):
                    has_attr = bool(nxt & (1 << 9))
                    has_tag = bool(nxt & (1 << 10))
                    continue
                self.pos -= 4  # not a continuation cell: the cdr is an ordinary item
                tail = self.item()
                if tail is not None:
                    out.tags.append(None)
                    out.values.append(tail)
                return out
        if t in (SPECIALSXP, BUILTINSXP):
            return RSymbol(self._take(self.int()).decode("latin-1"))
        if t == CHARSXP:
            n = self.int()
            if n == -1:
                return None  # NA_character_
            raw = self._take(n)
            if levels & _BYTES_MASK:
                return raw.decode("latin-1")
            return raw.decode("latin-1" if levels & _LATIN1_MASK else "utf-8", errors="replace")
        if t in (LGLSXP, INTSXP):
            n = self.length()
            vals = struct.unpack(f">{n}i", self._take(4 * n))
            vec = RVector([None if v == _NA_INTEGER else (bool(v) if t == LGLSXP else v) for v in vals], rtype=t)
        elif t == REALSXP:
            n = self.length()
            vec = RVector(struct.unpack(f">{n}d", self._take(8 * n)), rtype=t)
        elif t == CPLXSXP:
            n = self.length()
            v = struct.unpack(f">{2 * n}d", self._take(16 * n))
            vec = RVector([complex(v[2 * i], v[2 * i + 1]) for i in range(n)], rtype=t)
        elif t in (STRSXP, VECSXP, EXPRSXP):
            n = self.length()
            vec = RVector([self.item() for _ in range(n)], rtype=t)
        elif t == RAWSXP:
            n = self.length()
            raw = self._take(n)
            self._attributes(has_attr)
            return raw
        elif t == S4SXP:
            vec = RVector([], rtype=t)
        elif t == EXTPTRSXP:
            vec = RVector([], rtype=t)
            self.refs.append(vec)
            self.item()  # protected value
            self.item()  # tag
        elif t == WEAKREFSXP:
            vec = RVector([], rtype=t)
            self.refs.append(vec)
        elif t == ALTREP_SXP:
            return self._altrep()
        else:
            raise RDataError(f"{self.where}: unsupported R object type {t} at byte {self.pos - 4}")
        vec.attributes = self._attributes(has_attr)
        return vec

    def _altrep(self):
        """Compact ALTREP encodings R >= 3.5 writes: integer/real sequences, wrappers, deferred strings."""
        info = self.item()
        state = self.item()
        attrs = self.item()
        cls = info.values[0].name if isinstance(info, RPairList) and isinstance(info.values[0], RSymbol) else "?"
        if cls in ("compact_intseq", "compact_realseq"):
            n, start, step = (state[0], state[1], state[2])
            vals = [start + i * step for i in range(int(n))]
            vec = RVector([int(v) for v in vals] if cls == "compact_intseq" else vals,
                          rtype=INTSXP if cls == "compact_intseq" else REALSXP)
        elif cls.startswith("wrap_"):
            inner = state.values[0] if isinstance(state, RPairList) else state[0]
            vec = RVector(inner, rtype=getattr(inner, "rtype", VECSXP), attributes=getattr(inner, "attributes", {}))
        elif cls == "deferred_string":
            arg = state.values[0] if isinstance(state, RPairList) else state
            vec = RVector([None if v is None else _r_number_str(v) for v in arg], rtype=STRSXP)
        else:
            raise RDataError(f"{self.where}: unsupported ALTREP class {cls!r}")
        if isinstance(attrs, RPairList):
            vec.attributes.update(attrs.as_dict())
        return vec


def _r_number_str(v) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def unserialize(data: bytes, where: str = "<bytes>"):
    """Decode one XDR R serialisation (the bytes after any compression)."""
    r = _Reader(data, where)
    r.header()
    return r.item()


def read_rds(path: str):
    """Read an ``.rds`` file (gzip-compressed or plain serialisation)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return unserialize(data, path)


def _decompress_value(blob: bytes, compressed: int, where: str) -> bytes:
    if len(blob) < 4:
        raise RDataError(f"{where}: value of {len(blob)} bytes is shorter than its length header")
    out_len = struct.unpack(">I", blob[:4])[0]
    body = blob[4:]
    if compressed in (2, 3):
        method, body = body[:1], body[1:]
        if method == b"0":
            out = body
        elif method == b"Z":
            out = lzma.decompress(body)
        elif method == b"2":
            out = bz2.decompress(body)
        elif method == b"1":
            out = zlib.decompress(body)
        else:
            raise RDataError(f"{where}: unknown compression tag {method!r}")
    else:
        try:
            out = zlib.decompress(body)
        except zlib.error as e:
            raise RDataError(f"{where}: zlib data does not decompress: {e}") from None
    if len(out) != out_len:
        raise RDataError(f"{where}: decompressed to {len(out)} bytes, header says {out_len}")
    return out


def read_lazyload_db(prefix: str) -> dict:
    """All variables of the lazy-load database ``prefix.rdx`` / ``prefix.rdb``, decoded."""
    index = read_rds(prefix + ".rdx")
    if not isinstance(index, RVector) or index.names is None or "variables" not in index.names:
        raise RDataError(f"{prefix}.rdx is not a lazy-load index (no 'variables' entry)")
    parts = dict(zip(index.names, index))
    variables = parts["variables"]
    comp = parts.get("compressed")
    compressed = int(comp[0]) if comp else 1
    with open(prefix + ".rdb", "rb") as f:
        rdb = f.read()
    out = {}
    for name, (offset, length) in zip(variables.names or [], variables):
        offset, length = int(offset), int(length)
        where = f"{prefix}.rdb[{name}]"
        if offset < 0 or offset + length > len(rdb):
            raise RDataError(f"{where}: bytes {offset}..{offset + length} lie outside the {len(rdb)}-byte file")
        out[name] = unserialize(_decompress_value(rdb[offset:offset + length], compressed, where), where)
    return out
