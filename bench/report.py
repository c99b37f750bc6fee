"""Results → `latest.json`, `latest.md` (tables with ratios, the targets), `latest.png` (plots).

Figures come from one run on whatever machine ran it: they are ratios to read, never thresholds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
PEER_KEYS = ("mcp-proxy", "supergateway")
PIER_PATHS = ("sidecar-mcp", "sidecar-calls", "router-rest", "router-mcp")
_PLOT_SAMPLES = 4000  # latencies kept per run in the JSON (evenly spaced), enough for the plots

LABELS = {
    "direct": "direct stdio (baseline)",
    "mcp-proxy": "mcp-proxy /mcp",
    "supergateway": "supergateway /mcp (stateful)",
    "sidecar-mcp": "Pier sidecar /mcp",
    "sidecar-mcp:json": "Pier sidecar /mcp, Accept JSON only",
    "sidecar-mcp-2026": "Pier sidecar /mcp, 2026-07-28",
    "sidecar-calls": "Pier sidecar POST /v1/calls",
    "router-rest": "Pier router REST",
    "router-rest-unisolated": "Pier router REST, sessions unisolated",
    "router-rest-2p": "Pier router REST, two processes",
    "router-mcp-2p": "Pier router MCP relay, two processes",
    "router-mcp": "Pier router MCP relay",
    "router-mcp:json": "Pier router MCP relay, Accept JSON only",
    "router-mcp-2026": "Pier router MCP relay, 2026-07-28",
}


# One colour per path in every panel (matplotlib's default cycle repeats after ten series).
COLORS = {
    "direct": "#000000",
    "mcp-proxy": "#1f77b4",
    "supergateway": "#ff7f0e",
    "sidecar-mcp": "#2ca02c",
    "sidecar-calls": "#17becf",
    "router-rest": "#d62728",
    "router-mcp": "#9467bd",
    "sidecar-mcp-2026": "#98df8a",
    "router-mcp-2026": "#c5b0d5",
}


def label(key: str) -> str:
    return LABELS.get(key, key)


def _find(runs: list[dict[str, Any]], target: str, client: str = "lean") -> dict[str, Any] | None:
    return next((r for r in runs if r["target"] == target and r["client"] == client), None)


def best_peer(runs: list[dict[str, Any]], client: str) -> dict[str, Any] | None:
    peers = [r for k in PEER_KEYS if (r := _find(runs, k, client)) is not None and r["calls"]]
    return max(peers, key=lambda r: r["calls_per_s"], default=None)


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "-"
    return f"{a / b:.2f}x"


def sequential_table(runs: list[dict[str, Any]], client: str) -> list[str]:
    base = _find(runs, "direct", client)
    peer = best_peer(runs, client)
    lines = [
        f"| path ({client} client) | calls/s | vs direct | vs best peer | p50 ms | p99 ms | +p50 ms | +p99 ms "
        "| errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        if run["client"] != client:
            continue
        added50 = run["p50_ms"] - base["p50_ms"] if base and run is not base else None
        added99 = run["p99_ms"] - base["p99_ms"] if base and run is not base else None
        lines.append(
            f"| {label(run['target'])} | {_fmt(run['calls_per_s'], 0)} "
            f"| {_ratio(run['calls_per_s'], base['calls_per_s'] if base else None)} "
            f"| {_ratio(run['calls_per_s'], peer['calls_per_s'] if peer else None)} "
            f"| {_fmt(run['p50_ms'], 3)} | {_fmt(run['p99_ms'], 3)} "
            f"| {_fmt(added50, 3)} | {_fmt(added99, 3)} | {run['errors']} |"
        )
    if peer:
        lines.append(f"\nBest peer ({client}): {label(peer['target'])}.")
    return lines


CPU_ROLES = ("client", "gateway", "router", "bridge", "server", "redis")


def cpu_table(runs: list[dict[str, Any]]) -> list[str]:
    """CPU ms per call by process, user + system (system share in brackets): what each hop costs."""
    lines = [
        "| path | " + " | ".join(CPU_ROLES) + " | all but the client |",
        "|---|" + "---:|" * (len(CPU_ROLES) + 1),
    ]
    for run in runs:
        cpu = run.get("cpu_ms_per_call") or {}
        if not cpu:
            continue
        cells = []
        for role in CPU_ROLES:
            t = cpu.get(role)
            if t is None:
                cells.append("-")
            else:
                total = t["user"] + t["system"]
                cells.append(f"{total:.3f} ({100 * t['system'] / total:.0f}% sys)" if total else "0")
        path_total = sum(t["user"] + t["system"] for r, t in cpu.items() if r != "client")
        lines.append(f"| {label(run['target'])} ({run['client']}) | " + " | ".join(cells) + f" | {path_total:.3f} |")
    return lines


def sweep_table(runs: list[dict[str, Any]]) -> list[str]:
    levels = sorted({r["concurrency"] for r in runs})
    header = "| path | users | " + " | ".join(f"c={n} calls/s (p99 ms)" for n in levels) + " |"
    lines = [header, "|---|---|" + "---:|" * len(levels)]
    seen: list[tuple[str, str]] = []
    for run in runs:
        if (run["target"], run["users"]) not in seen:
            seen.append((run["target"], run["users"]))
    for target, users in seen:
        cells = []
        for n in levels:
            found: dict[str, Any] | None = next(
                (r for r in runs if r["target"] == target and r["users"] == users and r["concurrency"] == n), None
            )
            if found is None:
                cells.append("-")
            else:
                errors = f", {found['errors']} errors" if found["errors"] else ""
                cells.append(f"{_fmt(found['calls_per_s'], 0)} ({_fmt(found['p99_ms'], 1)}{errors})")
        lines.append(f"| {label(target)} | {users} | " + " | ".join(cells) + " |")
    return lines


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with what was measured and whether this run met it."""
    seq = results["sequential"]
    out: list[dict[str, Any]] = []

    rest, peer = _find(seq, "router-rest"), best_peer(seq, "lean")
    if rest and peer:
        ratio = rest["calls_per_s"] / peer["calls_per_s"]
        out.append(
            {
                "target": "Router REST sequential throughput ≥ 2x best peer (lean client)",
                "measured": f"{ratio:.2f}x ({rest['calls_per_s']:.0f} vs {peer['calls_per_s']:.0f} calls/s, "
                f"{label(peer['target'])})",
                "met": ratio >= 2,
            }
        )
    for key, goal, what in (
        ("router-mcp", 1.5, "Router MCP relay"),
        ("sidecar-mcp-2026", 2.0, "2026-07-28 through the bridge's /mcp"),
    ):
        run = _find(seq, key)
        if run and peer:
            ratio = run["calls_per_s"] / peer["calls_per_s"]
            out.append(
                {
                    "target": f"{what} sequential throughput ≥ {goal:g}x best peer (lean client)",
                    "measured": f"{ratio:.2f}x ({run['calls_per_s']:.0f} vs {peer['calls_per_s']:.0f} calls/s)",
                    "met": ratio >= goal,
                }
            )
    base = _find(seq, "direct")
    for key in PIER_PATHS:
        run = _find(seq, key)
        if run and base:
            added50, added99 = run["p50_ms"] - base["p50_ms"], run["p99_ms"] - base["p99_ms"]
            out.append(
                {
                    "target": f"Added latency over direct stdio, {label(key)}: p50 ≤ 0.5 ms, p99 ≤ 2 ms",
                    "measured": f"+{added50:.3f} ms p50, +{added99:.3f} ms p99",
                    "met": added50 <= 0.5 and added99 <= 2,
                }
            )
    memory = results.get("memory", {})
    bridge = memory.get("sidecar_idle")
    if bridge:
        rss = bridge["self"]["rss_mib"]
        out.append({"target": "One bridge's idle RSS ≤ 40 MiB", "measured": f"{rss:.1f} MiB", "met": rss <= 40})
    per = memory.get("per_session")
    if per:
        value = per["overhead_rss_mib"]
        out.append(
            {
                "target": f"Per-session overhead beyond the server at {per['sessions']} sessions ≤ 40 MiB",
                "measured": f"{value:.1f} MiB RSS ({per['overhead_pss_mib']:.1f} MiB PSS)",
                "met": value <= 40,
            }
        )
    cold = results.get("cold_start", {})
    if "router_first_call_ms" in cold and "server_start_ms" in cold:
        first, server = cold["router_first_call_ms"]["median"], cold["server_start_ms"]["median"]
        out.append(
            {
                "target": "Cold start ≤ the server's own start + 100 ms (medians)",
                "measured": f"{first:.0f} ms vs {server:.0f} ms server start (+{first - server:.0f} ms)",
                "met": first - server <= 100,
            }
        )
    if "router_pooled_first_call_ms" in cold and rest:
        pooled = cold["router_pooled_first_call_ms"]["median"]
        out.append(
            {
                "target": "With a warm pool, a new user's first call ≤ 2x a warm REST call (medians)",
                "measured": f"{pooled:.1f} ms vs {rest['p50_ms']:.2f} ms ({pooled / rest['p50_ms']:.1f}x)",
                "met": pooled <= 2 * rest["p50_ms"],
            }
        )
    handoff = results.get("handoff")
    if handoff:
        for key, what in (("sse_ms", "SSE client"), ("poll_ms", "poller")):
            d = handoff[key]
            out.append(
                {
                    "target": f"Job result reaches a waiting {what} ≤ 50 ms after the tool finishes",
                    "measured": f"median {d['median']:.1f} ms, max {d['max']:.1f} ms (n={d['n']})",
                    "met": d["max"] <= 50,
                }
            )
    return out


