r"""Collects a sweep's results.json files into the paper-style table and plots.

    python launch/collect.py --root=/runs/xsum_small [--metric=rouge2] [--out=/runs/xsum_small]

Reads every `<root>/**/results.json` written by `python -m gkd.main
--mode=train_and_eval` (or `eval`), groups the runs by task, student, method,
λ and student sampling temperature, and prints the table of mean ± std over
seeds (Markdown; `--format=csv` for CSV). With `--out` it also writes
results.md, results.csv and the PNG plots:
  metric_vs_lambda.png       the metric against λ, a line per divergence (one
                             panel per task and student; teacher and SFT as
                             horizontal lines);
  quality_vs_temperature.png the metric against the student's sampling
                             temperature (method.sampler.temperature), a line
                             per method.
"""

import argparse
import collections
import csv
import dataclasses
import glob
import io
import json
import math
import os
import statistics
import sys
from typing import Optional, Sequence

PREFERRED = ("rouge2", "bleu", "accuracy")  # the paper's headline metric per task
SFT, TEACHER = "sft", "teacher"


@dataclasses.dataclass(frozen=True)
class Key:
  task: str
  student: str
  method: str      # sft | supervised_kd | seqkd | gkd
  divergence: str  # e.g. jsd(0.9); "" for sft
  lmbda: float
  temperature: float


def _student(config: dict) -> str:
  s = config.get("student") or {}
  layers = s.get("num_layers") or s.get("num_decoder_layers")
  return f"{s.get('architecture', '?')}-d{s.get('embed_dim', '?')}-L{layers}"


def _divergence(d: dict) -> str:
  params = d.get("params") or {}
  inside = ",".join(f"{v:g}" for _, v in sorted(params.items()))
  return f"{d.get('name', '?')}({inside})" if inside else d.get("name", "?")


def key_of(results: dict) -> Key:
  """The table row a run belongs to (its seed is what varies inside a row)."""
  config = results["config"]
  m = config["method"]
  lmbda, temperature = float(m.get("lmbda", 0.0)), float(m["sampler"]["temperature"])
  divergence = _divergence(m["divergence"])
  if m["objective"] == "sft":
    method, divergence = SFT, ""
  elif m.get("seq_kd"):
    method = "seqkd"
  elif lmbda == 0.0 and m["divergence"]["name"] == "forward_kl":
    method = "supervised_kd"
  else:
    method = "gkd"
  return Key(config.get("task", "?"), _student(config), method, divergence, lmbda, temperature)


def load(root: str) -> list[dict]:
  """Every results.json below `root` that holds evaluation metrics."""
  out = []
  for path in sorted(glob.glob(os.path.join(root, "**", "results.json"), recursive=True)):
    with open(path) as f:
      results = json.load(f)
    if "eval" in results:
      out.append(results)
  return out


def _stats(values: list[float]) -> tuple[float, float]:
  return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


@dataclasses.dataclass
class Row:
  key: Key
  metrics: dict[str, tuple[float, float]]  # name -> (mean, std)
  seeds: list[int]


def table_rows(results: list[dict]) -> list[Row]:
  """Rows sorted by task, student, method, divergence, λ, temperature; teachers first."""
  groups: dict[Key, list[dict]] = collections.defaultdict(list)
  teachers: dict[tuple[str, str], dict] = {}
  for r in results:
    key = key_of(r)
    groups[key].append(r)
    if "teacher_eval" in r:
      teacher = r["config"].get("teacher") or TEACHER
      teachers[(key.task, teacher)] = r["teacher_eval"]
  rows = [Row(Key(task, TEACHER, TEACHER, "", math.nan, math.nan),
              {k: (float(v), 0.0) for k, v in metrics.items()}, [])
          for (task, _), metrics in sorted(teachers.items())]
  for key in sorted(groups, key=dataclasses.astuple):
    runs = groups[key]
    names = sorted(set.intersection(*(set(r["eval"]) for r in runs)))
    rows.append(Row(key, {n: _stats([float(r["eval"][n]) for r in runs]) for n in names},
                    sorted(int(r["config"].get("seed", 0)) for r in runs)))
  return rows


def _metric_names(rows: list[Row]) -> list[str]:
  names = sorted({n for r in rows for n in r.metrics})
  return sorted(names, key=lambda n: (PREFERRED.index(n) if n in PREFERRED else len(PREFERRED)))


def _num(x: float) -> str:
  return "" if math.isnan(x) else f"{x:g}"


def markdown(rows: list[Row]) -> str:
  names = _metric_names(rows)
  header = ["task", "student", "method", "divergence", "λ", "temperature", "seeds", *names]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in rows:
    k = r.key
    cells = [f"{m:.2f} ± {s:.2f}" if len(r.seeds) > 1 else f"{m:.2f}"
             for m, s in (r.metrics.get(n, (math.nan, 0.0)) for n in names)]
    lines.append("| " + " | ".join([k.task, k.student, k.method, k.divergence, _num(k.lmbda),
                                    _num(k.temperature), str(len(r.seeds) or ""), *cells]) + " |")
  return "\n".join(lines)


