"""Reading run folders back (metrics.csv written by Lightning's own CSVLogger) and plotting them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.loggers import CSVLogger
from matplotlib.image import imread

from ipo_lightning.analysis.plots import plot_metrics_over_steps
from ipo_lightning.analysis.run_logs import load_run
from ipo_lightning.errors import UserInputError


def _logged_run(root: Path, kl_values: list[float], loss_type: str) -> Path:
    logger = CSVLogger(root, name="")
    for step, kl in enumerate(kl_values):
        logger.log_metrics({"divergence/kl": kl}, step=step * 10)
        logger.log_metrics({"train/loss": 1.0 / (step + 1)}, step=step * 10 + 5)
    logger.save()
    run_dir = Path(logger.log_dir)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": {"loss_type": loss_type, "beta": 0.5}}))
    return run_dir


def test_load_run_reads_series_skipping_rows_without_the_metric(tmp_path: Path) -> None:
    run = load_run(_logged_run(tmp_path, [0.0, 0.02, 0.05], "ipo"))
    assert run.series("divergence/kl") == ([0, 10, 20], [0.0, 0.02, 0.05])
    assert run.series("train/loss") == ([5, 15, 25], [1.0, 0.5, pytest.approx(1 / 3)])
    assert run.last("divergence/kl") == 0.05 and math.isnan(run.last("never/logged"))
    assert run.setting("model.loss_type") == "ipo" and run.setting("model.missing", 7) == 7


def test_load_run_names_the_folder_without_metrics(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match=f"{tmp_path}: no metrics.csv"):
        load_run(tmp_path)


def test_plot_writes_a_png_with_one_panel_per_metric(tmp_path: Path) -> None:
    runs = {
        "ipo": load_run(_logged_run(tmp_path / "a", [0.0, 0.05, 0.05], "ipo")),
        "dpo": load_run(_logged_run(tmp_path / "b", [0.0, 0.08, 0.2], "dpo")),
    }
    path = plot_metrics_over_steps(
        runs,
        [("divergence/kl", "KL"), ("train/loss", "loss")],
        tmp_path / "out" / "plot.png",
        title="test",
        reference_lines={"train/loss": [(0.5, "target")]},
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(path)
    height, width = image.shape[:2]
    assert width > 1.8 * height  # two panels side by side
    assert image[..., :3].std() > 0.05  # something was drawn


def _validated_run(root: Path, val_lag: int) -> Path:
    """A metrics.csv with validations at steps 50 and 100, each followed by a generation measurement:
    ``val/`` rows ``val_lag`` steps before their ``gen/`` rows (1: the layout of earlier versions)."""
    logger = CSVLogger(root, name="")
    logger.log_metrics({"gen/reward": 0.1}, step=0)
    for step, loss in ((50, 0.6), (100, 0.4)):
        logger.log_metrics({"train/loss": loss + 0.1}, step=step - 1)
        logger.log_metrics({"val/loss": loss}, step=step - val_lag)
        logger.log_metrics({"gen/reward": 1.0 - loss}, step=step)
    logger.save()
    return Path(logger.log_dir)


def test_plots_draw_old_layout_validations_at_the_steps_taken(tmp_path: Path) -> None:
    old, new = (load_run(_validated_run(tmp_path / f"lag{lag}", lag)) for lag in (1, 0))
    assert [int(row["step"]) for row in old.rows if row.get("val/loss")] == [49, 99]  # as logged
    assert old.series("val/loss") == new.series("val/loss") == ([50, 100], [0.6, 0.4])
    assert old.series("train/loss") == new.series("train/loss") == ([49, 99], [0.7, 0.5])
    images = []
    for label, run in (("old", old), ("new", new)):
        panels = [("val/loss", "loss"), ("gen/reward", "reward")]
        images.append(imread(plot_metrics_over_steps({"run": run}, panels, tmp_path / f"{label}.png")))
    assert images[0].shape == images[1].shape and (images[0] == images[1]).all()  # the same points drawn
