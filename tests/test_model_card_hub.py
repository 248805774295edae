"""The export's model card, its W&B model artifact, and the hub push's start-up checks."""

from __future__ import annotations

import contextlib
import csv
import http.server
import json
import math
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
import torch
import wandb
import yaml
from huggingface_hub import ModelCard
from lightning.pytorch.loggers import CSVLogger

from ipo_lightning.analysis.run_logs import RunMetrics, load_run
from ipo_lightning.callbacks import DivergenceMonitor, HFExport
from ipo_lightning.cli import main
from ipo_lightning.data import DataSource, PreferenceDataModule
from ipo_lightning.errors import ConfigError
from ipo_lightning.hub import HubPushError, check_hub_access, check_repo_id, push_export, push_plan
from ipo_lightning.model_card import CONFIG_FILENAME, build_model_card
from ipo_lightning.module import DPO_DEFAULT_BETA, IPO_DEFAULT_BETA, PreferenceModule
from tests.helpers import (
    fit_config,
    polite_pairs,
    quiet_trainer,
    run_main,
    write_config,
    write_jsonl,
)

TABLE_ROW = re.compile(r"^\| `([^`]+)` \| (\S+) \| (\d+) \|$", re.MULTILINE)


def _last_values(metrics_csv: Path) -> dict[str, tuple[float, int]]:
    """Each column's last non-empty value and its step, read straight from the CSV file."""
    last: dict[str, tuple[float, int]] = {}
    with metrics_csv.open(newline="") as handle:
        for row in csv.DictReader(handle):
            for name, value in row.items():
                if value not in ("", None) and name != "step":
                    last[name] = (float(value), int(row["step"]))
    return last


