"""IWSLT'14 German-English data: fairseq's `examples/translation/prepare-iwslt14.sh`, step by step, in Python.

The script's pipeline, re-implemented (sacremoses stands in for Moses' perl scripts, subword-nmt's
library for its CLI):

1. training text `train.tags.de-en.{de,en}`: drop the lines that hold `<url>`, `<talkid>` or `<keywords>`,
   delete the `<title>`/`</title>`/`<description>`/`</description>` markup (their text stays, as a
   sentence), Moses-tokenize with `tokenizer.perl -l LANG`'s defaults (HTML escaping on, no aggressive
   hyphen splitting; blank lines pass through untouched);
2. `clean-corpus-n.perl -ratio 1.5 ... 1 175`: drop a pair when either side is empty or over 175 tokens,
   or one side is more than 1.5 times as long as the other (or holds a 1001-character token), then
   lowercase (`lowercase.perl`);
3. dev/test sets `IWSLT14.TED*.{de,en}.xml`: keep the `<seg id...>` lines, strip the seg tags, turn `’`
   into `'`, tokenize, lowercase;
4. valid = every 23rd line of the cleaned training text (`awk 'NR%23==0'`), train = the others; test =
   dev2010 + TEDX dev2012 + tst2010 + tst2011 + tst2012, in that order;
5. joint BPE: `learn_bpe -s 10000` on train.de followed by train.en, applied to every split ("@@ ").

On the real archive fairseq users report 160,239 / 7,283 / 6,750 sentence pairs (see EXPECTED_COUNTS).
"""
from __future__ import annotations

import io
import json
import re
import tarfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Iterable

from bench.errors import UserError
from bench.store.files import atomic_write as _atomic_write
from bench.task import SYNTHETIC_MARKER

SRC, TGT = "de", "en"
PAIR = f"{SRC}-{TGT}"
ARCHIVE = f"{PAIR}.tgz"
TRAIN_FILE = "train.tags.{pair}.{lang}"
# the order in which the script concatenates the tokenized dev/test sets into test.{de,en}
EVAL_SETS = ("IWSLT14.TED.dev2010", "IWSLT14.TEDX.dev2012", "IWSLT14.TED.tst2010", "IWSLT14.TED.tst2011",
             "IWSLT14.TED.tst2012")
TRAIN_DROP = ("<url>", "<talkid>", "<keywords>")                    # grep -v
TRAIN_STRIP = ("<title>", "</title>", "<description>", "</description>")  # sed s/...//g
CLEAN_RATIO, CLEAN_MIN, CLEAN_MAX = 1.5, 1, 175                      # clean-corpus-n.perl -ratio 1.5 ... 1 175
MAX_WORD_LENGTH = 1000                                               # clean-corpus-n.perl's default
VALID_EVERY = 23
BPE_MERGES = 10000
SPLITS = ("train", "valid", "test")
OUTPUTS = tuple(f"{split}.{lang}" for split in SPLITS for lang in (SRC, TGT)) + ("code",)
MARKER = SYNTHETIC_MARKER
COUNTS = "counts.json"
# What fairseq-preprocess logs for the output of prepare-iwslt14.sh on the real 2014-01 de-en archive.
EXPECTED_COUNTS = {"train": 160239, "valid": 7283, "test": 6750}


def required_files() -> list[str]:
    """The files of the archive's `de-en` folder that the preparation reads."""
    names = [TRAIN_FILE.format(pair=PAIR, lang=lang) for lang in (SRC, TGT)]
    names += [f"{s}.{PAIR}.{lang}.xml" for s in EVAL_SETS for lang in (SRC, TGT)]
    return names


# ----------------------------------------------------------------------------------------------------------
# Finding the raw files: a `de-en` folder, a `de-en.tgz`, or the release's `2014-01.tgz` (or its extraction)

def _missing(where: str, name: str) -> UserError:
    return UserError(f"IWSLT'14 raw data: {where} has no {name} (expected the de-en folder of the IWSLT "
                     f"2014-01 release, from {ARCHIVE})")


