"""The plots of a training comparison (`bixt.study.accuracy.summarize`'s table): test accuracy (dense tasks: mIoU)
against the cost,
one point per model and token count with the std over seeds as error bars, and a line joining each model's points
in order of tokens (the Pareto view)."""
from __future__ import annotations

from pathlib import Path

PLOTS = {"accuracy_vs_gmacs.png": ("gmacs", "GMACs per sample (architecture's count)", True),
         "accuracy_vs_time.png": ("train_s", "training time per run (s)", True),
         "accuracy_vs_tokens.png": ("tokens", "tokens per sample", True)}


def plot_study(table: list[dict], out: Path) -> list[Path]:
    """One PNG per entry of PLOTS; nothing when no run finished."""
    if not table:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bixt.io.atomic import atomic_path

    score = "miou" if "miou_mean" in table[0] else "acc"  # dense tasks: the class-mean IoU
    ylabel = ("test mIoU" if score == "miou" else "test top-1") + " (%), mean +- std over seeds"
    written = []
    for name, (key, label, log) in PLOTS.items():
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for model in dict.fromkeys(r["model"] for r in table):
            pts = sorted((r for r in table if r["model"] == model and r.get(key)), key=lambda r: r["tokens"])
            if not pts:
                continue
            ax.errorbar([r[key] for r in pts], [100 * r[f"{score}_mean"] for r in pts],
                        yerr=[100 * (r[f"{score}_std"] or 0.0) for r in pts], marker="o", capsize=3, label=model)
            for r in pts:
                ax.annotate(str(r["tokens"]), (r[key], 100 * r[f"{score}_mean"]), textcoords="offset points",
                            xytext=(4, -10), fontsize=7)
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title("labels: tokens per sample", fontsize=8)
        fig.tight_layout()
        with atomic_path(out / name) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)
        written.append(out / name)
    return written
