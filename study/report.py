"""
A study's report: the table shaped like the paper's Table 1 (a row per arm, mean ± std over seeds) and its picture
(the training curves of the RL arms and bars of the held-out scores, study/plot.py's figure).
"""
import random
import statistics

from machinery.files import read_jsonl
from study.plot import figure


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def percent(values):
    """"12.5 ± 3.0" (mean ± std over seeds, in %), or "12.5" for one seed."""
    mean, std = mean_std(values)
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if len(values) > 1 else "")


def rl_curves(metrics_file):
    """An RL stage's curves from its metrics.jsonl: the mean reward and the kept-group rate (the share of drawn groups
    whose rewards differed) at each step, and that rate's mean."""
    log = read_jsonl(metrics_file)
    return dict(reward_curve=[m["reward_mean"] for m in log], kept_group_curve=[m["kept_group_rate"] for m in log],
                kept_group_rate=statistics.mean(m["kept_group_rate"] for m in log))


def paired_interval(a, b, draws=2000, seed=0):
    """mean(a) - mean(b) and its 95% interval, for scores of two models on the same problems (a[i], b[i]: problem
    i): a bootstrap over the problems. Tells a difference between arms from the luck of which problems were drawn."""
    diffs, rng = [x - y for x, y in zip(a, b, strict=True)], random.Random(seed)
    means = sorted(sum(rng.choices(diffs, k=len(diffs))) / len(diffs) for _ in range(draws))
    return sum(diffs) / len(diffs), means[int(0.025 * draws)], means[int(0.975 * draws) - 1]


def table(results, columns):
    """A markdown table, a row per arm of results ({arm: {key: [value per seed]}}): columns [(header, key, kind)],
    kind "percent" (mean ± std over seeds, in %) or "rate" (the mean, two decimals); a key an arm lacks is left
    blank. With several seeds a last column gives the first column's value for each seed."""
    seeds = max((len(values) for r in results.values() for values in r.values()), default=1)
    headers = [header for header, _, _ in columns] + ([f"per seed ({columns[0][0]})"] if seeds > 1 else [])
    lines = ["| arm | " + " | ".join(headers) + " |", "|" + " --- |" * (len(headers) + 1)]
    for arm, r in results.items():
        cells = []
        for _, key, kind in columns:
            values = r.get(key)
            cells.append("" if not values else percent(values) if kind == "percent" else f"{mean_std(values)[0]:.2f}")
        if seeds > 1:
            cells.append(", ".join(f"{100 * v:.1f}" for v in r[columns[0][1]]))
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def draw(results, png, title, curves, bars):
    """The study's picture: curves [(panel title, y range, key, arms)] from each arm's per-step values
    ({arm: {key: [one list per seed]}}), bars [(panel title, y range, key)] of the held-out scores (%, a dot per
    seed). One colour per arm in every panel. Returns the path drawn, or None (no matplotlib: text sparklines)."""
    curve_panels = [(name, limits, {arm: [list(enumerate(run, 1)) for run in results[arm][key]]
                                    for arm in arms if key in results.get(arm, {})}, True)
                    for name, limits, key, arms in curves]
    bar_panels = [(name, limits, {arm: [100 * v for v in r[key]] for arm, r in results.items() if key in r})
                  for name, limits, key in bars]
    seeds = max((len(values) for r in results.values() for values in r.values()), default=1)
    title += "" if seeds > 1 else " (bold: a moving average over a tenth of the steps; faint: each step)"
    return figure([panel for panel in curve_panels if panel[2]], png, title, bar_panels)
