"""RESULTS.md and the plots, from results.json.

Everything in RESULTS.md is generated from the numbers of one run of
`benchmarks.run`, except the analysis notes at the end of each section,
which quote those numbers. Comparisons that did not run (``--only``) or
failed are shown as such.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import backlog_live, burst, live_streaming, scale_out, small_runs
from .common import fmt, fmt_summary, summary


def _ok(flag: Any) -> str:
    if flag is None:
        return "-"
    return "**met**" if flag else "**not met**"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _pct(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{100 * (ratio - 1):+.1f}%"


# --------------------------------------------------------------------- plots


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _errbars(summaries: list[dict[str, Any]]) -> tuple[list[float], list[list[float]]]:
    med = [s["median"] or 0.0 for s in summaries]
    lo = [m - (s["min"] if s["min"] is not None else m) for m, s in zip(med, summaries, strict=True)]
    hi = [(s["max"] if s["max"] is not None else m) - m for m, s in zip(med, summaries, strict=True)]
    return med, [lo, hi]


RE_ORDER = ("re_alone", "publisher", "sidecar_up", "sidecar_down", "tiledwriter_10000", "tiledwriter_1")
DRAIN_ORDER = ("inprocess", "sidecar", "sidecar_all_ideas")


def _ordered(keys: Any, order: tuple[str, ...]) -> list[str]:
    """`keys` in `order` first (results.json sorts keys alphabetically), then the rest."""
    keys = list(keys)
    return [k for k in order if k in keys] + sorted(k for k in keys if k not in order)


def plot_runengine(c: dict[str, Any], path: Path) -> None:
    plt = _plt()
    configs = _ordered(c["ms_per_event"], RE_ORDER)
    med, err = _errbars([c["ms_per_event"][k] for k in configs])
    fig, ax = plt.subplots(figsize=(8, 3.6))
    colors = ["#888", "#4c72b0", "#55a868", "#c44e52", "#8172b2", "#8172b2"]
    ax.barh(configs[::-1], med[::-1], xerr=[err[0][::-1], err[1][::-1]], color=colors[::-1], capsize=3)
    ax.set_xscale("log")
    from matplotlib.ticker import ScalarFormatter

    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(ScalarFormatter())
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("ms per event (median, min-max over repetitions; log scale)")
    tops = [c["ms_per_event"][k]["max"] or 0.0 for k in configs[::-1]]
    for i, k in enumerate(configs[::-1]):
        r = c["ratios"][k]["median"]
        ax.text(tops[i] * 1.1, i, f"x{r:.2f} vs RE alone", va="center", fontsize=8)
    ax.set_xlim(right=max(tops) * 3)
    ax.set_title(f"RunEngine bp.count([det], {c['events']}) cost per event")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_receive(c: dict[str, Any], path: Path) -> None:
    plt = _plt()
    keys = list(c["rate"])
    med, err = _errbars([c["rate"][k] for k in keys])
    fig, ax = plt.subplots(figsize=(8, 3.4))
    ax.bar(
        keys,
        med,
        yerr=err,
        capsize=3,
        color=["#4c72b0" if k.startswith("daemon") else "#55a868" for k in keys],
    )
    ax.axhline(50_000, color="#c44e52", ls="--", lw=1, label="target 50,000 docs/s")
    for i, k in enumerate(keys):
        top = med[i] + err[1][i]
        ax.text(i, top, f"{med[i]:,.0f}\nlost {c['lost'][k]:,}", ha="center", va="bottom", fontsize=8)
    ax.set_ylim(top=max(50_000, max(m + e for m, e in zip(med, err[1], strict=True))) * 1.25)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_ylabel("documents/s into the spool")
    ax.set_title("Receive path: bursts published without pause")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_drain(c: dict[str, Any], path: Path) -> None:
    plt = _plt()
    configs = _ordered(c["rows_per_s"], DRAIN_ORDER)
    med, err = _errbars([c["rows_per_s"][k] for k in configs])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    ax1.bar(range(len(configs)), med, yerr=err, capsize=3, color=["#888", "#4c72b0", "#55a868", "#8172b2"])
    ax1.set_xticks(range(len(configs)), [k.replace("sidecar_", "sidecar\n") for k in configs], fontsize=8)
    base = c["rows_per_s"]["inprocess"]["median"] or 1.0
    ax1.axhline(5 * base, color="#c44e52", ls="--", lw=1, label="target: 5x in-process")
    for i, k in enumerate(configs):
        top = med[i] + err[1][i]
        ax1.text(
            i, top, f"{med[i]:,.0f}\nx{c['ratios'][k]['median']:.2f}", ha="center", va="bottom", fontsize=8
        )
    ax1.set_ylim(top=max(5 * base, max(m + e for m, e in zip(med, err[1], strict=True))) * 1.2)
    ax1.set_ylabel("rows/s into Tiled")
    ax1.set_title(f"Backlog drain, {c['rows']:,} rows in {c['backlog']['runs']} runs")
    ax1.legend(fontsize=8)
    # Where each upload's wall time went (medians).
    wall = [c["upload_seconds"][k]["median"] for k in configs]
    cpu = [c["client_cpu_seconds"][k]["median"] for k in configs]
    http = [c["http_wait_seconds"][k]["median"] for k in configs]
    server = [c["server_cpu_seconds"][k]["median"] for k in configs]
    x = range(len(configs))
    ax2.bar([i - 0.2 for i in x], wall, width=0.2, label="wall", color="#333")
    ax2.bar([i for i in x], cpu, width=0.2, label="client CPU", color="#4c72b0")
    ax2.bar([i + 0.2 for i in x], http, width=0.2, label="waiting on HTTP", color="#dd8452")
    ax2.bar([i + 0.4 for i in x], server, width=0.2, label="Tiled server CPU", color="#c44e52")
    ax2.set_xticks(list(x), [k.replace("sidecar_", "sidecar\n") for k in configs], fontsize=8)
    ax2.set_ylabel("seconds (median)")
    ax2.set_title("Where the time goes")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_latency(c: dict[str, Any], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for key, values in c["latencies"].items():
        if not values:
            continue
        xs = sorted(values)
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        ax.step(xs, ys, where="post", label=key)
    ax.axvline(1.0, color="#c44e52", ls="--", lw=1, label="target p99 at 10 Hz")
    ax.axvline(2.0, color="#c44e52", ls=":", lw=1, label="target p99 at 200 Hz")
    ax.axhline(0.99, color="#999", lw=0.5)
    ax.set_xlabel("event time -> row readable from Tiled (s)")
    ax.set_ylabel("fraction of rows")
    ax.set_title("Live latency, all repetitions pooled")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_memory(c: dict[str, Any], replay: dict[str, Any] | None, path: Path) -> None:
    plt = _plt()
    samples = c["samples"]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    t = [s["t"] for s in samples]
    ax.plot(t, [s["receiver_mib"] for s in samples], label="receiver (daemon) RSS", color="#4c72b0")
    ax.plot(t, [s["uploader_mib"] for s in samples], label="uploader child RSS", color="#55a868")
    ax.axhline(250, color="#c44e52", ls="--", lw=1, label="250 MiB")
    drain = [s["t"] for s in samples if s["phase"] == "drain"]
    if drain:
        ax.axvspan(drain[0], drain[-1], color="#eee", label="Tiled up: draining")
    ax.set_xlabel("seconds")
    ax.set_ylabel("MiB")
    ax2 = ax.twinx()
    events = c["events"] or 1
    total_bytes = max((s["spool_bytes"] for s in samples), default=1) or 1
    # While building: spooled bytes as a share of the full backlog; while draining: events not yet in
    # Tiled (the spool shrinks as runs are released, so it cannot be used then).
    backlog = [
        max(0.0, events - s["rows_uploaded"])
        if s["phase"] != "build"
        else s["spool_bytes"] / total_bytes * events
        for s in samples
    ]
    ax2.plot(t, [b / 1000 for b in backlog], color="#999", ls=":", label="backlog (k events, approx.)")
    ax2.set_ylabel("backlog, thousands of events")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="upper left")
    ax.set_title(f"Sidecar memory: {c['events']:,}-event backlog built (Tiled down), then drained")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------- text


def _profile_lines(profile: dict[str, Any], label: str) -> list[str]:
    total = profile.get("total_s") or 1.0
    lines = [f"*{label}* ({fmt(total)} s profiled):"]
    inclusive = ", ".join(
        f"{name} {100 * seconds / total:.0f}%"
        for name, seconds in profile.get("inclusive_s", {}).items()
        if seconds
    )
    if inclusive:
        lines.append(f"- inclusive: {inclusive}")
    by_package = ", ".join(
        f"{name} {100 * seconds / total:.0f}%"
        for name, seconds in list(profile["self_by_package"].items())[:6]
    )
    lines.append(f"- self time by package: {by_package}")
    top = "; ".join(
        f"`{row['function']}` {100 * row['self_s'] / total:.0f}%" for row in profile["top_self"][:5]
    )
    lines.append(f"- top functions (self): {top}")
    return lines


def _runengine(c: dict[str, Any]) -> list[str]:
    ms, ratios = c["ms_per_event"], c["ratios"]
    rows = []
    for k in _ordered(ms, RE_ORDER):
        rows.append([f"`{k}`", fmt_summary(ms[k]), fmt_summary(ratios[k]), f"{ms[k]['spread_pct']:.0f}%"])
    cpu = c["sidecar_cpu_ms_per_event"]
    up = ratios["sidecar_up_vs_publisher"]
    down = ratios["sidecar_down_vs_publisher"]
    out = [
        f"`bp.count([det], N)`: N = {c.get('events_cheap')} for the first four configurations (best of "
        f"{c.get('rounds')} interleaved rounds per repetition), {c['events']} for `tiledwriter_10000`, "
        f"{c['events_tiledwriter_1']} for `tiledwriter_1`; all side by side in each repetition.",
        "",
        _table(["configuration", "ms/event median (min-max)", "x RE alone", "spread"], rows),
        "",
        f"- Sidecar vs Publisher-only, same repetition: Tiled up **x{fmt(up['median'])}** "
        f"({fmt(up['min'])}-{fmt(up['max'])}, {_pct(up['median'])}), Tiled down **x{fmt(down['median'])}** "
        f"({fmt(down['min'])}-{fmt(down['max'])}, {_pct(down['median'])}). Target: at most x1.02.",
        f"- CPU the sidecar itself spends per event (daemon + uploader child, /proc): Tiled up "
        f"{fmt_summary(cpu['sidecar_up'])} ms, Tiled down {fmt_summary(cpu['sidecar_down'])} ms, against the "
        f"RunEngine's {fmt(ms['re_alone']['median'])} ms per event of wall time. Documents lost: {c['lost']}.",
        "- CPU of the acquisition process itself per event, sidecar vs Publisher-only (same repetition): "
        + ", ".join(
            f"Tiled {k.removeprefix('sidecar_')} x{fmt_summary(ratios[f'{k}_vs_publisher_acquisition_cpu'])}"
            for k in ("sidecar_up", "sidecar_down")
        )
        + ".",
        "",
        "![RunEngine cost](runengine_cost.png)",
    ]
    return out


def _receive(c: dict[str, Any]) -> list[str]:
    rows = []
    for k, s in c["rate"].items():
        pub = c["publish_rate"].get(k)
        rows.append(
            [
                f"`{k}`",
                fmt_summary(s),
                str(c["lost"][k]),
                str(c["documents"][k]),
                fmt_summary(pub) if pub else "-",
            ]
        )
    fsync = c["ratios"]["fsync_batch_vs_never"]
    out = [
        _table(
            ["path", "documents/s median (min-max)", "lost", "documents sent", "publish rate docs/s"], rows
        ),
        "",
        f"- Daemon (through the proxy) vs the receiver in-process: x{fmt(c['ratios']['daemon_vs_in_process']['median'])}; "
        f"fsync=batch vs fsync=never in-process: x{fmt(fsync['median'])}.",
        "",
        *_profile_lines(c["profile_in_process"], "Profile of the receiver in-process"),
        "",
        "![Receive path](receive_path.png)",
    ]
    return out


def _drain(c: dict[str, Any]) -> list[str]:
    rows = []
    for k in _ordered(c["rows_per_s"], DRAIN_ORDER):
        rows.append(
            [
                f"`{k}`",
                fmt_summary(c["rows_per_s"][k]),
                fmt_summary(c["ratios"][k]),
                fmt(c["client_cpu_seconds"][k]["median"]),
                fmt(c["server_cpu_seconds"][k]["median"]),
                f"{fmt(c['http_requests'][k]['median'])} / {fmt(c['http_wait_seconds'][k]['median'])} s",
                str(c["tiled_5xx_retries"][k]),
            ]
        )
    parity = c["parity"]
    out = [
        f"{c['rows']:,} rows in {c['backlog']['runs']} runs, each configuration into its own container of the same Tiled server.",
        "",
        _table(
            [
                "configuration",
                "rows/s median (min-max)",
                "x in-process",
                "client CPU s",
                "Tiled CPU s",
                "HTTP requests / waiting",
                "Tiled 5xx (forced retries)",
            ],
            rows,
        ),
        "",
        f"- Parity (the parity test's `tree_summary` and row-by-row comparison, sidecar vs in-process, "
        f"{parity['runs_checked']} runs): {'**green**' if parity['green'] else '**RED**: ' + '; '.join(parity['problems'][:5])}.",
        "- Parity of the variants (first run each): "
        + ("green" if not parity.get("variants_problems") else "; ".join(parity["variants_problems"][:5])),
    ]
    if c.get("retry_sample"):
        out.append(f"- A Tiled 5xx seen: `{c['retry_sample'][:200]}`")
    out.append("")
    for config, profile in c.get("profiles", {}).items():
        out += _profile_lines(
            profile,
            f"Profile of `{config}` uploading one run ({fmt(profile['rows'])} rows, {fmt(profile['seconds'])} s)",
        )
        out.append("")
    out.append("HTTP requests per kind, first repetition (count / seconds waiting):")
    out.append("")
    kinds = sorted({kind for per in c["http_by_kind"].values() for kind in per})
    out.append(
        _table(
            ["request", *c["http_by_kind"]],
            [
                [f"`{kind}`"]
                + [
                    f"{per[kind]['count']} / {per[kind]['seconds']:.2f}" if kind in per else "-"
                    for per in c["http_by_kind"].values()
                ]
                for kind in kinds
            ],
        )
    )
    out += ["", "![Backlog drain](backlog_drain.png)"]
    return out


def _latency(c: dict[str, Any]) -> list[str]:
    rows = []
    for k in c["p50"]:
        rows.append(
            [
                f"`{k}`",
                fmt_summary(c["p50"][k]),
                fmt_summary(c["p99"][k]),
                fmt(c["pooled"][k]["p99"]),
                fmt(c["pooled"][k]["max"]),
                str(c["rows_missing"][k]),
                fmt(c["achieved_rate"][k]["median"]),
                fmt(c["poll_seconds"][k]["median"]),
                f"{c.get('upload_failures', {}).get(k, '-')} / {c.get('rewrites', {}).get(k, '-')}",
                fmt(c.get("flush_lag_max", {}).get(k, {}).get("median")),
            ]
        )
    clean = c.get("clean_scans") or {
        k: {
            "n": len(
                xs := [
                    r[k] for r in c["repetitions"] if r[k]["upload_failures"] == 0 and r[k]["p99"] is not None
                ]
            ),
            "p50": summary([x["p50"] for x in xs]),
            "p99": summary([x["p99"] for x in xs]),
        }
        for k in c["p50"]
    }
    clean_rows = [
        [f"`{k}`", f"{v['n']} of {len(c['repetitions'])}", fmt_summary(v["p50"]), fmt_summary(v["p99"])]
        for k, v in clean.items()
    ]
    return [
        f"{c['scan_seconds']:g} s scans per repetition; seconds.",
        "",
        _table(
            [
                "config @ rate",
                "p50 median (min-max)",
                "p99 median (min-max)",
                "p99 pooled",
                "max pooled",
                "rows missing",
                "achieved Hz",
                "poll period s",
                "upload failures / rewrites",
                "uploader flush lag max s",
            ],
            rows,
        ),
        "",
        "Only the scans during which no upload failed (see below):",
        "",
        _table(["config @ rate", "scans", "p50 median (min-max)", "p99 median (min-max)"], clean_rows),
        "",
        "![Live latency](live_latency.png)",
    ]


def _memory(c: dict[str, Any]) -> list[str]:
    r, u = c["receiver_mib"], c["uploader_mib"]
    slope = c["slope_mib_per_100k_documents"]
    return [
        f"{c['events']:,} events in {c['runs']} runs published through the proxy while Tiled was down "
        f"({c['build_rate']:,.0f} docs/s into the spool, {c['lost']} lost), then drained "
        f"({c['drain_rows_per_s']:,.0f} rows/s, first rows {fmt(c['drain_first_row_after_s'])} s after Tiled came up).",
        "",
        _table(
            [
                "process",
                "backlog building: max RSS MiB",
                "draining: max RSS MiB",
                "slope MiB per 100k docs backlogged",
            ],
            [
                [
                    "receiver (daemon)",
                    fmt(r["build"]["max"]),
                    fmt(r["drain"]["max"]),
                    f"{slope['receiver']:+.2f}",
                ],
                [
                    "uploader (child)",
                    fmt(u["build"]["max"]),
                    fmt(u["drain"]["max"]),
                    f"{slope['uploader']:+.2f}",
                ],
            ],
        ),
        "",
        f"- Peak of one process {fmt(c['headline']['peak_process_mib'])} MiB; both together "
        f"{fmt(c['headline']['peak_total_mib'])} MiB; uploader VmHWM {fmt(c['uploader_peak_hwm_mib'])} MiB.",
        "",
        "![Memory](memory.png)",
    ]


def _replay(c: dict[str, Any]) -> list[str]:
    return [
        f"`tiled-writer-sidecar replay` of {c['rows']:,} rows ({c['runs']} runs): "
        f"**{c['rows_per_s']:,.0f} rows/s** ({fmt(c['seconds'])} s uploading, "
        f"{fmt(c['wall_seconds_with_startup'])} s with start-up), peak RSS **{fmt(c['peak_rss_mib'])} MiB**.",
    ]


SECTIONS = {
    "burst": burst.section,
    "scale_out": scale_out.section,
    "live_streaming": live_streaming.section,
    "small_runs": small_runs.section,
    "backlog_live": backlog_live.section,
    "runengine_cost": _runengine,
    "receive_path": _receive,
    "backlog_drain": _drain,
    "live_latency": _latency,
    "memory": _memory,
    "replay": _replay,
}


def _headline(name: str, c: dict[str, Any]) -> str:
    h = c.get("headline", {})
    if name == "runengine_cost":
        share = h.get("sidecar_cpu_share_of_runengine", {})
        return (
            f"sidecar vs Publisher-only: Tiled up x{h['sidecar_up_vs_publisher']:.3f}, down "
            f"x{h['sidecar_down_vs_publisher']:.3f}; sidecar's own CPU = "
            + ", ".join(f"{100 * v:.1f}% ({k.removeprefix('sidecar_')})" for k, v in share.items())
            + " of the RunEngine's time per event"
        )
    if name == "receive_path":
        flow = next((k for k in h["rate_median"] if k.startswith("daemon_flow")), None)
        lost = ", ".join(f"{k.removeprefix('daemon_')} {100 * v:.0f}%" for k, v in h["lost_fraction"].items())
        return f"{fmt(h['rate_median'].get(flow))} docs/s sustained, 0 lost (flow-controlled); lost: {lost}"
    if name == "backlog_drain":
        return (
            f"sidecar x{fmt(h['sidecar_vs_inprocess'])} in-process (best variant x{fmt(h['best_variant_vs_inprocess'])}); "
            f"parity {'green' if h['parity_green'] else 'RED'}"
        )
    if name == "live_latency":
        return "p99 " + ", ".join(f"{k} {fmt(v)} s" for k, v in h["p99_median"].items())
    if name == "memory":
        return f"peak {fmt(h['peak_process_mib'])} MiB per process ({fmt(h['peak_total_mib'])} both); {'flat' if h['flat'] else 'grows'}"
    if name == "replay":
        return f"{fmt(h['rows_per_s'])} rows/s, peak RSS {fmt(h['peak_rss_mib'])} MiB"
    if name == "burst":
        return burst.headline(c)
    if name == "scale_out":
        return scale_out.headline(c)
    if name == "live_streaming":
        return live_streaming.headline(c)
    if name == "small_runs":
        return small_runs.headline(c)
    if name == "backlog_live":
        return backlog_live.headline(c)
    return ""


def write(results: dict[str, Any], path: Path, order: list[str]) -> None:
    comparisons = results.get("comparisons", {})
    machine = results.get("machine", {})
    run = results.get("run", {})
    out = [
        "# Benchmarks: tiled-writer-sidecar vs in-process TiledWriter",
        "",
        "Generated by `make bench` (`python -m benchmarks.run`) from `benchmarks/results.json`; "
        "every configuration of a comparison runs side by side in each repetition and ratios are taken "
        "within a repetition, then summarised as **median (min-max)** over the repetitions.",
        "",
        f"Run: {run.get('started', '?')}, {run.get('reps', '?')} repetition(s), "
        f"{fmt(run.get('seconds'))} s in all{' (SMOKE: tiny sizes, one repetition; not a measurement)' if run.get('smoke') else ''}."
        + (
            f" That run was `{run.get('command')}`: the other comparisons come from earlier runs merged into "
            "`results.json` (each section gives its own duration)."
            if run.get("only")
            else ""
        ),
        "",
        "## Machine",
        "",
        f"- {machine.get('cpus')} CPUs ({machine.get('cpu_model')}), {machine.get('memory_gib')} GiB RAM, "
        f"Linux {machine.get('kernel')}, Python {machine.get('python')}",
        f"- load average at start {machine.get('loadavg_at_start')}, at end {machine.get('loadavg_at_end')} "
        "(the machine is shared: other jobs ran during the benchmarks, so absolute times are noisy; read the ratios)",
        "- " + ", ".join(f"{k} {v}" for k, v in machine.get("packages", {}).items()),
        "- Tiled: `tiled serve catalog` with SQLite catalog and SQLite tables on the local disk (the test fixture `TiledServer`)",
        "",
        "## Summary",
        "",
    ]
    rows = []
    for name in order:
        c = comparisons.get(name)
        if c is None:
            rows.append([name, "not run", "", "-"])
            continue
        if c.get("status") != "ok":
            rows.append(
                [c.get("title", name), f"FAILED: {c.get('error', '')[:120]}", c.get("target", ""), "-"]
            )
            continue
        rows.append(
            [c["title"], _headline(name, c), c["target"], _ok(c.get("headline", {}).get("target_met"))]
        )
    out += [_table(["comparison", "result (median)", "target", "met"], rows), ""]
    plots = {
        "runengine_cost": plot_runengine,
        "receive_path": plot_receive,
        "backlog_drain": plot_drain,
        "live_latency": plot_latency,
    }
    for i, name in enumerate(order, 1):
        c = comparisons.get(name)
        if c is None or c.get("status") != "ok":
            continue
        took = (
            f"Took {fmt(c['seconds'])} s."
            if c.get("seconds") is not None
            else "Merged from standalone runs (listed below)."
        )
        out += [f"## {i}. {c['title']}", "", f"Target: {c['target']}. {took}", ""]
        try:
            out += SECTIONS[name](c)
            if name in plots:
                plots[name](c, path.with_name(f"{name}.png"))
            if name == "memory":
                plot_memory(c, comparisons.get("replay"), path.with_name("memory.png"))
        except (KeyError, TypeError, ValueError, IndexError) as err:
            out += [f"(cannot show these results: {type(err).__name__}: {err}; rerun this comparison)"]
        try:
            analysis = ANALYSIS[name](c, comparisons)
        except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError, StopIteration) as err:
            analysis = [f"(no analysis: {type(err).__name__}: {err})"]
        if analysis:
            out += ["", "**What limits it**", "", *analysis]
        out.append("")
    out += ["## Closing note", "", *_closing(comparisons)]
    path.write_text("\n".join(out) + "\n")


# --------------------------------------------------------------------- analysis


def _median(s: dict[str, Any]) -> float:
    return float(s["median"])


def _an_runengine(c: dict[str, Any], _all: dict[str, Any]) -> list[str]:
    r = c["ratios"]
    cpu = c["sidecar_cpu_ms_per_event"]
    re_ms = _median(c["ms_per_event"]["re_alone"])
    spread = max(
        r["sidecar_up_vs_publisher"]["spread_pct"] or 0, r["sidecar_down_vs_publisher"]["spread_pct"] or 0
    )
    acq = {k: _median(r[f"{k}_vs_publisher_acquisition_cpu"]) for k in ("sidecar_up", "sidecar_down")}
    return [
        f"- The sidecar-vs-Publisher wall-time ratios move by up to {spread:.0f}% between repetitions: on this "
        "shared 2-core machine one repetition cannot resolve 2%; the median over repetitions is the figure "
        "compared with the target.",
        "- The sidecar runs in other processes: the acquisition process's own CPU per event with it is "
        f"x{acq['sidecar_up']:.3f} (Tiled up) and x{acq['sidecar_down']:.3f} (Tiled down) Publisher-only's. "
        "It can only slow the RunEngine by taking a core the RunEngine needs: it spends "
        f"{_median(cpu['sidecar_down']):.3f} ms of CPU per event with Tiled down and "
        f"{_median(cpu['sidecar_up']):.3f} ms with Tiled up (receiver + uploader; the Tiled server's work comes on "
        f"top), {100 * _median(cpu['sidecar_down']) / re_ms:.1f}% / {100 * _median(cpu['sidecar_up']) / re_ms:.1f}% "
        f"of one core at the RunEngine's {re_ms:.2f} ms/event.",
        f"- In-process TiledWriter: batch 10000 x{fmt(_median(r['tiledwriter_10000']))}, batch 1 "
        f"x{fmt(_median(r['tiledwriter_1']))} the RunEngine alone (issue: x1.25 and x27 on an idle machine).",
    ]


def _an_receive(c: dict[str, Any], _all: dict[str, Any]) -> list[str]:
    reps = c["repetitions"]
    bursts = [k for k in c["rate"] if k.startswith("daemon_burst")]
    flow = next(k for k in c["rate"] if k.startswith("daemon_flow"))
    before = sum(r[k]["lost_before_receiver"] for r in reps for k in bursts)
    lost = sum(c["lost"][k] for k in bursts)
    sent = sum(c["documents"][k] for k in bursts)
    us = sorted(r[flow]["daemon_cpu_us_per_document"] for r in reps)
    us_med = us[len(us) // 2]
    prof = c["profile_in_process"]
    inc = {k.split(" ")[0]: 100 * v / prof["total_s"] for k, v in prof["inclusive_s"].items()}
    top = prof["top_self"][0]
    return [
        f"- Bursts without pause lose {100 * lost / sent:.0f}% of their documents, and {before} of those {lost} never "
        "reached the receiver (its message counter equals what it spooled): pre-pickled frames sent at "
        + ", ".join(fmt(_median(c["publish_rate"][k])) for k in bursts)
        + " messages/s, "
        "bluesky's Publisher and `bluesky-0MQ-proxy` drop beyond 0MQ's default high-water mark of 1,000 "
        "messages (the sidecar's own RCVHWM is 1,000,000). The sidecar cannot get these back; the proxy would "
        "need a higher HWM (it has no option for it) or the publisher must not outrun the subscriber.",
        *_publisher_bursts(c),
        f"- Flow-controlled (nothing lost): {fmt(_median(c['rate'][flow]))} docs/s. The limit is the receiver's CPU: "
        f"{us_med:.0f} us of CPU per document (daemon, measured from /proc), i.e. at most ~{1e6 / us_med:,.0f} docs/s "
        f"with a whole free core; in-process the receiver alone does {fmt(_median(c['rate']['in_process_batch']))} "
        "docs/s here (with other jobs on 2 cores it rarely gets a whole core). Where its time goes: "
        f"decoding {inc.get('decode', 0):.0f}%, schema validation {inc.get('validate', 0):.0f}%, framing and writing "
        f"{inc.get('append', 0):.0f}%; the first function by self time is `{top['function']}` "
        f"({100 * top['self_s'] / prof['total_s']:.0f}%). "
        f"fsync=batch vs never in-process: x{fmt(_median(c['ratios']['fsync_batch_vs_never']))}.",
    ]


def _publisher_bursts(c: dict[str, Any]) -> list[str]:
    """What bursts through bluesky's own Publisher (pickling each document) lost, and where."""
    keys = [k for k in c["rate"] if k.startswith("daemon_publisher_burst")]
    if not keys:
        return []
    reps = c["repetitions"]
    lost = sum(c["lost"][k] for k in keys)
    before = sum(r[k]["lost_before_receiver"] for r in reps for k in keys)
    sent = sum(c["documents"][k] for k in keys)
    pub = ", ".join(f"{fmt(_median(c['publish_rate'][k]))}" for k in keys)
    why = (
        ": with the publisher, the proxy and the daemon sharing 2 cores, the proxy's 1,000-message queues "
        "overflow when it does not get a core in time."
        if before
        else "."
    )
    return [
        f"- Through bluesky's `Publisher` (it pickles each document, {pub} docs/s published) bursts lose "
        f"{lost} of {sent} documents ({100 * lost / sent:.2f}%), {before} of them before the receiver{why}"
    ]


