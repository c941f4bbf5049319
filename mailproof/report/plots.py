"""The rehearsal report's plots, drawn with matplotlib and returned as inline SVG markup.

No pyplot (no global figure state, no GUI backend): each figure is a ``matplotlib.figure.Figure``
saved to SVG with text kept as text (searchable, selectable, readable in the DOM) and ids salted
per figure so two plots on one page never share a clip-path id.
"""

from __future__ import annotations

import io
import re
from collections import defaultdict
from typing import Iterable, Optional

import matplotlib
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter

from mailproof.load.results import Sample

WIDTH_IN, HEIGHT_IN = 11.0, 3.8
_XML_PROLOG = re.compile(r"^.*?(?=<svg)", re.S)


def _svg(fig: Figure, salt: str) -> str:
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt}):
        fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    svg = _prefix_ids(_XML_PROLOG.sub("", buffer.getvalue(), count=1), f"{salt}-")
    # Scale with the page: keep the viewBox, let CSS set the size.
    return re.sub(r'<svg([^>]*?) width="[^"]*" height="[^"]*"', r'<svg\1 class="plot" role="img"', svg, count=1)


def _prefix_ids(svg: str, prefix: str) -> str:
    """Make every id in ``svg`` (and every #reference to it) unique to this figure: matplotlib
    numbers groups the same way in every figure (figure_1, axes_1, ...), and one HTML page must
    not hold an id twice."""
    ids = set(re.findall(r'\bid="([^"]+)"', svg))
    if not ids:
        return svg
    svg = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{prefix}{m.group(1)}"', svg)
    return re.sub(r'#([A-Za-z_][\w.:-]*)', lambda m: f"#{prefix}{m.group(1)}" if m.group(1) in ids else m.group(0), svg)


def _empty(message: str, salt: str) -> str:
    fig = Figure(figsize=(WIDTH_IN, 1.2))
    ax = fig.add_subplot()
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=11, color="#52606d", transform=ax.transAxes)
    return _svg(fig, salt)


