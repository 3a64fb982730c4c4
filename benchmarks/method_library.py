"""The method library on SmolLM2-135M in one table: every weight-only method, number format,
rotation, weight-and-activation scheme and KV cache, each next to its RTN row.

It reads what the per-topic benchmarks saved under benchmarks/results/ (it quantizes nothing):
weight_only_methods.json, formats.json, rotations.json, activations.json, activations_w4a4.json,
activations_w4a4kv4.json and kv_cache.json. Each row keeps its own protocol (calibration windows,
evaluation tokens, machine), shown beside it, because the topics were run at different sizes;
within a section every row shares one protocol. "vs RTN" is the row's perplexity increase over
the original as a fraction of RTN's increase at the same setting (below 1: the method helps; above
1: it does not help on this model). KV caches have no RTN row: their KL is to the full-precision cache.

    python benchmarks/method_library.py      # writes benchmarks/results/method_library.{json,md}
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


@dataclass(frozen=True)
class Section:
    title: str
    sources: tuple[str, ...]
    setting: Callable[[dict], str]
    """The setting a row is compared within (its RTN row has the same setting)."""
    method: Callable[[dict], str]
    baseline: str
    """The method whose row at the same setting is the comparison ("": none)."""


def _bits_group(row: dict) -> str:
    group = "per-channel" if row["group_size"] == -1 else f"g{row['group_size']}"
    return f"w{row['bits']} asym {group}"


def _activation_setting(row: dict) -> str:
    return row["label"].rsplit("-", 1)[0].replace("-quarot", "").replace("-smoothquant", "")


def _activation_method(row: dict) -> str:
    prefix = _activation_setting(row)
    return row["label"].removeprefix(prefix + "-") if row["label"] != prefix else row["label"]


SECTIONS = (
    Section("Weight-only methods", ("weight_only_methods",), _bits_group, lambda r: r["method"], "rtn"),
    Section("Number formats", ("formats",), lambda r: r["format"], lambda r: r["method"], "rtn"),
    Section("Rotations (weight-only)", ("rotations",), _bits_group, lambda r: r["method"], "rtn"),
    Section("Weights and activations", ("activations", "activations_w4a4", "activations_w4a4kv4"),
            _activation_setting, _activation_method, "rtn"),
    Section("KV cache (weights in full precision)", ("kv_cache",), lambda r: "", lambda r: r["row"], ""),
)


def rows_of(section: Section) -> Iterator[dict]:
    """The section's rows with their protocol, and 'vs RTN' where the section has a baseline row."""
    rows, originals = [], {}  # originals and baselines per evaluation protocol: only like is compared with like
    for source in section.sources:
        path = RESULTS / f"{source}.json"
        if not path.exists():
            continue
        saved = json.loads(path.read_text())
        for row in saved["rows"]:
            if "original" in (row.get("method"), row.get("label")):
                originals[saved["meta"]["evaluation"]] = row["perplexity"]
            else:
                rows.append((source, saved["meta"], row))
    baselines = {(meta["evaluation"], section.setting(r)): r["perplexity"]
                 for _, meta, r in rows if section.method(r) == section.baseline}
    for source, meta, row in rows:
        setting, method = section.setting(row), section.method(row)
        base = baselines.get((meta["evaluation"], setting))
        start = originals.get(meta["evaluation"])
        versus = None
        if base is not None and start is not None and method != section.baseline and base != start:
            versus = (row["perplexity"] - start) / (base - start)
        yield {
            "section": section.title, "setting": setting, "method": method,
            "bits_per_weight": row.get("bits_per_weight"), "activations": row.get("activations", ""),
            "kv_bytes_per_token": row.get("bytes_per_token"), "perplexity": row["perplexity"],
            "kl": row["kl"], "versus_rtn": versus, "calibration": meta.get("calibration", "none"),
            "evaluation": meta["evaluation"], "machine": row.get("machine", meta.get("machine", "not recorded")),
            "source": f"benchmarks/results/{source}.json",
        }


def markdown(rows: list[dict]) -> str:
    lines = ["Model: SmolLM2-135M-Instruct (embedded GGUF), wikitext-2. Built by `python benchmarks/method_library.py` "
             "from the per-topic results; each section's protocol is listed under it. vs RTN = (perplexity - "
             "original) / (RTN's perplexity - original) at the same setting: below 1 the method helps, above 1 it "
             "does not help on this model. KV caches have no RTN row: their KL is to the full-precision cache.", ""]
    for title in dict.fromkeys(row["section"] for row in rows):
        part = [row for row in rows if row["section"] == title]
        lines += [f"### {title}", ""]
        for source in dict.fromkeys(r["source"] for r in part):
            first = next(r for r in part if r["source"] == source)
            machines = "; ".join(dict.fromkeys(r["machine"] for r in part if r["source"] == source))
            lines.append(f"- {source}: calibration {first['calibration']}; evaluation {first['evaluation']}; "
                         f"machine: {machines}")
        lines += ["", "| setting | method | bits/weight | activations | KV bytes/token | perplexity | KL | vs RTN |",
                  "|---|---|---:|---|---:|---:|---:|---:|"]
        for r in part:
            bpw = "" if r["bits_per_weight"] is None else f"{r['bits_per_weight']:.3f}"
            kv = "" if r["kv_bytes_per_token"] is None else f"{r['kv_bytes_per_token']:.0f}"
            versus = "" if r["versus_rtn"] is None else f"{r['versus_rtn']:.2f}"
            lines.append(f"| {r['setting']} | {r['method']} | {bpw} | {r['activations']} | {kv} | "
                         f"{r['perplexity']:.3f} | {r['kl']:.4f} | {versus} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "method_library")
    args = parser.parse_args()
    rows = [row for section in SECTIONS for row in rows_of(section)]
    if not rows:
        raise SystemExit(f"no per-topic results under {RESULTS}; run the benchmarks named in this script's docstring")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    args.out.with_suffix(".md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