def _an_drain(c: dict[str, Any], _all: dict[str, Any]) -> list[str]:
    keys = (
        "upload_seconds",
        "client_cpu_seconds",
        "http_wait_seconds",
        "server_cpu_seconds",
        "http_requests",
    )
    m = {k: {key: _median(c[key][k]) for key in keys} for k in c["rows_per_s"]}
    ip, sc = m["inprocess"], m["sidecar"]
    pin = c["profiles"]["inprocess"]
    psc = c["profiles"]["sidecar"]

    def share(profile: dict[str, Any], label: str) -> float:
        return 100 * profile["inclusive_s"].get(label, 0.0) / profile["total_s"]

    js = "jsonschema validation (event_model schema_validators)"
    return [
        f"- In-process TiledWriter is CPU-bound in the client: {ip['client_cpu_seconds']:.1f} s of CPU for "
        f"{ip['upload_seconds']:.1f} s of wall time; its profile puts {share(pin, js):.0f}% in jsonschema validation "
        f"of every document by `RunNormalizer` (deepcopy {share(pin, 'copy.deepcopy'):.0f}%).",
        "- The sidecar validates each document once, with compiled validators (receiver and `FastRunNormalizer`): "
        f"{sc['client_cpu_seconds']:.1f} s of client CPU. Its wall time ({sc['upload_seconds']:.1f} s) is that CPU plus "
        f"{sc['http_wait_seconds']:.1f} s waiting for {sc['http_requests']:.0f} HTTP requests, one after the other (the "
        f"Tiled server used {sc['server_cpu_seconds']:.1f} s of CPU, "
        f"{1000 * sc['server_cpu_seconds'] / sc['http_requests']:.0f} ms per request; the rest of each wait is SQLite "
        "commits and the loaded machine). Neither side is saturated: the limit is sequential round-trips.",
        "- Its profile on one run: `RunNormalizer.event`'s `copy.deepcopy` "
        f"{share(psc, 'copy.deepcopy'):.0f}% (the sidecar hands it documents nobody else holds, so the copy is "
        f"the same object), HTTP {share(psc, 'HTTP requests (httpx Client.send)'):.0f}%, verification "
        f"{share(psc, 'uploader verification (_verify)'):.0f}% (one Arrow request per stream for its seq_num "
        f"column), reading the spool {share(psc, 'reading the spool (LogReader.read)'):.0f}%.",
        "- Several runs at once (2 uploader threads) + batch 50,000 gives "
        f"x{fmt(_median(c['ratios']['sidecar_all_ideas']))}; SQLite-backed Tiled answers concurrent appends with "
        f'500 "database is locked" ({c.get("tiled_log_database_is_locked", "n/a")} in the server log), which the '
        f"uploader retries in place ({c.get('append_retries', {}).get('sidecar_all_ideas', 0)} append retries; "
        f"parity of the variants {'green' if not c['parity'].get('variants_problems') else 'RED'}). Not the default: "
        "one writer at a time keeps the server's lock free for readers.",
    ]


