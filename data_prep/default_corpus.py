"""The offline default corpus: Jane Austen's six novels and the King James Bible, as chapter documents.

Sources, in order of preference:

1. Debian packages (the machine's package registry, so no general internet is needed):
   ``r-cran-janeaustenr`` holds the novels in an R lazy-load database (``data/Rdata.rdb``, one line per
   element); ``bible-kjv-text`` holds the Bible in the compressed format of the ``bible`` program, which
   package ``bible-kjv`` provides and which we run from the unpacked package (no install).
2. Where apt is not available: the same public-domain texts from Project Gutenberg over HTTPS.

Each chapter becomes one document; the novels' line structure is kept (``\\n`` between lines).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_prep import debian_packages as deb  # noqa: E402
from data_prep.r_lazyload import read_lazyload_db  # noqa: E402

AUSTEN_PACKAGE = "r-cran-janeaustenr"
AUSTEN_DB = "usr/lib/R/site-library/janeaustenr/data/Rdata"
BIBLE_TEXT_PACKAGE = "bible-kjv-text"
BIBLE_PROGRAM_PACKAGE = "bible-kjv"

# Project Gutenberg ebook numbers of the same texts (fallback where apt is unavailable).
GUTENBERG_BOOKS = {
    "prideprejudice": 1342, "sensesensibility": 161, "emma": 158, "mansfieldpark": 141,
    "northangerabbey": 121, "persuasion": 105, "kjv": 10,
}
GUTENBERG_URL = "https://www.gutenberg.org/cache/epub/{n}/pg{n}.txt"

_CHAPTER = re.compile(r"^\s*(CHAPTER|Chapter)\s+([0-9]+|[IVXLC]+)\b")
_VERSE = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+)\s+(.*)$")


class CorpusSourceError(RuntimeError):
    """A source of the default corpus could not be fetched or read."""


def split_chapters(lines: list[str]) -> list[str]:
    """Chapter texts of a novel given as lines; front matter joins the first chapter."""
    chapters: list[list[str]] = []
    current: list[str] = []
    seen_heading = False
    for line in lines:
        if _CHAPTER.match(line) and (seen_heading or any(s.strip() for s in current)):
            if seen_heading:
                chapters.append(current)
                current = []
            seen_heading = True
        elif _CHAPTER.match(line):
            seen_heading = True
        current.append(line)
    chapters.append(current)
    texts = ["\n".join(c).strip() for c in chapters]
    return [t for t in texts if t]


def austen_from_lazyload(db_prefix: str) -> dict[str, list[str]]:
    """Novel name -> chapter texts, from the janeaustenr lazy-load database at ``db_prefix``."""
    novels = read_lazyload_db(db_prefix)
    if not novels:
        raise CorpusSourceError(f"{db_prefix}.rdx lists no datasets")
    out = {}
    for name in sorted(novels):
        lines = novels[name]
        if not isinstance(lines, list) or not all(isinstance(x, str) or x is None for x in lines):
            raise CorpusSourceError(f"{db_prefix}.rdb: dataset {name!r} is not a character vector")
        out[name] = split_chapters([x or "" for x in lines])
    return out


def bible_chapters_from_program(bible: str, data_dir: str) -> list[str]:
    """Chapter texts of the King James Bible printed by the ``bible`` program over ``data_dir/bible.data``."""
    try:
        r = subprocess.run([bible, "-f", "-p", data_dir, "gen1:1-rev22:21"], capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CorpusSourceError(f"cannot run {bible}: {e}") from None
    if r.returncode != 0 or not r.stdout:
        raise CorpusSourceError(f"{bible} failed (exit {r.returncode}): {r.stderr.decode(errors='replace')[-300:]}")
    return chapters_from_verse_lines(r.stdout.decode("utf-8", errors="replace").splitlines())


def chapters_from_verse_lines(lines: list[str]) -> list[str]:
    """Group ``Ge1:1 In the beginning ...`` lines into one text per (book, chapter)."""
    chapters: list[str] = []
    key, verses = None, []
    for line in lines:
        m = _VERSE.match(line)
        if not m:
            if verses and line.strip():  # wrapped continuation of the previous verse
                verses[-1] += " " + line.strip()
            continue
        k = (m.group(1), m.group(2))
        if k != key and verses:
            chapters.append("\n".join(verses))
            verses = []
        key = k
        verses.append(m.group(4).strip())
    if verses:
        chapters.append("\n".join(verses))
    return chapters


def fetch_from_debian(work_dir: str, with_bible: bool = True, log=print) -> dict[str, list[str]]:
    """Source name -> chapter texts, from Debian packages downloaded into ``work_dir/debs``."""
    debs = os.path.join(work_dir, "debs")
    unpack = os.path.join(work_dir, "unpacked")
    updated: list = []
    austen_deb = deb.apt_download(AUSTEN_PACKAGE, debs, log=log, _updated=updated)
    deb.extract_deb(austen_deb, unpack, [AUSTEN_DB + ".rdb", AUSTEN_DB + ".rdx"])
    sources = {f"austen/{k}": v for k, v in austen_from_lazyload(os.path.join(unpack, AUSTEN_DB)).items()}
    if with_bible:
        try:
            text_deb = deb.apt_download(BIBLE_TEXT_PACKAGE, debs, log=log, _updated=updated)
            prog_deb = deb.apt_download(BIBLE_PROGRAM_PACKAGE, debs, log=log, _updated=updated)
            deb.extract_deb(text_deb, unpack, ["usr/lib/bible.data", "usr/lib/bible.data.conc"])
            deb.extract_deb(prog_deb, unpack, ["usr/bin/bible"])
            sources["bible/kjv"] = bible_chapters_from_program(os.path.join(unpack, "usr/bin/bible"),
                                                               os.path.join(unpack, "usr/lib"))
        except (deb.PackageError, CorpusSourceError) as e:
            log(f"warning: King James Bible unavailable ({e}); continuing with the Austen novels only")
    return sources


def download(url: str, dest: str, timeout: float = 60) -> str:
    """Download ``url`` to ``dest`` (temporary name, then rename); skip if ``dest`` exists."""
    if os.path.exists(dest):
        return dest
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    tmp = f"{dest}.part"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
            while True:
                chunk = r.read(1 << 20)
                if not chunk:
                    break
                f.write(chunk)
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise CorpusSourceError(f"could not download {url}: {getattr(e, 'reason', e)}") from None
    return dest


def strip_gutenberg(text: str) -> str:
    """The book between Project Gutenberg's ``*** START OF`` and ``*** END OF`` markers."""
    start = re.search(r"^\*\*\* ?START OF.*$", text, re.M)
    end = re.search(r"^\*\*\* ?END OF.*$", text, re.M)
    return text[start.end() if start else 0:end.start() if end else len(text)].strip()


