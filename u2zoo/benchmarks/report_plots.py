"""The report's two plots (accuracy against FPS, latency by cell), drawn with matplotlib's
object API on an Agg canvas: pyplot is never imported, so no GUI backend is selected and no
global figure state is touched. matplotlib is the optional extra ``u2zoo[report]``."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from u2zoo.benchmarks.results import as_number, get_path, labels_of
from u2zoo.errors import BackendUnavailable


def _matplotlib() -> tuple[Any, Any]:
    """(Figure, FigureCanvasAgg), or BackendUnavailable naming the extra to install."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise BackendUnavailable("report plots need matplotlib", extra="report") from None
    return Figure, FigureCanvasAgg


def _new_figure(width: float, height: float) -> Any:
    Figure, FigureCanvasAgg = _matplotlib()
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _styles(labels: list[str]) -> dict[str, tuple[Any, str]]:
    """A fixed colour + marker per host, shared by both plots so they read together."""
    from matplotlib import colormaps

    colours = colormaps["tab10"].colors
    markers = "osD^vP*Xh<>"
    return {label: (colours[i % len(colours)], markers[i % len(markers)]) for i, label in enumerate(labels)}


def _no_data(fig: Any, title: str) -> None:
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(
        0.5,
        0.5,
        "no timed cells\n(no row with status ok and speed data)",
        ha="center",
        va="center",
        fontsize=13,
        color="#555",
        transform=ax.transAxes,
        bbox={"boxstyle": "round,pad=0.6", "fc": "#f4f4f4", "ec": "#bbb"},
    )


def _timed(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], str]]:
    """(raw row, host label) for ok cells that have a latency or an FPS."""
    return [
        (r, label)
        for r, label in zip(rows, labels_of(rows))
        if r.get("status") == "ok"
        and (_finite(get_path(r, "speed", "fps")) or _finite(get_path(r, "speed", "latency_ms_p50")))
    ]


def _finite(value: Any) -> bool:
    number = as_number(value)
    return number is not None and math.isfinite(number)


def accuracy_metric(rows: list[dict[str, Any]]) -> tuple[str, Callable[[dict[str, Any]], Any]]:
    """Ground-truth max F when every timed ok cell has it; otherwise parity IoU@0.5 vs torch.

    All-or-nothing so one plot never mixes two different accuracies on the same axis.
    """
    timed = [r for r, _ in _timed(rows) if _finite(get_path(r, "speed", "fps"))]
    if timed and all(_finite(get_path(r, "accuracy", "max_f")) for r in timed):
        return "max F-measure vs ground truth", lambda r: get_path(r, "accuracy", "max_f")
    return "IoU@0.5 vs torch reference (parity)", lambda r: get_path(r, "parity", "iou50")


# (dx, dy) in points, nearest first; far ones get a leader line back to their point.
_LABEL_OFFSETS = [(7, 0), (5, 5), (5, -5), (-7, 0), (-5, 5), (-5, -5), (0, 9), (0, -9)]
_LABEL_OFFSETS += [(dx * k, dy * k) for k in (2.2, 3.6) for dx, dy in _LABEL_OFFSETS]


def _place_labels(fig: Any, ax: Any, points: list[tuple[float, float, str, Any]]) -> None:
    """Annotate points, each at the nearest offset that overlaps no marker and no earlier label.

    Parity IoU is often exactly 1.0 for every cell, so naive labels would pile up on one line.
    """
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    radius = 6 * fig.dpi / 72  # a scatter marker of s=55 is ~7.4 pt across
    centres = [ax.transData.transform((x, y)) for x, y, _, _ in points]
    placed = [Bbox.from_extents(cx - radius, cy - radius, cx + radius, cy + radius) for cx, cy in centres]
    for x, y, text, colour in sorted(points, key=lambda p: (p[0], p[1])):
        candidates = [*_LABEL_OFFSETS, _LABEL_OFFSETS[0]]  # crowded: overlap rather than drop it
        for n, (dx, dy) in enumerate(candidates):
            last = n == len(candidates) - 1
            far = abs(dx) > 10 or abs(dy) > 10
            ann = ax.annotate(
                text,
                (x, y),
                xytext=(dx, dy),
                textcoords="offset points",
                fontsize=7.5,
                color=colour,
                ha="left" if dx > 0 else "right" if dx < 0 else "center",
                va="bottom" if dy > 0 else "top" if dy < 0 else "center",
                arrowprops={"arrowstyle": "-", "color": colour, "lw": 0.6, "shrinkA": 0, "shrinkB": 4} if far else None,
            )
            ann.update_positions(renderer)
            box = Text.get_window_extent(ann, renderer).expanded(1.04, 1.08)  # text only, not the leader
            fits = inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1
            if last or (fits and not any(box.overlaps(other) for other in placed)):
                placed.append(box)
                break
            ann.remove()


