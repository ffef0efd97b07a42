"""The loss-curve PNG written into output_dir at every save and at the end of training."""

from __future__ import annotations

from pathlib import Path

from finechat.files import atomic_file

LOSS_PNG = "loss_curve.png"


def smooth(values: list[float], weight: float = 0.6) -> list[float]:
    """Exponential moving average, as TensorBoard's smoothing slider does (bias-corrected)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def plot_loss(log_history: list[dict], path: str | Path, title: str = "") -> Path | None:
    """Plot training loss (raw and smoothed), eval loss and the learning rate; None when nothing was logged."""
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    lrs = [(e["step"], e["learning_rate"]) for e in log_history if "learning_rate" in e and "step" in e]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.35, label="train loss")
        if len(losses) > 2:
            ax.plot(steps, smooth(list(losses)), color="tab:blue", label="train loss (smoothed)")
    if evals:
        steps, losses = zip(*evals)
        ax.plot(steps, losses, "o-", color="tab:orange", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if lrs:
        ax2 = ax.twinx()
        steps, values = zip(*lrs)
        ax2.plot(steps, values, color="tab:gray", linestyle=":", label="learning rate")
        ax2.set_ylabel("learning rate")
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    handles, labels = ax.get_legend_handles_labels()
    if lrs:
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="upper right")
    ax.set_title(title or "training loss")
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_file(path, "wb") as fh:
            fig.savefig(fh, format="png")
    finally:
        plt.close(fig)
    return path
