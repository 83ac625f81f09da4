"""One colour per method, everywhere: the studio's plots and panels, and the benchmark figures.

`METHOD_COLORS[method]` is a hex colour (matplotlib and Vega-Lite both take it); `tint` gives a lighter shade of it for
a second series of the same method (e.g. the real error beside the bound).
"""
from __future__ import annotations

METHOD_COLORS = {
    "teacher": "#4d4d4d",  # grey: the reference
    "lcm": "#ff7f0e",  # matplotlib tab:orange, the baseline
    "splam": "#1f77b4",  # matplotlib tab:blue, the method
}


def tint(color: str, amount: float = 0.45) -> str:
    """`color` mixed with white by `amount` (0 = unchanged, 1 = white)."""
    r, g, b = (int(color[i:i + 2], 16) for i in (1, 3, 5))
    return "#" + "".join(f"{round(c + (255 - c) * amount):02x}" for c in (r, g, b))