def plot_accuracy_vs_fps(rows: list[dict[str, Any]], path: Path) -> Path:
    """Scatter of accuracy against FPS, one series per host: the deployment trade-off at a glance.

    One panel per model (shared axes), so labels only need target/precision and stay legible.
    """
    label_text, metric = accuracy_metric(rows)
    title = f"Accuracy vs speed — {label_text}"
    points = [(r, host) for r, host in _timed(rows) if _finite(get_path(r, "speed", "fps")) and _finite(metric(r))]
    if not points:
        fig = _new_figure(8.5, 6.0)
        _no_data(fig, title)
        return _save_png(fig, path)
    models = sorted({str(r.get("model")) for r, _ in points})
    hosts = sorted({h for _, h in points})
    styles = _styles(sorted(set(labels_of(rows))))
    fig = _new_figure(8.5, 6.0 if len(models) == 1 else 1.4 + 4.0 * len(models))
    axes = fig.subplots(len(models), 1, sharex=True, sharey=True, squeeze=False)[:, 0]
    xs = [float(get_path(r, "speed", "fps")) for r, _ in points]
    ys = [float(metric(r)) for r, _ in points]
    for ax, model in zip(axes, models):
        for host in hosts:
            colour, marker = styles[host]
            sel = [i for i, (r, h) in enumerate(points) if h == host and str(r.get("model")) == model]
            ax.scatter(
                [xs[i] for i in sel],
                [ys[i] for i in sel],
                color=colour,
                marker=marker,
                s=55,
                edgecolor="black",
                linewidth=0.5,
                label=host if ax is axes[0] else None,
                zorder=3,
            )
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(model, fontsize=10, loc="left")
    _set_limits(axes[0], xs, ys)
    log = axes[0].get_xscale() == "log"
    axes[-1].set_xlabel("throughput (FPS, higher is better)" + (" — log scale" if log else ""))
    fig.supylabel(f"{label_text} (higher is better)", fontsize=10)
    fig.suptitle(title)
    fig.legend(loc="outside lower center", ncols=min(2, len(hosts)), fontsize=8, title="host", title_fontsize=8)
    fig.canvas.draw()  # positions are final only after layout; labels are placed in display space
    for ax, model in zip(axes, models):
        _place_labels(
            fig,
            ax,
            [
                (x, y, _cell_name(r), styles[h][0])
                for x, y, (r, h) in zip(xs, ys, points)
                if str(r.get("model")) == model
            ],
        )
    return _save_png(fig, path)


def _cell_name(row: dict[str, Any]) -> str:
    return f"{row.get('target')}/{row.get('precision')}"


