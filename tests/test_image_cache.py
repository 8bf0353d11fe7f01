"""The decoded-image cache: exact equality with the uncached path, and its bad cases on real files.

    python -m pytest tests/test_image_cache.py -q

Bad cases: an unwritable directory (a clear LauncherError before training), truncated and corrupt entries (detected,
rebuilt, counted, never returned), two processes writing one entry (a valid entry, no exception), a failing write
mid-run (counted; the decoded image is still used), an image replaced in place (a miss, not a stale hit).
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from datasets_io.image_cache import (
    HEADER,
    CorruptEntry,
    ImageCache,
    check_writable,
    decode_entry,
    decode_gray,
    open_image_cache,
)
from datasets_io.images import ImageSpec, load_gray, normalize_gray, preprocess_image
from datasets_io.synth import write_synthetic
from datasets_io.errors import LauncherError

SPEC = ImageSpec(112)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    """Four synthetic chest X-rays at a MIMIC-like aspect (large enough for a 1/4 reduced-DCT decode at 112 px),
    one wide one, and a PNG (no draft mode)."""
    root = tmp_path_factory.mktemp("cache_images")
    write_synthetic(root, 4, seed=0, image_size=(1000, 834), progress=False)
    paths = sorted(str(p) for p in Path(root, "files").rglob("*.jpg"))
    gray = np.asarray(Image.open(paths[0]).convert("L"))
    Image.fromarray(gray.T.copy()).save(root / "wide.jpg", quality=90)
    Image.fromarray(gray[::3, ::3].copy()).save(root / "small.png")
    return paths + [str(root / "wide.jpg"), str(root / "small.png")]


def uncached(path: str, spec: ImageSpec = SPEC) -> np.ndarray:
    return preprocess_image(Path(path).read_bytes(), spec)


def the_entry(cache: ImageCache, path: str, spec: ImageSpec = SPEC) -> Path:
    return cache.entry_path(cache.key(path, spec)[0])


# ------------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("size", [112, 336])
def test_cold_and_warm_reads_equal_the_uncached_path_bit_for_bit(images, tmp_path, size):
    spec = ImageSpec(size)
    cache = ImageCache(str(tmp_path / "cache"))
    cold = [cache.pixels(p, spec) for p in images]
    assert cache.stats() == {"hits": 0, "misses": len(images), "rebuilt": 0, "write_errors": 0, "read_errors": 0}
    warm = [cache.pixels(p, spec) for p in images]
    assert cache.stats()["hits"] == len(images) and cache.stats()["misses"] == len(images)
    for path, c, w in zip(images, cold, warm):
        ref = uncached(path, spec)
        assert c.dtype == w.dtype == np.float32 and c.shape == (3, size, size)
        assert np.array_equal(c, ref) and np.array_equal(w, ref), path
    # entries hold the uint8 image before padding (longer side = size), not the (3, S, S) float32 tensor
    entry = the_entry(cache, images[0], spec)
    assert HEADER.size < entry.stat().st_size <= HEADER.size + size * size
    umask = os.umask(0o022)
    os.umask(umask)
    assert entry.stat().st_mode & 0o777 == 0o666 & ~umask  # as any file the user writes: shareable, not 0600


@pytest.mark.parametrize(
    "shape, spec",
    [
        ((336, 280), ImageSpec(336)),
        ((93, 112), ImageSpec(112)),
        ((64, 64), ImageSpec(64, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))),
    ],
)
def test_normalize_gray_gives_the_floats_of_the_formula_the_models_were_trained_with(shape, spec):
    """normalize_gray (the step the cache runs on every read) against the arithmetic written out: bit for bit."""
    gray = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    s, (h, w) = spec.size, shape
    mean = np.asarray(spec.mean, np.float32)[:, None, None]
    std = np.asarray(spec.std, np.float32)[:, None, None]
    want = np.zeros((3, s, s), np.float32)
    top, left = (s - h) // 2, (s - w) // 2
    want[:, top : top + h, left : left + w] = (gray.astype(np.float32)[None] / 255.0 - mean) / std
    assert np.array_equal(normalize_gray(gray, spec), want)


def test_decoding_from_the_open_file_equals_decoding_from_its_bytes(images):
    for path in images:
        from_bytes = np.asarray(load_gray(Path(path).read_bytes(), SPEC.size))
        assert np.array_equal(decode_gray(path, SPEC), from_bytes), path


def test_one_entry_serves_any_mean_and_std_and_a_new_process_reads_it(images, tmp_path):
    cache = ImageCache(str(tmp_path / "cache"))
    for p in images:
        cache.pixels(p, SPEC)
    other = ImageSpec(112, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    copy = pickle.loads(pickle.dumps(cache))  # what a Ray task or DataLoader worker gets: its own counters
    assert copy.stats() == {"hits": 0, "misses": 0, "rebuilt": 0, "write_errors": 0, "read_errors": 0}
    for p in images:
        assert np.array_equal(copy.pixels(p, other), uncached(p, other))
    assert copy.stats()["hits"] == len(images) and copy.stats()["misses"] == 0
    copy.pixels(images[0], ImageSpec(64))  # another size is another entry
    assert copy.stats()["misses"] == 1


def test_an_image_replaced_in_place_misses_instead_of_returning_the_old_pixels(images, tmp_path):
    path = tmp_path / "x.jpg"
    Path(path).write_bytes(Path(images[0]).read_bytes())
    cache = ImageCache(str(tmp_path / "cache"))
    before = cache.pixels(str(path), SPEC)
    Path(path).write_bytes(Path(images[1]).read_bytes())
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a distinct mtime even on a coarse clock
    after = cache.pixels(str(path), SPEC)
    assert cache.stats()["misses"] == 2 and cache.stats()["hits"] == 0
    assert np.array_equal(after, uncached(images[1])) and not np.array_equal(after, before)


def test_preprocessor_with_the_cache_gives_the_same_batches_and_decodes_each_image_once(synth_dir, tmp_path):
    from datasets_io.jsonl import read_records
    from training.data import Preprocessor
    from training.tokenizer import IMAGE_TOKEN, train_tokenizer

    rows, _ = read_records(str(synth_dir / "curriculum_train.jsonl"), str(synth_dir))
    rows = rows[:24]
    images = {r.image for r in rows}
    assert len(images) < len(rows)  # Stage A and Stage B rows of one study share its image
    tok = train_tokenizer([t for r in rows for t in (r.prompt, r.target)], vocab_size=400)
    args = (tok, ImageSpec(64), tok.convert_tokens_to_ids(IMAGE_TOKEN), 4, 512, "shorten_ehr", str(synth_dir))
    cache = ImageCache(str(tmp_path / "cache"))
    plain, cached = Preprocessor(*args), Preprocessor(*args, image_cache=cache)
    items = [(r.prompt, r.target, r.image, r.where) for r in rows]
    want = plain.batch(items)
    for _epoch in range(2):
        got = cached.batch(items)
        assert got.keys() == want.keys()
        for k in want:
            assert np.array_equal(got[k], want[k]), k
    assert cache.stats()["misses"] == len(images)
    assert cache.stats()["hits"] == 2 * len(rows) - len(images)


# ------------------------------------------------------------------------------------------------ bad cases
def test_an_unwritable_directory_is_a_launcher_error_naming_it_and_the_config_key(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    for bad in (blocker / "cache", blocker):
        with pytest.raises(LauncherError, match=r"data\.image_cache.*" + str(bad)):
            check_writable(str(bad))
        with pytest.raises(LauncherError, match="data.image_cache"):
            open_image_cache(str(bad))
    assert open_image_cache("") is None
    good = tmp_path / "new" / "cache"
    assert isinstance(open_image_cache(str(good)), ImageCache)
    made = sorted(p.name for p in good.iterdir())
    assert made == [f"{i:02x}" for i in range(256)] and all((good / m).is_dir() for m in made)  # no probe left


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
def test_a_read_only_directory_is_a_launcher_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    with pytest.raises(LauncherError, match=str(ro)):
        check_writable(str(ro))


def _truncate_half(b: bytes) -> bytes:
    return b[: len(b) // 2]


def _flip_payload_byte(b: bytes) -> bytes:
    i = HEADER.size + (len(b) - HEADER.size) // 2
    return b[:i] + bytes([b[i] ^ 0x40]) + b[i + 1 :]


def _flip_width(b: bytes) -> bytes:
    return b[:44] + bytes([b[44] ^ 0x01]) + b[45:]  # w sits at bytes 44..47 of the header


CORRUPTIONS = {
    "empty": lambda b: b"",
    "shorter than the header": lambda b: b[:20],
    "truncated payload": _truncate_half,
    "one byte short": lambda b: b[:-1],
    "trailing bytes": lambda b: b + b"\0\0\0\0",
    "flipped payload byte": _flip_payload_byte,
    "flipped header field": _flip_width,
    "not an entry": lambda b: b"\xff\xd8\xff\xe0 a JPEG, say" + b[40:],
}


@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_a_truncated_or_corrupt_entry_is_detected_rebuilt_and_counted(images, tmp_path, how):
    cache = ImageCache(str(tmp_path / "cache"))
    cache.pixels(images[0], SPEC)
    entry = the_entry(cache, images[0])
    good = entry.read_bytes()
    entry.write_bytes(CORRUPTIONS[how](good))
    with pytest.raises(CorruptEntry):
        decode_entry(cache.key(images[0], SPEC)[0], entry.read_bytes())

    fresh = ImageCache(cache.directory)
    assert np.array_equal(fresh.pixels(images[0], SPEC), uncached(images[0]))
    assert fresh.stats() == {"hits": 0, "misses": 1, "rebuilt": 1, "write_errors": 0, "read_errors": 0}
    assert entry.read_bytes() == good  # rewritten whole
    fresh.pixels(images[0], SPEC)
    assert fresh.stats()["hits"] == 1 and fresh.stats()["rebuilt"] == 1


def test_another_images_entry_under_this_name_is_rebuilt(images, tmp_path):
    cache = ImageCache(str(tmp_path / "cache"))
    cache.pixels(images[0], SPEC)
    cache.pixels(images[1], SPEC)
    the_entry(cache, images[0]).write_bytes(the_entry(cache, images[1]).read_bytes())  # valid checksum, wrong key
    assert np.array_equal(cache.pixels(images[0], SPEC), uncached(images[0]))
    assert cache.stats()["rebuilt"] == 1


def _fill_with_a_file_size_limit(directory: str, paths: list[str], results) -> None:
    """A real failing write: RLIMIT_FSIZE below one entry makes every entry write fail with EFBIG (as a full disk
    fails with ENOSPC); SIGXFSZ is ignored so the write returns the error instead of killing the process."""
    import logging
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("datasets_io.image_cache").addHandler(handler)
    cache = ImageCache(directory)
    equal = [np.array_equal(cache.pixels(p, SPEC), uncached(p)) for p in paths]
    results.put((cache.stats(), equal, messages))


def test_a_failing_write_is_counted_and_the_decoded_image_still_used(images, tmp_path):
    ctx = multiprocessing.get_context("fork")
    directory, results = str(tmp_path / "cache"), ctx.Queue()
    proc = ctx.Process(target=_fill_with_a_file_size_limit, args=(directory, images[:3], results))
    proc.start()
    stats, equal, messages = results.get(timeout=60)
    proc.join(timeout=60)
    assert proc.exitcode == 0 and equal == [True] * 3
    assert stats == {"hits": 0, "misses": 3, "rebuilt": 0, "write_errors": 3, "read_errors": 0}
    assert len(messages) == 1 and "cannot write" in messages[0]  # warned once per process
    assert not list(Path(directory).rglob("*.gray")) and not list(Path(directory).rglob("*.tmp"))


def test_an_entry_that_cannot_be_read_is_decoded_instead_counted_and_warned_once(images, tmp_path, caplog):
    cache = ImageCache(str(tmp_path / "cache"))
    for p in images[:2]:
        the_entry(cache, p).mkdir(parents=True)  # a directory where the entry file should be: reading it fails
    out = [cache.pixels(p, SPEC) for p in images[:2]]
    assert all(np.array_equal(o, uncached(p)) for o, p in zip(out, images[:2]))
    assert cache.stats() == {"hits": 0, "misses": 2, "rebuilt": 0, "write_errors": 2, "read_errors": 2}
    assert sum("cannot read" in r.getMessage() for r in caplog.records) == 1


# ------------------------------------------------------------------------------------------------ concurrent writers
def _writer(directory: str, path: str, rounds: int, barrier) -> None:
    """One process: decode through the cache, then keep rewriting the same entry (as racing Ray tasks would)."""
    cache = ImageCache(directory)
    barrier.wait()
    cache.gray(path, SPEC)
    digest, _ = cache.key(path, SPEC)
    gray = cache.gray(path, SPEC)
    from datasets_io.image_cache import encode_entry

    for _ in range(rounds):
        cache._write(cache.entry_path(digest), encode_entry(digest, gray))
    assert cache.write_errors == 0


def _reader(directory: str, path: str, rounds: int, barrier) -> None:
    """One process: read the entry while the writers replace it; a reader must never see a partial entry."""
    cache = ImageCache(directory)
    digest, _ = cache.key(path, SPEC)
    entry = cache.entry_path(digest)
    barrier.wait()
    seen = 0
    while seen < rounds:
        try:
            decode_entry(digest, entry.read_bytes())  # raises CorruptEntry on a partial file: exit code 1
            seen += 1
        except FileNotFoundError:
            continue


def test_two_processes_writing_one_entry_leave_a_valid_entry_and_raise_nothing(images, tmp_path):
    ctx = multiprocessing.get_context("fork")
    directory, path, rounds = str(tmp_path / "cache"), images[0], 300
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_writer, args=(directory, path, rounds, barrier)) for _ in range(2)]
    procs.append(ctx.Process(target=_reader, args=(directory, path, rounds, barrier)))
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    cache = ImageCache(directory)
    assert np.array_equal(cache.pixels(path, SPEC), uncached(path))
    assert cache.stats() == {"hits": 1, "misses": 0, "rebuilt": 0, "write_errors": 0, "read_errors": 0}
    assert not list(Path(directory).rglob("*.tmp"))  # every writer's temp file was renamed in


def _fill(directory: str, paths: list[str], barrier, results) -> None:
    cache = ImageCache(directory)
    barrier.wait()
    for p in paths:
        cache.pixels(p, SPEC)
    results.put(cache.stats())


def test_two_processes_filling_one_cache_at_once_agree_with_the_uncached_path(images, tmp_path):
    ctx = multiprocessing.get_context("fork")
    directory = str(tmp_path / "cache")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_fill, args=(directory, images, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    stats = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert all(s["rebuilt"] == 0 and s["write_errors"] == 0 for s in stats)
    assert sum(s["hits"] + s["misses"] for s in stats) == 2 * len(images)
    cache = ImageCache(directory)
    assert all(np.array_equal(cache.pixels(p, SPEC), uncached(p)) for p in images)
    assert cache.stats()["hits"] == len(images)


# ------------------------------------------------------------------------------------------------ config
def test_the_config_key_resolves_auto_off_and_a_path_and_refuses_a_uri(tmp_path):
    from datasets_io.config import ConfigError, image_cache_dir, load_config

    tiny = REPO / "configs" / "tiny.yaml"
    out = f"output.dir={tmp_path}/run"
    assert image_cache_dir(load_config(tiny, [out])) == f"{tmp_path}/run/image_cache"  # the default: "auto"
    assert image_cache_dir(load_config(tiny, [out, "data.image_cache="])) == ""
    assert image_cache_dir(load_config(tiny, [out, "data.image_cache=/mnt/shared/cache"])) == "/mnt/shared/cache"
    with pytest.raises(ConfigError, match="data.image_cache: must be a filesystem path"):
        load_config(tiny, [out, "data.image_cache=s3://bucket/cache"])
    with pytest.raises(ConfigError, match="data.image_cache: expected a valid string, got 3"):
        load_config(tiny, [out, "data.image_cache=3"])


# ------------------------------------------------------------------------------------------------ launcher data prepare
def test_data_prepare_fills_the_cache_a_run_then_only_hits(synth_dir, tmp_path, capsys):
    from datasets_io.jsonl import join, read_records
    from launcher.cli import main

    argv = [
        "data",
        "prepare",
        "--config",
        str(REPO / "configs" / "tiny.yaml"),
        "--set",
        f"data.root={synth_dir}",
        "--set",
        f"output.dir={tmp_path}/run",
        "--set",
        "model.tiny.image_size=64",
        "--processes",
        "2",
    ]
    rows = [
        r
        for f in ("curriculum_train.jsonl", "curriculum_val.jsonl")
        for r in read_records(str(synth_dir / f), str(synth_dir))[0]
    ]
    paths = sorted({join(str(synth_dir), r.image) for r in rows})
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"{len(paths)} images ({len(rows)} rows): {len(paths)} decoded and stored, 0 already there" in out
    cache = ImageCache(f"{tmp_path}/run/image_cache")
    assert all(np.array_equal(cache.pixels(p, ImageSpec(64)), uncached(p, ImageSpec(64))) for p in paths)
    assert cache.stats() == {"hits": len(paths), "misses": 0, "rebuilt": 0, "write_errors": 0, "read_errors": 0}
    assert main(argv[:-2] + ["--processes", "1"]) == 0
    assert f"0 decoded and stored, {len(paths)} already there" in capsys.readouterr().out


def test_data_prepare_lists_an_image_it_cannot_decode_and_fails(synth_dir, tmp_path, capsys):
    from launcher.cli import main

    root = tmp_path / "data"
    shutil.copytree(synth_dir, root)
    bad = sorted(root.rglob("*.jpg"))[0]
    bad.write_bytes(bad.read_bytes()[:200])  # a truncated JPEG: the header parses, the decode fails
    argv = [
        "data",
        "prepare",
        "--config",
        str(REPO / "configs" / "tiny.yaml"),
        "--set",
        f"data.root={root}",
        "--set",
        f"output.dir={tmp_path}/run",
        "--processes",
        "1",
    ]
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert ", 1 failed;" in out and str(bad) in err
    assert main(argv + ["--set", "data.image_cache="]) == 2
    assert "the cache is off" in capsys.readouterr().err