def _traces(meta: dict[str, Any]) -> str:
    return f", traces on: {meta.get('spans_exported', 0)} spans exported" if meta.get("traces") else ""


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        f"# Pier benchmark ({'quick' if meta['quick'] else 'full'} mode{_traces(meta)})",
        "",
        f"{meta['started_at']} · {meta['cpus']} CPUs · load average {meta['loadavg_before']} before, "
        f"{meta['loadavg_after']} after · {meta['elapsed_s']:.0f} s · Pier {meta['pier_rev']} · "
        f"server-everything {meta['versions'].get('server-everything')} · mcp-proxy {meta['versions']['mcp-proxy']} · "
        f"supergateway {meta['versions']['supergateway']} · Python {meta['python']} · Node {meta['node']}",
        "",
        "One run on a shared machine: read the ratios, not the absolute figures. Every path calls "
        "server-everything's `echo` tool; all traffic is on 127.0.0.1.",
        "",
        *[f"**Failed phase** — {failure}" for failure in meta.get("failures", [])],
        "## Targets",
        "",
        "| target | this run | met |",
        "|---|---|---|",
    ]
    lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |" for t in results["targets"]]
    lines += ["", "## Sequential echo calls", ""]
    lines += sequential_table(results["sequential"], "lean")
    lines += [""]
    lines += sequential_table(results["sequential"], "sdk")
    lines += [
        "",
        "CPU milliseconds per call, by process (user + system; the system share is mostly syscalls: "
        "sockets, pipes, epoll). Unlike latency, this hardly depends on how busy the machine is.",
        "",
    ]
    lines += cpu_table([*results["sequential"], *results.get("variants", [])])
    if results.get("variants"):
        lines += ["", "Variants (lean client):", ""]
        lines += [
            f"- {label(v['target'])}: {v['calls_per_s']:.0f} calls/s, p50 {v['p50_ms']:.3f} ms, "
            f"p99 {v['p99_ms']:.3f} ms"
            for v in results["variants"]
        ]
    lines += [
        "",
        "## Concurrency sweep (lean clients)",
        "",
        "`one`: every caller on one user's session (one server). `many`: one session, hence one server, per "
        "caller — except mcp-proxy, which has one server for all sessions, and direct stdio, where `many` is "
        "one server process per caller.",
        "",
    ]
    lines += sweep_table(results["sweep"])
    lines += ["", "## Cold start", "", "| what | median ms | min | max | n |", "|---|---:|---:|---:|---:|"]
    for key, what in (
        ("server_start_ms", "server-everything's own start (spawn → initialize answered)"),
        ("sidecar_listening_ms", "`pier sidecar` spawn → listening"),
        ("sidecar_ready_ms", "`pier sidecar` spawn → ready (server initialized)"),
        ("router_first_call_ms", "router: a new user's first call (session started by it)"),
        ("router_first_call_unisolated_ms", "router: a new user's first call, sessions unisolated"),
        (
            "router_pooled_first_call_ms",
            "router: a new user's first call, warm pool (a started session claimed; an open connection)",
        ),
        ("supergateway_first_call_ms", "supergateway: a new session's initialize + first call"),
    ):
        d = results["cold_start"].get(key)
        if d:
            lines.append(f"| {what} | {d['median']:.0f} | {d['min']:.0f} | {d['max']:.0f} | {d['n']} |")
    lines += _memory_lines(results.get("memory", {}))
    handoff = results.get("handoff")
    if handoff:
        lines += [
            "",
            "## Job hand-off",
            "",
            f"`slow(seconds={handoff['sleep_s']})` with `timeout_s={handoff['timeout_s']}` on the demo profile "
            f"(handed off, 202). Delay from the tool's finish (the bridge's call record: when the server's answer "
            "was read) to the result at the client; the poller polls every "
            f"{handoff['poll_interval_s'] * 1000:.0f} ms.",
            "",
            "| delay | median ms | min | max | n |",
            "|---|---:|---:|---:|---:|",
        ]
        for key, what in (
            ("sse_ms", "tool finished → SSE `completed` event received"),
            ("poll_ms", "tool finished → poller sees `completed`"),
            ("record_ms", "tool finished → worker stored the result (job `finished_at`)"),
            ("sse_vs_expected_ms", "expected sleep end (request + seconds) → SSE event"),
        ):
            d = handoff[key]
            lines.append(f"| {what} | {d['median']:.1f} | {d['min']:.1f} | {d['max']:.1f} | {d['n']} |")
    lines += ["", "Plots: `latest.png` (latency distribution, concurrency sweep). Raw figures: `latest.json`.", ""]
    return "\n".join(lines)


