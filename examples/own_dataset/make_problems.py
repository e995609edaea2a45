"""Writes problems.jsonl: three string tasks over three-letter words, one category each (copy, reverse, sort).

Run once (``python make_problems.py``); the file is checked in so the example needs nothing but metaopt.
"""

import json
import random

LETTERS = "abcdef"
TASKS = {"copy": lambda w: w, "reverse": lambda w: w[::-1], "sort": lambda w: "".join(sorted(w))}


def main(rows_per_task: int = 200, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open("problems.jsonl", "w") as out:
        for _ in range(rows_per_task):
            for task, solve in TASKS.items():
                word = "".join(rng.choice(LETTERS) for _ in range(3))
                out.write(json.dumps({"prompt": f"{task} {word}", "answer": solve(word), "task": task}) + "\n")


if __name__ == "__main__":
    main()
