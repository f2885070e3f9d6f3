"""
The learning-rate search every arm of a study gets alike, judged on validation problems only (never the test
problems): the start rate times 1/3, 1 and 3, then, while the best is the highest (or lowest) tried, a factor of 3
further that way, a few times at most. quickstart.py --tune and study/gsm8k.py --tune use it.
"""


def search_learning_rate(start, score, factors=(1 / 3, 1, 3), max_extensions=3):
    """score(lr) -> a comparable value (higher is better; e.g. (avg@k, greedy) on the validation problems), for the
    rates start x factors, then one factor of 3 beyond the best while it sits at an edge of those tried, at most
    max_extensions times. Returns {lr: score} in the order tried; the best is max(tried, key=tried.get)."""
    tried = {}
    for _ in range(len(factors) + max_extensions):
        untried = [lr for lr in sorted({start * f for f in factors}) if lr not in tried]
        if not untried:
            best = max(tried, key=tried.get)
            if best not in (min(tried), max(tried)):
                break
            untried = [best * 3 if best == max(tried) else best / 3]
        tried[untried[0]] = score(untried[0])
    return tried
