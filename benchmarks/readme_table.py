"""The README's short speed table, generated from ``benchmarks/results/e2e-*.json`` (never typed by hand).

``python benchmarks/readme_table.py [FILE ...] [--update README.md]``: without files, every e2e result file
with the newest one's setup (device, dtype, steps, CFG), merged (a run split over several commands gives one
table; newer rows win); prints the markdown table, or with ``--update`` replaces the text between ``<!-- speed-table:start -->``
and ``<!-- speed-table:end -->`` in that file. With no results it says so and prints no table.

One row per (model, size, batch) for one sampler (``--sampler``, default the registry's default, DPM++ 2M; the
caption gives its AUTOMATIC1111 name with its default schedule): it/s of each implementation, then our
whole-image and first-image latency and peak memory (tritonsd-graph).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tritonsd.sampler import registry

RESULTS_DIR = Path(__file__).resolve().parent / "results"
IMPL_ORDER = ("tritonsd-graph", "tritonsd-eager", "diffusers-eager", "diffusers-compile")
START, END = "<!-- speed-table:start -->", "<!-- speed-table:end -->"


class ResultsError(ValueError):
    """A results file that is not an e2e results JSON, or a README without the table markers."""


def result_files(directory: Path | None = None) -> list[Path]:
    """The e2e results files in ``directory`` (default ``benchmarks/results``)."""
    directory = RESULTS_DIR if directory is None else directory
    return sorted(directory.glob("e2e-*.json")) if directory.is_dir() else []


def load_results(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ResultsError(f"{path}: cannot read results ({e})") from None
    if data.get("bench") != "e2e" or not isinstance(data.get("rows"), list):
        raise ResultsError(f"{path}: not an end-to-end results file (no bench 'e2e' / rows)")
    return data


def _setup(data: dict) -> tuple:
    """What must agree for rows of several files to share one table."""
    st = data.get("settings", {})
    return data.get("device"), st.get("dtype"), st.get("steps"), st.get("cfg")


def merge(datas: list[dict]) -> dict:
    """One results dict from several runs of the same setup (a run split over several commands): rows of
    later files (by date) replace those of earlier ones for the same model, size, batch, sampler and impl;
    files of another device / dtype / steps / CFG than the newest are left out."""
    datas = sorted(datas, key=lambda d: str(d.get("date", "")))
    if not datas:
        raise ResultsError("no results to merge")
    last = datas[-1]
    rows: dict[tuple, dict] = {}
    for d in datas:
        if _setup(d) != _setup(last):
            continue
        for r in d["rows"]:
            key = (r.get("model"), r.get("size"), r.get("batch"), r.get("sampler"), r.get("impl"))
            if "error" not in r or key not in rows:
                rows[key] = r
    commits = list(dict.fromkeys(str(d.get("git_commit"))[:10] for d in datas if _setup(d) == _setup(last)))
    return {**last, "rows": list(rows.values()), "git_commit": ", ".join(commits)}


def newest_setup(paths: list[Path]) -> list[dict]:
    """The readable results among ``paths`` that share the newest file's setup."""
    datas = []
    for p in paths:
        try:
            datas.append(load_results(p))
        except ResultsError:
            continue
    if not datas:
        return []
    latest = max(datas, key=lambda d: str(d.get("date", "")))
    return [d for d in datas if _setup(d) == _setup(latest)]


def sampler_caption(sampler: str) -> str:
    """A results row's sampler as the caption names it: AUTOMATIC1111's combined name of its default schedule
    ("DPM++ 2M Karras", "Euler"); a name the registry does not know, as it is."""
    spec = registry.SAMPLERS.get(sampler)
    return sampler if spec is None else registry.a1111_name(sampler, spec.karras, combined=True)


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def speed_table(data: dict, sampler: str = registry.DEFAULT_SAMPLER, source: str | None = None) -> str:
    """Markdown: a caption line with the device, versions and settings, then the table. Empty when the file
    has no successful row for ``sampler``."""
    rows = [r for r in data["rows"] if r.get("sampler") == sampler and "error" not in r]
    if not rows:
        return ""
    impls = [i for i in IMPL_ORDER if any(r["impl"] == i for r in rows)]
    impls += sorted({r["impl"] for r in rows} - set(impls))
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["size"], r["batch"]), {})[r["impl"]] = r
    s = data.get("settings", {})
    caption = (f"{data.get('device')}, {s.get('dtype')}, {s.get('steps')} steps {sampler_caption(sampler)},"
               f" CFG {s.get('cfg')}; torch {data.get('torch')}, triton {data.get('triton')}"
               + (f", diffusers {data['diffusers']}" if data.get("diffusers") else "")
               + f"; commit {data.get('git_commit')}, {str(data.get('date'))[:10]}"
               + (f" (`{source}`)" if source else ""))
    head = ["model", "size", "batch"] + [f"{i} it/s" for i in impls]
    ours = "tritonsd-graph" if "tritonsd-graph" in impls else impls[0]
    head += [f"{ours} image s", "first image s", "peak GB"]
    lines = [caption, "", "| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for (model, size, batch), by_impl in sorted(groups.items()):
        cells = [model, f"{size}×{size}", str(batch)]
        cells += [_fmt(by_impl[i]["it_per_s"], ".2f") if i in by_impl else "–" for i in impls]
        r = by_impl.get(ours, {})
        cells += [_fmt(r.get("image_ms") and r["image_ms"] / 1e3, ".2f"),
                  _fmt(r.get("first_image_ms") and r["first_image_ms"] / 1e3, ".1f"),
                  _fmt(r.get("peak_mem_gb"), ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def update_readme(readme: Path, table: str) -> None:
    """Replace the text between the markers (which must be there) with ``table``."""
    text = readme.read_text()
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ResultsError(f"{readme}: no {START} ... {END} markers to put the table between")
    readme.write_text(text[: start + len(START)] + "\n" + table + text[end:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/readme_table.py", description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="*", type=Path,
                   help="e2e results JSON, merged (default: those of the newest setup in benchmarks/results)")
    p.add_argument("--sampler", default=registry.DEFAULT_SAMPLER, choices=sorted(registry.graph_samplers()),
                   help="the benchmarked (CUDA-graphed) sampler whose rows make the table")
    p.add_argument("--update", type=Path, default=None, metavar="README", help="rewrite the table in this file")
    args = p.parse_args(argv)
    try:
        datas = [load_results(f) for f in args.files] if args.files else newest_setup(result_files())
        table = speed_table(merge(datas), args.sampler) if datas else ""
        if not table:
            print("no end-to-end results (run `tritonsd bench e2e` on a GPU; results go to benchmarks/results/)",
                  file=sys.stderr)
            return 0
        if args.update:
            update_readme(args.update, table)
            print(f"updated {args.update}")
        else:
            print(table, end="")
    except ResultsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