def _style(ax) -> None:
    ax.grid(True, color="#e4e7eb", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.tick_params(labelsize=9, colors="#3e4c59")


def latency_over_time(samples: list[Sample], t0: Optional[float], colors: dict[str, str],
                      thresholds: Iterable[tuple] = ()) -> str:
    """Scatter of each delivered email: x = seconds into the run, y = latency from its trigger."""
    if not samples or t0 is None:
        return _empty("No email was delivered in this run: no latency to plot.", "latency")
    fig = Figure(figsize=(WIDTH_IN, HEIGHT_IN))
    ax = fig.add_subplot()
    _style(ax)
    by_flow: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_flow[s.flow].append(s)
    top = max(s.latency for s in samples) * 1000
    positive = sorted(s.latency * 1000 for s in samples if s.latency > 0)
    median = positive[len(positive) // 2] if positive else 0
    log = bool(median) and top / median > 10  # a few very late emails would flatten everyone else
    for flow, points in sorted(by_flow.items()):
        ax.scatter([p.t - t0 for p in points], [max(p.latency * 1000, 0.01) for p in points],
                   s=14, alpha=0.75, color=colors.get(flow, "#555"), label=f"{flow} ({len(points)})",
                   edgecolors="none")
    if log:
        ax.set_yscale("log")
    ax.set_ylim(bottom=ax.get_ylim()[0] if log else 0)
    drawn = set()
    ymax = ax.get_ylim()[1]
    for gate, subject in thresholds:
        value = gate.value * 1000
        key = (gate.metric, value)
        if value > ymax or key in drawn:
            continue
        drawn.add(key)
        ax.axhline(value, color="#c81e1e", linestyle="--", linewidth=1)
        ax.annotate(f"gate {gate.metric} {gate.op} {value:g} ms", xy=(1, value), xycoords=("axes fraction", "data"),
                    xytext=(-4, 3), textcoords="offset points", ha="right", fontsize=8, color="#c81e1e")
    ax.set_xlabel("seconds into the run", fontsize=9, color="#3e4c59")
    ax.set_ylabel("delivery latency (ms)" + (", log scale" if log else ""), fontsize=9, color="#3e4c59")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _svg(fig, "latency")


def _per_second(series: Iterable, t0: float, length: int) -> list[int]:
    counts = [0] * length
    for stamp, count in series:
        index = int(stamp - int(t0))
        if 0 <= index < length:
            counts[index] += int(count)
    return counts


def throughput(sends: list[tuple[int, int]], deliveries: list[tuple[int, int]], users: list[tuple[float, int]],
               t0: Optional[float]) -> str:
    """Emails triggered and delivered per second, with the number of Locust users behind them."""
    if t0 is None or not (sends or deliveries or users):
        return _empty("No sends, deliveries or users recorded: nothing to plot.", "throughput")
    end = max([t for t, _ in sends] + [t for t, _ in deliveries] + [t for t, _ in users] + [t0])
    length = int(end) - int(t0) + 1
    xs = list(range(length))
    fig = Figure(figsize=(WIDTH_IN, HEIGHT_IN))
    ax = fig.add_subplot()
    _style(ax)
    if users:
        ax_users = ax.twinx()
        ax_users.fill_between([t - int(t0) for t, _ in users], [u for _, u in users], step="post",
                              color="#9aa5b1", alpha=0.25, linewidth=0, label="users (load shape)")
        ax_users.step([t - int(t0) for t, _ in users], [u for _, u in users], where="post",
                      color="#7b8794", linewidth=1)
        ax_users.set_ylabel("users", fontsize=9, color="#7b8794")
        ax_users.set_ylim(bottom=0, top=max(u for _, u in users) * 1.15 or 1)
        ax_users.tick_params(labelsize=9, colors="#7b8794")
        ax_users.spines["top"].set_visible(False)
        ax.set_zorder(ax_users.get_zorder() + 1)
        ax.patch.set_visible(False)
    # Triggered: a wide pale line underneath; delivered: a thin dark one on top, so both show
    # where they coincide (most emails arrive within the second they were triggered).
    ax.step(xs, _per_second(sends, t0, length), where="post", color="#7fb8e6", linewidth=4.5,
            solid_capstyle="butt", label="emails triggered / s")
    ax.step(xs, _per_second(deliveries, t0, length), where="post", color="#0b6e2e", linewidth=1.4,
            label="emails delivered / s")
    ax.set_ylim(bottom=0)
    ax.set_xlim(0, max(length - 1, 1))
    ax.set_xlabel("seconds into the run", fontsize=9, color="#3e4c59")
    ax.set_ylabel("emails per second", fontsize=9, color="#3e4c59")
    handles, labels = ax.get_legend_handles_labels()
    if users:
        handles.append(Patch(color="#9aa5b1", alpha=0.4))
        labels.append("users (load shape, right axis)")
    ax.legend(handles, labels, fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.06, 1.0))
    return _svg(fig, "throughput")


def arrivals(offered: list[int], started: list[int], completed: list[int]) -> str:
    """Under a load shape (open model): arrivals offered, flows started and completed per second.
    Started below offered means the concurrency cap was hit: the load was not held."""
    length = max(len(offered), len(started), len(completed))
    if not length:
        return _empty("No arrivals recorded: nothing to plot.", "arrivals")
    xs = list(range(length))

    def padded(series: list[int]) -> list[int]:
        return list(series) + [0] * (length - len(series))

    fig = Figure(figsize=(WIDTH_IN, HEIGHT_IN))
    ax = fig.add_subplot()
    _style(ax)
    ax.step(xs, padded(offered), where="post", color="#9aa5b1", linewidth=4.5, solid_capstyle="butt",
            label="offered / s (the shape)")
    ax.step(xs, padded(started), where="post", color="#1f6fb2", linewidth=1.6, label="flows started / s")
    ax.step(xs, padded(completed), where="post", color="#0b6e2e", linewidth=1.2, linestyle="--",
            label="flows completed / s")
    ax.set_ylim(bottom=0)
    ax.set_xlim(0, max(length - 1, 1))
    ax.set_xlabel("seconds into the shape", fontsize=9, color="#3e4c59")
    ax.set_ylabel("flows per second", fontsize=9, color="#3e4c59")
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _svg(fig, "arrivals")

