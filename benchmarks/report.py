"""Summaries of the measured rounds: medians, paired ratios to the floors, the printed table."""

from __future__ import annotations

import re
import statistics
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.scenarios import Scenario

Rows = dict[str, dict[str, list[dict[str, Any]]]]  # scenario key -> config -> rounds

_KEYS = (
    "per_s",
    "server_cpu_us_per_op",
    "server_cores",
    "client_cpu_us_per_op",
    "background_cores",
    "latency_p50_ms",
    "latency_p99_ms",
    "log_bytes_per_call",
    "startup_ms",
    "listening_ms",
    "serving_rss_mib",
)


TARGETS_FILE = Path(__file__).with_name("targets.toml")


@dataclass(frozen=True)
class Headline:
    """One target of targets.toml: a paired comparison of two cells of the table."""

    name: str
    a: tuple[str, str]  # (scenario, config)
    b: tuple[str, str]
    key: str
    difference: bool  # a - b instead of a / b
    target: str

    def met(self, value: float) -> bool | None:
        """Whether value meets the target; None when there is none ("-")."""
        return target_met(self.target, value)


_TARGET = re.compile(r"^(?P<op>>=|<=)\s*(?P<bound>[0-9.]+)\s*(?P<unit>x|us)$")


def target_met(target: str, value: float) -> bool | None:
    """Evaluate a target of targets.toml (">= 0.95x", "<= 30 us"); None for "-"."""
    if target == "-":
        return None
    match = _TARGET.match(target.strip())
    if match is None:
        raise ValueError(f"target {target!r} is not '>= N x', '<= N x', '<= N us' or '-'")
    bound = float(match["bound"])
    return value >= bound if match["op"] == ">=" else value <= bound


def load_targets(path: Path = TARGETS_FILE) -> tuple[Headline, ...]:
    """Read the targets the report compares against from a targets.toml."""
    entries = tomllib.loads(path.read_text())["target"]
    headlines = []
    for entry in entries:
        if entry["compare"] not in ("ratio", "difference") or entry["metric"] not in _KEYS:
            raise ValueError(f"{path}: {entry['name']}: unknown compare or metric")
        target_met(entry["target"], 0.0)  # a malformed target fails here, not after a run
        unit = "us" if entry["compare"] == "difference" else "x"
        if entry["target"] != "-" and not entry["target"].endswith(unit):
            raise ValueError(f"{path}: {entry['name']}: a {entry['compare']} target is in {unit}")
        headlines.append(
            Headline(
                name=entry["name"],
                a=(entry["measure"][0], entry["measure"][1]),
                b=(entry["against"][0], entry["against"][1]),
                key=entry["metric"],
                difference=entry["compare"] == "difference",
                target=entry["target"],
            )
        )
    return tuple(headlines)


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [row[key] for row in rows if row.get(key) is not None]
    return statistics.median(values) if values else None


def _paired(
    a: list[dict[str, Any]],
    b: list[dict[str, Any]],
    key: str,
    combine: Callable[[float, float], float],
) -> float | None:
    # Pair by round: both sides were measured within seconds of each other, under the
    # same background load, so the pair cancels most of the machine's noise.
    by_round = {row["round"]: row for row in b}
    values = [
        combine(row[key], by_round[row["round"]][key])
        for row in a
        if row["round"] in by_round and row.get(key) and by_round[row["round"]].get(key)
    ]
    return statistics.median(values) if values else None


def _ratio(x: float, y: float) -> float:
    return x / y


def _minus(x: float, y: float) -> float:
    return x - y