def _read_folder(folder: Path) -> dict[str, bytes]:
    files = {}
    for name in required_files():
        if not (folder / name).is_file():
            raise _missing(str(folder), name)
        files[name] = (folder / name).read_bytes()
    if (folder / MARKER).is_file():
        files[MARKER] = b""
    return files


def _read_tar(label: str, tar: tarfile.TarFile) -> dict[str, bytes]:
    """The `de-en` files inside an open tar; a nested `de-en.tgz` (the release's outer archive) is opened."""
    wanted = set(required_files()) | {MARKER}
    found: dict[str, tarfile.TarInfo] = {}
    nested = None
    for member in tar.getmembers():
        path = PurePosixPath(member.name)
        if not member.isfile():
            continue
        if path.name in wanted and (path.parent.name == PAIR or path.name not in found):
            found[path.name] = member
        elif path.name == ARCHIVE and (nested is None or path.parent.parts[-2:] == (SRC, TGT)):
            nested = member
    if TRAIN_FILE.format(pair=PAIR, lang=SRC) not in found and nested is not None:
        with tarfile.open(fileobj=io.BytesIO(tar.extractfile(nested).read()), mode="r:*") as inner:
            return _read_tar(f"{label}:{nested.name}", inner)
    files = {}
    for name in required_files():
        if name not in found:
            raise _missing(label, name)
        files[name] = tar.extractfile(found[name]).read()
    if MARKER in found:
        files[MARKER] = b""
    return files


def _read_archive(path: Path) -> dict[str, bytes]:
    try:
        with tarfile.open(path, mode="r:*") as tar:
            return _read_tar(str(path), tar)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise UserError(f"IWSLT'14 raw data: cannot read the archive {path} ({exc})") from None


def read_raw(raw: str | Path) -> dict[str, bytes]:
    """The raw files the preparation reads (`required_files()`, plus `SYNTHETIC` when there is one), found
    under `raw`: a `de-en.tgz`, a `de-en` folder, a folder holding either, the release's `2014-01.tgz` or
    the `texts/de/en/...` tree it extracts to."""
    raw = Path(raw).expanduser()
    if raw.is_file():
        return _read_archive(raw)
    if not raw.is_dir():
        raise UserError(f"IWSLT'14 raw data: {raw} does not exist (expected {ARCHIVE} of the IWSLT 2014-01 "
                        "release, or its extracted de-en folder)")
    first = TRAIN_FILE.format(pair=PAIR, lang=SRC)
    release = Path("texts") / SRC / TGT
    for folder in (raw, raw / PAIR, raw / release / PAIR, raw / "2014-01" / release / PAIR):
        if (folder / first).is_file():
            files = _read_folder(folder)
            break
    else:
        for archive in (raw / ARCHIVE, raw / release / ARCHIVE, raw / "2014-01" / release / ARCHIVE,
                        raw / "2014-01.tgz"):
            if archive.is_file():
                files = _read_archive(archive)
                break
        else:
            if (raw / PAIR).is_dir():  # a de-en folder without the training text: name the file there
                _read_folder(raw / PAIR)
            raise UserError(f"IWSLT'14 raw data: found neither {raw / PAIR / first} nor {raw / ARCHIVE} "
                            "(expected the IWSLT 2014-01 release's de-en.tgz or its extracted de-en folder)")
    if (raw / MARKER).is_file():
        files[MARKER] = b""
    return files


# ----------------------------------------------------------------------------------------------------------
# The text steps