def to_csv(rows: list[Row]) -> str:
  names = _metric_names(rows)
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(["task", "student", "method", "divergence", "lmbda", "temperature", "seeds",
              *(f"{n}_{s}" for n in names for s in ("mean", "std"))])
  for r in rows:
    k = r.key
    values = [f"{v:.6g}" for n in names for v in r.metrics.get(n, (math.nan, math.nan))]
    w.writerow([k.task, k.student, k.method, k.divergence, _num(k.lmbda), _num(k.temperature),
                " ".join(map(str, r.seeds)), *values])
  return buf.getvalue()


def _panels(rows: list[Row]) -> list[tuple[str, str]]:
  return sorted({(r.key.task, r.key.student) for r in rows if r.key.method != TEACHER})


def _figure(n: int):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, n, figsize=(5 * n, 3.6), squeeze=False)
  return plt, fig, axes[0]


def _line(ax, points: list[tuple[float, Row]], metric: str, label: str) -> None:
  points = sorted((x, r) for x, r in points if metric in r.metrics)
  if points:
    ax.errorbar([x for x, _ in points], [r.metrics[metric][0] for _, r in points],
                yerr=[r.metrics[metric][1] for _, r in points], marker="o", capsize=3,
                label=label)


def _references(ax, rows: list[Row], task: str, student: str, metric: str) -> None:
  for r in rows:
    if r.key.task == task and metric in r.metrics and (
        r.key.method == TEACHER or (r.key.method == SFT and r.key.student == student)):
      ax.axhline(r.metrics[metric][0], linestyle="--" if r.key.method == TEACHER else ":",
                 color="k" if r.key.method == TEACHER else "gray", label=r.key.method)


def plot_lambda(rows: list[Row], metric: str, path: str) -> None:
  """The metric against λ, a line per divergence (supervised KD is forward KL at λ = 0),
  at each panel's most common sampling temperature."""
  panels = _panels(rows)
  plt, fig, axes = _figure(len(panels))
  for ax, (task, student) in zip(axes, panels):
    mine = [r for r in rows if (r.key.task, r.key.student) == (task, student)
            and r.key.method in ("gkd", "supervised_kd")]
    temperature = statistics.mode([r.key.temperature for r in mine]) if mine else math.nan
    lines = collections.defaultdict(list)
    for r in mine:
      if r.key.temperature == temperature:
        lines[r.key.divergence].append((r.key.lmbda, r))
    for divergence, points in sorted(lines.items()):
      _line(ax, points, metric, divergence)
    _references(ax, rows, task, student, metric)
    ax.set(xlabel="λ (fraction of on-policy student data)", ylabel=metric,
           title=f"{task} · {student} · sampling T={temperature:g}")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_temperature(rows: list[Row], metric: str, path: str) -> None:
  """The metric against the student's sampling temperature, a line per method."""
  panels = _panels(rows)
  plt, fig, axes = _figure(len(panels))
  for ax, (task, student) in zip(axes, panels):
    lines = collections.defaultdict(list)
    for r in rows:
      k = r.key
      if (k.task, k.student) == (task, student) and k.method not in (TEACHER, SFT):
        lines[(k.method, k.divergence, k.lmbda)].append((k.temperature, r))
    for (method, divergence, lmbda), points in sorted(lines.items()):
      _line(ax, points, metric, f"{method} {divergence} λ={lmbda:g}")
    _references(ax, rows, task, student, metric)
    ax.set(xlabel="student sampling temperature", ylabel=metric, title=f"{task} · {student}")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def choose_metric(rows: list[Row], metric: Optional[str]) -> str:
  names = _metric_names([r for r in rows if r.key.method != TEACHER] or rows)
  if metric is None:
    if not names:
      raise ValueError("the results hold no evaluation metrics")
    return names[0]
  if metric not in names:
    raise ValueError(f"no run has metric {metric!r}; the results have {', '.join(names)}")
  return metric


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
  p.add_argument("--root", required=True, help="the sweep's directory (searched recursively)")
  p.add_argument("--metric", default=None, help=f"metric to plot (default: first of {PREFERRED})")
  p.add_argument("--format", default="markdown", choices=["markdown", "csv"])
  p.add_argument("--out", default=None, help="write results.md, results.csv and the PNGs here")
  args = p.parse_args(argv)
  results = load(args.root)
  if not results:
    print(f"collect: error: no results.json with eval metrics under {args.root}", file=sys.stderr)
    return 2
  rows = table_rows(results)
  try:
    metric = choose_metric(rows, args.metric)
  except ValueError as e:
    print(f"collect: error: {e}", file=sys.stderr)
    return 2
  print(markdown(rows) if args.format == "markdown" else to_csv(rows).rstrip("\n"))
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.md"), "w") as f:
      f.write(markdown(rows) + "\n")
    with open(os.path.join(args.out, "results.csv"), "w") as f:
      f.write(to_csv(rows))
    plot_lambda(rows, metric, os.path.join(args.out, "metric_vs_lambda.png"))
    plot_temperature(rows, metric, os.path.join(args.out, "quality_vs_temperature.png"))
  return 0


if __name__ == "__main__":
  sys.exit(main())