def _an_latency(c: dict[str, Any], _all: dict[str, Any]) -> list[str]:
    failures = sum(c.get("upload_failures", {}).values())
    rewrites = sum(c.get("rewrites", {}).values())
    lag = c.get("flush_lag_max", {})
    lags = ", ".join(f"{k} {fmt(v.get('median'))} s" for k, v in lag.items() if v.get("median") is not None)
    return [
        "- A row is readable at best `batch_seconds` after the first row of its batch was spooled, plus one "
        "append round-trip: with `batch_seconds = 1.0` (the default before 0.5) the p99 at 10 Hz cannot be under 1 s.",
        "- The uploader's own flush lag (oldest row of each flush, no reader involved), median of the per-scan "
        f"maxima: {lags or 'n/a'}.",
        f"- Upload failures during the scans: {failures}, run rewrites: {rewrites}. Against SQLite-backed Tiled a "
        'client reading the table while the sidecar appends can make the append fail with 500 "database is '
        "locked\"; the uploader retries that append in place after reading the table's `seq_num` column "
        f"({sum(c.get('append_retries', {}).values())} appends retried in place) and rewrites a run only when it "
        "cannot tell whether a failed append landed.",
    ]


def _an_memory(c: dict[str, Any], _all: dict[str, Any]) -> list[str]:
    u = c["uploader_mib"]
    return [
        f"- The receiver stays at {fmt(c['receiver_mib']['build']['max'])} MiB whatever the backlog (slope "
        f"{c['slope_mib_per_100k_documents']['receiver']:+.2f} MiB per 100,000 documents): flat.",
        f"- The uploader child idles at {fmt(u['build']['max'])} MiB before it uploads anything: that is its "
        "imports. TiledWriter's module imports tiled's array and dataframe clients and bluesky-tiled-plugins' "
        "catalog classes, hence pandas, pyarrow, dask.array and xarray (each measured alone: pandas 133 MiB, "
        "dask.array 229 MiB, xarray 145 MiB, overlapping). The optional sparse/numba that dask would also import "
        "are kept out (`process_defaults`: idle 274 -> 222 MiB measured). "
        f"Draining adds {fmt(u['drain']['max'] - u['build']['max'])} MiB (a 10,000-row batch as Arrow and pandas). "
        "The target is met by the receiver; the uploader misses it by its imports, not by the backlog: its RSS "
        "does not grow with the backlog.",
    ]


