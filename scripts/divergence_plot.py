"""IPO vs DPO on the quickstart data: how far each drifts from the reference (the README's plot).

Trains the quickstart config once per method with the product's own CLI, then plots the logged
``divergence/kl``, the held-out margin and the held-out accuracy over optimizer steps:

    python scripts/divergence_plot.py                      # train all runs (CPU, ~15 min), then plot
    python scripts/divergence_plot.py --plot-only          # re-plot from runs/divergence_plot/

All methods use beta 0.5 and the same data, seed, learning rate and steps. The matched comparison
is IPO vs DPO with the same length normalisation (mean log-prob per token); DPO with summed
log-probs, its usual form and this project's DPO default, is the third line.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from ipo_lightning.analysis.plots import plot_metrics_over_steps
from ipo_lightning.analysis.run_logs import RunMetrics, load_run

REPO = Path(__file__).resolve().parents[1]

METHODS: dict[str, list[str]] = {
    "IPO, beta 0.5, per-token mean (target margin 1)": ["--model.loss_type", "ipo"],
    "DPO, beta 0.5, per-token mean": ["--model.loss_type", "dpo", "--model.length_normalize", "true"],
    "DPO, beta 0.5, summed (DPO default)": ["--model.loss_type", "dpo", "--model.length_normalize", "false"],
}


def run_folder_name(label: str) -> str:
    """A short folder name for a method's legend label."""
    loss = "ipo" if label.startswith("IPO") else "dpo"
    return f"{loss}_{'summed' if 'summed' in label else 'mean'}"


def train(label: str, root: Path, epochs: int, every_n_steps: int) -> None:
    """One quickstart fit for ``label`` into ``root/<folder>/version_0``."""
    command = [
        sys.executable,
        "-m",
        "ipo_lightning",
        "fit",
        "--config",
        str(REPO / "configs" / "quickstart.yaml"),
        *METHODS[label],
        "--trainer.default_root_dir",
        str(root / run_folder_name(label)),
        "--trainer.max_epochs",
        str(epochs),
        "--trainer.val_check_interval",
        "1.0",
        "--trainer.enable_progress_bar",
        "false",
        "--divergence.every_n_steps",
        str(every_n_steps),
        "--divergence.sample_prompts",
        "0",
        "--export.enabled",
        "false",
        "--wandb.enabled",
        "false",
    ]
    print(f"training: {label}", flush=True)
    subprocess.run(command, check=True, cwd=REPO)


def main() -> None:
    """Train (unless ``--plot-only``) and write the PNG."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "divergence_plot", help="run folders")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images" / "divergence_ipo_vs_dpo.png")
    parser.add_argument("--epochs", type=int, default=5, help="epochs over the 1400 quickstart pairs")
    parser.add_argument("--every-n-steps", type=int, default=25, help="divergence measurement interval")
    parser.add_argument("--plot-only", action="store_true", help="re-plot existing runs, train nothing")
    args = parser.parse_args()

    if not args.plot_only:
        for label in METHODS:
            shutil.rmtree(args.runs / run_folder_name(label), ignore_errors=True)
            train(label, args.runs, args.epochs, args.every_n_steps)
    runs: dict[str, RunMetrics] = {
        label: load_run(args.runs / run_folder_name(label) / "version_0") for label in METHODS
    }
    plot_metrics_over_steps(
        runs,
        [
            ("divergence/kl", "KL(pi || ref), nats per completion token (log scale)"),
            ("divergence/logratio/margin_mean", "held-out margin h (log scale)"),
            ("val/rewards/accuracy", "held-out preference accuracy"),
        ],
        args.out,
        title=f"Quickstart data, {args.epochs} epochs: drift from the reference",
        reference_lines={"divergence/logratio/margin_mean": [(1.0, "IPO target 1/(2 beta)")]},
        log_scale=("divergence/kl", "divergence/logratio/margin_mean"),
    )
    for label, run in runs.items():
        print(
            f"{label}: final divergence/kl {run.last('divergence/kl'):.4f}, "
            f"margin_mean {run.last('divergence/logratio/margin_mean'):.3f}, "
            f"val accuracy {run.last('val/rewards/accuracy'):.3f}, "
            f"ood {run.last('val/ood/rewards/accuracy'):.3f}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
