"""`tiled-writer-sidecar monitor`: a live view of acquisition and of the sidecar.

A second subscriber on the proxy's out-address, independent of the sidecar
(either one runs without the other), in three threads:

- decode (`Subscriber`): reads 0MQ frames from a `subscription.Subscription`
  (unpaced here), decodes them with `wire.decode_message` and feeds
  `monitor.state.MonitorState`; the subscription's connection events become
  the connection state (connecting / connected / disconnected / error).
- health (`HealthPoller`): polls the sidecar's ``/healthz`` once a second;
  a refused connection or a timeout is shown as "sidecar down", not raised.
- main: renders `MonitorState.snapshot()` with rich at `FRAMES_PER_SECOND`;
  if the terminal blocks, only frames are skipped. The layout fits the
  terminal: on a short one (80x24) the run and sidecar panels are compact
  and the run history gets the lines left. ``q`` (or Ctrl+C) quits.

``--once`` listens for ``--seconds`` (or until SIGINT/SIGTERM), prints one
snapshot (``--json``: the snapshot dict), exits 0, and logs run starts/stops
and connection changes to stderr. Expected trouble never shows a traceback.
An exception while decoding or accounting for one message is confined to it
(counted); everything shown passes `text.clean` and reaches rich only as
plain `Text`; a frame that cannot be rendered becomes an error line. Why
three threads, and sizes left to the decoder: docs/design.md, "The receive
side: three parts, composed once".
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import signal
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from itertools import islice
from types import FrameType
from typing import Any

import httpx
import zmq
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from tiled_writer_sidecar.config import Config, ZmqConfig
from tiled_writer_sidecar.errors import ConfigError, RejectedMessage
from tiled_writer_sidecar.logs import TextFormatter
from tiled_writer_sidecar.receive.subscription import Subscription
from tiled_writer_sidecar.states import HealthStatus, counted
from tiled_writer_sidecar.text import clean, rich_text
from tiled_writer_sidecar.tools.monitor.state import MonitorState, sidecar_state

log = logging.getLogger(__name__)

FRAMES_PER_SECOND = 4.0
HEALTH_INTERVAL_S = 1.0
HEALTH_TIMEOUT_S = 2.0
POLL_MS = 100

Decoder = Callable[..., tuple[str, dict[str, Any]]]


def health_url(sidecar: str | None, metrics_address: str) -> str:
    """The /healthz URL from `--sidecar` (URL or host:port) or `[metrics] address`."""
    url = sidecar or metrics_address
    if "://" not in url:
        url = "http://" + url
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--sidecar must look like http://HOST:PORT, not {sidecar or url!r}")
    if parts.path in ("", "/"):
        url = url.rstrip("/") + "/healthz"
    return url


# ------------------------------------------------------------------ threads
class Subscriber:
    """The decode thread: `Subscription` -> decode -> `MonitorState.feed`."""

    def __init__(self, config: ZmqConfig, state: MonitorState, decode: Decoder | None = None) -> None:
        if decode is None:
            from tiled_writer_sidecar.documents.wire import decode_message

            decode = decode_message
        self.config = config
        self.state = state
        self.decode = decode
        self.prefix = config.prefix.encode()
        self.stopping = threading.Event()
        self._got_message = False
        self._connected = False
        self._connects = 0
        self._retries = 0
        self._problem: str | None = None
        try:
            self.subscription = Subscription(config, pace=False)
        except zmq.ZMQError as err:
            raise ConfigError(f"cannot subscribe to {config.address}: {err}") from None
        self.thread = threading.Thread(target=self._run, name="monitor-decode", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        if self.thread.ident is not None:
            self.thread.join(timeout=5)
        if not self.thread.is_alive():
            self.subscription.close()

    def _run(self) -> None:
        subscription = self.subscription
        while not self.stopping.is_set():
            try:
                subscription.watch()
                self._follow_connection()
                if subscription.wait(POLL_MS):
                    subscription.drain(self.handle)
            except Exception as err:  # noqa: BLE001 - the view must outlive any surprise
                self.state.error(f"decode thread: {type(err).__name__}: {err}")
                log.warning("monitor decode thread: %s: %s", type(err).__name__, clean(err))
                self.stopping.wait(0.1)

    def _follow_connection(self) -> None:
        """Turn the subscription's connection state into the monitor's (and its log lines)."""
        subscription, address = self.subscription, self.config.address
        new = subscription.connects - self._connects
        self._connects = subscription.connects
        for n in range(new):
            if self._connected or n > 0:  # a reconnection: the proxy went away in between
                self._went_away()
            self._connected, self._got_message = True, False
            self.state.set_connection("connected")
            log.info("connected to proxy %s", address)
        if self._connected and not subscription.connected:
            self._went_away()
        if subscription.problem and subscription.problem != self._problem:
            self.state.set_connection("error", f"{subscription.problem} (check the CURVE keys)")
        self._problem = subscription.problem
        retried, self._retries = subscription.retries != self._retries, subscription.retries
        if retried and not self._connected and self.state.connection == "connecting":
            self.state.set_connection(
                "connecting", "nothing listens there yet (is bluesky-0MQ-proxy running?)"
            )

    def _went_away(self) -> None:
        self._connected = False
        self.state.set_connection("disconnected", "proxy went away; reconnecting")
        log.warning("proxy %s went away; reconnecting", self.config.address)

    def handle(self, frames: list[bytes]) -> None:
        """Decode one message and account for it (never raises for bad input)."""
        self.state.note_message(sum(len(f) for f in frames))
        if not self._got_message:
            self._got_message = True
            log.info("receiving from proxy %s", self.config.address)
        try:
            name, doc = self.decode(
                frames,
                serializer=self.config.serializer,
                prefix=self.prefix,
                max_bytes=self.config.max_message_bytes,
            )
        except RejectedMessage as rejected:
            if counted(rejected.reason):
                self.state.reject(rejected.reason)
            return
        except Exception as err:  # noqa: BLE001 - a decoder surprise costs one message, not the view
            self.state.reject("decode-error")
            self.state.error(f"decode: {type(err).__name__}: {err}")
            return
        self.state.feed(name, doc)
        if name in ("start", "stop"):
            self._log_run(name, doc)

    def _log_run(self, name: str, doc: Mapping[str, Any]) -> None:
        if name == "start":
            log.info(
                "run start uid=%s scan_id=%s plan=%s",
                clean(doc.get("uid")),
                clean(doc.get("scan_id")),
                clean(doc.get("plan_name")),
            )
        else:
            log.info(
                "run stop uid=%s exit_status=%s num_events=%s",
                clean(doc.get("run_start")),
                clean(doc.get("exit_status")),
                _brief(doc.get("num_events")),
            )


def _brief(mapping: Any, items: int = 16) -> str:
    """The first `items` entries of a document's mapping as ``{key: value, ...}``, cleaned."""
    if not isinstance(mapping, Mapping):
        return clean(type(mapping).__name__)
    shown = ", ".join(f"{clean(k, 64)}: {clean(v, 24)}" for k, v in islice(mapping.items(), items))
    return "{" + shown + (", …}" if len(mapping) > items else "}")