def _memory_lines(memory: dict[str, Any]) -> list[str]:
    if not memory:
        return []
    lines = [
        "",
        "## Memory",
        "",
        "RSS counts shared pages in every process; PSS divides them among their users (sums are real use).",
        "",
        "| process | RSS MiB | PSS MiB |",
        "|---|---:|---:|",
    ]
    for key, what in (
        ("sidecar_idle", "one `pier sidecar` (bridge alone, idle after start)"),
        ("sidecar_loaded", "one `pier sidecar` after the load runs"),
        ("router_idle", "router (`pier up`, worker in-process), no session"),
        ("mcp_proxy", "mcp-proxy (alone, its server excluded)"),
        ("supergateway", "supergateway (alone, after its runs)"),
    ):
        m = memory.get(key)
        if m:
            lines.append(f"| {what} | {m['self']['rss_mib']:.1f} | {m['self']['pss_mib']:.1f} |")
    per = memory.get("per_session")
    if per:
        lines += [
            "",
            f"At {per['sessions']} idle sessions: router {per['router_rss_mib']:.1f} MiB RSS "
            f"(+{per['router_growth_rss_mib']:.1f}), bridges {per['bridges_rss_mib']:.0f} MiB RSS / "
            f"{per['bridges_pss_mib']:.0f} MiB PSS, servers {per['servers_rss_mib']:.0f} MiB RSS / "
            f"{per['servers_pss_mib']:.0f} MiB PSS; total {per['total_rss_mib']:.0f} MiB RSS / "
            f"{per['total_pss_mib']:.0f} MiB PSS. Overhead per session beyond its server "
            f"(bridge + router growth): **{per['overhead_rss_mib']:.1f} MiB RSS, {per['overhead_pss_mib']:.1f} MiB "
            f"PSS** (one server: {per['server_rss_median_mib']} MiB RSS). Sessions started in "
            f"{per['fill_s']:.1f} s.",
        ]
    return lines


