"""IWSLT'14 de-en preparation (fairseq's prepare-iwslt14.sh in Python), on the synthetic raw archive."""
import json
import re
import shutil
import tarfile
from pathlib import Path

import pytest

pytest.importorskip("sacremoses")
pytest.importorskip("subword_nmt")

from bench.errors import UserError  # noqa: E402
from tasks.translation import fake as F  # noqa: E402
from tasks.translation import prepare as P  # noqa: E402

LANGS = ("de", "en")
FILES = [f"{s}.{lang}" for s in ("train", "valid", "test") for lang in LANGS]


def lines(path):
    return Path(path).read_text(encoding="utf-8").split("\n")[:-1]


def unbpe(line):
    return line.replace("@@ ", "")


def run(raw, out, merges=50):
    return P.prepare_iwslt14(raw, out, bpe_merges=merges)


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return F.write_fake_archive(tmp_path_factory.mktemp("raw"), n_train=400, n_test=50, seed=0)


@pytest.fixture(scope="module")
def prepared(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    return out, run(raw, out)


def copy_raw(raw, tmp_path):
    dst = tmp_path / "raw" / "de-en"
    shutil.copytree(raw, dst)
    return dst


def expected_clean(raw, lang_pairs=LANGS):
    """An independent re-derivation of the cleaned, lowercased training corpus (before the valid split)."""
    from sacremoses import MosesTokenizer
    sides = []
    for lang in lang_pairs:
        tok = MosesTokenizer(lang)
        out = []
        for line in lines(raw / f"train.tags.de-en.{lang}"):
            if re.search(r"<url>|<talkid>|<keywords>", line):
                continue
            line = re.sub(r"</?(title|description)>", "", line)
            out.append(tok.tokenize(line, return_str=True, escape=True) if line.strip() else line)
        sides.append(out)
    kept = []
    for de, en in zip(*sides):
        a, b = de.split(), en.split()
        if 1 <= len(a) <= 175 and 1 <= len(b) <= 175 and len(a) <= 1.5 * len(b) and len(b) <= 1.5 * len(a):
            kept.append((" ".join(a).lower(), " ".join(b).lower()))
    return kept


def test_outputs_and_counts(prepared):
    out, counts = prepared
    assert P.is_prepared(out)
    for name in FILES + ["code", "counts.json"]:
        assert (out / name).is_file(), name
    assert json.loads((out / "counts.json").read_text()) == counts == P.read_counts(out)
    for split in ("train", "valid", "test"):
        n = len(lines(out / f"{split}.de"))
        assert n == len(lines(out / f"{split}.en")) == counts[split] > 0
    assert counts["test"] == 5 * 50  # the five dev/test sets, 50 segments each


def test_every_23rd_cleaned_line_is_valid(raw, prepared):
    out, counts = prepared
    kept = expected_clean(raw)
    assert counts["train"] + counts["valid"] == len(kept)
    for i, lang in enumerate(LANGS):
        corpus = [pair[i] for pair in kept]
        assert [unbpe(x) for x in lines(out / f"valid.{lang}")] == corpus[22::23]
        assert [unbpe(x) for x in lines(out / f"train.{lang}")] == [x for k, x in enumerate(corpus, 1) if k % 23]


def test_test_set_is_the_five_sets_in_order(raw, prepared):
    out, _ = prepared
    from sacremoses import MosesTokenizer
    for lang in LANGS:
        tok = MosesTokenizer(lang)
        want = []
        for name in P.EVAL_SETS:
            for line in lines(raw / f"{name}.de-en.{lang}.xml"):
                m = re.search(r'<seg id="\d+">\s*(.*?)\s*</seg>', line)
                if m:
                    want.append(tok.tokenize(m.group(1), return_str=True, escape=True).lower())
        assert [unbpe(x) for x in lines(out / f"test.{lang}")] == want


def test_tags_gone_lowercase_and_bpe(prepared):
    out, _ = prepared
    text = {name: (out / name).read_text(encoding="utf-8") for name in FILES}
    for name, body in text.items():
        assert body == body.lower(), name
        for junk in ("<", ">", "&lt;", "url", "http", "talkid", "keywords", "title", "description", "seg id"):
            assert junk not in body, (name, junk)
        assert all(line.strip() for line in body.split("\n")[:-1]), name
        assert not re.search(r"@@$|@@ *$", body, flags=re.M), name
    train = text["train.de"] + text["valid.de"]
    assert "speaker 1 :" in unbpe(train)  # a <title> line: markup removed, text kept as a sentence
    assert "@@ " in text["train.de"] and "@@ " in text["test.en"]
    assert "&quot;" in text["train.en"]  # tokenizer.perl's default escaping
    assert (out / "code").read_text().startswith("#version")


def test_cleaning_drops_planted_pairs(raw, tmp_path):
    src = copy_raw(raw, tmp_path)
    planted = [("überlang " * 200, "overlong " * 200),           # 200 tokens > 175
               ("kurzwort zwei", "shortword a b c d"),           # ratio 5/2 > 1.5
               ("", "emptypartner"),                             # empty side
               ("kontrollsatz eins zwei", "controlsentence one two")]  # a good pair, kept
    for i, lang in enumerate(LANGS):
        with open(src / f"train.tags.de-en.{lang}", "a", encoding="utf-8") as f:
            f.write("".join(pair[i].strip() + "\n" for pair in planted))
    out = tmp_path / "out"
    counts = run(src.parent, out)  # the folder that holds de-en/
    body = {lang: unbpe((out / f"train.{lang}").read_text() + (out / f"valid.{lang}").read_text())
            for lang in LANGS}
    for word in ("überlang", "kurzwort"):
        assert word not in body["de"]
    for word in ("overlong", "shortword", "emptypartner"):
        assert word not in body["en"]
    assert "kontrollsatz eins zwei" in body["de"] and "controlsentence one two" in body["en"]
    assert counts["train"] + counts["valid"] == len(expected_clean(src))


def test_tgz_and_release_archive_match_folder(raw, prepared, tmp_path):
    out, counts = prepared
    tgz = F.write_fake_archive(tmp_path / "t", n_train=400, n_test=50, seed=0, as_tgz=True)
    assert tgz.name == "de-en.tgz" and tgz.is_file() and not (tmp_path / "t" / "de-en").exists()
    # the release's outer archive: 2014-01/texts/de/en/de-en.tgz inside 2014-01.tgz
    outer = tmp_path / "r" / "2014-01.tgz"
    outer.parent.mkdir()
    with tarfile.open(outer, "w:gz") as tar:
        tar.add(tgz, arcname="2014-01/texts/de/en/de-en.tgz")
    for i, source in enumerate((tgz, tgz.parent, outer)):
        dst = tmp_path / f"o{i}"
        assert run(source, dst) == counts
        for name in FILES + ["code", "SYNTHETIC"]:
            assert (dst / name).read_bytes() == (out / name).read_bytes(), (source, name)


def test_synthetic_marker(raw, prepared, tmp_path):
    out, _ = prepared
    assert (raw / "SYNTHETIC").is_file() and (out / "SYNTHETIC").is_file()
    src = copy_raw(raw, tmp_path)
    (src / "SYNTHETIC").unlink()
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "SYNTHETIC").write_text("stale")
    run(src, dst)
    assert not (dst / "SYNTHETIC").exists()


