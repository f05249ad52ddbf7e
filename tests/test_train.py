"""Training: status writer, action registry, checkpoint callbacks, and a tiny real Grounding DINO run."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from grounding_dino import actions  # noqa: E402
from grounding_dino.status import StatusWriter, read_status  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ status.json
def test_status_lines_follow_tao_format(tmp_path):
    writer = StatusWriter(tmp_path / "status.json")
    writer.write("STARTED", "go")
    writer.write("RUNNING", "epoch", epoch=0, step=5, kpi={"train_loss": 1.5, "val_mAP": float("nan")})
    StatusWriter(tmp_path / "status.json", enabled=False).write("RUNNING", "other rank")
    records = read_status(tmp_path / "status.json")
    assert [r["status"] for r in records] == ["STARTED", "RUNNING"]
    month, day, year = records[0]["date"].split("/")
    assert len(year) == 4 and 1 <= int(month) <= 12 and 1 <= int(day) <= 31
    assert len(records[0]["time"].split(":")) == 3 and records[0]["verbosity"] == "INFO"
    assert records[1]["epoch"] == 0 and records[1]["kpi"] == {"train_loss": 1.5, "val_mAP": None}
    with pytest.raises(ValueError, match="status must be one of"):
        writer.write("DONE")


def test_read_status_names_bad_line(tmp_path):
    path = tmp_path / "status.json"
    path.write_text('{"status": "STARTED"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2"):
        read_status(path)


# ------------------------------------------------------------------------------------------------ actions
def test_action_registry_is_lazy_and_errors_are_clear():
    # importing the registry must not import torch (the CLI and SDK import it before anything heavy)
    code = "import sys, grounding_dino.actions; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    assert "train" in actions.available_actions()
    with pytest.raises(actions.UnknownActionError, match="unknown action 'bake'"):
        actions.get_action("bake")
    missing = next(a for a in ("gen_trt_engine", "quantize", "export") if a not in actions.available_actions())
    with pytest.raises(actions.ActionUnavailableError, match="not available yet"):
        actions.get_action(missing)


def test_unimportable_action_is_reported_as_unavailable(monkeypatch):
    monkeypatch.setitem(actions._REGISTRY, "export", "grounding_dino.no_such_module:run")
    with pytest.raises(actions.ActionUnavailableError, match="importing grounding_dino.no_such_module failed"):
        actions.get_action("export")
    with pytest.raises(ValueError, match="package.module:function"):
        actions.register_action("export", "no_colon")


def test_train_action_resolves_to_run_training():
    from grounding_dino.train import run_training

    assert actions.get_action("train") is run_training


# ------------------------------------------------------------------------------------------------ callbacks
class _Tiny:
    """A linear regression LightningModule: exercises the callbacks in a second, without the detector."""

    @staticmethod
    def module(fail_at_step=None):
        import torch
        from lightning.pytorch import LightningModule

        class Tiny(LightningModule):
            def __init__(self):
                super().__init__()
                self.layer = torch.nn.Linear(4, 1)

            def training_step(self, batch, batch_idx):
                if fail_at_step is not None and self.global_step == fail_at_step:
                    raise RuntimeError("injected failure")
                x, y = batch
                loss = torch.nn.functional.mse_loss(self.layer(x), y)
                self.log("train_loss", loss, on_step=False, on_epoch=True)
                return loss

            def configure_optimizers(self):
                return torch.optim.AdamW(self.parameters(), lr=0.1)

            def train_dataloader(self):
                g = torch.Generator().manual_seed(0)
                data = torch.utils.data.TensorDataset(torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g))
                return torch.utils.data.DataLoader(data, batch_size=4, shuffle=True)

        return Tiny()

    @staticmethod
    def trainer(results, epochs=3, **checkpoint_kwargs):
        from lightning.pytorch import Trainer

        from grounding_dino.callbacks import AtomicCheckpointIO, GDinoCheckpoint, RngState, StatusLogger

        return Trainer(
            accelerator="cpu", max_epochs=epochs, logger=False, enable_progress_bar=False,
            enable_model_summary=False, plugins=[AtomicCheckpointIO()],
            callbacks=[GDinoCheckpoint(results, **checkpoint_kwargs), RngState(), StatusLogger(results, epochs)],
        )


def _checkpoints(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("model_epoch_"))


def test_checkpoints_every_epoch_named_linked_and_loadable(tmp_path):
    import torch

    _Tiny.trainer(tmp_path, every_n_epochs=1).fit(_Tiny.module())
    assert _checkpoints(tmp_path) == ["model_epoch_000_step_00002.pth", "model_epoch_001_step_00004.pth",
                                      "model_epoch_002_step_00006.pth"]
    latest = tmp_path / "gdino_model_latest.pth"
    assert latest.is_symlink() and os.readlink(latest) == "model_epoch_002_step_00006.pth"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    ckpt = torch.load(latest, weights_only=True)  # RNG states and scheduler state load without pickle
    assert ckpt["global_step"] == 6 and "RngState" in ckpt["callbacks"]

    records = read_status(tmp_path / "status.json")
    assert [r["status"] for r in records] == ["STARTED", "RUNNING", "RUNNING", "RUNNING", "SUCCESS"]
    epoch_line = records[3]
    for key in ("epoch", "step", "max_epoch", "max_step", "time_per_epoch", "time_per_step", "eta"):
        assert key in epoch_line, key
    assert (epoch_line["epoch"], epoch_line["step"], epoch_line["max_epoch"], epoch_line["max_step"]) == (2, 6, 3, 6)
    assert set(epoch_line["kpi"]) == {"train_loss", "lr"} and epoch_line["kpi"]["lr"] == pytest.approx(0.1)


def test_checkpoint_interval_in_steps(tmp_path):
    _Tiny.trainer(tmp_path, every_n_train_steps=3).fit(_Tiny.module())
    assert _checkpoints(tmp_path) == ["model_epoch_001_step_00003.pth", "model_epoch_002_step_00006.pth"]
    assert os.readlink(tmp_path / "gdino_model_latest.pth") == "model_epoch_002_step_00006.pth"


def test_checkpoint_saved_and_linked_on_exception(tmp_path):
    with pytest.raises(RuntimeError, match="injected failure"):
        _Tiny.trainer(tmp_path, every_n_epochs=1).fit(_Tiny.module(fail_at_step=3))
    # epoch 0 ended at step 2; the failure came in epoch 1 after one more step
    assert _checkpoints(tmp_path) == ["model_epoch_000_step_00002.pth", "model_epoch_001_step_00003.pth"]
    assert os.readlink(tmp_path / "gdino_model_latest.pth") == "model_epoch_001_step_00003.pth"
    last = read_status(tmp_path / "status.json")[-1]
    assert last["status"] == "FAILURE" and "injected failure" in last["message"]


def test_atomic_save_never_leaves_a_partial_file(tmp_path):
    import torch

    from grounding_dino.callbacks import AtomicCheckpointIO

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    target = tmp_path / "model_epoch_000_step_00001.pth"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"weights": torch.ones(3)}, target)
    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"weights": torch.zeros(1000), "bad": Unpicklable()}, target)
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no temp file left behind
    assert torch.equal(torch.load(target, weights_only=True)["weights"], torch.ones(3))  # old content intact


def test_rng_state_round_trip():
    import numpy as np
    import torch

    from grounding_dino.callbacks import RngState

    callback = RngState()
    state = callback.state_dict()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    callback.load_state_dict(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first
