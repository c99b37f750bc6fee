"""Measured effects of proposed changes, without touching Pier's code.

    python -m bench.experiments [--seconds 6] [--rounds 3] [--only paths] [--variants names] [--callers N]
                                [--zygote]

Each variant runs the sidecar and the router (`pier up`) under the bench venv's Python with
bench/patches on PYTHONPATH (the baseline too, so every variant runs the same interpreter), and
measures echo calls on each Pier path with the lean client (one at a time, or `--callers N` at
once, one user and session each): throughput, latency and CPU per call by process. Variants are
prototypes of proposals (bench/patches/sitecustomize.py) or plain settings. `--zygote` measures
the fork-server proposal for bridge start-up and memory: bridges forked from a process that has
already imported Pier (bench/zygote.py) against bridges started as `pier sidecar` processes.

Results: bench/results/experiments.md and experiments.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from bench import peers, report, scenarios, targets
from bench.scenarios import drive, prime
from bench.stats import Run, describe

PATCHES_DIR = Path(__file__).resolve().parent / "patches"
PATHS = ("sidecar-mcp", "sidecar-calls", "router-rest", "router-mcp")
COLD_SAMPLES = 3
GC_STATS = Path("/tmp/bench-gc-stats")


def _gc_variant(patches: str, what: str) -> tuple[str, dict[str, str], str]:
    """A collector variant; each process records its collections under GC_STATS/<patches>/<pid>.json."""
    return patches + ",gcstats", {"BENCH_GC_STATS": str(GC_STATS / (patches or "settled"))}, what


# name → (BENCH_PATCHES, extra PIER_* settings, what it stands for)
VARIANTS: dict[str, tuple[str, dict[str, str], str]] = {
    "baseline": ("", {}, "Pier as it is (run by the bench venv's Python, like every variant)"),
    "no-audit-log": ("", {"PIER_AUDIT_LOG": "false"}, "router: PIER_AUDIT_LOG=false (one JSON log line less per call)"),
    "uvloop": ("uvloop", {}, "asyncio on uvloop"),
    "gc-settled": _gc_variant("", "Pier as it is, its collections recorded"),
    "gc-young-7000": _gc_variant("gcyoung=7000", "Pier's settling, young collections after 7,000 objects"),
    "gc-python": _gc_variant("gcpython", "Python's own collector settings, not Pier's (collections recorded)"),
    "two-processes": ("", {"PIER_PROCESSES": "2"}, "router: two processes on one port (PIER_PROCESSES=2)"),
    "process-bridges": (
        "",
        {"PIER_LOCAL_BRIDGES": "process"},
        "router: one `pier sidecar` process per local session (the former default)",
    ),
}


def pier_command() -> list[str]:
    return [str(peers.BENCH_PYTHON), "-m", "pier.cli"]


def variant_env(patches: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(PATCHES_DIR), "BENCH_PATCHES": patches}


async def measure(target: targets.Target, seconds: float, callers: int = 1) -> dict[str, Any]:
    clients = (
        await scenarios.open_clients(target, [f"x{n}" for n in range(callers)])
        if callers > 1
        else [await target.client("bench")]
    )
    try:
        await prime(clients)
        run = await drive(clients, seconds, 1.0, Run(target.key, "lean", callers, "many" if callers > 1 else "one"))
    finally:
        await scenarios.close_all(clients)
    return run.summary()


async def run_variant(
    name: str, paths: list[str], seconds: float, logs: Path, callers: int = 1
) -> list[dict[str, Any]]:
    patches, settings, _ = VARIANTS[name]
    out = []
    env = {**variant_env(patches), **settings}
    if any(p.startswith("sidecar") for p in paths):
        async with targets.sidecar(logs, env, pier_command()) as started:
            for target in started.targets:
                if target.key in paths:
                    out.append({"variant": name, **await measure(target, seconds, callers)})
                    _show(out[-1])
    if any(p.startswith("router") for p in paths):
        # `pier up` drops PIER_* from what it passes on, not PYTHONPATH/BENCH_PATCHES: bridges are patched too.
        extra = {"PYTHONPATH": str(PATCHES_DIR), "BENCH_PATCHES": patches, **settings}
        async with targets.router(logs, logs / f"router-{name}", extra, pier_command()) as started:
            for target in started.targets:
                if target.key in paths:
                    out.append({"variant": name, **await measure(target, seconds, callers)})
                    _show(out[-1])
            first = await scenarios.router_cold(started.info["url"], COLD_SAMPLES, name)
            out.append({"variant": name, "target": "router-first-call", "first_call_ms": describe(first)})
            print(f"  {name:<18} router: a new user's first call, median {out[-1]['first_call_ms']['median']:.0f} ms")
    return out


def _show(s: dict[str, Any]) -> None:
    cpu = sum(t["user"] + t["system"] for r, t in s["cpu_ms_per_call"].items() if r != "client")
    print(
        f"  {s['variant']:<18} {s['target']:<14} {s['calls_per_s']:>7.0f} calls/s  p50 {s['p50_ms']:.3f} ms  "
        f"p99 {s['p99_ms']:.3f} ms  Pier+server CPU {cpu:.3f} ms/call",
        flush=True,
    )


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (variant, path): medians over the rounds, and the spread of throughput."""
    rows = []
    measured = [r for r in runs if r.get("calls")]  # a run whose system died has no calls
    keys = list(dict.fromkeys((r["variant"], r["target"]) for r in measured))
    for variant, target in keys:
        same = [r for r in measured if r["variant"] == variant and r["target"] == target]
        roles = {role for r in same for role in r["cpu_ms_per_call"]}
        cpu = {
            role: {
                kind: round(_median([r["cpu_ms_per_call"].get(role, {}).get(kind, 0.0) for r in same]), 4)
                for kind in ("user", "system")
            }
            for role in roles
        }
        rows.append(
            {
                "variant": variant,
                "target": target,
                "rounds": len(same),
                "calls_per_s": _median([r["calls_per_s"] for r in same]),
                "calls_per_s_min": min(r["calls_per_s"] for r in same),
                "calls_per_s_max": max(r["calls_per_s"] for r in same),
                "p50_ms": _median([r["p50_ms"] for r in same]),
                "p99_ms": _median([r["p99_ms"] for r in same]),
                "cpu_ms_per_call": cpu,
            }
        )
    return rows


