"""Regenerate `instructions.jsonl`: short SYNTHETIC instruction/answer pairs for the tiny causal-LM recipes.

    python recipes/data/make_instructions.py        # from the repository root; stdlib only, byte-for-byte reproducible

The pairs are generated from templates (arithmetic, number words, capitals, opposites, plurals, counting, greetings,
sentiment labels), not written by people: figures measured on them show that a pipeline works, never model quality.
The review data is real text and comes from recipes/data/fetch_reviews.py instead. Released under CC0.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
INSTRUCTIONS_PATH = HERE / "instructions.jsonl"
SEED = 1234


# ---------------------------------------------------------------------------
# Instruction-following examples
# ---------------------------------------------------------------------------

NUMBER_WORDS = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
    "nine", "ten",
]

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"),
    ("Spain", "Madrid"), ("Portugal", "Lisbon"), ("Japan", "Tokyo"),
    ("China", "Beijing"), ("India", "New Delhi"), ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"), ("Canada", "Ottawa"), ("Mexico", "Mexico City"),
    ("Brazil", "Brasilia"), ("Argentina", "Buenos Aires"), ("Peru", "Lima"),
    ("Chile", "Santiago"), ("Russia", "Moscow"), ("Poland", "Warsaw"),
    ("Greece", "Athens"), ("Sweden", "Stockholm"), ("Norway", "Oslo"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Ireland", "Dublin"),
    ("Austria", "Vienna"), ("Hungary", "Budapest"), ("Belgium", "Brussels"),
    ("the Netherlands", "Amsterdam"), ("Australia", "Canberra"),
    ("New Zealand", "Wellington"), ("South Korea", "Seoul"),
    ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Turkey", "Ankara"),
    ("Iceland", "Reykjavik"), ("Cuba", "Havana"), ("Morocco", "Rabat"),
    ("Nigeria", "Abuja"), ("the United Kingdom", "London"),
    ("the United States", "Washington, D.C."),
]

OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"),
    ("happy", "sad"), ("light", "dark"), ("open", "closed"), ("old", "new"),
    ("high", "low"), ("early", "late"), ("full", "empty"), ("wet", "dry"),
    ("hard", "soft"), ("loud", "quiet"), ("rich", "poor"), ("strong", "weak"),
    ("thick", "thin"), ("long", "short"), ("young", "old"), ("day", "night"),
    ("yes", "no"), ("in", "out"), ("left", "right"), ("win", "lose"),
    ("good", "bad"), ("clean", "dirty"), ("heavy", "light"),
    ("inside", "outside"), ("before", "after"), ("first", "last"),
    ("start", "finish"), ("buy", "sell"), ("push", "pull"),
    ("true", "false"), ("love", "hate"), ("near", "far"), ("top", "bottom"),
    ("easy", "difficult"), ("cheap", "expensive"), ("awake", "asleep"),
    ("north", "south"), ("east", "west"), ("above", "below"),
    ("friend", "enemy"), ("laugh", "cry"), ("sweet", "sour"),
    ("wide", "narrow"), ("safe", "dangerous"),
]

PLURALS = [
    ("cat", "cats"), ("dog", "dogs"), ("book", "books"), ("tree", "trees"),
    ("car", "cars"), ("apple", "apples"), ("house", "houses"),
    ("bird", "birds"), ("chair", "chairs"), ("table", "tables"),
    ("box", "boxes"), ("bus", "buses"), ("glass", "glasses"),
    ("dish", "dishes"), ("watch", "watches"), ("fox", "foxes"),
    ("baby", "babies"), ("city", "cities"), ("story", "stories"),
    ("party", "parties"), ("lady", "ladies"), ("key", "keys"),
    ("boy", "boys"), ("day", "days"), ("leaf", "leaves"),
    ("knife", "knives"), ("wife", "wives"), ("wolf", "wolves"),
    ("child", "children"), ("man", "men"), ("woman", "women"),
    ("foot", "feet"), ("tooth", "teeth"), ("mouse", "mice"),
    ("goose", "geese"), ("person", "people"), ("sheep", "sheep"),
    ("fish", "fish"), ("potato", "potatoes"), ("tomato", "tomatoes"),
    ("hero", "heroes"), ("piano", "pianos"), ("photo", "photos"),
    ("pen", "pens"), ("cup", "cups"), ("star", "stars"),
]

NAMES = [
    "Anna", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hugo",
    "Ines", "Jack", "Kemal", "Lena", "Mateo", "Nora", "Omar", "Priya",
    "Quinn", "Rosa", "Sam", "Tara", "Uma", "Victor", "Wei", "Yara", "Zoe",
]

SENTIMENT_SNIPPETS = [
    ("I loved every minute of it.", "positive"),
    ("This was a wonderful day.", "positive"),
    ("The food was delicious.", "positive"),
    ("What a great movie!", "positive"),
    ("I am so happy with this phone.", "positive"),
    ("The staff were very kind.", "positive"),
    ("This book is fantastic.", "positive"),
    ("Best concert I have ever been to.", "positive"),
    ("The hotel room was lovely.", "positive"),
    ("I would buy this again.", "positive"),
    ("The game is really fun.", "positive"),
    ("Everything worked perfectly.", "positive"),
    ("The weather was beautiful.", "positive"),
    ("Our teacher is brilliant.", "positive"),
    ("This song makes me smile.", "positive"),
    ("Not bad at all, I enjoyed it.", "positive"),
    ("The service was excellent.", "positive"),
    ("I had a great time.", "positive"),
    ("This coffee is amazing.", "positive"),
    ("The show was a joy to watch.", "positive"),
    ("I hated every minute of it.", "negative"),
    ("This was a terrible day.", "negative"),
    ("The food was awful.", "negative"),
    ("What a boring movie.", "negative"),
    ("I am so unhappy with this phone.", "negative"),
    ("The staff were very rude.", "negative"),
    ("This book is dreadful.", "negative"),
    ("Worst concert I have ever been to.", "negative"),
    ("The hotel room was dirty.", "negative"),
    ("I would never buy this again.", "negative"),
    ("The game is really dull.", "negative"),
    ("Nothing worked at all.", "negative"),
    ("The weather was miserable.", "negative"),
    ("The lesson was a waste of time.", "negative"),
    ("This song makes me cringe.", "negative"),
    ("I wanted to love it, but it was bad.", "negative"),
    ("The service was slow and careless.", "negative"),
    ("I had an awful time.", "negative"),
    ("This coffee is disgusting.", "negative"),
    ("The show was painful to watch.", "negative"),
]

GREETINGS = [
    ("Say hello.", "Hello!"),
    ("Say goodbye.", "Goodbye!"),
    ("Say good morning.", "Good morning!"),
    ("Say good night.", "Good night!"),
    ("Say thank you.", "Thank you!"),
    ("Say hello in Spanish.", "Hola!"),
    ("Say hello in French.", "Bonjour!"),
    ("Say hello in German.", "Hallo!"),
    ("Say hello in Italian.", "Ciao!"),
    ("Say thank you in French.", "Merci!"),
    ("Say thank you in Spanish.", "Gracias!"),
    ("Say thank you in German.", "Danke!"),
    ("How are you?", "I am fine, thank you."),
    ("What is your name?", "I am a small assistant."),
    ("Wish me luck.", "Good luck!"),
    ("Wish me a happy birthday.", "Happy birthday!"),
]


def build_instructions() -> list[dict[str, str]]:
    rng = random.Random(SEED + 1)
    items: list[tuple[str, str]] = []

    # Arithmetic: addition and subtraction with small numbers.
    add_pairs = [(a, b) for a in range(0, 13) for b in range(0, 13)]
    for a, b in rng.sample(add_pairs, 60):
        items.append((f"What is {a} plus {b}?", str(a + b)))
    sub_pairs = [(a, b) for a in range(0, 21) for b in range(0, 13) if a >= b]
    for a, b in rng.sample(sub_pairs, 45):
        items.append((f"What is {a} minus {b}?", str(a - b)))
    mul_pairs = [(a, b) for a in range(1, 10) for b in range(1, 10)]
    for a, b in rng.sample(mul_pairs, 25):
        items.append((f"What is {a} times {b}?", str(a * b)))

    # Next / previous number.
    for n in range(1, 21):
        items.append((f"What number comes after {n}?", str(n + 1)))
    for n in range(2, 12):
        items.append((f"What number comes before {n}?", str(n - 1)))

    # Number words.
    for n, word in enumerate(NUMBER_WORDS):
        items.append((f"Write the number {n} as a word.", word))

    # Capitals.
    for country, capital in CAPITALS:
        items.append((f"What is the capital of {country}?", capital))

    # Opposites.
    for word, opposite in OPPOSITES:
        items.append((f"Give the opposite of {word}.", opposite))

    # Plurals.
    for word, plural in PLURALS:
        items.append((f"What is the plural of {word}?", plural))

    # Counting.
    for start, end in [(1, 3), (1, 4), (1, 5), (1, 6), (1, 7), (1, 8),
                       (2, 6), (3, 8), (4, 9), (5, 10), (6, 10), (10, 15)]:
        seq = " ".join(str(i) for i in range(start, end + 1))
        items.append((f"Count from {start} to {end}.", seq))
    for start, end in [(5, 1), (8, 4), (10, 5), (3, 1), (6, 1), (10, 3)]:
        seq = " ".join(str(i) for i in range(start, end - 1, -1))
        items.append((f"Count down from {start} to {end}.", seq))
    for word in ["cat", "sun", "tree", "apple", "house", "dog", "bird", "water",
                 "table", "garden", "orange", "pencil", "window", "banana"]:
        items.append((f"How many letters are in the word {word}?", str(len(word))))

    # Greetings.
    items.extend(GREETINGS)
    for name in NAMES:
        items.append((f"Greet {name}.", f"Hello, {name}!"))

    # Sentiment labelling.
    for text, label in SENTIMENT_SNIPPETS:
        items.append((f"Is this positive or negative? {text}", label))

    seen: set[str] = set()
    out: list[dict[str, str]] = []
    for instruction, output in items:
        if instruction in seen:
            raise ValueError(f"duplicate instruction: {instruction!r}")
        seen.add(instruction)
        out.append({"instruction": instruction, "output": output})
    rng.shuffle(out)
    return out


def instructions_jsonl(items: list[dict[str, str]]) -> str:
    return "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items)


def main() -> None:
    INSTRUCTIONS_PATH.write_text(instructions_jsonl(build_instructions()), encoding="utf-8", newline="")
    print(f"wrote {INSTRUCTIONS_PATH}")


if __name__ == "__main__":
    main()
