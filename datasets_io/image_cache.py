"""Images decoded once per run: a disk cache of preprocessed images, shared by Stage A and B rows and every epoch.

    cache = open_image_cache("runs/tiny/image_cache")   # None for ""; LauncherError if the directory is unwritable
    pixels = cache.pixels("data/synth/files/p10/p1000/s50/x.jpg", ImageSpec(336))   # (3, S, S) float32
    cache.stats()   # {"hits", "misses", "rebuilt", "write_errors", "read_errors"}: this process's counts
    Preprocessor(..., image_cache=open_image_cache(image_cache_dir(cfg)))   # how a run uses it (training/data.py)
    launcher data prepare --config configs/tiny.yaml [--processes N]         # fill it ahead of a run

What an entry holds: the (h, w) uint8 grayscale image that `load_gray` returns (longer side = S, ~94 KB at S=336,
14x smaller than the float32 tensor). Padding and normalization run on every read (`normalize_gray`, cheap next to a decode), so a
cached image gives exactly the floats of the uncached path, and one entry serves any mean/std.

The key is the image's identity plus what decides the stored bytes: the absolute path (or the URI), its size and mtime
in nanoseconds (os.stat for a local file; pyarrow's FileInfo for a URI, an S3 HEAD: a warm read never fetches the
JPEG), the spec's size, the `load_gray` recipe version and the Pillow version (its libjpeg decides the DCT output).
Path + size + mtime rather than a content hash because hashing means reading every JPEG on every epoch, the read a
warm epoch saves (on S3 the expensive part). A file replaced in place changes size or mtime and misses. A filesystem
that reports no mtime falls back to a hash of the file's bytes.

Entry file: `<dir>/<2 hex>/<64 hex>.gray`, a 56-byte header (magic, the key's sha256, h, w, payload length, CRC-32 of
the payload) then the pixels. A short file, a wrong magic/key/length or a bad CRC is detected on read, counted as
`rebuilt`, decoded again and rewritten; its bytes are never returned. Writes go to a temp file of a unique name in the
entry's directory (O_EXCL, mode 0666 less the umask, as any file the user writes) and `os.replace` it in: atomic on
POSIX filesystems, so concurrent writers (DataLoader workers, Ray tasks, several nodes on a shared filesystem) each
install a whole, identical entry, and readers see no entry, the old one or a whole new one. No fsync: an entry lost to
a crash reads as short or corrupt and is rebuilt.

Counters are per process (a pickled copy starts from zero): Ray Data tasks and DataLoader workers count their own.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import struct
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL

from datasets_io.images import GRAY_RECIPE, ImageSpec, load_gray, normalize_gray, preprocess_image
from datasets_io.jsonl import read_bytes, resolve_fs
from datasets_io.errors import LauncherError

log = logging.getLogger(__name__)

CONFIG_KEY = "data.image_cache"
MAGIC = b"CXRGRAY1"
HEADER = struct.Struct("<8s32sIIII")  # magic, sha256(key), h, w, payload bytes, crc32(payload): 56 bytes


class CorruptEntry(ValueError):
    """An entry file that must not be trained on: short, wrong header, or a bad checksum."""


def check_writable(directory: str) -> None:
    """Create `directory` if needed and prove a file can be written, renamed and removed there (what an entry write
    does). Raises LauncherError naming the directory and the config key; call it before training starts."""
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".probe-", suffix=".tmp")
        os.close(fd)
        os.replace(tmp, tmp + ".ok")
        os.remove(tmp + ".ok")
    except OSError as e:
        raise LauncherError(
            f"{CONFIG_KEY}: cannot write to the image cache directory {directory!r} ({e.strerror or e}); "
            f"choose a writable directory (--set {CONFIG_KEY}=DIR) or turn the cache off ({CONFIG_KEY}='')"
        ) from None


def open_image_cache(directory: str) -> ImageCache | None:
    """The cache for `directory` after `check_writable`, its 256 fan-out directories made; None when `directory` is
    empty (cache off). Call it once in run preparation, then ship the cache (it pickles) to the data workers."""
    if not directory:
        return None
    check_writable(directory)
    cache = ImageCache(directory)
    cache.make_fanout_dirs()
    return cache


def load_pixels(path: str, spec: ImageSpec, cache: ImageCache | None) -> np.ndarray:
    """The image at `path` as model-ready (3, S, S) float32: through `cache` when there is one (an entry written on a
    miss), else decoded. The same floats either way."""
    return cache.pixels(path, spec) if cache is not None else preprocess_image(read_bytes(path), spec)


def encode_entry(key_digest: bytes, gray: np.ndarray) -> bytes:
    payload = np.ascontiguousarray(gray, dtype=np.uint8).tobytes()
    h, w = gray.shape
    return HEADER.pack(MAGIC, key_digest, h, w, len(payload), zlib.crc32(payload)) + payload


def decode_entry(key_digest: bytes, data: bytes) -> np.ndarray:
    """Entry bytes -> (h, w) uint8, or CorruptEntry saying what is wrong."""
    if len(data) < HEADER.size:
        raise CorruptEntry(f"{len(data)} bytes, shorter than the {HEADER.size}-byte header")
    magic, digest, h, w, n, crc = HEADER.unpack_from(data)
    if magic != MAGIC or digest != key_digest:
        raise CorruptEntry("wrong magic or key in the header")
    if n != h * w or len(data) != HEADER.size + n:
        raise CorruptEntry(f"{len(data) - HEADER.size} payload bytes, header says {n} ({h}x{w})")
    payload = memoryview(data)[HEADER.size :]
    if zlib.crc32(payload) != crc:
        raise CorruptEntry("payload checksum mismatch")
    return np.frombuffer(payload, dtype=np.uint8).reshape(h, w)


def image_identity(path: str) -> tuple[str, bytes | None]:
    """(identity, the file's bytes if they had to be read). Identity = path, size and mtime: from os.stat for a local
    file (what pyarrow's LocalFileSystem reports too, at a tenth of the cost here), from pyarrow's FileInfo for a
    URI; a filesystem without mtimes gets a content hash instead."""
    if "://" not in path:
        st = os.stat(path)  # FileNotFoundError, as the uncached path raises
        return f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}", None  # abspath: same file, any cwd
    fs, inner = resolve_fs(path)
    info = fs.get_file_info(inner)
    if info.mtime_ns is not None and info.size is not None:
        return f"{path}|{info.size}|{info.mtime_ns}", None
    data = read_bytes(path)
    return f"blake2b:{hashlib.blake2b(data, digest_size=32).hexdigest()}", data


def decode_gray(path: str, spec: ImageSpec, data: bytes | None = None) -> np.ndarray:
    """`load_gray` of the image at `path` as (h, w) uint8; a local file is decoded straight from the open file."""
    if data is None and "://" not in path:
        with open(path, "rb") as f:
            return np.asarray(load_gray(f, spec.size), dtype=np.uint8)
    return np.asarray(load_gray(data if data is not None else read_bytes(path), spec.size), dtype=np.uint8)


@dataclass
class ImageCache:
    """Preprocessed images on disk under `directory` (local disk, or a shared filesystem on a cluster)."""

    directory: str
    hits: int = field(default=0, compare=False)
    misses: int = field(default=0, compare=False)
    rebuilt: int = field(default=0, compare=False)
    """Entries found short or corrupt: decoded again and rewritten (also counted in `misses`)."""
    write_errors: int = field(default=0, compare=False)
    """Entries that could not be written (e.g. disk full): the decoded image is still used; warned once."""
    read_errors: int = field(default=0, compare=False)
    """Entries there but unreadable (e.g. a stale NFS handle): decoded instead (also in `misses`); warned once."""

    def __getstate__(self) -> dict:
        return {"directory": self.directory}  # a copy in another process counts its own events

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["directory"])

    def stats(self) -> dict[str, int]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "rebuilt": self.rebuilt,
            "write_errors": self.write_errors,
            "read_errors": self.read_errors,
        }

    def key(self, path: str, spec: ImageSpec) -> tuple[bytes, bytes | None]:
        """(sha256 of the entry's key, the image's bytes if identifying it read them)."""
        identity, data = image_identity(path)
        key = {"image": identity, "size": spec.size, "recipe": GRAY_RECIPE, "pillow": PIL.__version__}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).digest(), data

    def make_fanout_dirs(self) -> None:
        """Make <dir>/00 ... <dir>/ff once, so an entry write is one file create and a rename (a mkdir per write
        costs as much again on ext4)."""
        for i in range(256):
            Path(self.directory, f"{i:02x}").mkdir(parents=True, exist_ok=True)

    def entry_path(self, digest: bytes) -> Path:
        hexd = digest.hex()
        return Path(self.directory, hexd[:2], hexd + ".gray")

    def pixels(self, path: str, spec: ImageSpec) -> np.ndarray:
        """The image at `path` as (3, S, S) float32, equal to `preprocess_image(read_bytes(path), spec)`."""
        return normalize_gray(self.gray(path, spec), spec)

    def gray(self, path: str, spec: ImageSpec) -> np.ndarray:
        """The (h, w) uint8 image `load_gray` gives for `path`, from the cache or decoded and stored."""
        digest, data = self.key(path, spec)
        entry = self.entry_path(digest)
        try:
            gray = decode_entry(digest, entry.read_bytes())
            self.hits += 1
            return gray
        except FileNotFoundError:
            pass
        except CorruptEntry as e:
            self.rebuilt += 1
            log.warning("image cache: entry %s is corrupt (%s); rebuilding it", entry, e)
        except OSError as e:  # e.g. ESTALE on NFS after another node replaced the entry: decode instead
            if not self.read_errors:
                log.warning(
                    "image cache: cannot read %s (%s); decoding the image instead (warned once per process; "
                    "counted in read_errors)",
                    entry,
                    e,
                )
            self.read_errors += 1
        self.misses += 1
        gray = decode_gray(path, spec, data)
        self._write(entry, encode_entry(digest, gray))
        return gray

    def _write(self, entry: Path, blob: bytes) -> None:
        """Atomic: a temp file with a name no other writer uses, in the entry's directory, then os.replace. Concurrent
        writers all succeed; readers see no entry, the old one or a whole new one."""
        tmp = f"{entry}.{os.getpid()}.{secrets.token_hex(6)}.tmp"  # pid + random: unique across processes and nodes
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        try:
            try:
                fd = os.open(tmp, flags, 0o666)
            except FileNotFoundError:  # a cache not made by open_image_cache, or its fan-out directory removed
                entry.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(tmp, flags, 0o666)
            with open(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, entry)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            if not self.write_errors:
                log.warning(
                    "image cache: cannot write %s (%s); training goes on with decoded images, uncached "
                    "(warned once per process; counted in write_errors)",
                    entry,
                    e,
                )
            self.write_errors += 1


# ------------------------------------------------------------------------------------------------ filling ahead
@dataclass
class FillReport:
    """What `fill_cache` did: the cache's counters summed over its processes, and the images that failed."""

    images: int = 0
    hits: int = 0
    misses: int = 0
    rebuilt: int = 0
    write_errors: int = 0
    read_errors: int = 0
    failed: list[str] = field(default_factory=list)
    """"path: error" for each image that could not be decoded (missing, unreadable, not an image)."""

    def add(self, stats: dict[str, int], failed: list[str]) -> None:
        for name, value in stats.items():
            setattr(self, name, getattr(self, name) + value)
        self.failed += failed


def _fill_chunk(args: tuple[ImageCache, list[str], ImageSpec]) -> tuple[dict[str, int], list[str]]:
    cache, paths, spec = args
    failed = []
    for path in paths:
        try:
            cache.gray(path, spec)
        except (OSError, ValueError, SyntaxError) as e:  # what Pillow and file access raise for a bad image
            failed.append(f"{path}: {e.__class__.__name__}: {e}")
    return cache.stats(), failed


def fill_cache(cache: ImageCache, paths: list[str], spec: ImageSpec, processes: int = 1, chunk: int = 64) -> FillReport:
    """Decode and store every image of `paths` not cached yet (`launcher data prepare`), in `processes` processes
    (each with its own copy of the cache and counters). Duplicate paths are taken once."""
    import multiprocessing

    unique = list(dict.fromkeys(paths))
    jobs = [(cache, unique[i : i + chunk], spec) for i in range(0, len(unique), chunk)]
    report = FillReport(images=len(unique))
    if processes <= 1:
        for job in jobs:
            report.add(*_fill_chunk(job))
        return report
    with multiprocessing.get_context("spawn").Pool(processes) as pool:  # spawn: no fork of a threaded parent
        for stats, failed in pool.imap_unordered(_fill_chunk, jobs):
            report.add(stats, failed)
    return report
