"""Tables and plots across runs: ours beside the paper, ablation tables, perception-distortion scatter."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from xpsr.errors import shown
from xpsr.metrics.evaluate import LOWER_BETTER, markdown_table, recorded_folder

PAPER_FILE = Path(__file__).with_name("paper_results.yaml")


class NoPlotData(ValueError):
    """No run has both metrics of the perception-distortion plot; the message says which runs lack which."""


def load_summary(path: str | Path) -> dict[str, float]:
    """Metric values of an `xpsr eval` output folder (or its summary.json)."""
    return _summary_and_speed(path)[0]


def _summary_file(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run `xpsr eval` first")
    return path


def _summary_and_speed(path: str | Path) -> tuple[dict[str, float], str]:
    """(metric values, with ``seconds_per_image`` when the SR folder has an infer report; why it has none)."""
    path = _summary_file(path)
    doc = json.loads(path.read_text())
    values = {k: v for k, v in doc.items() if isinstance(v, (int, float))}
    sr_folder, why = recorded_folder(path, doc.get("settings", {}), "sr")
    if sr_folder is not None:
        speed = seconds_per_image(sr_folder)
        if speed is not None:
            values[SPEED] = speed
        else:
            why = f"no infer_report*.json with {SPEED} in its SR folder {shown(sr_folder)}"
    return values, why


SPEED = "seconds_per_image"  # a column of its own, read from the `xpsr infer` report beside the SR images


def seconds_per_image(sr_folder: str | Path | None) -> float | None:
    """``seconds_per_image`` of the ``infer_report*.json`` that `xpsr infer` wrote into the SR folder an eval
    read (the mean over processes, each timing its own share); None when there is no report."""
    if not sr_folder or not Path(sr_folder).is_dir():
        return None
    values = [json.loads(r.read_text()).get(SPEED) for r in sorted(Path(sr_folder).glob("infer_report*.json"))]
    values = [v for v in values if isinstance(v, (int, float))]
    return sum(values) / len(values) if values else None


def paper_rows(dataset: str, paper_file: Path = PAPER_FILE) -> tuple[dict[str, dict], dict[str, str]]:
    """Published values for ``dataset`` (methods without transcribed values are listed with their source)."""
    data = yaml.safe_load(paper_file.read_text())
    if dataset not in data["datasets"]:
        raise KeyError(f"no published numbers for {dataset!r}; known: {sorted(data['datasets'])}")
    rows, sources = {}, {}
    for method, entry in data["datasets"][dataset].items():
        rows[f"{method} (paper)"] = entry.get("values") or {}
        sources[f"{method} (paper)"] = entry["source"] + ("" if entry.get("values") else " — not transcribed yet")
    return rows, sources


def compare_table(runs: dict[str, str | Path], metrics: list[str], dataset: str | None = None) -> str:
    """Markdown table of our runs (label -> eval folder), with the paper's rows when ``dataset`` is given.

    The s/img column appears when a run's SR folder has `xpsr infer`'s report; a run without one is named in
    a note under the table with the reason, so the column never goes missing without a word."""
    loaded = {label: _summary_and_speed(path) for label, path in runs.items()}
    results = {label: values for label, (values, _) in loaded.items()}
    missing = {label: why for label, (values, why) in loaded.items() if SPEED not in values}
    if len(missing) < len(loaded) and SPEED not in metrics:
        metrics = [*metrics, SPEED]
    notes = [f"- s/img of {label}: none ({why})" for label, why in missing.items()]
    if dataset:
        rows, sources = paper_rows(dataset)
        results = {**rows, **results}
        notes += [f"- {m}: {s}" for m, s in sources.items()]
    return markdown_table(results, metrics) + ("\n" + "\n".join(notes) + "\n" if notes else "")


def pd_scatter(runs: dict[str, str | Path], path: str | Path, distortion: str = "psnr",
               perception: str = "lpips") -> Path:
    """Perception-distortion scatter (one point per run) as a PNG; :class:`NoPlotData` (and no file) when no
    run has both metrics, naming the runs and what each lacks."""
    summaries = {label: load_summary(run) for label, run in runs.items()}
    lacking = {label: [m for m in (distortion, perception) if m not in s] for label, s in summaries.items()}
    if all(lacking.values()):
        detail = "; ".join(f"{label} has no {' or '.join(ms)}" for label, ms in lacking.items())
        raise NoPlotData(f"no run has both {distortion} and {perception} ({detail}); add them to `xpsr eval "
                         f"metrics=` or choose distortion=/perception= among the metrics the runs have")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    for label, s in summaries.items():
        if not lacking[label]:
            ax.scatter(s[distortion], s[perception])
            ax.annotate(label, (s[distortion], s[perception]), fontsize=8, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(f"{distortion.upper()} ({'lower' if distortion in LOWER_BETTER else 'higher'} is better)")
    ax.set_ylabel(f"{perception.upper()} ({'lower' if perception in LOWER_BETTER else 'higher'} is better)")
    ax.set_title("perception-distortion")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