def _lines(data: bytes, name: str) -> list[str]:
    """The file's lines as grep/awk/perl see them: split on "\\n" only, no final empty line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"IWSLT'14 raw data: {name} is not UTF-8 text ({exc.reason} at byte {exc.start})") \
            from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


_BLANK = re.compile(r"\s*")


class _Tokenizer:
    """`tokenizer.perl -l LANG` with its defaults (escaping on, no -a, no -x)."""

    def __init__(self, lang: str):
        try:
            from sacremoses import MosesTokenizer
        except ImportError:
            raise UserError("preparing IWSLT'14 needs sacremoses: pip install sacremoses") from None
        self._moses = MosesTokenizer(lang=lang)

    def __call__(self, line: str) -> str:
        if _BLANK.fullmatch(line):  # tokenizer.perl prints blank lines as they are
            return line
        return self._moses.tokenize(line, aggressive_dash_splits=False, return_str=True, escape=True)


def lowercase(line: str) -> str:
    """Perl's lc: the per-character full lowercase mapping (Python's str.lower adds a final-sigma rule)."""
    lowered = line.lower()
    if "\u03a3" in line:
        lowered = "".join(ch.lower() for ch in line)
    return lowered


def filter_train_line(line: str) -> str | None:
    """The script's grep -v / sed steps on one line of train.tags: None when the line is dropped."""
    if any(tag in line for tag in TRAIN_DROP):
        return None
    for tag in TRAIN_STRIP:
        line = line.replace(tag, "")
    return line


_SEG_OPEN = re.compile(r'<seg id="[0-9]*">\s*')
_SEG_CLOSE = re.compile(r"\s*</seg>\s*")


def eval_segments(lines: Iterable[str]) -> list[str]:
    """The script's grep '<seg id' / sed steps on a dev/test xml file."""
    out = []
    for line in lines:
        if "<seg id" in line:
            line = _SEG_CLOSE.sub("", _SEG_OPEN.sub("", line))
            out.append(line.replace("\u2019", "'"))
    return out


def clean_corpus(src: list[str], tgt: list[str], ratio: float = CLEAN_RATIO, min_len: int = CLEAN_MIN,
                 max_len: int = CLEAN_MAX, max_word_length: int = MAX_WORD_LENGTH) -> tuple[list[str], list[str]]:
    """`clean-corpus-n.perl -ratio R corpus src tgt out MIN MAX`: the kept pairs, whitespace-normalised."""
    if len(src) != len(tgt):
        raise ValueError(f"clean_corpus: {len(src)} source lines but {len(tgt)} target lines")
    long_word = re.compile(r"[^\s|]{%d}" % (max_word_length + 1))
    factored = bool(src) and ("|" in src[0] or "|" in tgt[0])
    kept_src, kept_tgt = [], []
    for f, e in zip(src, tgt):
        if not factored:
            f, e = f.replace("|", ""), e.replace("|", "")
        f, e = " ".join(f.split()), " ".join(e.split())
        if not f or not e:
            continue
        fc, ec = len(f.split(" ")), len(e.split(" "))
        if fc > max_len or ec > max_len or fc < min_len or ec < min_len:
            continue
        if ec / fc > ratio or fc / ec > ratio:
            continue
        if long_word.search(e) or long_word.search(f):
            continue
        kept_src.append(f)
        kept_tgt.append(e)
    return kept_src, kept_tgt


def split_valid(lines: list[str], every: int = VALID_EVERY) -> tuple[list[str], list[str]]:
    """awk 'NR%23 != 0' (train) and awk 'NR%23 == 0' (valid), NR counted from 1."""
    train = [line for i, line in enumerate(lines, 1) if i % every]
    valid = [line for i, line in enumerate(lines, 1) if not i % every]
    return train, valid


# ----------------------------------------------------------------------------------------------------------
# The pipeline

def _write_lines(path: Path, lines: Iterable[str]) -> None:
    _atomic_write(path, "".join(line + "\n" for line in lines))


