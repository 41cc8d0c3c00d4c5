"""The training loss curve (``loss_curve.png``) drawn from ``log.jsonl``."""
from __future__ import annotations

from pathlib import Path

from artifacts.checkpoints import read_jsonl


def plot_loss_curve(log_path: Path, png_path: Path) -> Path | None:
    """Plot per-step losses (thin) and per-epoch means (markers) from ``log.jsonl`` into a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from artifacts.atomic import atomic_path

    records = read_jsonl(log_path)
    steps = [r for r in records if r.get("type") == "step"]
    epochs = [r for r in records if r.get("type") == "epoch"]
    if not steps:
        return None
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x = [r["step"] for r in steps]
    steps_at_epoch = {r["epoch"]: r["step"] for r in steps}
    for name, colour in (("loss", "black"), ("loss_contrastive", "tab:blue"), ("loss_saliency", "tab:orange")):
        ax.plot(x, [r[name] for r in steps], color=colour, alpha=0.35, linewidth=0.8)
        ax.plot([steps_at_epoch[r["epoch"]] for r in epochs], [r[name] for r in epochs], "o-",
                color=colour, markersize=3, label=f"{name} (epoch mean)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("MaskContrast training loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    with atomic_path(png_path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return png_path