class HealthPoller:
    """The health thread: GET the sidecar's /healthz every `interval` seconds."""

    def __init__(
        self,
        url: str,
        state: MonitorState,
        *,
        interval: float = HEALTH_INTERVAL_S,
        timeout: float = HEALTH_TIMEOUT_S,
    ) -> None:
        self.url = url
        self.state = state
        self.interval = interval
        self.timeout = timeout
        self.stopping = threading.Event()
        self.polled = threading.Event()
        self.thread = threading.Thread(target=self._run, name="monitor-health", daemon=True)
        self._last_state = ""

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        if self.thread.ident is not None:
            self.thread.join(timeout=self.timeout + 5)

    def _run(self) -> None:
        with self._client() as client:
            while True:
                self._poll_safely(client)
                if self.stopping.wait(self.interval):
                    return

    def _client(self) -> httpx.Client:
        return httpx.Client(timeout=self.timeout, trust_env=False)

    def poll_now(self) -> None:
        """One poll in the calling thread (the final one of `--once`)."""
        with self._client() as client:
            self._poll_safely(client)

    def _poll_safely(self, client: httpx.Client) -> None:
        try:
            self.poll_once(client)
        except Exception as err:  # noqa: BLE001 - shown on screen, never raised
            self.state.set_health(None, f"{type(err).__name__}: {err}")
        self.polled.set()

    def poll_once(self, client: httpx.Client) -> None:
        try:
            response = client.get(self.url)
        except httpx.ConnectError:
            self._down("nothing listens there (sidecar not running?)")
            return
        except httpx.TimeoutException:
            self._down(f"no answer within {self.timeout:g} s")
            return
        except httpx.HTTPError as err:
            self._down(f"{type(err).__name__}: {err}")
            return
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            self._down(f"HTTP {response.status_code}: not a sidecar /healthz answer")
            return
        self.state.set_health(body)
        status = body.get("status")
        detail = body.get("warnings") if status == HealthStatus.DEGRADED else body.get("reasons")
        self._transition(sidecar_state(status), str(detail or ""))

    def _down(self, error: str) -> None:
        self.state.set_health(None, error)
        self._transition("down", error)

    def _transition(self, state: str, detail: str) -> None:
        if state != self._last_state:
            self._last_state = state
            log.info("sidecar %s at %s%s", state, self.url, f": {detail}" if state != "up" else "")


