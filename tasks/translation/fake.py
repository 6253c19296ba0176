"""A synthetic stand-in for the raw IWSLT'14 de-en archive (`bench data fake iwslt14`): the real file names
and structure (talk headers in the training files, <doc>/<seg> XML dev/test sets), a `SYNTHETIC` marker, and an
English side that is a deterministic function of the German side so that a model can learn it and BLEU rises.
"""
from __future__ import annotations

import random
import tarfile
from pathlib import Path

from tasks.translation.prepare import ARCHIVE, EVAL_SETS, MARKER, PAIR, SRC, TGT, TRAIN_FILE

# (German, English) pairs over a small vocabulary; English is a word-for-word image of German, plus one
# reordering rule (see `_translate`), so a model can learn the mapping exactly.
_NOUNS = [("Haus", "house"), ("Baum", "tree"), ("Hund", "dog"), ("Katze", "cat"), ("Stadt", "city"),
          ("Welt", "world"), ("Wasser", "water"), ("Buch", "book"), ("Kind", "child"), ("Frau", "woman"),
          ("Mann", "man"), ("Schule", "school"), ("Idee", "idea"), ("Zeit", "time"), ("Auto", "car"),
          ("Brot", "bread"), ("Musik", "music"), ("Sonne", "sun"), ("Meer", "sea"), ("Garten", "garden"),
          ("Freund", "friend"), ("Arbeit", "work"), ("Sprache", "language"), ("Zukunft", "future")]
_ADJS = [("gross", "big"), ("klein", "small"), ("alt", "old"), ("neu", "new"), ("schnell", "fast"),
         ("langsam", "slow"), ("gut", "good"), ("schoen", "beautiful"), ("warm", "warm"), ("kalt", "cold"),
         ("gruen", "green"), ("leise", "quiet")]
_VERBS = [("sieht", "sees"), ("findet", "finds"), ("liebt", "loves"), ("baut", "builds"), ("kennt", "knows"),
          ("hoert", "hears"), ("braucht", "needs"), ("sucht", "seeks"), ("malt", "paints"), ("teilt", "shares")]
_FUNCS = [("der", "the"), ("ein", "a"), ("und", "and"), ("mit", "with"), ("ohne", "without"), ("nicht", "not"),
          ("sehr", "very"), ("heute", "today"), ("hier", "here"), ("auch", "also"), ("wir", "we"),
          ("sie", "they")]
_LEXICON = dict(_NOUNS + _ADJS + _VERBS + _FUNCS)
_VERB_SET = {de for de, _ in _VERBS}
_HEADER_KEYWORDS = "talks, TED, science, culture, technology"