async def main(
    seconds: float, paths: list[str], variants: list[str], rounds: int, with_zygote: bool, callers: int
) -> None:
    logs = peers.PEERS / "logs" / ("experiments-" + time.strftime("%Y%m%d-%H%M%S"))
    runs: list[dict[str, Any]] = []
    # Rounds interleave the variants, so a busy spell of the machine does not land on one variant only.
    extra: dict[str, Any] = {"failures": []}
    for n in range(rounds):
        for name in variants:
            print(f"round {n + 1}/{rounds}: {name}", flush=True)
            try:
                runs += await run_variant(name, paths, seconds, logs, callers)
            except Exception as exc:  # one broken run costs its figures only; the rounds go on
                extra["failures"].append(f"round {n + 1}, {name}: {type(exc).__name__}: {exc}")
                print(f"  FAILED: {extra['failures'][-1]}", flush=True)
        write(aggregate(runs), runs, extra, seconds, n + 1, callers)  # partial results survive an interruption
    if with_zygote:
        from bench import zygote

        extra["zygote"] = await zygote.compare(logs)
        write(aggregate(runs), runs, extra, seconds, rounds, callers)


def _cpu(row: dict[str, Any]) -> float:
    return float(sum(t["user"] + t["system"] for role, t in row["cpu_ms_per_call"].items() if role != "client"))


