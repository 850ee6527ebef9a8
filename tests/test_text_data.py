"""Text data kit: shard round trip, hostile shards (invariant 8), quality score, Brown cleaning."""
from __future__ import annotations

import itertools
import json
import pickle

import pytest

from data.fetch import cached_text_dirs, default_cache_dir
from data.shards import BadSample, SkipCounter, decode_text_sample, expand_shards, iter_samples, iter_text_docs
from data.text_kit import (brown_documents, pydoc_documents, quality_score, shakespeare_documents,
                           strip_brown_tags, write_text_shards)
from tests.shard_helpers import write_tar




def _meta(source="t", genre="g", quality=0.5):
    return json.dumps({"source": source, "genre": genre, "quality": quality}).encode()


class _Creates:
    """Unpickling this creates the file at `path` (stands in for any code execution)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pydoc_round_trip(tmp_path):
    docs = list(itertools.islice(pydoc_documents(), 25))
    assert len(docs) == 25 and all(d["source"] == "pydoc" and d["genre"] == "docs" for d in docs)
    paths = write_text_shards(docs, tmp_path, "t", max_docs_per_shard=10)
    assert [p.name for p in paths] == ["t-000000.tar", "t-000001.tar", "t-000002.tar"]
    skips = SkipCounter()
    back = list(iter_text_docs(expand_shards(str(tmp_path / "t-{000000..000002}.tar")), skips))
    assert skips.as_dict() == {}
    assert [(d["key"], d["text"], d["source"], d["genre"]) for d in back] == \
        [(d["key"], d["text"], d["source"], d["genre"]) for d in docs]
    assert all(d["quality"] == pytest.approx(quality_score(s["text"]), abs=1e-4) for d, s in zip(back, docs))


def test_expand_shards_forms(tmp_path):
    paths = write_text_shards(itertools.islice(pydoc_documents(), 6), tmp_path, "s", max_docs_per_shard=2)
    assert expand_shards(str(tmp_path / "s-*.tar")) == paths
    assert expand_shards(tmp_path) == paths
    assert expand_shards([str(p) for p in paths]) == paths
    assert expand_shards(str(tmp_path / "s-{000001..000002}.tar")) == paths[1:]
    with pytest.raises(FileNotFoundError, match="nothing-"):
        expand_shards(str(tmp_path / "nothing-*.tar"))
    with pytest.raises(FileNotFoundError, match="s-000003"):
        expand_shards(str(tmp_path / "s-{000000..000009}.tar"))
    # a mix (`::` or a list) whose one glob matches nothing is an error, not a silently smaller mix
    assert expand_shards(f"{tmp_path / 's-00000[01].tar'}::{tmp_path / 's-000002.tar'}") == paths
    mixes = (f"{tmp_path / 's-*.tar'}::{tmp_path / 'anneal-*.tar'}", [str(tmp_path / "s-*.tar"), str(tmp_path / "x-*")])
    for mix in mixes:
        with pytest.raises(FileNotFoundError, match="of the shard mix"):
            expand_shards(mix)


def test_hostile_shards_are_skipped_and_counted(tmp_path):
    victim = tmp_path / "pwned"
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Creates(probe)))  # the payload is real: unpickling creates a file
    assert probe.exists()
    payload = pickle.dumps(_Creates(victim))
    good = write_tar(tmp_path / "a-good.tar", [("g1.txt", b"hello"), ("g1.json", _meta()),
                                          ("g2.txt", b"world"), ("g2.json", _meta())])
    evil = write_tar(tmp_path / "b-evil.tar", [("p1.txt", b"kept"), ("p1.json", _meta()), ("p1.pkl", payload),
                                          ("p2.model.pth", payload), ("../escape.txt", b"x"),
                                          ("big.txt", b"y" * 2000)])
    bad = write_tar(tmp_path / "c-bad.tar", [("u.txt", b"\xff\xfe bad"), ("u.json", _meta()),
                                        ("n.json", _meta()), ("j.txt", b"ok"), ("j.json", b"{not json"),
                                        ("l.txt", b"ok"), ("l.json", b"[1, 2]"), ("fine.txt", b"still fine")])
    long_tar = write_tar(tmp_path / "d-long.tar", [(f"k{i}.txt", b"z" * 600) for i in range(4)])
    truncated = tmp_path / "e-truncated.tar"
    truncated.write_bytes(long_tar.read_bytes()[: 2 * 1536 + 512 + 100])  # cut inside k2's data
    not_tar = tmp_path / "f-not.tar"
    not_tar.write_bytes(b"this is not a tar archive at all" * 40)
    empty = tmp_path / "g-empty.tar"
    empty.write_bytes(b"")
    tail = write_tar(tmp_path / "h-tail.tar", [("t1.txt", b"after the bad ones")])
    paths = [good, evil, bad, truncated, not_tar, empty, tail]

    raw = list(iter_samples(paths, SkipCounter(), max_member_bytes=1000))
    assert all(isinstance(v, bytes) for s in raw for k, v in s.items() if not k.startswith("__"))
    assert not any(k in s for s in raw for k in ("pkl", "model.pth"))
    assert [s["__key__"] for s in raw if s["__url__"] == str(truncated)] == ["k0", "k1"]  # k2 incomplete
    skips = SkipCounter()
    docs = list(iter_text_docs(paths, skips, max_member_bytes=1000))
    assert not victim.exists()
    assert [d["text"] for d in docs] == ["hello", "world", "kept", "still fine", "z" * 600, "z" * 600,
                                         "after the bad ones"]
    assert docs[-1]["source"] == "unknown" and docs[-1]["quality"] is None
    assert skips.as_dict() == {"bad_json": 2, "bad_tar": 3, "bad_utf8": 1, "missing_txt": 1,
                               "oversize_member": 1, "pickle_member": 2, "unsafe_name": 1}


def test_decode_text_sample_reasons():
    assert decode_text_sample({"__key__": "k", "txt": "é".encode()})["text"] == "é"
    for sample, reason in [({"__key__": "k"}, "missing_txt"), ({"txt": b"\xc3("}, "bad_utf8"),
                           ({"txt": b"a", "json": b"nope"}, "bad_json"),
                           ({"txt": b"a", "json": b'{"quality": "high"}'}, "bad_json")]:
        with pytest.raises(BadSample) as e:
            decode_text_sample(sample)
        assert e.value.reason == reason


def test_quality_score_ranks_normal_text_higher():
    normal = ("The committee met on Tuesday to review the proposed budget. Several members raised concerns "
              "about the cost of the new library, while others argued that the city had postponed the project "
              "for too long. After a long discussion, they agreed to ask for a revised estimate.")
    duplicated = "\n".join(["click here to subscribe now!!!"] * 30)
    symbols = " ".join(["$$## 0x1F 12:34 ==> {[]} ;;;"] * 20)
    assert 0.0 <= quality_score(duplicated) < quality_score(normal) <= 1.0
    assert quality_score(symbols) < quality_score(normal)
    assert quality_score(normal) > 0.9 and quality_score(duplicated) < 0.2
    assert quality_score("") == 0.0


def test_strip_brown_tags():
    raw = ("\n\n\tThe/at jury/nn said/vbd ,/, ``/`` no/at evidence/nn ''/'' ./.\n"
           "\tIt/pps cost/vbd 1-1/2/cd dollars/nns (/( approx./rb )/) etc./rb ./.\n\n\n"
           "Merger/nn-hl proposed/vbn-hl \nHowever/wrb ,/, it/pps ended/vbd ./.\n")
    assert strip_brown_tags(raw) == ('The jury said, "no evidence". It cost 1-1/2 dollars (approx.) etc.'
                                     "\n\nMerger proposed\n\nHowever, it ended.")


def test_brown_and_shakespeare_readers(tmp_path):
    (tmp_path / "cats.txt").write_text("ca01 news\ncr01 humor\n")
    (tmp_path / "ca01").write_text("\n\n\tA/at dog/nn ./.\n")
    (tmp_path / "cr01").write_text("\n\n\tA/at joke/nn !/.\n")
    assert [(d["key"], d["genre"], d["text"]) for d in brown_documents(tmp_path)] == \
        [("brown_ca01", "news", "A dog."), ("brown_cr01", "humor", "A joke!")]
    shk = tmp_path / "shk"
    shk.mkdir()
    (shk / "sonnets_gut.txt").write_text("Header junk\r\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\r\n"
                                         "Shall I compare thee\r\n\r\n\r\n\r\nto a summer's day\r\n"
                                         "*** END OF THE PROJECT GUTENBERG EBOOK X ***\r\nlicence text\r\n")
    (shk / "hamlet_gut.txt").write_text("HAMLET\n\nHam.\nTo be.\n")
    docs = {d["key"]: d for d in shakespeare_documents(shk)}
    assert docs["shakespeare_sonnets"]["text"] == "Shall I compare thee\n\nto a summer's day"
    assert docs["shakespeare_sonnets"]["genre"] == "poetry" and docs["shakespeare_hamlet"]["genre"] == "drama"


@pytest.mark.data_cache
def test_build_text_kit_on_real_cache(tmp_path):
    cache = default_cache_dir()
    if cached_text_dirs(cache) is None:
        pytest.skip(f"text data cache not fetched at {cache} (run data.fetch.fetch_text)")
    from data.text_kit import build_text_kit

    m = build_text_kit(cache, tmp_path)
    train, val = m["splits"]["train"], m["splits"]["val"]
    assert train["by_source"]["brown"] + val["by_source"]["brown"] == 500
    assert train["by_source"]["shakespeare"] == 42
    assert set(val["by_source_genre"]) == {"brown/humor"} and "brown/humor" not in train["by_source_genre"]
    skips = SkipCounter()
    val_docs = list(iter_text_docs(expand_shards(tmp_path / "text" / "val-*.tar"), skips))
    assert len(val_docs) == val["docs"] and {d["genre"] for d in val_docs} == {"humor"} and not skips.total()
    assert (tmp_path / "ATTRIBUTION.md").is_file()