@pytest.mark.parametrize("missing", ["train.tags.de-en.en", "IWSLT14.TED.tst2011.de-en.en.xml"])
def test_missing_file_names_it(raw, tmp_path, missing):
    src = copy_raw(raw, tmp_path)
    (src / missing).unlink()
    out = tmp_path / "out"
    with pytest.raises(UserError, match=re.escape(missing)):
        run(src, out)
    assert not (out / "counts.json").exists()


def test_missing_or_malformed_raw(raw, tmp_path):
    with pytest.raises(UserError, match="de-en"):
        run(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="train.tags.de-en.de"):
        run(tmp_path / "empty", tmp_path / "out")
    bad = tmp_path / "de-en.tgz"
    bad.write_bytes(b"not a tar archive")
    with pytest.raises(UserError, match="de-en.tgz"):
        run(bad, tmp_path / "out")
    src = copy_raw(raw, tmp_path)
    with open(src / "train.tags.de-en.en", "a", encoding="utf-8") as f:
        f.write("one extra English line\n")
    with pytest.raises(UserError, match="train.tags.de-en.en"):
        run(src, tmp_path / "out")
    (src / "IWSLT14.TED.dev2010.de-en.de.xml").write_bytes(b"<seg id=\"1\"> \xff\xfe </seg>\n")
    with pytest.raises(UserError, match="IWSLT14.TED.dev2010.de-en.de.xml"):
        run(src, tmp_path / "out")
    assert not (tmp_path / "out" / "counts.json").exists()


def test_interrupted_prepare_does_not_look_complete(raw, prepared, tmp_path, monkeypatch):
    out, _ = prepared
    dst = tmp_path / "out"
    shutil.copytree(out, dst)
    assert P.is_prepared(dst)
    calls = {"n": 0}
    original = P._write_lines

    def flaky(path, body):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        original(path, body)

    monkeypatch.setattr(P, "_write_lines", flaky)
    with pytest.raises(KeyboardInterrupt):
        run(raw, dst)
    assert not P.is_prepared(dst) and not (dst / "counts.json").exists()
    with pytest.raises(UserError, match="counts.json"):
        P.read_counts(dst)


def test_fake_archive_shape_and_learnable(raw, tmp_path):
    assert sorted(p.name for p in raw.iterdir()) == sorted(P.required_files() + ["SYNTHETIC"])
    de, en = lines(raw / "train.tags.de-en.de"), lines(raw / "train.tags.de-en.en")
    assert len(de) == len(en)
    for tag in ("<url>", "<keywords>", "<talkid>", "<title>", "<description>"):
        assert any(line.startswith(tag) for line in de)
    pairs = [(a, b) for a, b in zip(de, en) if not a.startswith("<")]
    assert len(pairs) == 400
    assert all(3 <= len(a.split()) <= 12 for a, _ in pairs)
    # deterministic, and English is a function of German: the lexicon word by word, with a sentence-final
    # German verb moved to second place
    F.write_fake_archive(tmp_path, n_train=400, n_test=50, seed=0)
    assert lines(tmp_path / "de-en" / "train.tags.de-en.en") == en
    lex = {k.lower(): v for k, v in F._LEXICON.items()}
    verbs = {k for k, _ in F._VERBS}
    for a, b in F.fake_pairs(300, seed=5):
        german = [w.strip('".,?!').lower() for w in a.split()]
        english = [lex[w] for w in german]
        if german[-1] in verbs:
            english.insert(1, english.pop())
        assert [w.strip('".,?!').lower() for w in b.split()] == english
    # the dev/test sets differ from the training text and from each other
    segs = {name: lines(raw / f"{name}.de-en.de.xml") for name in P.EVAL_SETS}
    assert len({tuple(v) for v in segs.values()}) == len(P.EVAL_SETS)


def test_expected_real_counts_are_consistent():
    c = P.EXPECTED_COUNTS
    assert c == {"train": 160239, "valid": 7283, "test": 6750}
    assert (c["train"] + c["valid"]) // 23 == c["valid"]  # awk 'NR%23==0' over the cleaned corpus