def _written_record(path: Path, needle: bytes, timeout: float = 60.0) -> bytes:
    """The bytes of W&B's run record once they hold ``needle``: ``wandb.finish()`` can return before
    W&B's service process has written an offline run's last records to the file."""
    deadline = time.monotonic() + timeout
    while needle not in (record := path.read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return record


def _no_run_folder(tmp_path: Path) -> bool:
    runs = tmp_path / "runs"
    return not runs.exists() or not any(runs.iterdir())


def _closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_fit_writes_a_model_card_from_the_run_files_and_a_wandb_artifact(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(16))
    val = write_jsonl(tmp_path / "val.jsonl", polite_pairs(4, offset=50))
    config = fit_config(
        tmp_path,
        tiny_model_dir,
        train,
        {"in_dist": val},
        trainer={"max_steps": 4, "val_check_interval": 2},
        model={"loss_type": "ipo", "beta": 0.5},
        data={"batch_size": 4, "label_noise": 0.25},
        divergence={"sample_prompts": 1, "max_new_tokens": 4},
    )
    main(["fit", "--config", str(write_config(tmp_path / "c.yaml", config))])
    run_dir = tmp_path / "runs" / "version_0"
    export = run_dir / "hf_model"

    card = ModelCard.load(export / "README.md")
    assert card.data.library_name == "transformers"
    assert {"ipo-lightning", "ipo"} <= set(card.data.tags)
    # A local model folder and a local data file are no hub ids: named in the body only.
    assert card.data.base_model is None and card.data.datasets is None
    assert f"`{tiny_model_dir}`" in card.text and f"`{train}`: 16 training pairs" in card.text
    assert "`(h - (2p - 1)/(2 beta))^2`" in card.text
    assert "**beta**: 0.5 (target margin 1/(2 beta) = 1)" in card.text
    assert "**Label noise**: 0.25" in card.text and "**Length normalisation**: on" in card.text

    # Every val/ metric and divergence/kl, at the last value and step metrics.csv holds for it.
    last = _last_values(run_dir / "metrics.csv")
    table = {name: (float(value), int(step)) for name, value, step in TABLE_ROW.findall(card.text)}
    expected = {name for name in last if name.startswith("val/")} | {"divergence/kl"}
    assert set(table) == expected and "val/rewards/accuracy" in table
    for name, (value, step) in table.items():
        assert step == last[name][1], name
        assert math.isclose(value, last[name][0], rel_tol=5e-4, abs_tol=1e-12), name
    assert table["divergence/kl"][1] == 4  # the measurement after the last validation is in the card

    # The config beside the card is the run's, and the card's command runs it.
    assert (export / CONFIG_FILENAME).read_bytes() == (run_dir / "config.yaml").read_bytes()
    assert f"python -m ipo_lightning fit --config {CONFIG_FILENAME}" in card.text

    # The export is a W&B model artifact of the offline run, referring to the export's own files.
    wandb.finish()  # what the end of the process does: the run's record is written out
    (wandb_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    run_id = wandb_file.stem.removeprefix("run-")
    record = _written_record(wandb_file, f"hf_model-{run_id}".encode())
    assert f"hf_model-{run_id}".encode() in record and b"model" in record
    for path in export.iterdir():
        assert str(path.resolve()).encode() in record, path.name


def test_card_front_matter_names_hub_models_and_datasets(tmp_path: Path) -> None:
    rows = [
        {"step": "9", "val/loss": "0.5", "divergence/kl": "", "gen/win_rate": ""},
        {"step": "19", "val/loss": "0.25", "divergence/kl": "0.125", "gen/win_rate": "0.75"},
        {"step": "19", "train/loss": "0.1"},
    ]
    config = {
        "model": {
            "model_name_or_path": "Qwen/Qwen2.5-0.5B-Instruct",
            "loss_type": "dpo",
            "beta": 0.1,
            "label_smoothing": 0.2,
            "length_normalize": False,
            "reference": "precomputed",
        },
        "data": {"train": {"path": "HuggingFaceH4/ultrafeedback_binarized", "split": "train_prefs"}},
    }
    run = RunMetrics(run_dir=tmp_path, rows=rows, config=config)
    build_model_card(run, global_step=20, train_pairs=1000, reproducible=False, title="me/m").save(
        tmp_path / "README.md"
    )
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "Qwen/Qwen2.5-0.5B-Instruct"
    assert card.data.datasets == ["HuggingFaceH4/ultrafeedback_binarized"]
    assert {"ipo-lightning", "dpo"} <= set(card.data.tags) and "ipo" not in card.data.tags
    assert "`-(1 - e) logsigmoid(beta h) - e logsigmoid(-beta h)`" in card.text
    assert "**Label smoothing** e: 0.2" in card.text and "**Length normalisation**: off" in card.text
    assert "(split train_prefs): 1000 training pairs" in card.text
    table = {name: (value, step) for name, value, step in TABLE_ROW.findall(card.text)}
    assert table == {
        "val/loss": ("0.25", "19"),
        "divergence/kl": ("0.125", "19"),
        "gen/win_rate": ("0.75", "19"),
    }
    assert "python -m ipo_lightning" not in card.text  # no config to rerun: no command claimed


def test_card_says_what_a_builtin_model_is_not_where_it_is_cached(tmp_path: Path) -> None:
    config = {"model": {"model_name_or_path": "builtin:quickstart"}, "data": {}}
    run = RunMetrics(run_dir=tmp_path, rows=[], config=config)
    card = build_model_card(run, global_step=1, train_pairs=None, reproducible=True, title="t")
    assert card.data.base_model is None
    assert "`builtin:quickstart`: a tiny Llama" in card.text and ".cache" not in card.text
    assert "No held-out metrics were logged." in card.text


def test_card_shows_the_generation_scores_metrics_csv_holds(tmp_path: Path) -> None:
    columns = ["step", "val/loss", "gen/reward", "gen/win_rate", "gen/length", "gen/ood/reward"]
    with (tmp_path / "metrics.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerow(["0", "", "1.5", "0.5", "7", "1.25"])
        writer.writerow(["4", "0.25", "", "", "", ""])
        writer.writerow(["4", "", "2.5", "0.625", "9", "2.25"])
    config = {"model": {"model_name_or_path": "builtin:quickstart"}, "data": {}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    card = build_model_card(
        load_run(tmp_path), global_step=4, train_pairs=None, reproducible=False, title="t"
    )
    table = {name: (value, step) for name, value, step in TABLE_ROW.findall(card.text)}
    # The primary set's reward and win rate; not every gen/ metric, nor the per-set copies.
    assert table == {"val/loss": ("0.25", "4"), "gen/reward": ("2.5", "4"), "gen/win_rate": ("0.625", "4")}


@pytest.mark.parametrize(("loss_type", "beta"), [("ipo", IPO_DEFAULT_BETA), ("dpo", DPO_DEFAULT_BETA)])
def test_card_names_the_beta_the_run_used_when_none_was_set(
    tmp_path: Path, loss_type: str, beta: float
) -> None:
    config = {"model": {"model_name_or_path": "builtin:quickstart", "loss_type": loss_type, "beta": None}}
    run = RunMetrics(run_dir=tmp_path, rows=[], config=config)
    card = build_model_card(run, global_step=1, train_pairs=None, reproducible=False, title="t")
    assert f"- **beta**: {beta:g}" in card.text
    assert PreferenceModule("builtin:quickstart", loss_type=loss_type).hparams.beta == beta


@pytest.mark.parametrize("repo_id", ["me/a/b", "me/bad..name", "me/name.git", "-me/x"])
def test_malformed_repo_id_is_a_config_error(repo_id: str) -> None:
    with pytest.raises(
        ConfigError, match=rf"^export\.push_to_hub='{re.escape(repo_id)}' is not a hub repo id"
    ):
        check_repo_id(repo_id)


def test_offline_mode_is_reported_before_training() -> None:
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # conftest: the hub client refuses every request
    with pytest.raises(
        ConfigError, match=r"^export\.push_to_hub=me/m: the hub is needed, but HF_HUB_OFFLINE"
    ):
        check_hub_access("me/m", token="hf_not_checked")


def test_bad_repo_id_stops_the_fit_at_start_up_with_one_line(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(4))
    config = write_config(
        tmp_path / "c.yaml", fit_config(tmp_path, tiny_model_dir, train, wandb={"enabled": False})
    )
    code, err = run_main(["fit", "--config", str(config), "--export.push_to_hub", "me/bad..name"], capsys)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in err
    assert lines == [
        "error: export.push_to_hub='me/bad..name' is not a hub repo id: "
        "Cannot have -- or .. in repo_id: 'me/bad..name'."
    ]
    assert _no_run_folder(tmp_path)


def _fit_pushing(
    tmp_path: Path,
    model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    *,
    token: str | None = None,
    endpoint: str | None = None,
) -> tuple[int, str, str]:
    """``fit --export.push_to_hub me/m`` through the CLI's entry point in this process, hub lookups
    allowed: with ``token`` as HF_TOKEN (none, and no login, when None) and the hub at ``endpoint``
    (huggingface_hub's default when None). Its exit code, stdout and stderr.

    What the HF_HOME, HF_TOKEN and HF_ENDPOINT variables of a child would set, set in this process:
    the child's start-up would cost seconds of imports, and its subject is the start-up check.
    """
    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(4))
    config = write_config(
        tmp_path / "c.yaml", fit_config(tmp_path, model_dir, train, wandb={"enabled": False})
    )
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    # An HF_HOME of its own: no login's token file.
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(variable, raising=False)
    if token is not None:
        monkeypatch.setenv("HF_TOKEN", token)
    if endpoint is not None:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    capsys.readouterr()
    try:
        main(["fit", "--config", str(config), "--export.push_to_hub", "me/m"])
        code = 0
    except SystemExit as exit_info:
        code = int(exit_info.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_no_token_stops_the_fit_at_start_up(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _fit_pushing(tmp_path, tiny_model_dir, monkeypatch, capsys)
    assert code == 2, err[-3000:]
    assert _error_lines(err) == [
        "error: export.push_to_hub=me/m: no Hugging Face token; log in with `hf auth login` or set HF_TOKEN"
    ]
    assert _no_run_folder(tmp_path)
    assert "Epoch" not in out + err


def test_unreachable_hub_stops_the_fit_at_start_up(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    code, _, err = _fit_pushing(
        tmp_path, tiny_model_dir, monkeypatch, capsys, token="hf_unchecked", endpoint=endpoint
    )
    assert code == 2, err[-3000:]
    (line,) = _error_lines(err)
    assert line.startswith(f"error: export.push_to_hub=me/m: cannot reach {endpoint} (")
    assert "refused" in line.lower()
    assert _no_run_folder(tmp_path)


def test_python_api_card_holds_the_rows_still_pending_at_fit_end(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(8))
    val = write_jsonl(tmp_path / "val.jsonl", polite_pairs(4, offset=50))
    module = PreferenceModule(str(tiny_model_dir), optimizer=lambda params: torch.optim.SGD(params, lr=0.1))
    data = PreferenceDataModule(
        train=DataSource(path=str(train)),
        val={"held": DataSource(path=str(val))},
        tokenizer_name_or_path=str(tiny_model_dir),
        batch_size=4,
    )
    # The monitor's last measurement (step 3, mid-epoch, no validation or train row after it) reaches
    # the logger with log_metrics, which writes nothing to disk: the CSV logger flushes on the next
    # Lightning logging call or at finalize, and finalize comes after on_fit_end.
    logger = CSVLogger(tmp_path, name="", version="run")
    monitor = DivergenceMonitor(every_n_steps=3, on_validation=False, sample_prompts=0, num_pairs=2)
    trainer = quiet_trainer(tmp_path, max_steps=3, logger=logger, callbacks=[monitor, HFExport()])
    trainer.fit(module, datamodule=data)
    card = ModelCard.load(tmp_path / "run" / "hf_model" / "README.md")
    table = {name: (float(value), int(step)) for name, value, step in TABLE_ROW.findall(card.text)}
    last = _last_values(tmp_path / "run" / "metrics.csv")
    assert set(table) == {name for name in last if name.startswith("val/")} | {"divergence/kl"}
    assert table["divergence/kl"][1] == 3 and "val/loss" in table
    assert all(math.isclose(table[name][0], last[name][0], rel_tol=5e-4, abs_tol=1e-12) for name in table)
    assert f"`{train}`: 8 training pairs" in card.text and "Trained through the Python API" in card.text
    assert not (tmp_path / "run" / "hf_model" / CONFIG_FILENAME).exists()


def test_a_failed_upload_is_one_line_that_says_how_to_retry(tmp_path: Path) -> None:
    # HF_HUB_OFFLINE (conftest) makes the hub client refuse the first request, as a dropped network would.
    plan = push_plan(tmp_path / "hf_model", "me/m", private=False, global_step=3)
    with pytest.raises(HubPushError) as failure:
        push_export(plan)
    message = str(failure.value)
    assert message.startswith("export.push_to_hub=me/m: upload failed (OfflineModeIsEnabled: ")
    assert message.endswith(
        f"the export is in {tmp_path / 'hf_model'}; retry with `hf upload me/m {plan.folder} .`"
    )
    assert "\n" not in message


@contextlib.contextmanager
def _whoami_hub(answer: dict[str, Any]) -> Iterator[tuple[str, list[str]]]:
    """A local HTTP server that answers the hub's ``/api/whoami-v2`` with ``answer`` (404 otherwise):
    its URL, and the Authorization headers it was sent."""
    seen: list[str] = []

    class Hub(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
            seen.append(f"{self.path} {self.headers.get('Authorization', '')}".strip())
            body = json.dumps(answer).encode() if self.path == "/api/whoami-v2" else b"{}"
            self.send_response(200 if self.path == "/api/whoami-v2" else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def _fine_grained(*scoped: tuple[str, str, list[str]], global_: list[str] | None = None) -> dict[str, Any]:
    """A whoami answer of user ``me`` (member of org ``lab``) for a fine-grained token with these
    ``(entity type, entity name, permissions)`` scopes, in the shape the hub sends."""
    return {
        "type": "user",
        "name": "me",
        "orgs": [{"type": "org", "name": "lab"}],
        "auth": {
            "type": "access_token",
            "accessToken": {
                "displayName": "ci",
                "role": "fineGrained",
                "fineGrained": {
                    "canReadGatedRepos": False,
                    "global": global_ or ["discussion.write", "post.write"],
                    "scoped": [
                        {"entity": {"_id": "x", "type": kind, "name": name}, "permissions": permissions}
                        for kind, name, permissions in scoped
                    ],
                },
            },
        },
    }


READ_ONLY = ["repo.content.read", "repo.access.read"]
WRITE = [*READ_ONLY, "repo.write"]


@pytest.mark.parametrize(
    ("repo_id", "scoped", "allowed"),
    [
        ("me/m", [("user", "me", WRITE)], True),
        ("m", [("user", "me", WRITE)], True),  # no namespace: the token's user
        ("lab/m", [("user", "me", WRITE), ("org", "lab", WRITE)], True),
        ("me/m", [("model", "me/m", WRITE)], True),  # this repo only
        ("m", [("model", "me/m", WRITE)], True),  # this repo only, named without its namespace
        ("me/m", [("user", "me", READ_ONLY)], False),
        ("lab/m", [("user", "me", WRITE), ("org", "lab", READ_ONLY)], False),
        ("lab/m", [("user", "me", WRITE)], False),  # the user's scope is not the org's
        ("me/other", [("model", "me/m", WRITE)], False),
        ("me/m", [], False),
    ],
)
def test_a_fine_grained_token_must_grant_writing_to_the_repo_namespace(
    monkeypatch: pytest.MonkeyPatch, repo_id: str, scoped: list[tuple[str, str, list[str]]], allowed: bool
) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the local stand-in only
    with _whoami_hub(_fine_grained(*scoped)) as (endpoint, seen):
        if allowed:
            check_hub_access(repo_id, token="hf_fine", endpoint=endpoint)
        else:
            namespace = repo_id.split("/")[0] if "/" in repo_id else "me"
            with pytest.raises(ConfigError) as refused:
                check_hub_access(repo_id, token="hf_fine", endpoint=endpoint)
            message = str(refused.value)
            assert message.startswith(
                f"export.push_to_hub={repo_id}: the fine-grained Hugging Face token may not write to "
                f"{namespace!r}"
            )
            assert "\n" not in message
    assert seen == ["/api/whoami-v2 Bearer hf_fine"]  # the token was checked by the stand-in hub, once


def test_a_write_token_passes_and_a_read_token_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    write = {"type": "user", "name": "me", "auth": {"accessToken": {"role": "write"}}}
    with _whoami_hub(write) as (endpoint, _):
        check_hub_access("lab/m", token="hf_w", endpoint=endpoint)
    # A fine-grained token whose answer lists no scopes at all: nothing to judge, so it passes.
    unlisted = {"type": "user", "name": "me", "auth": {"accessToken": {"role": "fineGrained"}}}
    with _whoami_hub(unlisted) as (endpoint, _):
        check_hub_access("me/m", token="hf_f", endpoint=endpoint)
    read = {"type": "user", "name": "me", "auth": {"accessToken": {"role": "read"}}}
    with _whoami_hub(read) as (endpoint, _), pytest.raises(ConfigError, match="token is read-only"):
        check_hub_access("me/m", token="hf_r", endpoint=endpoint)


def test_a_fine_grained_token_without_write_access_stops_the_fit_at_start_up(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with _whoami_hub(_fine_grained(("user", "me", READ_ONLY))) as (endpoint, seen):
        code, _, err = _fit_pushing(
            tmp_path, tiny_model_dir, monkeypatch, capsys, token="hf_fine", endpoint=endpoint
        )
    assert code == 2, err[-3000:]
    (line,) = _error_lines(err)
    assert line.startswith("error: export.push_to_hub=me/m: the fine-grained Hugging Face token may not")
    assert "/api/whoami-v2 Bearer hf_fine" in seen  # the token was checked by the stand-in hub
    assert _no_run_folder(tmp_path)
