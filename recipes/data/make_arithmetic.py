"""Build recipes/data/arithmetic.jsonl: small sums and differences whose answers code can check (the GRPO recipes).

    python recipes/data/make_arithmetic.py        (stdlib only; byte-for-byte reproducible, seed 20240)

400 rows `{"prompt": "What is 7 plus 5? Answer:", "answer": "12"}`: a and b drawn from 0-20, `plus` or `minus` (minus
only when the result is not negative), no prompt twice. Synthetic, released under CC0 1.0.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent / "arithmetic.jsonl"


def main() -> None:
    rng = random.Random(20240)
    rows: dict[str, str] = {}
    while len(rows) < 400:
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        op = rng.choice(["plus", "minus"]) if a >= b else "plus"
        rows.setdefault(f"What is {a} {op} {b}? Answer:", str(a + b if op == "plus" else a - b))
    OUT.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in rows.items()))


if __name__ == "__main__":
    main()
