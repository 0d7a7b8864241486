"""Build conversations.jsonl from real, human-written chats: the BYU Chit-Chat Challenge corpus that chitchat-dataset ships.

    python recipes/data/fetch_conversations.py      # from the repository root; needs pip and PyPI, nothing else

What it does, deterministically (the same inputs give the same bytes):
1. `pip download --no-deps chitchat-dataset==0.9.0` and check the wheel's sha256 (WHEEL_SHA256);
2. read `chitchat_dataset/dataset.json` from the wheel and check its sha256 (CORPUS_SHA256): 7,168 open-domain text
   chats between two people (students of the BYU Perception, Control & Cognition lab's Chit-Chat Challenge, 2018),
   each started from a suggested prompt ("What superpower do you wish you had, and why?");
3. keep the chats with two participants; the one who wrote first is the `user`, the other the `assistant`; the lines
   one person sent in a row are one turn, joined with a line end; chats holding an e-mail address or a phone number
   are dropped, and so are chats with a turn of keyboard mashing or one line sent over and over;
4. a chat ends on its last `assistant` turn that keeps the whole chat within MAX_CHARS characters of content (whole turns
   only: a chat's length is where people stopped or the first turns that fit, never a cut turn); the chat's prompt,
   where it has one, becomes the `system` turn "Chat casually with the user. Suggested topic: <prompt>" (that wording
   is ours; the prompt is the corpus's);
5. deduplicate as fetch_reviews.py does (normalized repeats and word 5-gram Jaccard >= 0.5 over the whole chat), then
   draw ROWS chats with a fixed seed and write one `{"messages": [{"role", "content"}, ...]}` per line.

Why this corpus: real people's multi-turn conversations of uneven length (1 to 40+ turns), MIT-licensed, inside a PyPI
package, small enough to sample into the repository. It is chit-chat between peers, not instructions and answers: the
tiny chat recipe learns a conversational register from it, and the packing benchmark gets a realistic length spread.
Provenance and licence are in README.md beside this file.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fetch_reviews import deduplicated  # noqa: E402  (the same dedup rules as the reviews)

HERE = Path(__file__).resolve().parent
OUT = HERE / "conversations.jsonl"
PACKAGE = "chitchat-dataset==0.9.0"
WHEEL = "chitchat_dataset-0.9.0-py3-none-any.whl"
WHEEL_SHA256 = "7bf89f36645e2d5ec87d53370c8e851b5a688479c7beb7079cb4c87fc5acea3e"
CORPUS = "chitchat_dataset/dataset.json"
CORPUS_SHA256 = "d2a5d0bf6acf354fef51f3af39cbece2220d3b8f6086b658c3d335105798312a"
ROWS = 1000
SEED = 20180419
MAX_CHARS = 2000
SYSTEM = "Chat casually with the user. Suggested topic: {prompt}"
# a chat that gives out contact details is left out (people's real addresses and numbers have no place in a test set)
CONTACT = re.compile(r"[\w.+-]+@[\w-]+\.[\w.]+|\b\d{3}[-. )]\s?\d{3}[-. ]\d{4}\b")


def keyboard_spam(turn: str) -> bool:
    """A turn of mashed keys ("a", "asd", "f", ...) or one line sent over and over: some participants filled time that
    way, and a model learns nothing from it."""
    lines = turn.split("\n")
    short = sum(len(line) <= 3 for line in lines)
    repeated = max(lines.count(line) for line in set(lines))
    return (len(lines) >= 6 and short * 2 > len(lines)) or repeated >= 4


def chats(corpus: dict) -> list[list[dict[str, str]]]:
    """The corpus's two-person chats as message lists (system?, user, assistant, ...), ending on an assistant turn."""
    out = []
    for key in sorted(corpus):
        chat = corpus[key]
        groups = chat["messages"]
        if len({u["sender"] for group in groups for u in group}) != 2:
            continue
        turns = ["\n".join(u["text"].strip() for u in group if u["text"].strip()) for group in groups]
        if any(not turn or CONTACT.search(turn) or keyboard_spam(turn) for turn in turns):
            continue
        kept: list[str] = []
        used = 0
        for index, turn in enumerate(turns):
            used += len(turn)
            if used > MAX_CHARS:
                break
            if index % 2 == 1:  # an assistant turn: the chat may end here
                kept = turns[: index + 1]
        if not kept:
            continue
        messages = [{"role": "system", "content": SYSTEM.format(prompt=chat["prompt"].strip())}] \
            if (chat.get("prompt") or "").strip() else []
        messages += [{"role": "user" if i % 2 == 0 else "assistant", "content": turn} for i, turn in enumerate(kept)]
        out.append(messages)
    return out


def read_corpus(wheel: Path) -> dict:
    with zipfile.ZipFile(wheel) as archive:
        raw = archive.read(CORPUS)
    digest = hashlib.sha256(raw).hexdigest()
    if digest != CORPUS_SHA256:
        sys.exit(f"{CORPUS} in {wheel.name}: sha256 {digest} is not the recorded {CORPUS_SHA256}")
    return json.loads(raw)


def download_wheel(folder: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d",
                    str(folder), PACKAGE], check=True)
    wheel = folder / WHEEL
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        sys.exit(f"{wheel.name}: sha256 {digest} is not the recorded {WHEEL_SHA256}")
    return wheel


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        corpus = read_corpus(download_wheel(Path(tmp)))
    every = chats(corpus)
    # dedup on the chat's whole text; the "label" slot is unused (one value), so only repeats and near copies go
    texts = ["\n".join(m["content"] for m in chat if m["role"] != "system") for chat in every]
    kept_texts = {text for text, _ in deduplicated([(text, "chat") for text in texts])}
    seen: set[str] = set()
    kept = []
    for text, chat in zip(texts, every, strict=True):
        if text in kept_texts and text not in seen:
            seen.add(text)
            kept.append(chat)
    if len(kept) < ROWS:
        sys.exit(f"only {len(kept)} distinct chats, {ROWS} wanted")
    sample = random.Random(SEED).sample(kept, ROWS)
    OUT.write_text("".join(json.dumps({"messages": chat}, ensure_ascii=False) + "\n" for chat in sample),
                   encoding="utf-8", newline="")
    print(f"{len(corpus)} chats, {len(every)} two-person chats kept, {len(kept)} after deduplication, {len(sample)} "
          f"written to {OUT.name}; sha256 {hashlib.sha256(OUT.read_bytes()).hexdigest()}")


if __name__ == "__main__":
    main()
