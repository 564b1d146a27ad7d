"""Structured data of matplotlib figures (`e2b/chart`) and pandas frames (`e2b/data`), the
two MIME types E2B's code interpreter adds to a result so that an agent can reason about a plot
or a table without vision.

The chart shapes are the ones the `e2b_code_interpreter` SDK deserialises (its `charts.py`):
every chart has `type`, `title` and `elements`; 2-D charts add `x_label`, `y_label`,
`x_unit`, `y_unit`; line and scatter charts add ticks, tick labels and scales of both axes. A
figure with several charted axes is a `superchart` whose elements are those charts.

Everything here reads the figure as it is (artists, axis converters, formatters) without
drawing it: the PNG of the same display draws it anyway, and a second draw would double the
cost of every figure. Box plots are the exception that cannot be read back reliably from the
artists (whiskers, caps and medians are plain lines), so `Axes.bxp` is wrapped to remember the
statistics it drew from. Extraction never raises: a figure it does not understand is `unknown`,
and a bug here must not cost the user their PNG.
"""

import datetime
import math
import re

_UNIT = re.compile(r"[(\[]\s*([^()\[\]]+?)\s*[)\]]\s*$")
_BOXES = "_ringfence_boxes"


def install(shell):
    """Registers the two formatters on `shell` and the box-plot hook in matplotlib."""
    from IPython.core.formatters import BaseFormatter
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from pandas import DataFrame
    from traitlets import ObjectName, Unicode

    class _DictFormatter(BaseFormatter):
        _return_type = (dict,)

    class ChartFormatter(_DictFormatter):
        format_type = Unicode("e2b/chart")
        print_method = ObjectName("_repr_e2b_chart_")

    class DataFormatter(_DictFormatter):
        format_type = Unicode("e2b/data")
        print_method = ObjectName("_repr_e2b_data_")

    formatters = shell.display_formatter.formatters
    chart = ChartFormatter(parent=shell.display_formatter)
    chart.for_type(Figure, _safe(figure_chart))
    formatters["e2b/chart"] = chart
    data = DataFormatter(parent=shell.display_formatter)
    data.for_type(DataFrame, _safe(frame_data))
    formatters["e2b/data"] = data

    if not getattr(Axes.bxp, "_ringfence", False):
        original = Axes.bxp

        def bxp(self, bxpstats, *args, **kwargs):
            drawn = original(self, bxpstats, *args, **kwargs)
            positions = kwargs.get("positions")
            if positions is None and args:
                positions = args[0]
            stats = list(bxpstats)
            if positions is None:
                positions = range(1, len(stats) + 1)
            vertical = kwargs.get("orientation", "vertical") == "vertical"
            if "vert" in kwargs and kwargs["vert"] is not None:
                vertical = bool(kwargs["vert"])
            boxes = getattr(self, _BOXES, [])
            boxes.extend((pos, st, vertical) for pos, st in zip(positions, stats))
            setattr(self, _BOXES, boxes)
            return drawn

        bxp._ringfence = True
        Axes.bxp = bxp

    _show_pil_inline()


def _show_pil_inline():
    """`Image.show()` displays the image as a result (E2B's behaviour) instead of looking for
    an image viewer program, of which a sandbox has none."""
    from IPython.display import display
    from PIL import ImageShow

    class InlineViewer(ImageShow.Viewer):
        def show(self, image, **options):
            display(image)
            return 1

    if not any(type(v).__name__ == "InlineViewer" for v in ImageShow._viewers):
        ImageShow.register(InlineViewer(), order=-1)


def _safe(f):
    def run(obj):
        try:
            return f(obj)
        except Exception:  # noqa: BLE001 - a chart we cannot read is no chart, not an error
            return None

    return run


def frame_data(df):
    """A DataFrame as E2B gives it: column name -> list of values, timestamps in ISO 8601."""
    out = {}
    for name, values in df.to_dict(orient="list").items():
        out[str(name)] = [_plain(v) for v in values]
    return out


def _plain(v):
    if isinstance(v, (datetime.datetime, datetime.date)):
        return v.isoformat()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    if hasattr(v, "item"):  # a numpy scalar
        try:
            return _plain(v.item())
        except (TypeError, ValueError):
            pass
    return str(v)


def figure_chart(fig):
    charts = [c for c in (axes_chart(ax) for ax in fig.get_axes()) if c is not None]
    suptitle = fig._suptitle.get_text() if getattr(fig, "_suptitle", None) else ""
    if not charts:
        return {"type": "unknown", "title": suptitle or None, "elements": []}
    if len(charts) == 1:
        chart = charts[0]
        if not chart.get("title") and suptitle:
            chart["title"] = suptitle
        return chart
    return {"type": "superchart", "title": suptitle or None, "elements": charts}


def axes_chart(ax):
    """The chart of one axes, or None for empty axes (a colorbar, a hidden subplot)."""
    from matplotlib.collections import PathCollection
    from matplotlib.container import BarContainer
    from matplotlib.patches import Wedge

    title = ax.get_title() or None
    boxes = getattr(ax, _BOXES, None)
    if boxes:
        return _box_chart(ax, title, boxes)
    wedges = [p for p in ax.patches if isinstance(p, Wedge)]
    if wedges:
        return {
            "type": "pie",
            "title": title,
            "elements": [
                {
                    "label": _label(w.get_label()),
                    "angle": abs(w.theta2 - w.theta1),
                    "radius": w.r,
                }
                for w in wedges
            ],
        }
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    if bars:
        return _bar_chart(ax, title, bars)
    lines = [ln for ln in ax.get_lines() if len(ln.get_xydata())]
    scatters = [c for c in ax.collections if isinstance(c, PathCollection)]
    if lines and not scatters:
        return _point_chart(ax, "line", title, [(ln.get_label(), ln.get_xydata()) for ln in lines])
    if scatters and not lines:
        return _point_chart(
            ax, "scatter", title, [(c.get_label(), c.get_offsets()) for c in scatters]
        )
    if lines or scatters or ax.images or ax.collections or ax.patches:
        return {"type": "unknown", "title": title, "elements": []}
    return None


