"""Writes problems.jsonl: three string tasks over three-letter words, one category each (copy, reverse, sort).

Each task's words are distinct (200 of the 216), so no held-out prompt repeats a training one.

Run once (``python make_problems.py``); the file is checked in so the example needs nothing but metaopt.
"""

import itertools
import json
import random

LETTERS = "abcdef"
TASKS = {"copy": lambda w: w, "reverse": lambda w: w[::-1], "sort": lambda w: "".join(sorted(w))}


def main(rows_per_task: int = 200, seed: int = 0) -> None:
    rng = random.Random(seed)
    words = ["".join(letters) for letters in itertools.product(LETTERS, repeat=3)]
    drawn = {task: rng.sample(words, rows_per_task) for task in TASKS}
    with open("problems.jsonl", "w") as out:
        for i in range(rows_per_task):
            for task, solve in TASKS.items():
                word = drawn[task][i]
                out.write(json.dumps({"prompt": f"{task} {word}", "answer": solve(word), "task": task}) + "\n")


if __name__ == "__main__":
    main()