def _cell(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    entry: dict[str, Any] = {"rounds": rounds, "errors": sum(r.get("errors", 0) for r in rounds)}
    if rounds:
        entry["median"] = {key: _median(rounds, key) for key in _KEYS}
        entry["range"] = {
            key: [min(r[key] for r in rounds), max(r[key] for r in rounds)]
            for key in ("per_s", "startup_ms")
            if all(r.get(key) is not None for r in rounds)
        }
    return entry


def _vs_floor(mine: list[dict[str, Any]], floor: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "throughput": _paired(mine, floor, "per_s", _ratio),
        "p50": _paired(mine, floor, "latency_p50_ms", _ratio),
        "p99": _paired(mine, floor, "latency_p99_ms", _ratio),
        "server_cpu": _paired(mine, floor, "server_cpu_us_per_op", _ratio),
        "server_cpu_added_us": _paired(mine, floor, "server_cpu_us_per_op", _minus),
        "startup": _paired(mine, floor, "startup_ms", _ratio),
    }


def summarize(
    scenarios: list[Scenario],
    rows: Rows,
    memory: dict[str, dict[str, float | None]],
    failed: dict[str, str],
) -> dict[str, Any]:
    """Medians per cell, paired ratios to the floor, memory, and the targets of targets.toml."""
    summary: dict[str, Any] = {"scenarios": {}, "memory": memory, "failed": failed}
    for scenario in scenarios:
        cells = rows.get(scenario.key, {})
        floor = cells.get(scenario.floor, [])
        entry: dict[str, Any] = {
            "label": scenario.label,
            "unit": scenario.unit,
            "floor": scenario.floor,
            "configs": {},
        }
        for config in scenario.configs:
            cell = _cell(cells.get(config, []))
            if config != scenario.floor:
                cell["vs_floor"] = _vs_floor(cells.get(config, []), floor)
            entry["configs"][config] = cell
        summary["scenarios"][scenario.key] = entry
    # Memory against the in-memory floor: what the service holds beyond grpc.aio itself.
    floor_memory = memory.get("bare", {})
    for values in memory.values():
        for key in ("idle_rss_mib", "peak_rss_mib"):
            base, value = floor_memory.get(key), values.get(key)
            ratio = value / base if base and value is not None else None
            values[key.replace("_mib", "_vs_floor")] = ratio
    headlines = []
    for headline in load_targets():
        a = rows.get(headline.a[0], {}).get(headline.a[1], [])
        b = rows.get(headline.b[0], {}).get(headline.b[1], [])
        if headline.a[0] not in rows or headline.b[0] not in rows:
            continue  # a scenario it compares was not selected (--only)
        value = _paired(a, b, headline.key, _minus if headline.difference else _ratio)
        headlines.append(
            {
                "name": headline.name,
                "value": value,
                "unit": "us" if headline.difference else "x",
                "target": headline.target,
                "against": f"{headline.b[0]} {headline.b[1]}",
                "met": None if value is None else headline.met(value),
            }
        )
    summary["headlines"] = headlines
    return summary


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def progress(scenario: Scenario, row: dict[str, Any]) -> str:
    """One round's result, for the progress lines on stderr."""
    if scenario.kind == "startup":
        return f"{row['startup_ms']:8.0f} ms to SERVING"
    cpu = row.get("server_cpu_us_per_op") or 0.0
    return (
        f"{row['per_s']:8.0f} {scenario.unit} {cpu:7.1f} us/op server {row.get('errors', 0)} errors"
    )


_HEADER = (
    f"{'scenario':<24} {'config':<16} {'figure':>18} {'p50 ms':>7} {'p99 ms':>7} "
    f"{'srv us/op':>9} {'x floor':>7} {'p99 x':>6} {'+us/op':>7} {'err':>4}"
)


def _line(label: str, config: str, figure: str, cells: tuple[str, ...]) -> str:
    p50, p99, cpu, ratio, p99x, added, errors = cells
    return (
        f"{label:<24} {config:<16} {figure:>18} {p50:>7} {p99:>7} {cpu:>9} {ratio:>7} "
        f"{p99x:>6} {added:>7} {errors:>4}"
    )


def _scenario_lines(entry: dict[str, Any]) -> list[str]:
    lines, label = [], entry["label"]
    floor = entry.get("floor")
    for config, cell in entry["configs"].items():
        median = cell.get("median")
        if median is None:
            lines.append(f"{label:<24} {config:<16} not measured")
            label = ""
            continue
        vs = cell.get("vs_floor", {})
        if entry["unit"] == "ms":
            figure = _fmt(median["startup_ms"], ".0f", " ms")
            ratio = _fmt(vs.get("startup"), ".2f", "x")
            cells = ("-", "-", "-", ratio, "-", "-", str(cell["errors"]))
        else:
            figure = _fmt(median["per_s"], ".0f", " " + entry["unit"])
            cells = (
                _fmt(median["latency_p50_ms"], ".2f"),
                _fmt(median["latency_p99_ms"], ".2f"),
                _fmt(median["server_cpu_us_per_op"], ".1f"),
                _fmt(vs.get("throughput"), ".2f", "x"),
                _fmt(vs.get("p99"), ".2f", "x"),
                _fmt(vs.get("server_cpu_added_us"), "+.1f"),
                str(cell["errors"]),
            )
        lines.append(_line(label, "*" + config if config == floor else config, figure, cells))
        label = ""
    return lines


def render(summary: dict[str, Any]) -> str:
    """The human-readable report: one table, then the targets."""
    settings = summary["settings"]
    lines = [
        f"{summary['command']}: {settings['rounds']} interleaved rounds "
        f"({settings['bulk_rounds']} of export, import, watch and start-up),",
        f"{settings['seconds']:g} s windows (+{settings['warmup']:g} s warm-up), "
        f"{settings['stream_users']} users per export and import.",
        "Medians over rounds. x floor: median of the per-round paired ratios to the",
        "scenario's floor, marked *; +us/op: server CPU per operation above the floor's.",
        "",
        _HEADER,
    ]
    for entry in summary["scenarios"].values():
        lines += _scenario_lines(entry)
    for kind, key in (("idle RSS", "idle_rss"), ("peak RSS", "peak_rss")):
        label = kind
        for config, values in summary["memory"].items():
            figure = _fmt(values[f"{key}_mib"], ".0f", " MiB")
            ratio = _fmt(values.get(f"{key}_vs_floor"), ".2f", "x")
            lines.append(_line(label, config, figure, ("-", "-", "-", ratio, "-", "-", "-")))
            label = ""
    for name, reason in summary["failed"].items():
        lines.append(f"{name} not started: {reason.splitlines()[0]}")
    if summary["headlines"]:
        lines += [
            "",
            f"{'target (benchmarks/targets.toml)':<46} {'against':<22} {'measured':>9} "
            f"{'target':>10}  verdict",
        ]
    verdicts = {True: "met", False: "MISSED", None: "-"}
    for headline in summary["headlines"]:
        spec = "+.1f" if headline["unit"] == "us" else ".2f"
        suffix = " us" if headline["unit"] == "us" else "x"
        value = "-" if headline["value"] is None else format(headline["value"], spec) + suffix
        verdict = verdicts[headline["met"]] if headline["value"] is not None else "not measured"
        lines.append(
            f"{headline['name']:<46} {headline['against']:<22} {value:>9} "
            f"{headline['target']:>10}  {verdict}"
        )
    load = summary["loadavg"]
    lines.append(
        f"\n{summary['cpus']} CPUs, load average {load['before']:.2f} before / "
        f"{load['after']:.2f} after, {summary['wall_seconds']:.0f} s. Client and server\n"
        "share these CPUs, so calls/s depends on the machine: compare server CPU us/op and\n"
        "the ratios. RSS of full-2w is summed over its processes."
    )
    return "\n".join(lines)