def _label(text):
    return "" if text is None else str(text)


def _axis_kind(axis):
    """The scale E2B names: matplotlib's own, or `datetime`/`categorical` from the axis'
    unit converter."""
    converter = axis.get_converter() if hasattr(axis, "get_converter") else axis.converter
    name = type(converter).__name__ if converter is not None else ""
    if "Date" in name:
        return "datetime"
    if "StrCategory" in name:
        return "categorical"
    return axis.get_scale()


def _categories(axis):
    units = axis.get_units()
    mapping = getattr(units, "_mapping", None)
    return {v: k for k, v in mapping.items()} if mapping else {}


def _convert(axis, kind, value):
    """A data coordinate as the user gave it: a date as ISO 8601, a category as its string."""
    value = float(value)
    if kind == "datetime":
        from matplotlib.dates import num2date

        return num2date(value).isoformat()
    if kind == "categorical":
        cats = _categories(axis)
        key = round(value)
        if key in cats and abs(value - key) < 1e-9:
            return str(cats[key])
    return _number(value)


def _number(value):
    value = float(value)
    if not math.isfinite(value):
        return None
    return int(value) if value.is_integer() and abs(value) < 2**53 else value


def _ticks(axis, kind):
    lo, hi = sorted(axis.get_view_interval())
    locs = [loc for loc in axis.get_majorticklocs() if lo - 1e-9 <= loc <= hi + 1e-9]
    labels = axis.get_major_formatter().format_ticks(locs) if locs else []
    ticks = [_convert(axis, kind, loc) for loc in locs]
    # Tick steps accumulate float noise (1.2000000000000002); 12 digits keep every real tick.
    ticks = [float(f"{t:.12g}") if isinstance(t, float) else t for t in ticks]
    ticks = [int(t) if isinstance(t, float) and t.is_integer() else t for t in ticks]
    return ticks, [str(t) for t in labels]


def _labels_and_units(ax):
    out = {}
    for name, text in (("x", ax.get_xlabel()), ("y", ax.get_ylabel())):
        m = _UNIT.search(text or "")
        out[f"{name}_label"] = text or None
        out[f"{name}_unit"] = m.group(1) if m else None
    return out


def _point_chart(ax, kind, title, series):
    x_kind, y_kind = _axis_kind(ax.xaxis), _axis_kind(ax.yaxis)
    x_ticks, x_tick_labels = _ticks(ax.xaxis, x_kind)
    y_ticks, y_tick_labels = _ticks(ax.yaxis, y_kind)
    elements = []
    for label, xy in series:
        points = []
        for x, y in xy:
            points.append([_convert(ax.xaxis, x_kind, x), _convert(ax.yaxis, y_kind, y)])
        elements.append({"label": _label(label), "points": points})
    return {
        "type": kind,
        "title": title,
        **_labels_and_units(ax),
        "x_ticks": x_ticks,
        "x_tick_labels": x_tick_labels,
        "x_scale": x_kind,
        "y_ticks": y_ticks,
        "y_tick_labels": y_tick_labels,
        "y_scale": y_kind,
        "elements": elements,
    }


def _category_at(axis, position):
    """The name of the category (or tick) at `position` along `axis`."""
    kind = _axis_kind(axis)
    if kind == "categorical":
        return _convert(axis, kind, position)
    locs, labels = _ticks(axis, kind)
    for loc, text in zip(axis.get_majorticklocs(), labels):
        if abs(float(loc) - position) < 1e-6 and text:
            return text
    return str(_convert(axis, kind, position))


def _bar_chart(ax, title, containers):
    elements = []
    for c in containers:
        horizontal = getattr(c, "orientation", "vertical") == "horizontal"
        group = _label(c.get_label())
        for patch in c.patches:
            if horizontal:
                where = patch.get_y() + patch.get_height() / 2
                label, value = _category_at(ax.yaxis, where), patch.get_width()
            else:
                where = patch.get_x() + patch.get_width() / 2
                label, value = _category_at(ax.xaxis, where), patch.get_height()
            elements.append({"label": label, "group": group, "value": _number(value)})
    return {"type": "bar", "title": title, **_labels_and_units(ax), "elements": elements}


def _box_chart(ax, title, boxes):
    elements = []
    for pos, st, vertical in boxes:
        axis = ax.xaxis if vertical else ax.yaxis
        label = st.get("label")
        elements.append(
            {
                "label": str(label) if label is not None else _category_at(axis, float(pos)),
                "min": _number(st["whislo"]),
                "first_quartile": _number(st["q1"]),
                "median": _number(st["med"]),
                "third_quartile": _number(st["q3"]),
                "max": _number(st["whishi"]),
                "outliers": [_number(v) for v in st.get("fliers", [])],
            }
        )
    return {"type": "box_and_whisker", "title": title, **_labels_and_units(ax), "elements": elements}