# ---------------------------------------------------------------- rendering
# Every value below comes from documents, the wire or /healthz: it is shown with
# `text.rich_text` / `text.clean` as plain rich `Text` (never a markup string), and the
# formatting helpers accept any value (a hostile /healthz body, inf, 10**400).
BLOCKS = " ▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float], width: int, height: int = 1) -> list[str]:
    """The last `width` values as `height` rows of block characters (top row first)."""
    values = [v for v in list(values)[-width:] if math.isfinite(v)] if width > 0 else []
    if not values:
        return [""] * height
    lo, hi = min(values), max(values)
    steps = 8 * height
    span = hi - lo
    if not math.isfinite(span):  # values near ±max float: scale them down first
        values = [v / 4 for v in values]
        lo, hi, span = lo / 4, hi / 4, hi / 4 - lo / 4
    levels = [steps // 2 if span == 0 else 1 + round((v - lo) / span * (steps - 1)) for v in values]
    rows = []
    for row in range(height):
        base = (height - 1 - row) * 8
        rows.append("".join(BLOCKS[max(0, min(8, level - base))] for level in levels))
    return rows


def _number(value: Any) -> float | None:
    """`value` as a finite float, or None (any other value, a bool, inf, NaN, an int too big)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _duration(seconds: Any) -> str:
    value = _number(seconds)
    if value is None or value > 1e9:
        return "-"
    value = max(0.0, value)
    if value < 10:
        return f"{value:.1f} s"
    s = int(value)
    if s < 3600:
        return f"{s // 60}:{s % 60:02d}"
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _clock(epoch: Any) -> str:
    value = _number(epoch)
    if not value:
        return "-"
    try:
        return time.strftime("%H:%M:%S", time.localtime(value))
    except (OverflowError, OSError, ValueError):
        return "-"


def _size(n: Any) -> str:
    value = _number(n)
    if value is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if abs(value) < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"  # pragma: no cover - GB ends the loop


def _rate(value: Any) -> str:
    number = _number(value)
    if number is None:
        return "-"
    return f"{number:.0f}" if number >= 100 else f"{number:.1f}"


def _count(value: Any) -> str:
    """A count with thousands separators; anything that is not a number, cleaned."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 10**30:
        return f"{value:,}"
    return clean(value, 40)


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return clean(value, 80)


_STATE_STYLE = {
    "connected": "green",
    "up": "green",
    "success": "green",
    "running": "cyan",
    "connecting": "yellow",
    "unknown": "yellow",
    "unhealthy": "red",
    "degraded": "yellow",
    "not_tiled": "red",
    "down": "red",
    "disconnected": "red",
    "error": "red",
    "abort": "yellow",
    "unauthorized": "red",
    "fail": "red",
}


def _style(state: Any, default: str = "") -> str:
    return _STATE_STYLE.get(state, default) if isinstance(state, str) else default


def _badge(state: Any) -> Text:
    return rich_text(f"● {clean(state, 40)}", style=_style(state, "white"))


def _get(mapping: Any, key: str, default: Any = None) -> Any:
    """`mapping[key]` if `mapping` is a dict holding it (a /healthz body may be anything)."""
    return mapping.get(key, default) if isinstance(mapping, Mapping) else default


def render_header(snap: Mapping[str, Any]) -> RenderableType:
    z = snap["zmq"]
    line = Text.assemble(
        ("tiled-writer-sidecar monitor  ", "bold"),
        f"proxy {clean(z['address'])} ",
        _badge(z["connection"]),
        f" for {_duration(snap['time'] - z['since'])}",
    )
    if z["connection"] != "connected" and z["detail"]:
        line.append(f" — {clean(z['detail'], 300)}", style="yellow")
    rejected = sum(z["rejected"].values())
    line.append(f"   {_count(z['messages'])} messages, {_size(z['bytes'])}")
    if rejected:
        reasons = ", ".join(f"{n} {clean(r, 64)}" for r, n in z["rejected"].items())
        line.append(f", rejected: {reasons}", style="yellow")
    if z["orphans"]:
        line.append(f", {z['orphans']} from runs started before the monitor", style="dim")
    if z["errors"]:
        line.append(f", monitor errors: {z['errors']} ({clean(z['last_error'], 300)})", style="red")
    return line


def render_run(snap: Mapping[str, Any], plot_width: int = 60, *, compact: bool = False) -> RenderableType:
    run = snap["run"]
    if run is None:
        return Panel(Text("waiting for a run to start…", style="dim"), title="run")
    parts: list[RenderableType] = []
    parts.append(
        Text.assemble(
            ("scan_id ", "dim"),
            (clean(run["scan_id"], 80), "bold"),
            ("   plan ", "dim"),
            clean(run["plan_name"], 80),
            ("   uid ", "dim"),
            clean(run["uid"], 256),
        )
    )
    status = Text.assemble(
        ("started ", "dim"),
        _clock(run["start_time"]),
        ("   elapsed ", "dim"),
        _duration(run["elapsed_seconds"]),
        "   ",
        _badge(run["state"]),
    )
    if run["reason"]:
        status.append(f"  {clean(run['reason'], 200)}", style="yellow")
    parts.append(status)

    streams = Table(box=None, pad_edge=False, expand=False)
    for column, justify in (
        ("stream", "left"),
        ("events", "right"),
        ("rate/s", "right"),
        ("last seq_num", "right"),
        ("gaps", "right"),
    ):
        streams.add_column(column, justify=justify)  # type: ignore[arg-type]
    for name, s in run["streams"].items():
        rate = s["rate"] if run["state"] == "running" else s["mean_rate"]
        gaps = rich_text(s["gaps"], style="bold red" if s["gaps"] else "")
        streams.add_row(
            rich_text(name, limit=64),
            rich_text(s["events"]),
            rich_text(_rate(rate)),
            rich_text(s["last_seq_num"]),
            gaps,
        )
    parts.append(streams)

    latest = [(k, v) for s in run["streams"].values() for k, v in s.get("latest", {}).items()]
    if latest and not compact:
        grid = Table.grid(padding=(0, 2))
        per_row = 4
        for _ in range(per_row):
            grid.add_column()
        for i in range(0, len(latest[:24]), per_row):
            cells = [
                Text.assemble((f"{clean(k, 80)} ", "dim"), _value(v)) for k, v in latest[i : i + per_row]
            ]
            grid.add_row(*cells)
        parts.append(grid)

    plot = snap["plot"]
    if plot["key"] and plot["values"]:
        values = plot["values"]
        rows = sparkline(values, plot_width, height=1 if compact else 3)
        parts.append(
            Text.assemble(
                ("plot ", "dim"),
                (clean(plot["key"], 80), "bold"),
                f"  last {_value(values[-1])}  min {_value(min(values))}  max {_value(max(values))}",
                (f"  ({plot['count']} points)", "dim"),
            )
        )
        parts.append(Text("\n".join(rows), style="cyan"))
    elif plot["key"]:
        parts.append(rich_text(f"plot {clean(plot['key'], 80)}: no values yet", style="dim"))
    return Panel(Group(*parts), title="run", title_align="left")


def render_sidecar(snap: Mapping[str, Any], *, compact: bool = False) -> RenderableType:
    side = snap["sidecar"]
    lines: list[Text] = [] if compact else [rich_text(side["url"], style="dim")]
    state = side["state"]
    since = side["since"]
    head = Text.assemble(("sidecar ", "bold"), _badge(state))
    if since is not None:
        head.append(f" since {_clock(since)} ({_duration(snap['time'] - since)})")
    lines.append(head)
    health = side["health"]
    if state == "down":
        lines.append(rich_text(side["error"] or "no answer", style="red", limit=300))
    if health is not None:
        for key, style in (("reasons", "red"), ("warnings", "yellow")):
            found = _get(health, key)
            if found:
                shown = "; ".join(clean(r) for r in found[:10]) if isinstance(found, list) else clean(found)
                lines.append(rich_text(shown, style=style, limit=1000))
        tiled = _get(health, "tiled") or {}
        tiled_line = Text.assemble(("Tiled ", "dim"), _badge(_get(tiled, "state", "unknown")))
        tiled_since = _number(_get(tiled, "since"))
        if tiled_since is not None:
            tiled_line.append(f" since {_clock(tiled_since)} ({_duration(snap['time'] - tiled_since)})")
        if compact:
            head.append("   ")
            head.append_text(tiled_line)
        else:
            lines.append(tiled_line)
        spool = _get(health, "spool") or {}
        lines.append(
            Text.assemble(
                ("backlog ", "dim"),
                f"{_count(_get(spool, 'backlog_documents', 0))} documents, "
                f"{_size(_get(spool, 'backlog_bytes'))} in {_count(_get(spool, 'backlog_runs', 0))} run(s); "
                f"oldest {_duration(_get(spool, 'oldest_unuploaded_age_seconds'))}",
            )
        )
        upload = _get(health, "upload") or {}
        lines.append(
            Text.assemble(
                ("upload ", "dim"),
                f"{_rate(side['upload_rows_per_second'])} rows/s, "
                f"{_rate(side['upload_documents_per_second'])} docs/s "
                f"({_count(_get(upload, 'documents', 0))} documents, "
                f"{_count(_get(upload, 'rows', 0))} rows in total)",
            )
        )
        lag = Text.assemble(("event→Tiled lag ", "dim"), _duration(_get(upload, "last_lag_seconds")))
        if compact:
            lines[-1].append("   ")
            lines[-1].append_text(lag)
        else:
            lines.append(lag)
        receiver = _get(health, "receiver") or {}
        if not compact:
            lines.append(
                Text.assemble(
                    ("receiver ", "dim"),
                    f"{_count(_get(receiver, 'messages', 0))} messages, "
                    f"gaps {_count(_get(receiver, 'gaps', 0))}, dropped {_count(_get(receiver, 'dropped', 0))}",
                )
            )
        error = _get(tiled, "last_error")
        if error or not compact:
            lines.append(
                Text.assemble(
                    ("last error ", "dim"), (clean(error, 300) if error else "-", "red" if error else "")
                )
            )
    return Panel(Group(*lines), title="sidecar", title_align="left")


def render_runs(snap: Mapping[str, Any], limit: int = 8, *, wide: bool = True) -> RenderableType:
    sidecar_runs: dict[Any, Any] = {}
    runs = _get(snap["sidecar"]["health"], "runs")
    if isinstance(runs, list):
        sidecar_runs = {clean(r.get("uid"), 256): r for r in runs if isinstance(r, Mapping)}
    table = Table(box=None, pad_edge=False, expand=True)
    columns = [
        ("scan_id", "right"),
        ("uid", "left"),
        ("plan", "left"),
        ("started", "left"),
        ("duration", "right"),
        ("exit", "left"),
        ("events", "left"),
        ("gaps", "right"),
        ("sidecar", "left"),
    ]
    if not wide:
        columns = [c for c in columns if c[0] not in ("started", "duration")]
    for column, justify in columns:
        table.add_column(column, justify=justify, no_wrap=column != "events")  # type: ignore[arg-type]
    for run in snap["runs"][:limit]:
        events = " ".join(f"{clean(k, 64)}={v}" for k, v in run["events"].items())
        gaps = sum(run["gaps"].values())
        spooled = sidecar_runs.get(clean(run["uid"], 256))
        sidecar = (
            f"{clean(spooled.get('state'), 24)} "
            f"{_count(spooled.get('uploaded_documents', 0))}/{_count(spooled.get('documents', 0))}"
            if spooled
            else "-"
        )
        cells: list[RenderableType] = [
            rich_text(run["scan_id"], limit=24),
            rich_text(clean(run["uid"], 256)[:8]),
            rich_text(run["plan_name"], limit=80),
        ]
        if wide:
            cells += [Text(_clock(run["start_time"])), Text(_duration(run["elapsed_seconds"]))]
        cells += [
            rich_text(run["state"], style=_style(run["state"]), limit=40),
            rich_text(events, limit=400),
            Text(str(gaps), style="bold red" if gaps else ""),
            rich_text(sidecar, limit=80),
        ]
        table.add_row(*cells)
    return Panel(table, title="last runs", title_align="left")


#: Below this many columns the run and sidecar panels are stacked, not side by side.
SIDE_BY_SIDE_WIDTH = 110


def render(snap: Mapping[str, Any], width: int = 120, height: int | None = None) -> RenderableType:
    """The whole screen for one snapshot, laid out for a terminal `width` columns (and `height` lines) big.

    With a `height`, the screen fits it: if the full layout is taller, the run
    and sidecar panels are compact, and the run history shows what fits.
    """
    footer = Text(
        f"gaps detected: {snap['gaps']}   ·   q or Ctrl+C quits   ·   {_clock(snap['time'])}",
        style="bold red" if snap["gaps"] else "dim",
    )
    header = render_header(snap)
    wide = width >= 100
    top = _top(snap, width, compact=False)
    if height is None:
        return Group(header, top, render_runs(snap, wide=wide), footer)
    limit = len(snap["runs"])
    used = _lines(Group(header, top, footer), width)
    if used + RUNS_PANEL_LINES + min(limit, MIN_RUNS_SHOWN) > height:
        top = _top(snap, width, compact=True)
        used = _lines(Group(header, top, footer), width)
    rows = max(0, min(limit, height - used - RUNS_PANEL_LINES))
    if rows == 0:
        return Group(header, top, footer)
    return Group(header, top, render_runs(snap, limit=rows, wide=wide), footer)


#: The run history's panel takes this many lines besides its rows (two borders, the column header).
RUNS_PANEL_LINES = 3
#: A layout that leaves fewer rows than this for the history is made compact.
MIN_RUNS_SHOWN = 5


def _top(snap: Mapping[str, Any], width: int, *, compact: bool) -> RenderableType:
    """The run and sidecar panels, side by side on a wide terminal, else stacked."""
    if width >= SIDE_BY_SIDE_WIDTH:
        grid = Table.grid(expand=True, padding=(0, 1))
        grid.add_column(ratio=3)
        grid.add_column(ratio=2)
        grid.add_row(
            render_run(snap, plot_width=width * 3 // 5 - 6, compact=compact),
            render_sidecar(snap, compact=compact),
        )
        return grid
    return Group(
        render_run(snap, plot_width=max(10, width - 4), compact=compact),
        render_sidecar(snap, compact=compact),
    )


def _lines(renderable: RenderableType, width: int) -> int:
    """How many lines `renderable` takes on a terminal `width` columns wide."""
    console = Console(width=width, file=io.StringIO(), force_terminal=False, color_system=None)
    return len(console.render_lines(renderable, console.options, pad=False))


def render_safely(state: MonitorState, width: int, height: int | None = None) -> RenderableType:
    """`render(state.snapshot())`; if that fails, one line saying so (counted as a monitor error)."""
    try:
        return render(state.snapshot(), width, height)
    except Exception as err:  # noqa: BLE001 - the view must outlive any surprise
        state.error(f"render: {type(err).__name__}: {err}")
        log.warning("monitor render: %s: %s", type(err).__name__, clean(err))
        return rich_text(f"cannot render this frame: {type(err).__name__}: {clean(err, 300)}", style="red")


# ---------------------------------------------------------------- entry
@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGINT/SIGTERM set `stop` instead of raising (main thread only)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_monitor(config: Config, args: argparse.Namespace) -> int:
    """The `monitor` command; returns the exit code."""
    once = bool(getattr(args, "once", False))
    as_json = bool(getattr(args, "json", False))
    seconds = float(getattr(args, "seconds", 2.0))
    if as_json and not once:
        raise ConfigError("--json needs --once")
    if seconds < 0:
        raise ConfigError("--seconds must not be negative")
    url = health_url(getattr(args, "sidecar", None), config.metrics.address)
    state = MonitorState(address=config.zmq.address, plot_key=getattr(args, "plot", None), sidecar_url=url)
    logging.getLogger(Subscription.__module__).setLevel(logging.ERROR)  # the monitor logs the transitions
    subscriber = Subscriber(config.zmq, state)
    poller = HealthPoller(url, state)
    console = Console()
    if not once:
        _quiet_logging(console)
    subscriber.start()
    poller.start()
    stop = threading.Event()
    try:
        with _stop_on_signals(stop):
            if once:
                stop.wait(seconds)
            else:
                _live(state, stop, console)
    finally:
        subscriber.stop()
        poller.stop()
    if once:
        poller.poll_now()  # the snapshot shows the sidecar as it is now
        if as_json:
            print(json.dumps(state.snapshot(), indent=2, default=str, ensure_ascii=True))
        else:
            console.print(render_safely(state, console.width))
    return 0


def _quiet_logging(console: Console) -> None:
    """In the live view, only warnings reach the screen (printed above the view)."""
    from rich.logging import RichHandler

    handler = RichHandler(console=console, show_path=False, markup=False, rich_tracebacks=False)
    handler.setFormatter(TextFormatter("%(message)s"))  # messages escaped, one line each
    root = logging.getLogger()
    root.handlers[:] = [handler]
    log.setLevel(logging.WARNING)


def _live(state: MonitorState, stop: threading.Event, console: Console) -> None:
    frame = 1.0 / FRAMES_PER_SECOND
    with _keys() as pressed, Live(console=console, auto_refresh=False, redirect_stderr=False) as live:
        while not stop.is_set():
            started = time.monotonic()
            size = console.size
            live.update(render_safely(state, size.width, size.height - 1), refresh=True)
            if pressed(max(0.0, frame - (time.monotonic() - started))) in QUIT_KEYS:
                return
            if stop.is_set():
                return


QUIT_KEYS = ("q", "Q")


@contextmanager
def _keys() -> Iterator[Callable[[float], str]]:
    """A function that waits up to its argument in seconds for one key press on stdin (or "").

    On a terminal, stdin is put in cbreak mode (keys arrive one by one, not
    echoed; Ctrl+C still interrupts) and restored afterwards. Without a
    terminal on stdin it just waits.
    """
    import select
    import sys
    import termios
    import tty

    fd = sys.stdin.fileno() if sys.stdin is not None and sys.stdin.isatty() else None
    if fd is None:

        def wait(timeout: float) -> str:
            time.sleep(timeout)
            return ""

        yield wait
        return
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)

    def pressed(timeout: float) -> str:
        ready, _, _ = select.select([fd], [], [], timeout)
        return os.read(fd, 1).decode(errors="replace") if ready else ""

    try:
        yield pressed
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


__all__ = ["HealthPoller", "Subscriber", "health_url", "render", "run_monitor", "sparkline"]
