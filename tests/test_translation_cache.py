"""The translation cache's file index: exact lookups, resumption after a torn write, and memory flat in its lines."""
import hashlib
import json

from engine import translation_cache
from engine.translation_cache import TranslationCache


def key(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def records(n: int, start: int = 0) -> list[dict[str, str]]:
    return [{"key": key(i), "src": f"줄 {i}", "out": f"line {i}"} for i in range(start, start + n)]


def test_lookups_read_back_what_was_added_across_merges_and_reopening(tmp_path, monkeypatch):
    monkeypatch.setattr(translation_cache, "PENDING", 4)  # merged into the sorted arrays every few batches
    path = tmp_path / "cache.jsonl"
    cache = TranslationCache(path)
    assert cache.lookup([key(0)]) == [None]
    for start in range(0, 30, 3):
        cache.add(records(3, start))
    wanted = [key(i) for i in (29, 0, 17, 3)] + [key(99)]
    assert cache.lookup(wanted) == ["line 29", "line 0", "line 17", "line 3", None]
    reopened = TranslationCache(path)
    assert len(reopened) == 30 and reopened.lookup(wanted) == cache.lookup(wanted)
    memory = TranslationCache()  # no file: held in memory
    memory.add(records(2))
    assert memory.lookup([key(1), key(5)]) == ["line 1", None]


def test_keys_that_share_their_first_8_bytes_stay_apart(tmp_path):
    cache = TranslationCache(tmp_path / "cache.jsonl")
    a, b, c = "ab" * 8 + "0" * 48, "ab" * 8 + "1" * 48, "ab" * 8 + "2" * 48
    cache.add([{"key": a, "src": "가", "out": "A"}, {"key": b, "src": "나", "out": "B"}])
    assert cache.lookup([b, a, c]) == ["B", "A", None]


def test_a_torn_last_line_is_skipped_and_the_next_records_start_on_a_line_of_their_own(tmp_path):
    path = tmp_path / "cache.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records(2)) + '{"key": "abc', "utf-8")
    cache = TranslationCache(path)
    assert len(cache) == 2
    cache.add(records(1, 2))
    assert cache.lookup([key(2), key(1)]) == ["line 2", "line 1"]
    lines = path.read_text("utf-8").splitlines()
    assert lines[2] == '{"key": "abc' and json.loads(lines[3])["key"] == key(2)
    assert TranslationCache(path).lookup([key(0), key(2)]) == ["line 0", "line 2"]


def test_memory_is_16_bytes_a_line_not_the_keys_and_outputs(tmp_path):
    import tracemalloc

    n, path = 100_000, tmp_path / "cache.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records(n)), "utf-8")

    def held(read) -> int:
        tracemalloc.start()
        kept = read()  # noqa: F841 (held while measured)
        size = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        return size

    ours = held(lambda: TranslationCache(path))
    strings = held(lambda: {r["key"]: r["out"] for r in map(json.loads, path.open("rb"))})  # what it held before
    assert ours < 24 * n < strings / 5  # 1.6 MB against 17 MB when written
    assert TranslationCache(path).lookup([key(n - 1), key(n // 2)]) == [f"line {n - 1}", f"line {n // 2}"]
