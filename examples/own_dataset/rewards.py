"""The researcher's own reward: partial credit per correct letter, so a near miss already teaches something.

metaopt calls ``score(completion, answer)`` in a worker process with a time limit (``reward_timeout_s``) on the
text the policy wrote (up to its end-of-sequence token) and the row's ``answer``; it must return a float.
"""


def score(completion: str, answer: str) -> float:
    """1.0 for the exact answer; else the fraction of positions with the right letter, halved."""
    guess = completion.strip().split("\n", 1)[0]
    if guess == answer:
        return 1.0
    right = sum(a == b for a, b in zip(guess, answer))
    return 0.5 * right / max(len(answer), len(guess), 1)