def write(
    rows: list[dict[str, Any]],
    runs: list[dict[str, Any]],
    extra: dict[str, Any],
    seconds: float,
    rounds: int,
    callers: int,
) -> None:
    lines = [
        f"# Experiments: measured effects of proposed changes (lean client, echo calls, {callers} at a time)",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M')} · load average {os.getloadavg()[0]:.1f} · {rounds} interleaved rounds of "
        f"{seconds:.0f} s per path and variant; medians (throughput: median, min-max). CPU = ms per call of Pier's "
        "processes and the server (the client excluded).",
        "",
        "| variant | what | " + " | ".join(f"{p}: calls/s · p50 · p99 ms · CPU ms" for p in PATHS) + " |",
        "|---|---|" + "---:|" * len(PATHS),
    ]
    baseline = {r["target"]: r for r in rows if r["variant"] == "baseline"}
    for name in dict.fromkeys(r["variant"] for r in rows):
        cells = []
        for path in PATHS:
            r = next((x for x in rows if x["variant"] == name and x["target"] == path), None)
            if r is None:
                cells.append("-")
                continue
            base = baseline.get(path)
            ratio = f" **{r['calls_per_s'] / base['calls_per_s']:.2f}x**" if base and name != "baseline" else ""
            spread = f" ({r['calls_per_s_min']:.0f}-{r['calls_per_s_max']:.0f})" if r["rounds"] > 1 else ""
            cells.append(
                f"{r['calls_per_s']:.0f}{spread}{ratio} · {r['p50_ms']:.3f} · {r['p99_ms']:.1f} · {_cpu(r):.3f}"
            )
        lines.append(f"| {name} | {VARIANTS[name][2]} | " + " | ".join(cells) + " |")
    firsts = [r for r in runs if r["target"] == "router-first-call"]
    if firsts:
        lines += ["", "Router, a new user's first call (its session started by it), ms:", ""]
        lines += ["| variant | medians of each round |", "|---|---|"]
        for name in dict.fromkeys(r["variant"] for r in firsts):
            medians = [f"{r['first_call_ms']['median']:.0f}" for r in firsts if r["variant"] == name]
            lines.append(f"| {name} | {', '.join(medians)} |")
    lines += ["", "CPU per call by process (medians):", ""]
    lines += report.cpu_table([{**r, "client": r["variant"]} for r in rows])
    lines += [f"\n**Failed** — {failure}" for failure in extra.get("failures", [])]
    lines += _gc_lines()
    z = extra.get("zygote")
    if z:
        lines += ["", "## Fork-server (zygote) bridges", "", *z["lines"]]
    (report.RESULTS / "experiments.md").write_text("\n".join(lines) + "\n")
    data = {"rows": rows, "runs": runs, **extra}
    (report.RESULTS / "experiments.json").write_text(json.dumps(data, indent=1) + "\n")
    print("\n".join(lines))


def _gc_lines() -> list[str]:
    """The collections the gc-* variants' processes recorded (every round's processes summed)."""
    lines = []
    for folder in sorted(GC_STATS.glob("*")):
        totals = {g: [0, 0.0, 0.0] for g in "012"}
        for path in folder.glob("*.json"):
            for g, s in json.loads(path.read_text())["gc"].items():
                totals[g][0] += s["collections"]
                totals[g][1] += s["total_ms"]
                totals[g][2] = max(totals[g][2], s["max_ms"])
        cells = [f"{n} · {total:.0f} · {longest:.1f}" for n, total, longest in totals.values()]
        lines.append(f"| {folder.name} | " + " | ".join(cells) + " |")
    if not lines:
        return []
    head = "| patches | " + " | ".join(f"gen {g}: collections · total ms · longest ms" for g in "012") + " |"
    return ["", "Collections after start-up (gc-* variants, all rounds):", "", head, "|---|---:|---:|---:|", *lines]


def cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.experiments", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--only", default=",".join(PATHS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--zygote", action="store_true")
    parser.add_argument("--callers", type=int, default=1, help="callers at once, one user each (default: sequential)")
    args = parser.parse_args()
    paths = [p for p in args.only.split(",") if p]
    variants = [v for v in args.variants.split(",") if v]
    if set(paths) - set(PATHS) or set(variants) - set(VARIANTS):
        parser.error(f"paths: {', '.join(PATHS)}; variants: {', '.join(VARIANTS)}")
    asyncio.run(main(args.seconds, paths, variants, args.rounds, args.zygote, args.callers))


if __name__ == "__main__":
    cli()