def _an_replay(c: dict[str, Any], all_: dict[str, Any]) -> list[str]:
    drain = all_.get("memory", {}).get("drain_rows_per_s")
    return [
        "- Same uploader as the daemon; runs of 100,000 rows amortise the per-run round-trips, hence "
        f"{fmt(c['rows_per_s'])} rows/s here against the 20,000-row runs of comparison 3"
        + (f" (the daemon drained the same backlog at {fmt(drain)} rows/s)." if drain else "."),
        f"- Peak RSS {fmt(c['peak_rss_mib'])} MiB: the uploader's import footprint plus one batch.",
    ]


ANALYSIS = {
    "burst": burst.analysis,
    "scale_out": scale_out.analysis,
    "live_streaming": live_streaming.analysis,
    "small_runs": small_runs.analysis,
    "backlog_live": backlog_live.analysis,
    "runengine_cost": _an_runengine,
    "receive_path": _an_receive,
    "backlog_drain": _an_drain,
    "live_latency": _an_latency,
    "memory": _an_memory,
    "replay": _an_replay,
}


def _closing(comparisons: dict[str, Any]) -> list[str]:
    lines = []
    c = comparisons.get("runengine_cost", {})
    if c.get("status") == "ok":
        h = c["headline"]
        lines.append(
            f"- RunEngine cost: sidecar vs Publisher-only x{h['sidecar_up_vs_publisher']:.3f} (Tiled up), "
            f"x{h['sidecar_down_vs_publisher']:.3f} (Tiled down); in-process TiledWriter "
            f"x{fmt(_median(c['ratios']['tiledwriter_10000']))} (batch 10000) and "
            f"x{fmt(_median(c['ratios']['tiledwriter_1']))} (batch 1) vs the RunEngine alone. Target <= x1.02: "
            + ("met" if h["target_met"] else "not met")
            + "; the acquisition process's own CPU per event with the sidecar vs Publisher-only: "
            + ", ".join(f"x{v:.3f} ({k})" for k, v in h["acquisition_cpu_vs_publisher"].items())
            + "; the sidecar's CPU per event is "
            + ", ".join(
                f"{100 * v:.1f}% ({k})" for k, v in h.get("sidecar_cpu_share_of_runengine", {}).items()
            )
            + " of a core at the RunEngine's rate."
        )
    c = comparisons.get("receive_path", {})
    if c.get("status") == "ok":
        flow = next(k for k in c["rate"] if k.startswith("daemon_flow"))
        lines.append(
            f"- Receive path: {fmt(_median(c['rate'][flow]))} docs/s sustained with 0 lost "
            f"(x{_median(c['rate'][flow]) / 50000:.2f} the 50,000 target); bursts without pause lose "
            + ", ".join(
                f"{k.removeprefix('daemon_')} {100 * v:.0f}%"
                for k, v in c["headline"]["lost_fraction"].items()
                if v
            )
            + " before the receiver (0MQ high-water marks upstream)."
        )
    c = comparisons.get("backlog_drain", {})
    if c.get("status") == "ok":
        lines.append(
            f"- Backlog drain: sidecar x{fmt(_median(c['ratios']['sidecar']))} in-process TiledWriter "
            f"({fmt(_median(c['rows_per_s']['sidecar']))} vs {fmt(_median(c['rows_per_s']['inprocess']))} rows/s), "
            f"x{fmt(_median(c['ratios']['sidecar_all_ideas']))} with 2 threads and batch 50,000; target x5; "
            f"parity {'green' if c['parity']['green'] else 'RED'}."
        )
    c = comparisons.get("live_latency", {})
    if c.get("status") == "ok":
        lines.append(
            "- Live latency p99 (median of repetitions): "
            + ", ".join(f"{k} {fmt(v)} s" for k, v in c["headline"]["p99_median"].items())
            + "; targets 1 s at 10 Hz, 2 s at 200 Hz."
        )
    c = comparisons.get("memory", {})
    if c.get("status") == "ok":
        lines.append(
            f"- Memory: receiver {fmt(c['receiver_mib']['build']['max'])} MiB flat; uploader "
            f"{fmt(c['uploader_mib']['build']['max'])} MiB idle, {fmt(c['uploader_mib']['drain']['max'])} MiB draining "
            f"(target 250 MiB); the 1M-event backlog drained at {fmt(c['drain_rows_per_s'])} rows/s."
        )
    c = comparisons.get("replay", {})
    if c.get("status") == "ok":
        lines.append(
            f"- Replay of 1M events: {fmt(c['rows_per_s'])} rows/s, peak RSS {fmt(c['peak_rss_mib'])} MiB."
        )
    c = comparisons.get("burst", {})
    if c.get("status") == "ok":
        lines.append(burst.closing(c))
    c = comparisons.get("scale_out", {})
    if c.get("status") == "ok":
        lines.append(scale_out.closing(c))
    c = comparisons.get("live_streaming", {})
    if c.get("status") == "ok":
        lines.append(live_streaming.closing(c))
    c = comparisons.get("small_runs", {})
    if c.get("status") == "ok":
        lines.append(small_runs.closing(c))
    return lines or ["(nothing ran)"]
