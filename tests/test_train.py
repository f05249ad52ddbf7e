"""Training: status writer, action registry, checkpoint callbacks, and a tiny real Grounding DINO run."""
from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import THREADS, tiny_spec

from grounding_dino import actions
from grounding_dino.status import StatusWriter, read_status

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
def test_action_registry_is_lazy_and_errors_are_clear(monkeypatch):
    # importing the registry must not import torch (the CLI and SDK import it before anything heavy)
    code = "import sys, grounding_dino.actions; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    assert "train" in actions.REGISTRY
    with pytest.raises(actions.ActionError, match="unknown action 'bake'"):
        actions.get_action("bake")


def test_unimportable_action_is_reported_as_unavailable(monkeypatch):
    monkeypatch.setitem(actions.REGISTRY, "export", actions.Entry("grounding_dino.no_such_module:run", "export"))
    with pytest.raises(actions.ActionError, match="importing grounding_dino.no_such_module failed"):
        actions.get_action("export")


def test_train_action_resolves_to_run_training():
    from grounding_dino.actions.train import run_training

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

            def validation_step(self, batch, batch_idx):
                x, y = batch
                self.log("val_loss", torch.nn.functional.mse_loss(self.layer(x), y))

            def train_dataloader(self):
                g = torch.Generator().manual_seed(0)
                data = torch.utils.data.TensorDataset(torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g))
                return torch.utils.data.DataLoader(data, batch_size=4, shuffle=True)

            val_dataloader = train_dataloader

        return Tiny()

    @staticmethod
    def trainer(results, epochs=3, validate_every=1, **checkpoint_kwargs):
        from lightning.pytorch import Trainer

        from grounding_dino.callbacks import (
            AtomicCheckpointIO,
            GDinoCheckpoint,
            RngState,
            StatusLogger,
        )

        return Trainer(
            accelerator="cpu", max_epochs=epochs, logger=False, enable_progress_bar=False,
            enable_model_summary=False, plugins=[AtomicCheckpointIO()], check_val_every_n_epoch=validate_every,
            num_sanity_val_steps=0,
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
    assert set(epoch_line["kpi"]) == {"train_loss", "val_loss", "lr"} and epoch_line["kpi"]["lr"] == pytest.approx(0.1)


def test_status_reports_val_kpis_only_in_epochs_that_validated(tmp_path):
    _Tiny.trainer(tmp_path, epochs=4, validate_every=2, every_n_epochs=1).fit(_Tiny.module())
    lines = [r for r in read_status(tmp_path / "status.json") if r["status"] == "RUNNING"]
    assert ["val_loss" in r["kpi"] for r in lines] == [False, True, False, True]


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


# ------------------------------------------------------------------------------------------------ real training
def _config(spec: dict):
    from grounding_dino.config import load_experiment

    return load_experiment(spec)


@pytest.fixture(scope="module")
def two_epochs(tiny_train_spec, tmp_path_factory):
    """One real 2-epoch run (8 images, batch 4: 2 steps per epoch) shared by the tests below."""
    import torch

    from grounding_dino.actions import run_action

    torch.set_num_threads(THREADS)
    out = tmp_path_factory.mktemp("two_epochs")
    spec = tiny_spec(tiny_train_spec, out, encryption_key="secret-key")
    assert run_action("train", _config(spec)) == 0
    return out / "train", spec


def test_run_writes_tao_named_checkpoints_and_latest_link(two_epochs):
    results, _ = two_epochs
    assert _checkpoints(results) == ["model_epoch_000_step_00002.pth", "model_epoch_001_step_00004.pth"]
    assert os.readlink(results / "gdino_model_latest.pth") == "model_epoch_001_step_00004.pth"
    assert not [p for p in results.iterdir() if p.name.endswith(".tmp")]


def test_checkpoint_content_and_reload(two_epochs):
    import torch

    from grounding_dino.model import build_model
    from grounding_dino.model.checkpoint import load_weights

    results, spec = two_epochs
    ckpt = torch.load(results / "gdino_model_latest.pth", weights_only=True)
    assert ckpt["tao_model"] == "grounding_dino" and ckpt["epoch"] == 1 and ckpt["global_step"] == 4
    assert ckpt["model_config"]["hidden_dim"] == 64 and ckpt["optimizer_states"] and ckpt["lr_schedulers"]
    assert all(k.startswith("model.") for k in ckpt["state_dict"])
    model = build_model(_config(spec).model)
    report = load_weights(model, results / "gdino_model_latest.pth")
    assert report.format == "ours" and report.ok
    saved = ckpt["state_dict"]["model.transformer.tgt_embed.weight"]
    assert torch.equal(model.state_dict()["transformer.tgt_embed.weight"], saved)


def test_status_json_epoch_lines_and_kpis(two_epochs):
    results, _ = two_epochs
    records = read_status(results / "status.json")
    assert [r["status"] for r in records] == ["STARTED", "RUNNING", "RUNNING", "SUCCESS"]
    for epoch, line in enumerate(records[1:3]):
        assert (line["epoch"], line["step"], line["max_epoch"], line["max_step"]) == (epoch, 2 * (epoch + 1), 2, 4)
        for key in ("time_per_epoch", "time_per_step", "eta"):
            assert line[key].count(":") == 2, key
        kpi = line["kpi"]
        assert set(kpi) == {"train_loss", "val_loss", "val_mAP", "val_mAP50", "lr"}
        assert 0.0 <= kpi["val_mAP"] <= kpi["val_mAP50"] <= 1.0 and kpi["train_loss"] > 0
        assert kpi["lr"] == pytest.approx(1e-3)


def test_experiment_yaml_and_tensorboard(two_epochs):
    import yaml

    results, _ = two_epochs
    written = yaml.safe_load((results / "experiment.yaml").read_text())
    assert written["train"]["num_epochs"] == 2 and written["model"]["hidden_dim"] == 64
    assert written["encryption_key"] is None  # the key never lands on disk
    assert list((results / "tensorboard").glob("events.out.tfevents.*"))


def test_param_groups_get_their_learning_rates(tiny_train_spec, tmp_path):
    from grounding_dino.lightning_module import GroundingDINOModule

    spec = tiny_spec(tiny_train_spec, tmp_path, **{"train.optim.lr": 1e-3, "train.optim.lr_backbone": 2e-5,
                                               "train.optim.lr_linear_proj_mult": 0.1})
    module = GroundingDINOModule(_config(spec))
    optimizer = module.configure_optimizers()["optimizer"]
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs == pytest.approx({"base": 1e-3, "backbone": 2e-5, "linear_proj": 1e-4})
    group_of = {id(p): g["name"] for g in optimizer.param_groups for p in g["params"]}
    names = dict(module.model.named_parameters())
    assert len(group_of) == sum(len(g["params"]) for g in optimizer.param_groups)  # each parameter once
    assert set(group_of) == {id(p) for p in names.values() if p.requires_grad}
    for name, param in names.items():
        expected = ("backbone" if name.startswith(("backbone.0.", "bert.")) else
                    "linear_proj" if "sampling_offsets" in name or "reference_points" in name else "base")
        assert group_of[id(param)] == expected, name
    assert any("sampling_offsets" in n for n in names) and any(n.startswith("bert.") for n in names)


def test_schedules_decay_at_the_configured_epochs(tiny_train_spec, tmp_path):
    from grounding_dino.lightning_module import GroundingDINOModule

    def lrs(**optim):
        spec = tiny_spec(tiny_train_spec, tmp_path, **{f"train.optim.{k}": v for k, v in optim.items()})
        scheduler = GroundingDINOModule(_config(spec)).configure_optimizers()["lr_scheduler"]
        assert scheduler["interval"] == "epoch"
        out = []
        for _ in range(6):
            out.append(scheduler["scheduler"].get_last_lr()[0])
            scheduler["scheduler"].optimizer.step()
            scheduler["scheduler"].step()
        return out

    assert lrs(lr=1.0, lr_scheduler="MultiStep", lr_steps=[2, 4], lr_decay=0.5) == \
        pytest.approx([1, 1, 0.5, 0.5, 0.25, 0.25])
    assert lrs(lr=1.0, lr_scheduler="StepLR", lr_step_size=3, lr_decay=0.1) == \
        pytest.approx([1, 1, 1, 0.1, 0.1, 0.1])


class _WeightProbe:
    """A callback recording the weights at train start and end."""

    @staticmethod
    def make():
        from lightning.pytorch import Callback

        class Probe(Callback):
            def on_train_start(self, trainer, pl_module):
                self.before = {k: v.detach().clone() for k, v in pl_module.model.named_parameters()}
                self.modes = set()

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                model = pl_module.model
                self.modes.add((model.training, model.backbone.training, model.bert.training))

            def on_train_end(self, trainer, pl_module):
                self.after = {k: v.detach().clone() for k, v in pl_module.model.named_parameters()}
                self.metrics = set(trainer.callback_metrics)

        return Probe()


@pytest.fixture(scope="module")
def dry_run_frozen(tiny_train_spec, tmp_path_factory):
    from grounding_dino.actions import run_action

    out = tmp_path_factory.mktemp("dry_run")
    spec = tiny_spec(tiny_train_spec, out, **{"train.is_dry_run": True, "train.num_epochs": 5, "train.verbose": True,
                                          "train.freeze": ["backbone.0", "bert"]})
    probe = _WeightProbe.make()
    assert run_action("train", _config(spec), callbacks=[probe]) == 0
    return out / "train", probe


def test_dry_run_is_one_batch_of_train_and_val(dry_run_frozen):
    results, probe = dry_run_frozen
    assert _checkpoints(results) == []
    records = read_status(results / "status.json")
    assert [r["status"] for r in records] == ["STARTED", "RUNNING", "SUCCESS"]
    assert records[1]["step"] == 1 and records[1]["max_step"] == 1
    assert {"train_loss", "val_loss", "val_mAP", "val_mAP50"} <= set(records[1]["kpi"])
    # train.verbose logs every weighted loss term: final layer, aux layer 0 and the encoder proposals
    assert {"train_loss_ce", "train_loss_giou_0", "train_loss_bbox_interm", "val_loss_ce"} <= probe.metrics


def test_freeze_keeps_prefixed_weights_and_trains_the_rest(dry_run_frozen):
    import torch

    _, probe = dry_run_frozen
    frozen = [k for k in probe.before if k.startswith(("backbone.0.", "bert."))]
    assert frozen and all(torch.equal(probe.before[k], probe.after[k]) for k in frozen)
    changed = [k for k in probe.before if not torch.equal(probe.before[k], probe.after[k])]
    assert changed and not any(k.startswith(("backbone.0.", "bert.")) for k in changed)
    # the frozen parts train in eval mode (no dropout, fixed norm statistics), the rest in training mode
    assert probe.modes == {(True, False, False)}


def test_freeze_names_an_unknown_prefix(tiny_train_spec, tmp_path):
    from grounding_dino.actions.train import build_module

    spec = tiny_spec(tiny_train_spec, tmp_path, **{"train.freeze": ["backbone.0", "bakbone"]})
    with pytest.raises(ValueError, match=r"train.freeze\[1\] = 'bakbone' matches no parameter"):
        build_module(_config(spec))


def test_pretrained_weights_load_and_resume_checks(two_epochs, tiny_train_spec, tmp_path):
    import torch

    from grounding_dino.actions import run_action

    from grounding_dino.actions.train import build_module

    results, _ = two_epochs
    latest = results / "gdino_model_latest.pth"
    saved = torch.load(latest, weights_only=True)
    spec = tiny_spec(tiny_train_spec, tmp_path, **{"train.pretrained_model_path": str(latest)})
    module = build_module(_config(spec))
    assert torch.equal(module.model.state_dict()["transformer.tgt_embed.weight"],
                       saved["state_dict"]["model.transformer.tgt_embed.weight"])
    # resuming needs our training checkpoint with the same architecture
    other = tiny_spec(tiny_train_spec, tmp_path, **{"model.num_queries": 120})
    with pytest.raises(ValueError, match="model.num_queries: checkpoint 100, spec 120"):
        build_module(_config(other), saved)
    with pytest.raises(ValueError, match="not a training checkpoint"):
        build_module(_config(spec), {"model": saved["state_dict"]})
    # through run_action, the pre-check refuses the same mistakes before anything is written
    from grounding_dino.errors import UserError

    before = sorted(tmp_path.rglob("*"))
    missing = tiny_spec(tiny_train_spec, tmp_path,
                        **{"train.resume_training_checkpoint_path": str(tmp_path / "nope.pth")})
    with pytest.raises(UserError, match=f"^train.resume_training_checkpoint_path: {tmp_path / 'nope.pth'} does "
                                        "not exist"):
        run_action("train", _config(missing))
    for key in ("train.resume_training_checkpoint_path", "train.pretrained_model_path"):
        contradicting = tiny_spec(tiny_train_spec, tmp_path, **{key: str(latest), "model.num_queries": 120})
        with pytest.raises(UserError, match=f"^{key} {latest} was trained with other model settings"
                                            ".*\n  model.num_queries: checkpoint 100, spec 120$"):
            run_action("train", _config(contradicting))
    assert sorted(tmp_path.rglob("*")) == before, "a refused run wrote files"


def test_fsdp_on_cpu_is_refused(tiny_train_spec, tmp_path):
    import torch

    from grounding_dino.actions.train import build_trainer

    if torch.cuda.is_available():
        pytest.skip("FSDP is allowed on CUDA")
    spec = tiny_spec(tiny_train_spec, tmp_path, **{"train.distributed_strategy": "fsdp"})
    with pytest.raises(ValueError, match="fsdp.*needs CUDA GPUs.*use 'ddp'"):
        build_trainer(_config(spec), tmp_path)


@pytest.mark.slow
def test_it_can_fit_eight_images(tiny_train_spec, tmp_path):
    """Train and validate on the same 8 images until val mAP50 >= 0.9: matcher, losses, post-processing and COCO
    evaluation must agree for this to happen. Stops at the threshold; fails after 10 minutes."""
    import time

    import torch
    from lightning.pytorch.callbacks import EarlyStopping, Timer

    from grounding_dino.actions import run_action

    torch.set_num_threads(THREADS)
    val = tiny_train_spec["dataset"]["val_data_sources"]
    spec = tiny_spec(tiny_train_spec, tmp_path, **{
        "dataset.train_data_sources": [dict(val)],
        "dataset.augmentation.horizontal_flip_prob": 0.0,
        "dataset.augmentation.train_random_crop_min": 128,  # crops and rescales become identities
        "train.num_epochs": 300, "train.validation_interval": 5, "train.checkpoint_interval": 300,
        "train.optim.lr": 1e-3, "train.optim.lr_backbone": 1e-3, "train.optim.lr_steps": [300],
    })
    stop = EarlyStopping(monitor="val_mAP50", mode="max", stopping_threshold=0.9, patience=300,
                         check_on_train_epoch_end=False)
    start = time.monotonic()
    run_action("train", _config(spec), callbacks=[stop, Timer(duration={"minutes": 10})])
    elapsed = time.monotonic() - start
    lines = [r for r in read_status(tmp_path / "train" / "status.json") if "val_mAP50" in r.get("kpi", {})]
    best = max(r["kpi"]["val_mAP50"] for r in lines)
    print(f"val mAP50 {best:.3f} after epoch {lines[-1]['epoch']} in {elapsed:.0f} s")
    assert best >= 0.9, f"val mAP50 reached only {best:.3f} in {elapsed:.0f} s"