def plot(results: dict[str, Any], path: Path) -> None:
    """Latency distribution (sequential, lean and SDK) and the concurrency sweep."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(19, 6))
    for client, style in (("lean", "-"), ("sdk", ":")):
        for key, values in results["latencies"].items():
            target, kind = key.rsplit("|", 1)
            if kind != client or not values:
                continue
            ordered = sorted(values)
            ys = [(i + 1) / len(ordered) for i in range(len(ordered))]
            color = COLORS.get(target)
            axes[0].plot(ordered, ys, style, color=color, label=f"{label(target)} ({client})", linewidth=1.4)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("latency per echo call, ms (log)")
    axes[0].set_ylabel("fraction of calls")
    axes[0].set_title("Sequential calls: latency distribution")
    axes[0].grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")

    series: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in results["sweep"]:
        series.setdefault((run["target"], run["users"]), []).append(run)
    for (target, users), runs in series.items():
        runs.sort(key=lambda r: r["concurrency"])
        xs = [r["concurrency"] for r in runs]
        style = "-o" if users == "one" else "--s"
        kwargs = {"color": COLORS.get(target), "label": f"{label(target)}, {users}", "markersize": 4}
        axes[1].plot(xs, [r["calls_per_s"] for r in runs], style, **kwargs)
        axes[2].plot(xs, [r["p99_ms"] for r in runs], style, **kwargs)
    for ax, title, ylabel in (
        (axes[1], "Concurrency sweep: throughput", "calls/s (log)"),
        (axes[2], "Concurrency sweep: p99 latency", "p99 ms (log)"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    fig.suptitle(f"Pier benchmark ({'quick' if results['meta']['quick'] else 'full'}), {results['meta']['started_at']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def downsample(values: list[float], keep: int = _PLOT_SAMPLES) -> list[float]:
    if len(values) <= keep:
        return [round(v, 4) for v in values]
    step = len(values) / keep
    return [round(values[int(i * step)], 4) for i in range(keep)]


def write(results: dict[str, Any], directory: Path = RESULTS) -> str:
    """Write latest.json, latest.md and latest.png; returns the markdown."""
    directory.mkdir(parents=True, exist_ok=True)
    results["targets"] = targets(results)
    text = markdown(results)
    (directory / "latest.md").write_text(text)
    (directory / "latest.json").write_text(json.dumps(results, indent=1, allow_nan=True) + "\n")
    plot(results, directory / "latest.png")
    return text
