"""The files the search stage writes: trials.csv, sensitivity.csv, searched_skip.yaml and trials.png."""

from __future__ import annotations

import csv
from pathlib import Path

from pipeline.engine.skip_search import SearchResult
from pipeline.schema import skip_yaml


def write_outputs(result: SearchResult, criterion: str, out: Path) -> None:
    """Trial table, sensitivity table, the winning skip-list as conf/skip YAML, and a history plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with (out / "trials.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(
            [
                "trial",
                "float_layers",
                criterion,
                "ci95_low",
                "ci95_high",
                "meets_bar",
                "latency_ms",
                "latency_spread_ms",
                "recovery",
                "skipped",
            ]
        )
        for trial in result.trials:
            low, high = trial.interval or (None, None)
            writer.writerow(
                [
                    trial.number,
                    len(trial.skipped),
                    f"{trial.score:.6g}",
                    "" if low is None else f"{low:.4f}",
                    "" if high is None else f"{high:.4f}",
                    trial.meets,
                    f"{trial.latency_ms:.4f}",
                    f"{trial.latency_spread_ms:.4f}",
                    "defaults" if trial.recovery_defaults else "run",
                    " ".join(trial.skipped),
                ]
            )
    with (out / "sensitivity.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["module_name", "quantized_type", "own_output_sqnr_db"])
        for layer in result.sensitivity:
            writer.writerow([layer.module_name, layer.quantized_type, f"{layer.sqnr_db:.3f}"])
    header = (
        f"Found by search=greedy: trial {result.winner.number} of {len(result.trials)}, {criterion} "
        f"{result.winner.score:.4g} (bar {result.bar:.4g}){'' if result.met else ' - did NOT meet the bar'}, "
        f"{result.samples} evaluation samples.\n"
        f"Copy to conf/skip/searched.yaml and run with skip=searched.\n"
    )
    (out / "searched_skip.yaml").write_text(skip_yaml(result.skip_spec(), header))

    figure, axis = plt.subplots(figsize=(7, 4))
    numbers = [trial.number for trial in result.trials]
    axis.plot(numbers, [trial.score for trial in result.trials], color="0.6", zorder=1)
    for trial in result.trials:
        axis.scatter(trial.number, trial.score, color="tab:green" if trial.meets else "tab:red", zorder=2)
        axis.annotate(
            f"{len(trial.skipped)} fp32",
            (trial.number, trial.score),
            textcoords="offset points",
            xytext=(0, 6),
            ha="center",
            fontsize=8,
        )
    axis.axhline(result.bar, linestyle="--", color="tab:blue", label=f"bar {result.bar:.4g}")
    axis.scatter(
        [result.winner.number],
        [result.winner.score],
        s=200,
        facecolors="none",
        edgecolors="black",
        label=f"winner (trial {result.winner.number})",
    )
    axis.set_xlabel("trial")
    axis.set_ylabel(criterion)
    axis.set_title("skip search: green meets the bar, red misses; labels = layers left float")
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(out / "trials.png", dpi=100)
    plt.close(figure)