def chapters_from_gutenberg_kjv(text: str) -> list[str]:
    """Chapter texts of Gutenberg's KJV, where each verse is a paragraph starting ``<chapter>:<verse>``.

    A verse ``N:1`` starts a new chapter; a book title between chapters stays with the chapter it precedes.
    """
    chapters: list[list[str]] = [[]]
    has_verse = False
    pending = 0  # trailing non-verse paragraphs (a book title) of the current chapter
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        if not para:
            continue
        m = re.match(r"^(\d+):(\d+)\s+(.*)$", para)
        if m and m.group(2) == "1" and has_verse:
            # The pending title belongs to the chapter that starts here.
            cut = len(chapters[-1]) - pending
            chapters.append(chapters[-1][cut:])
            del chapters[-2][cut:]
        if m:
            chapters[-1].append(m.group(3))
            has_verse, pending = True, 0
        else:
            chapters[-1].append(para)
            pending = pending + 1 if has_verse else 0
    return ["\n".join(c) for c in chapters if c]


def fetch_from_gutenberg(work_dir: str, with_bible: bool = True, log=print) -> dict[str, list[str]]:
    """Source name -> chapter texts, downloaded from Project Gutenberg over HTTPS."""
    sources = {}
    for name, n in GUTENBERG_BOOKS.items():
        if name == "kjv" and not with_bible:
            continue
        log(f"downloading {GUTENBERG_URL.format(n=n)}")
        path = download(GUTENBERG_URL.format(n=n), os.path.join(work_dir, "gutenberg", f"pg{n}.txt"))
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            text = strip_gutenberg(f.read().replace("\r\n", "\n"))
        if name == "kjv":
            sources["bible/kjv"] = chapters_from_gutenberg_kjv(text)
        else:
            sources[f"austen/{name}"] = split_chapters(text.split("\n"))
    return sources


def main(argv=None) -> int:
    """Fetches the sources and prints their chapter counts: a check of the sources that
    ``prepare_data.py default`` (which builds the corpus) reads."""
    parser = argparse.ArgumentParser(
        description="Fetch the offline default corpus's sources (Debian packages, or Project Gutenberg where apt "
                    "is unavailable) into WORK_DIR and print the chapters found per source. To build the "
                    "tokenised corpus use `python data_prep/prepare_data.py default`.")
    parser.add_argument("--work-dir", required=True, help="folder for the downloaded packages or books")
    parser.add_argument("--source", choices=("auto", "debian", "gutenberg"), default="auto",
                        help="where to fetch from (default: auto = Debian packages when apt-get is available)")
    parser.add_argument("--no-bible", action="store_true", help="the Austen novels only (default: with the KJV)")
    args = parser.parse_args(argv)
    use_debian = deb.apt_available() if args.source == "auto" else args.source == "debian"
    fetch = fetch_from_debian if use_debian else fetch_from_gutenberg
    try:
        sources = fetch(args.work_dir, with_bible=not args.no_bible)
    except (deb.PackageError, CorpusSourceError) as err:
        print(f"default_corpus.py: error: {err}", file=sys.stderr)
        return 1
    for name in sorted(sources):
        print(f"{name}: {len(sources[name])} chapters, {sum(map(len, sources[name])):,} characters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
