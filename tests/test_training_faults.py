"""Training faults: non-finite losses and weights, a full disk, killed saves, pruned checkpoints, and what a
checkpoint holds. Callback behaviour runs on a linear toy module (seconds); the detector's own paths on the tiny
config of conftest.tiny_train_spec."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import THREADS, tiny_spec

from grounding_dino.status import read_status

REPO = Path(__file__).resolve().parents[1]


def _checkpoints(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("model_epoch_"))


def _toy(val_maps=(), poison_at_step=None):
    """A linear LightningModule (2 steps per epoch) that logs val_mAP = val_maps[epoch] and, at `poison_at_step`,
    turns its weight into NaN after the optimizer step."""
    import torch
    from lightning.pytorch import LightningModule

    class Toy(LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.layer(x), y)

        def on_train_batch_end(self, outputs, batch, batch_idx):
            if self.global_step == poison_at_step:
                with torch.no_grad():
                    self.layer.weight.fill_(float("nan"))

        def validation_step(self, batch, batch_idx):
            if val_maps:
                self.log("val_mAP", float(val_maps[self.current_epoch]))

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=0.1)

        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            data = torch.utils.data.TensorDataset(torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g))
            return torch.utils.data.DataLoader(data, batch_size=4)

        val_dataloader = train_dataloader

    return Toy()


def _trainer(results: Path, epochs: int, **checkpoint_kwargs):
    from lightning.pytorch import Trainer

    from grounding_dino.callbacks import AtomicCheckpointIO, GDinoCheckpoint, StatusLogger

    return Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, plugins=[AtomicCheckpointIO()], num_sanity_val_steps=0,
                   limit_val_batches=1,
                   callbacks=[GDinoCheckpoint(results, every_n_epochs=1, **checkpoint_kwargs),
                              StatusLogger(results, epochs)])


# ------------------------------------------------------------------------------------------------ toy callbacks
def test_nonfinite_weights_are_never_saved_and_latest_keeps_pointing_at_the_last_good_one(tmp_path):
    import torch

    from grounding_dino.callbacks import CheckpointNotSaved

    # step 3 is the last of epoch 1: its end-of-epoch checkpoint would hold the NaN weight
    with pytest.raises(CheckpointNotSaved, match=r"not saving checkpoint model_epoch_001_step_00004\.pth: 1 of "):
        _trainer(tmp_path, 3).fit(_toy(poison_at_step=4))
    assert _checkpoints(tmp_path) == ["model_epoch_000_step_00002.pth"]
    assert os.readlink(tmp_path / "gdino_model_latest.pth") == "model_epoch_000_step_00002.pth"
    saved = torch.load(tmp_path / "gdino_model_latest.pth", weights_only=True)
    assert all(torch.isfinite(t).all() for t in saved["state_dict"].values())
    last = read_status(tmp_path / "status.json")[-1]
    assert last["status"] == "FAILURE" and "train.optim.lr" in last["message"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_atomic_io_refuses_a_nonfinite_optimizer_state_and_keeps_the_old_file(tmp_path):
    import torch

    from grounding_dino.callbacks import AtomicCheckpointIO, CheckpointNotSaved

    target = tmp_path / "model_epoch_000_step_00001.pth"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, target)
    bad = {"state_dict": {"w": torch.ones(2)},
           "optimizer_states": [{"state": {0: {"exp_avg": torch.tensor([1.0, math.inf]), "step": torch.tensor(3)}}}]}
    with pytest.raises(CheckpointNotSaved, match=r"1 of 2 tensors hold NaN or Inf \(optimizer_states\[0\]\.state"):
        io.save_checkpoint(bad, target)
    assert torch.equal(torch.load(target, weights_only=True)["state_dict"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_keep_last_keeps_the_newest_and_the_best_validated(tmp_path):
    maps = (0.5, 0.9, 0.1, 0.2)
    _trainer(tmp_path, 4, keep_last=1).fit(_toy(val_maps=maps))
    # newest: epoch 3; best val_mAP 0.9: epoch 1
    assert _checkpoints(tmp_path) == ["model_epoch_001_step_00004.pth", "model_epoch_003_step_00008.pth"]
    assert os.readlink(tmp_path / "gdino_model_latest.pth") == "model_epoch_003_step_00008.pth"


def test_keep_last_zero_keeps_everything(tmp_path):
    _trainer(tmp_path, 3).fit(_toy())
    assert len(_checkpoints(tmp_path)) == 3


def test_stale_temp_files_of_a_killed_save_are_removed_at_the_next_start(tmp_path):
    stale = [tmp_path / ".model_epoch_000_step_00002.pth.k3x_9abc.tmp",
             tmp_path / ".gdino_model_latest.pth.a1b2c3d4.tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    unrelated = tmp_path / ".notes.tmp"
    unrelated.write_text("not ours")
    with pytest.warns(UserWarning, match="unfinished checkpoint write"):
        _trainer(tmp_path, 1).fit(_toy())
    assert not any(p.exists() for p in stale) and unrelated.exists()
    assert _checkpoints(tmp_path) == ["model_epoch_000_step_00002.pth"]


DISK_FULL = textwrap.dedent("""
    import os, resource, signal, sys
    import torch
    from grounding_dino.callbacks import AtomicCheckpointIO, CheckpointNotSaved
    from grounding_dino.errors import UserError

    folder = sys.argv[1]
    io = AtomicCheckpointIO()
    old = os.path.join(folder, "model_epoch_000_step_00002.pth")
    io.save_checkpoint({"state_dict": {"w": torch.ones(4)}}, old)
    os.symlink("model_epoch_000_step_00002.pth", os.path.join(folder, "gdino_model_latest.pth"))
    # the process may write no file above 1 MB; ignoring SIGXFSZ turns the kill into a write error (EFBIG)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    try:
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3 << 20)}},
                           os.path.join(folder, "model_epoch_001_step_00004.pth"))
    except UserError as err:
        print(err)
        sys.exit(err.exit_code)
