"""
A picture of a run, or of several side by side: what each run folder's metrics.jsonl holds, step by step. For
srl.py and rlvr.py runs the mean reward, the kept-group rate, the validation score, the response length, the entropy
and the skipped steps; for sft.py runs the loss, the learning rate and the gradient norm.

    python -m study.plot runs/srl                  # -> runs/srl/metrics.png
    python -m study.plot runs/srl runs/rlvr --out compare.png

matplotlib draws it when it is installed (pip install matplotlib); without it each curve is printed as a line of
text. The quickstart study draws its picture with the same function, figure(). Each curve is drawn as its moving
average (over a tenth of the steps, at least 1) over the raw values, faint; for several seeds of one arm, the seeds'
mean, bold, over each seed's moving average, faint. A colour stands for one run (or arm) in every panel; rates are
drawn on [0, 1], rewards on their whole range.
"""
import argparse
import statistics
import sys
from pathlib import Path

from machinery.files import read_jsonl

# (metric, title, y range or None, smoothed): what a run's panels show
RL_PANELS = [("reward_mean", "mean reward", None, True), ("kept_group_rate", "kept-group rate", (-0.03, 1.03), True),
             ("val_score", "validation score", (-0.03, 1.03), False),
             ("response_length", "response length (tokens)", None, True),
             ("entropy", "entropy (nats a token)", None, True),
             ("skipped_steps", "skipped steps (in all)", None, False)]
SFT_PANELS = [("loss", "loss", None, True), ("lr", "learning rate", None, False),
              ("grad_norm", "gradient norm", None, True)]


def smooth(values, window):
    """The centred moving average over `window` values (fewer at the ends)."""
    half = window // 2
    return [statistics.mean(values[max(0, i - half):i + half + 1]) for i in range(len(values))]


def sparkline(values):
    """One character per value, from ▁ (the lowest) to █ (the highest)."""
    bars = "▁▂▃▄▅▆▇█"
    low, high = min(values), max(values)
    return "".join(bars[int((v - low) / (high - low) * (len(bars) - 1)) if high > low else 0] for v in values)


def figure(curves, png, title, bars=()):
    """Draw panels of curves and of bars into png. curves: [(title, y range or None, {label: [series, ...]},
    smoothed)], each series a list of (step, value), one per seed (drawn as their mean); bars: [(title, y range or
    None, {label: [value per seed]})], drawn as the mean with a dot per seed. One colour per label in every panel.
    Without matplotlib, the curves' means go to the terminal as sparklines. Returns the path drawn, or None."""
    labels = list(dict.fromkeys(label for panel in [*curves, *bars] for label in panel[2]))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        for name, _, series, _ in curves:
            for label, runs in series.items():
                values = [statistics.mean(v) for v in zip(*[[value for _, value in run] for run in runs])]
                if values:
                    print(f"  {name}, {label}: {sparkline(values)} {values[0]:.3g} -> {values[-1]:.3g}")
        for name, _, series in bars:
            print(f"  {name}: " + ", ".join(f"{label} {statistics.mean(v):.1f}" for label, v in series.items()))
        print("  (pip install matplotlib for a picture)")
        return None
    colors = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    panels = len(curves) + len(bars)
    columns = min(3, panels)
    rows = -(-panels // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.3 * rows), squeeze=False)
    for ax, (name, limits, series, smoothed) in zip(axes.flat, curves):
        for label, runs in series.items():
            runs = [run for run in runs if run]
            if not runs:
                continue
            window = max(1, len(runs[0]) // 10) if smoothed else 1
            for run in runs:  # faint: one run's raw values, or each seed's moving average under their mean
                steps, values = zip(*run)
                if window > 1 or len(runs) > 1:
                    ax.plot(steps, values if len(runs) == 1 else smooth(list(values), window), color=colors[label],
                            alpha=0.15 if len(runs) == 1 else 0.3, linewidth=0.8)
            length = min(len(run) for run in runs)
            mean = [statistics.mean(run[i][1] for run in runs) for i in range(length)]
            ax.plot([step for step, _ in runs[0][:length]], smooth(mean, window), color=colors[label], label=label,
                    linewidth=1.5 if len(runs) == 1 else 2.2, marker="." if length < 3 else None)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        if limits:
            ax.set_ylim(*limits)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=7)
    for ax, (name, limits, series) in zip(list(axes.flat)[len(curves):], bars):
        for x, (label, values) in enumerate(series.items()):
            ax.bar(x, statistics.mean(values), color=colors[label], alpha=0.7)
            ax.plot([x] * len(values), values, "k.", markersize=5)
        ax.set_xticks(range(len(series)), list(series), rotation=30, fontsize=8)
        ax.set_title(name, fontsize=10)
        if limits:
            ax.set_ylim(*limits)
        ax.grid(alpha=0.3, axis="y")
    for ax in list(axes.flat)[panels:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def read_metrics(folder):
    """The records of a run folder's metrics.jsonl; a line cut short (a stopped run) is left out."""
    return read_jsonl(Path(folder) / "metrics.jsonl", torn_lines=[])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("runs", nargs="+", help="run folders (each holding metrics.jsonl)")
    p.add_argument("--out", help="the picture (default: <first run>/metrics.png)")
    args = p.parse_args(argv)
    for run in args.runs:
        if not (Path(run) / "metrics.jsonl").is_file():
            p.exit(2, f"{p.prog}: error: {run}: no metrics.jsonl in it (a folder that sft.py, srl.py or rlvr.py "
                      "wrote)\n")
    logs = {run: read_metrics(run) for run in args.runs}
    rl = any("reward_mean" in record for log in logs.values() for record in log)
    curves = []
    for metric, name, limits, smoothed in RL_PANELS if rl else SFT_PANELS:
        series = {Path(run).name if len(set(Path(r).name for r in logs)) == len(logs) else run:
                  [[(r["step"], r[metric]) for r in log if metric in r]] for run, log in logs.items()}
        if any(run for runs in series.values() for run in runs):
            curves.append((name, limits, series, smoothed))
    png = args.out or str(Path(args.runs[0]) / "metrics.png")
    drawn = figure(curves, png, ", ".join(args.runs))
    print(f"picture: {drawn}" if drawn else "", end="\n" if drawn else "")


if __name__ == "__main__":
    sys.exit(main())