def prepare_iwslt14(raw: str | Path, out: str | Path, bpe_merges: int = BPE_MERGES) -> dict[str, int]:
    """Prepare IWSLT'14 de-en as fairseq's prepare-iwslt14.sh does; returns {"train": N, "valid": N, "test": N}.

    `raw`: the release's `de-en.tgz`, its extracted `de-en` folder, a folder holding either (or the
    release's `2014-01.tgz`, or the `texts/de/en/...` tree it extracts to). Writes into `out`:
    train/valid/test.{de,en} (tokenized, lowercased, BPE with "@@ " markers), `code` (the BPE codes),
    a copy of the `SYNTHETIC` marker when the raw data has one, and `counts.json` last: a folder without
    counts.json is not (or not yet) prepared.
    """
    try:
        from subword_nmt.apply_bpe import BPE
        from subword_nmt.learn_bpe import learn_bpe
    except ImportError:
        raise UserError("preparing IWSLT'14 needs subword-nmt: pip install subword-nmt") from None
    files = read_raw(raw)
    raw_texts = {name: _lines(files[name], name) for name in required_files()}
    synthetic = MARKER in files

    tokenized: dict[str, list[str]] = {}
    tests: dict[str, list[str]] = {}
    for lang in (SRC, TGT):
        tok = _Tokenizer(lang)
        name = TRAIN_FILE.format(pair=PAIR, lang=lang)
        kept = (filter_train_line(line) for line in raw_texts[name])
        tokenized[lang] = [tok(line) for line in kept if line is not None]
        test: list[str] = []
        for s in EVAL_SETS:
            test += [lowercase(tok(seg)) for seg in eval_segments(raw_texts[f"{s}.{PAIR}.{lang}.xml"])]
        tests[lang] = test
    n_src, n_tgt = len(tokenized[SRC]), len(tokenized[TGT])
    if n_src != n_tgt:
        raise UserError(f"IWSLT'14 raw data: {TRAIN_FILE.format(pair=PAIR, lang=SRC)} has {n_src} sentences "
                        f"but {TRAIN_FILE.format(pair=PAIR, lang=TGT)} has {n_tgt}: the files do not match")
    for s in EVAL_SETS:
        a = len(eval_segments(raw_texts[f"{s}.{PAIR}.{SRC}.xml"]))
        b = len(eval_segments(raw_texts[f"{s}.{PAIR}.{TGT}.xml"]))
        if a != b:
            raise UserError(f"IWSLT'14 raw data: {s}.{PAIR}.{SRC}.xml has {a} segments but "
                            f"{s}.{PAIR}.{TGT}.xml has {b}: the files do not match")
    clean_src, clean_tgt = clean_corpus(tokenized[SRC], tokenized[TGT])
    if not clean_src:
        raise UserError(f"IWSLT'14 raw data: no sentence pair of {TRAIN_FILE.format(pair=PAIR, lang=SRC)} "
                        "survived cleaning")
    splits: dict[str, dict[str, list[str]]] = {"train": {}, "valid": {}, "test": tests}
    for lang, clean in ((SRC, clean_src), (TGT, clean_tgt)):
        splits["train"][lang], splits["valid"][lang] = split_valid([lowercase(x) for x in clean])

    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / COUNTS).unlink(missing_ok=True)  # from here on the folder no longer looks prepared
    codes = io.StringIO()
    learn_bpe(io.StringIO("".join(line + "\n" for lang in (SRC, TGT) for line in splits["train"][lang])),
              codes, bpe_merges)
    _atomic_write(out / "code", codes.getvalue())
    bpe = BPE(io.StringIO(codes.getvalue()))
    counts = {}
    for split in SPLITS:
        for lang in (SRC, TGT):
            _write_lines(out / f"{split}.{lang}", (bpe.process_line(line) for line in splits[split][lang]))
        counts[split] = len(splits[split][SRC])
    if synthetic:
        _atomic_write(out / MARKER, "synthetic IWSLT'14-shaped data from write_fake_archive, not the real "
                                    "corpus\n")
    else:
        (out / MARKER).unlink(missing_ok=True)
    _atomic_write(out / COUNTS, json.dumps(counts, indent=2) + "\n")
    return counts


def is_prepared(out: str | Path) -> bool:
    """Whether `out` holds a complete preparation (counts.json is written last)."""
    out = Path(out)
    return (out / COUNTS).is_file() and all((out / name).is_file() for name in OUTPUTS)


def read_counts(out: str | Path) -> dict[str, int]:
    path = Path(out) / COUNTS
    if not is_prepared(out):
        raise UserError(f"IWSLT'14: {path} is missing: the data in {out} is not prepared (or the preparation "
                        "was interrupted)")
    return json.loads(path.read_text(encoding="utf-8"))