""")


def test_disk_full_during_a_save_is_a_user_error_and_keeps_the_previous_checkpoint(tmp_path):
    import torch

    result = subprocess.run([sys.executable, "-c", DISK_FULL, str(tmp_path)], capture_output=True, text=True,
                            cwd=REPO, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stdout.strip().startswith(f"no space left in {tmp_path} (checkpoint needs about 13 MB)")
    assert "Traceback" not in result.stderr
    assert _checkpoints(tmp_path) == ["model_epoch_000_step_00002.pth"]
    assert os.readlink(tmp_path / "gdino_model_latest.pth") == "model_epoch_000_step_00002.pth"
    assert torch.equal(torch.load(tmp_path / "gdino_model_latest.pth", weights_only=True)["state_dict"]["w"],
                       torch.ones(4))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------------------ the detector
def _config(spec: dict):
    from grounding_dino.config import load_experiment

    return load_experiment(spec)


def test_a_nonfinite_loss_stops_training_with_the_step_the_terms_and_a_fix(tiny_train_spec, tmp_path):
    """The weights become Inf after step 2 (as with train.optim.lr .inf): step 3's loss is NaN; the epoch-0
    checkpoint stays the latest and nothing non-finite is written."""
    import torch
    from lightning.pytorch import Callback

    from grounding_dino.actions import run_action
    from grounding_dino.lightning_module import NonFiniteLoss

    class Diverge(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                with torch.no_grad():
                    pl_module.model.transformer.tgt_embed.weight.fill_(math.inf)

    torch.set_num_threads(THREADS)
    spec = tiny_spec(tiny_train_spec, tmp_path)
    with pytest.raises(NonFiniteLoss) as caught:
        run_action("train", _config(spec), callbacks=[Diverge()])
    message = str(caught.value)
    assert message.startswith("training loss is not finite at step 3 (epoch 1): non-finite terms ")
    assert "loss_bbox=nan" in message and "images in the batch: ids [" in message
    assert "lower train.optim.lr (now 0.001)" in message and "train.skip_nonfinite_steps" in message
    results = tmp_path / "train"
    assert _checkpoints(results) == ["model_epoch_000_step_00002.pth"]
    assert os.readlink(results / "gdino_model_latest.pth") == "model_epoch_000_step_00002.pth"
    last = read_status(results / "status.json")[-1]
    assert last["status"] == "FAILURE" and "not finite at step 3" in last["message"]


@pytest.fixture(scope="module")
def skipping_run(tiny_train_spec, tmp_path_factory):
    """One epoch with train.skip_nonfinite_steps whose first step has a NaN loss, a frozen text encoder that has
    weights on disk, and a stale temp file in the results folder."""
    import torch

    from grounding_dino.actions import run_action
    from grounding_dino.lightning_module import GroundingDINOModule
    from grounding_dino.model.text import build_bert, write_small_text_encoder

    torch.set_num_threads(THREADS)
    root = tmp_path_factory.mktemp("skipping")
    encoder = write_small_text_encoder(root / "bert", hidden_size=64)
    build_bert(encoder).save_pretrained(encoder)
    spec = tiny_spec(tiny_train_spec, root / "out", **{"train.num_epochs": 1, "train.skip_nonfinite_steps": True,
                                                        "train.freeze": ["bert"], "model.text_encoder_type": encoder})
    (root / "out" / "train").mkdir(parents=True)
    stale = root / "out" / "train" / ".model_epoch_000_step_00002.pth.zz9_zz9z.tmp"
    stale.write_bytes(b"killed mid-save")
    original = GroundingDINOModule._losses
    calls = []

    def first_training_loss_nan(self, outputs, targets):
        loss, losses = original(self, outputs, targets)
        if self.training:
            calls.append(1)
            if len(calls) == 1:
                losses = dict(losses, loss_giou=losses["loss_giou"] * math.nan)
                loss = loss * math.nan
        return loss, losses

    GroundingDINOModule._losses = first_training_loss_nan
    try:
        with pytest.warns(UserWarning, match=r"skipped 1 step\(s\) with a non-finite loss in epoch 0; the first: "
                                             r"training loss is not finite at step 0"):
            assert run_action("train", _config(spec)) == 0
    finally:
        GroundingDINOModule._losses = original
    return root / "out" / "train", spec, stale


def test_skip_nonfinite_steps_skips_counts_and_reports(skipping_run):
    import torch

    results, _, stale = skipping_run
    running = [r for r in read_status(results / "status.json") if r["status"] == "RUNNING"]
    assert [r["skipped_nonfinite_steps"] for r in running] == [1]
    assert read_status(results / "status.json")[-1]["skipped_nonfinite_steps"] == 1
    ckpt = torch.load(results / "gdino_model_latest.pth", weights_only=True)
    # two batches, one optimizer update: every parameter's AdamW step count is 1
    steps = {float(s["step"]) for s in ckpt["optimizer_states"][0]["state"].values()}
    assert steps == {1.0}
    assert not stale.exists()


def test_a_frozen_text_encoder_is_named_not_stored_and_loads_back(skipping_run, tmp_path):
    import torch

    from grounding_dino.actions import run_action
    from grounding_dino.model import build_model
    from grounding_dino.model.checkpoint import load_weights

    results, spec, _ = skipping_run
    latest = results / "gdino_model_latest.pth"
    ckpt = torch.load(latest, weights_only=True)
    assert ckpt["text_encoder"] == spec["model"]["text_encoder_type"]
    assert not [k for k in ckpt["state_dict"] if k.startswith("model.bert.")]
    model = build_model(_config(spec).model)
    assert load_weights(model, latest).ok
    # resume: the trainer refills the text encoder from model.text_encoder_type
    resumed = dict(spec, results_dir=str(tmp_path))
    resumed["train"] = dict(spec["train"], num_epochs=2, resume_training_checkpoint_path=str(latest))
    assert run_action("train", _config(resumed)) == 0
    assert _checkpoints(tmp_path / "train") == ["model_epoch_001_step_00004.pth"]
