"""The loss-curve PNG (train and eval), drawn with matplotlib's Agg canvas and written atomically."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tnlora.io import atomic_path


def loss_series(log_history: Sequence[dict[str, Any]]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train, eval) lists of (step, loss) from ``TrainerState.log_history``."""
    train = [(int(e["step"]), float(e["loss"])) for e in log_history if "loss" in e and "step" in e]
    evals = [(int(e["step"]), float(e["eval_loss"])) for e in log_history if "eval_loss" in e and "step" in e]
    return train, evals


def _ema(values: list[float], weight: float) -> list[float]:
    out: list[float] = []
    last = values[0] if values else 0.0
    for v in values:
        last = weight * last + (1 - weight) * v
        out.append(last)
    return out


def plot_loss(log_history: Sequence[dict[str, Any]], path: str | os.PathLike[str], title: str = "") -> Path | None:
    """Draw train loss (raw and smoothed) and eval loss against the step; ``None`` when nothing was logged."""
    # The Figure/Agg canvas API, not pyplot: no global backend switch, safe in threads and without a display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train, evals = loss_series(log_history)
    if not train and not evals:
        return None
    fig = Figure(figsize=(7, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="#9ecae1", linewidth=1, label="train")
        if len(losses) >= 5:
            ax.plot(steps, _ema(list(losses), 0.8), color="#08519c", linewidth=1.5, label="train (smoothed)")
    if evals:
        steps, losses = zip(*evals)
        ax.plot(steps, losses, "o-", color="#e6550d", linewidth=1.5, markersize=4, label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (per token)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