def _translate(words: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """The synthetic 'grammar' on (prefix, word, suffix) tokens: word-for-word through the lexicon (the
    punctuation travels with its word), except that a verb ending a German sentence of 3+ words moves to
    second place in English (German verb-final order -> English subject-verb order)."""
    en = [(pre, _LEXICON[w], post) for pre, w, post in words]
    if len(words) >= 3 and words[-1][1] in _VERB_SET:
        en.insert(1, en.pop())
    return en


def _sentence(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(3, 12)
    pool = _NOUNS + _ADJS + _VERBS + _FUNCS
    words = [["", rng.choice(pool)[0], ""] for _ in range(n)]
    if rng.random() < 0.5:  # a verb-final sentence, to exercise the reordering rule
        words[-1][1] = rng.choice(_VERBS)[0]
    if n >= 4 and rng.random() < 0.15:  # a quoted word: tokenized and escaped to &quot;
        words[1][0], words[1][2] = '"', '"'
    if n >= 6 and rng.random() < 0.4:  # a comma after the third word
        words[2][2] += ","
    de = [tuple(w) for w in words]
    en = _translate(de)
    end = rng.choice([".", ".", ".", "?", "!"])
    de_s = " ".join("".join(w) for w in de) + end
    en_s = " ".join("".join(w) for w in en) + end
    return de_s[0].upper() + de_s[1:], en_s[0].upper() + en_s[1:]


def fake_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """`n` synthetic (German, English) sentence pairs; English is a deterministic function of German."""
    rng = random.Random(seed)
    return [_sentence(rng) for _ in range(n)]


def _train_tags(pairs: list[tuple[str, str]], rng: random.Random) -> tuple[list[str], list[str]]:
    """Lines of train.tags.de-en.{de,en}: talks with the release's header lines, then their sentences."""
    de_lines, en_lines = [], []
    i, talk = 0, 0
    while i < len(pairs):
        talk += 1
        size = rng.randint(15, 40)
        title = fake_pairs(1, 10_000 + talk)[0]
        desc = fake_pairs(1, 20_000 + talk)[0]
        for side, lines in ((0, de_lines), (1, en_lines)):
            lang = (SRC, TGT)[side]
            lines.append(f"<url>http://www.ted.com/talks/lang/{lang}/synthetic_talk_{talk}.html</url>")
            lines.append(f"<keywords>{_HEADER_KEYWORDS}</keywords>")
            lines.append(f"<talkid>{talk}</talkid>")
            lines.append(f"<title>Speaker {talk}: {title[side]}</title>")
            lines.append(f"<description>TED Talk: {desc[side]}</description>")
        for de, en in pairs[i:i + size]:
            de_lines.append(de)
            en_lines.append(en)
        i += size
    return de_lines, en_lines


def _eval_xml(name: str, lang: str, pairs: list[tuple[str, str]], side: int) -> str:
    """A dev/test file in the release's xml layout: <doc> blocks of header lines and <seg id="N"> lines."""
    setname = name.split(".")[-1]
    if lang == SRC:
        opening, closing = f'<srcset setid="iwslt2014-{setname}" srclang="german">', "</srcset>"
    else:
        opening = f'<refset setid="iwslt2014-{setname}" srclang="german" trglang="english" refid="ref">'
        closing = "</refset>"
    out = ['<?xml version="1.0" encoding="UTF-8"?>', "<mteval>", opening]
    seg = 0
    for doc, start in enumerate(range(0, len(pairs), 10), 1):
        out.append(f'<doc docid="{doc}" genre="lectures">')
        out.append(f"<url>http://www.ted.com/talks/synthetic_{setname}_{doc}.html</url>")
        out.append(f"<keywords>{_HEADER_KEYWORDS}</keywords>")
        out.append(f"<talkid>{doc}</talkid>")
        out.append(f"<title>Synthetic {setname} {doc}</title>")
        for pair in pairs[start:start + 10]:
            seg += 1
            out.append(f'<seg id="{seg}"> {pair[side]} </seg>')
        out.append("</doc>")
    out += [closing, "</mteval>"]
    return "\n".join(out) + "\n"


def write_fake_archive(out: str | Path, n_train: int = 400, n_test: int = 50, seed: int = 0,
                       as_tgz: bool = False) -> Path:
    """Write a synthetic raw IWSLT'14 de-en folder `out/de-en/` (or archive `out/de-en.tgz`); returns its path.

    Same file names and layout as the release: train.tags.de-en.{de,en} (talks with <url>, <keywords>,
    <talkid>, <title>, <description> header lines) and the ten IWSLT14.TED*.de-en.{de,en}.xml dev/test
    files (<doc> blocks of <seg id="N"> lines, `n_test` segments each), plus a `SYNTHETIC` marker. The
    English side is a deterministic function of the German side (`_translate`); each dev/test set is
    drawn with its own seed.
    """
    out = Path(out).expanduser()
    folder = out / PAIR
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    de_lines, en_lines = _train_tags(fake_pairs(n_train, seed), rng)
    (folder / TRAIN_FILE.format(pair=PAIR, lang=SRC)).write_text("\n".join(de_lines) + "\n", encoding="utf-8")
    (folder / TRAIN_FILE.format(pair=PAIR, lang=TGT)).write_text("\n".join(en_lines) + "\n", encoding="utf-8")
    for k, name in enumerate(EVAL_SETS):
        pairs = fake_pairs(n_test, seed * 1000 + 101 + k)
        for side, lang in enumerate((SRC, TGT)):
            (folder / f"{name}.{PAIR}.{lang}.xml").write_text(_eval_xml(name, lang, pairs, side),
                                                              encoding="utf-8")
    (folder / MARKER).write_text("synthetic IWSLT'14-shaped data from write_fake_archive, not the real "
                                 "corpus\n", encoding="utf-8")
    if not as_tgz:
        return folder
    archive = out / ARCHIVE
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=f"{PAIR}/{path.name}")
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()
    return archive