def _plain_log_ticks(axis: Any) -> None:
    """1, 2, 5, 10, 20 … instead of bare powers of ten: readable ms/FPS on a log axis."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _set_limits(ax: Any, xs: list[float], ys: list[float]) -> None:
    """Log x when FPS spans more than 10×; padded limits so edge labels stay inside the axes."""
    lo, hi = min(xs), max(xs)
    if lo > 0 and hi / lo > 10:
        ax.set_xscale("log")
        ax.set_xlim(lo / 1.6, hi * 1.6)
        _plain_log_ticks(ax.xaxis)
    else:
        pad = max(hi - lo, abs(hi) * 0.1, 1e-9) * 0.35
        ax.set_xlim(max(lo - pad, 0.0) if lo >= 0 else lo - pad, hi + pad)
    ylo, yhi = min(ys), max(ys)
    span = max(yhi - ylo, 0.01)
    top = yhi + span * 0.4
    if yhi <= 1.0:  # IoU / F-measure cannot exceed 1: keep impossible values off the axis
        top = min(top, 1.0 + span * 0.12)
    ax.set_ylim(ylo - span * 0.4, top)


def plot_latency(rows: list[dict[str, Any]], path: Path) -> Path:
    """Horizontal bars of p50 per cell, one bar per host, whisker to p90: where time goes, per host."""
    timed = [(r, h) for r, h in _timed(rows) if _finite(get_path(r, "speed", "latency_ms_p50"))]
    title = "Engine latency per call (p50, whisker to p90)"
    if not timed:
        fig = _new_figure(8.5, 4.0)
        _no_data(fig, title)
        return _save_png(fig, path)
    groups = sorted({f"{r.get('model')}/{r.get('target')}/{r.get('precision')}" for r, _ in timed})
    hosts = sorted({h for _, h in timed})
    cell: dict[tuple[str, str], dict[str, Any]] = {}
    for r, h in timed:  # a repeated cell on the same host: the latest row wins
        key = (f"{r.get('model')}/{r.get('target')}/{r.get('precision')}", h)
        if key not in cell or str(r.get("created") or "") >= str(cell[key].get("created") or ""):
            cell[key] = r
    statuses = {
        (f"{r.get('model')}/{r.get('target')}/{r.get('precision')}", h): str(r.get("status"))
        for r, h in zip(rows, labels_of(rows))
    }
    styles = _styles(sorted(set(labels_of(rows))))
    height = 0.8 / len(hosts)
    fig = _new_figure(8.5, max(3.5, 0.32 * len(groups) * len(hosts) + 0.45 * len(groups) + 1.8))
    ax = fig.add_subplot()
    values = []
    for j, host in enumerate(hosts):
        colour, _ = styles[host]
        ys, p50s, whiskers = [], [], []
        for i, group in enumerate(groups):
            r = cell.get((group, host))
            if r is None:  # say why the bar is missing instead of leaving a silent gap
                ax.text(
                    0.01,
                    i - 0.4 + height * (j + 0.5),
                    statuses.get((group, host), "not run"),
                    transform=ax.get_yaxis_transform(),
                    va="center",
                    fontsize=7,
                    color="#777",
                    style="italic",
                )
                continue
            p50 = float(get_path(r, "speed", "latency_ms_p50"))
            p90 = as_number(get_path(r, "speed", "latency_ms_p90"))
            ys.append(i - 0.4 + height * (j + 0.5))
            p50s.append(p50)
            whiskers.append(max(p90 - p50, 0.0) if p90 is not None and math.isfinite(p90) else 0.0)
            values += [p50, p50 + whiskers[-1]]
        ax.barh(
            ys,
            p50s,
            height=height * 0.9,
            color=colour,
            label=host,
            edgecolor="black",
            linewidth=0.4,
            xerr=[[0.0] * len(whiskers), whiskers],
            error_kw={"ecolor": "#333", "capsize": 3, "lw": 1},
        )
        for y, p50, w in zip(ys, p50s, whiskers):
            ax.annotate(
                f"{p50:.1f}",
                (p50 + w, y),
                xytext=(4, 0),
                textcoords="offset points",
                va="center",
                fontsize=7,
                color="#333",
            )
    ax.set_yticks(range(len(groups)), groups, fontsize=8)
    ax.set_ylim(len(groups) - 0.5, -0.5)  # first group on top
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > 50:
        ax.set_xscale("log")
        ax.set_xlim(min(positive) / 2, max(positive) * 2.5)
        _plain_log_ticks(ax.xaxis)
    else:
        ax.set_xlim(0, max(values) * 1.15 if values and max(values) > 0 else 1)
    ax.grid(True, axis="x", which="both", alpha=0.3)
    ax.set_xlabel(
        "latency per engine call (ms, lower is better)" + (" — log scale" if ax.get_xscale() == "log" else "")
    )
    ax.set_title(title)
    fig.legend(loc="outside lower center", ncols=min(2, len(hosts)), fontsize=8, title="host", title_fontsize=8)
    return _save_png(fig, path)


def _save_png(fig: Any, path: Path) -> Path:
    """Save beside the target under a temp name, then rename: a reader never sees half a PNG."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
