"""The demo's base model: a small Grounding DINO pretrained by this project on synthetic shapes, and its recipe.

Like a TAO user who starts from a pretrained model, the demo fine-tunes this one. It ships as one packed file
(`assets/base_model.pth`, the frozen part of the text encoder left out: its weights come from the packaged MiniLM;
only the MiniLM layers the recipe trained are stored) with a JSON card
(`assets/base_model.card.json`: recipe, data seed, steps, time, val mAP/mAP50, sha256). The recipe rebuilds both:

    python -m runner.base_model build --out DIR [--minutes M] [--epochs N] [--batch-size B]
                                              [--num-train N] [--lr LR] [--text-layers N] [--device auto|cpu|cuda]
                                              [--init FILE]
    python -m runner.base_model card --model DIR/base_model.pth

`build` generates the base data (COLORS x SHAPES unless --colors/--shapes say otherwise, seed SEED), trains from
scratch with `run_training`, stops after N epochs or M minutes (whichever comes first), packs the final weights and
writes the card without metrics.
`--text-layers N` trains MiniLM's top N layers too (frozen, it keeps colour words such as "red", "green" and
"blue" too alike for the detector to tell apart). `build --init PREVIOUS/base_model.pth` continues from an earlier
build instead of from scratch: the card then lists every stage (device, time, steps, settings) and its `recipe`
chains the commands that rebuild the file from scratch.
`card` regenerates the base val set from the seed in the card, evaluates the packed file through the evaluate
action and writes val_mAP, val_mAP50, size and sha256 into the card. Hours on a 2-core CPU, minutes on a GPU.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import grounding_dino
from grounding_dino.precision import resolve

# The packed model ships with the backend package (it is its pretrained weights); this module only builds it.
ASSETS = Path(grounding_dino.__file__).resolve().parent / "assets"
BASE_MODEL = ASSETS / "base_model.pth"
BASE_CARD = ASSETS / "base_model.card.json"
TEXT_ENCODER = "minilm"
TAO_MODEL = "grounding_dino"

SEED = 0
COLORS = ("red", "green", "blue", "yellow", "cyan", "magenta", "white", "black")
SHAPES = ("circle", "square", "triangle", "star", "diamond")
IMAGE_SIZE = 256
MAX_OBJECTS = 6
NUM_VAL = 200
DEFAULT_VOCABULARY = {"colors": COLORS, "shapes": SHAPES, "holdout": ()}

# The architecture every spec that starts from the base model must carry (structural keys are checked on load).
MODEL: Dict[str, Any] = {
    "backbone": "resnet_10t", "return_interm_indices": [1, 2, 3, 4], "num_feature_levels": 4,
    "hidden_dim": 128, "nheads": 8, "enc_layers": 2, "dec_layers": 2, "dim_feedforward": 512,
    "num_queries": 100, "num_select": 100, "max_text_len": 256, "text_encoder_type": TEXT_ENCODER,
    "log_scale": "auto", "class_embed_bias": True, "backbone_norm": "trainable",
}
# 256 px images: small scales around it, no 1333 padding.
AUGMENTATION: Dict[str, Any] = {
    "scales": [208, 224, 240, 256, 272, 288, 304], "train_random_resize": [256, 288],
    "train_random_crop_min": 192, "train_random_crop_max": 256, "random_resize_max_size": 320,
    "test_random_resize": IMAGE_SIZE, "fixed_padding": False,
}
LR = 2e-4
LR_DECAY_AT = 0.8  # share of the run after which the learning rate drops 10x


def model_section() -> Dict[str, Any]:
    """A copy of the base model's `model` spec section."""
    return copy.deepcopy(MODEL)


def generate_data(root: str | os.PathLike, num_train: int, num_val: int = NUM_VAL, seed: int = SEED,
                  colors: Sequence[str] = COLORS, shapes: Sequence[str] = SHAPES,
                  holdout: Sequence[str] = ()) -> Dict[str, str]:
    """The base data under `root` (train ODVG + val COCO, the paths a spec needs). Same arguments, same bytes;
    the val images do not depend on num_train. holdout: names left out of training (the val set keeps them)."""
    from grounding_dino.data.synthetic import generate

    return generate(str(root), num_train=num_train, num_val=num_val, image_size=IMAGE_SIZE,
                    max_objects=MAX_OBJECTS, seed=seed, colors=colors, shapes=shapes, holdout=holdout)


def _names(text: Optional[str], default: Sequence[str]) -> tuple:
    """A comma-separated option ("red,orange") as a tuple; None gives `default`."""
    return tuple(default) if text is None else tuple(n.strip() for n in text.split(",") if n.strip())


def text_freeze(text_layers: int) -> list:
    """train.freeze for a build that trains MiniLM's top `text_layers` layers (0: the whole text encoder frozen)."""
    from transformers import AutoConfig

    from grounding_dino.model.text import resolve_text_encoder

    total = AutoConfig.from_pretrained(resolve_text_encoder(TEXT_ENCODER)).num_hidden_layers
    if not 0 <= text_layers <= total:
        raise ValueError(f"--text-layers {text_layers}: the text encoder has {total} layers; give 0 to {total}")
    if text_layers == 0:
        return ["bert"]
    return ["bert.embeddings"] + [f"bert.encoder.layer.{i}" for i in range(total - text_layers)]


def train_spec(paths: Dict[str, str], results_dir: str, *, epochs: int, batch_size: int, cuda: bool,
               workers: int, validation_interval: int, decay_by_epoch: bool, lr: float = LR,
               freeze: Sequence[str] = ("bert",)) -> Dict[str, Any]:
    """The recipe's train spec, in bf16 where the GPU or CPU has bf16 units (precision auto). The learning rate
    drops at LR_DECAY_AT of the epochs, or of the time budget when `decay_by_epoch` is false (TimeBudget does it
    then). freeze: see `text_freeze`."""
    lr_steps = [max(1, int(epochs * LR_DECAY_AT))] if decay_by_epoch else [epochs + 1]
    return {
        "results_dir": results_dir,
        "model": model_section(),
        "dataset": {
            "train_data_sources": [{"image_dir": paths["train_image_dir"], "json_file": paths["train_json_file"],
                                    "label_map": paths["label_map"]}],
            "val_data_sources": {"image_dir": paths["val_image_dir"], "json_file": paths["val_json_file"]},
            "batch_size": batch_size, "workers": workers, "augmentation": copy.deepcopy(AUGMENTATION),
        },
        "train": {
            "num_epochs": epochs, "seed": SEED, "freeze": list(freeze), "activation_checkpoint": False,
            "precision": "auto", "validation_interval": validation_interval,
            "checkpoint_interval": validation_interval,
            "optim": {"lr": lr, "lr_backbone": lr, "lr_steps": lr_steps},
        },
    }


def eval_spec(val_image_dir: str, val_json_file: str, checkpoint: Optional[str], results_dir: str,
              batch_size: int = 8) -> Dict[str, Any]:
    """The evaluate spec the card is measured with (the card test runs the same one as an SDK job)."""
    return {
        "results_dir": results_dir,
        "model": model_section(),
        "dataset": {"test_data_sources": {"image_dir": val_image_dir, "json_file": val_json_file},
                    "batch_size": batch_size, "workers": 0, "augmentation": copy.deepcopy(AUGMENTATION)},
        "evaluate": {"checkpoint": checkpoint},
    }


# ---------------------------------------------------------------------------------------------------------------
# packing

def trained_text_keys(state: Dict[str, Any]) -> set:
    """The text-encoder keys of a GroundingDINO state dict whose tensors differ from the packaged MiniLM's (the
    layers a build trained)."""
    import torch

    from grounding_dino.model.text import build_bert, resolve_text_encoder

    packaged = build_bert(resolve_text_encoder(TEXT_ENCODER)).state_dict()
    return {f"bert.{k}" for k, v in packaged.items()
            if f"bert.{k}" in state and not torch.equal(state[f"bert.{k}"].cpu(), v)}


def pack(model, path: str | os.PathLike) -> Path:
    """Save `model` (a GroundingDINO) as the packed base file: float16 weights, the text encoder's only where
    they differ from the packaged MiniLM (the loader takes the rest from it)."""
    import dataclasses

    import torch

    own = model.state_dict()
    text = trained_text_keys(own)
    state = {k: v.detach().to("cpu", torch.float16 if v.is_floating_point() else v.dtype, copy=True)
             for k, v in own.items()
             if (not k.startswith("bert.") or k in text) and not k.endswith("num_batches_tracked")}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state, "model_config": dataclasses.asdict(model.cfg), "text_encoder": TEXT_ENCODER,
                "tao_model": TAO_MODEL}, path)
    return path


def sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def card_path(model_path: str | os.PathLike) -> Path:
    """`x/base_model.pth` -> `x/base_model.card.json`."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.stem + ".card.json")


def read_card(model_path: str | os.PathLike = BASE_MODEL) -> Dict[str, Any]:
    path = card_path(model_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `python -m runner.base_model card --model "
                                f"{model_path}` (or the build recipe) to write it")
    return json.loads(path.read_text())


def _write_card(path: Path, card: Dict[str, Any]) -> None:
    path.write_text(json.dumps(card, indent=2, sort_keys=True, allow_nan=False) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# build


def _callbacks(out: Path, seconds: Optional[float]):
    """Lightning callbacks of the recipe: a progress line per epoch, the time budget, and packing at the end."""
    from lightning.pytorch import Callback

    class Progress(Callback):
        def on_train_start(self, trainer, module):
            self.start = time.monotonic()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step % 100 == 0:
                print(f"[base] step {trainer.global_step} loss={float(outputs['loss']):.3f} "
                      f"({time.monotonic() - self.start:.0f} s)", flush=True)

        def on_train_epoch_end(self, trainer, module):
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k in ("train_loss", "val_mAP50")}
            print(f"[base] epoch {trainer.current_epoch} step {trainer.global_step} "
                  + " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
                  + f" ({time.monotonic() - self.start:.0f} s)", flush=True)

    class TimeBudget(Callback):
        """Drop the learning rate 10x at the first step after LR_DECAY_AT of the budget (what MultiStep does for a
        fixed epoch count; checked per step, so a run of a few long epochs still trains at the low rate), and stop
        at the end of the epoch after which the next one would overrun `seconds`."""

        def on_train_start(self, trainer, module):
            self.start, self.decayed = time.monotonic(), False

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            elapsed = time.monotonic() - self.start
            if not self.decayed and elapsed >= LR_DECAY_AT * seconds:
                for optimizer in trainer.optimizers:
                    for group in optimizer.param_groups:
                        group["lr"] *= 0.1
                self.decayed = True
                packer.lr_drop_step = trainer.global_step
                print(f"[base] learning rate dropped 10x at step {trainer.global_step} ({elapsed:.0f} s)", flush=True)

        def on_train_epoch_end(self, trainer, module):
            elapsed = time.monotonic() - self.start
            if elapsed + elapsed / (trainer.current_epoch + 1) > seconds:
                trainer.should_stop = True

    class Pack(Callback):
        epochs = steps = 0
        lr_drop_step = None

        def on_train_epoch_end(self, trainer, module):
            self.epochs += 1

        def on_fit_end(self, trainer, module):
            self.steps = trainer.global_step
            if trainer.is_global_zero:
                pack(module.model, out / "base_model.pth")

    packer = Pack()
    return [Progress(), packer] + ([TimeBudget()] if seconds else []), packer


RECIPE_OPTIONS = ("minutes", "epochs", "batch_size", "num_train", "lr", "text_layers", "colors", "shapes", "holdout",
                  "device", "init")


def _stage_command(args: Dict[str, Any], out: str) -> str:
    # A fixed option order: the card stores its arguments with sorted keys, and the command must read the same.
    return f"python -m runner.base_model build --out {out} " + " ".join(
        f"--{k.replace('_', '-')} {shlex.quote(str(args[k]))}" for k in RECIPE_OPTIONS if args.get(k) is not None)


def recipe_commands(stages: Sequence[Dict[str, Any]]) -> list:
    """The build commands that remake a file from scratch, one per stage, each continuing from the one before."""
    commands = []
    for number, stage in enumerate(stages, 1):
        args = {k: v for k, v in stage["recipe_args"].items() if k != "init"}
        if number > 1:
            args["init"] = f"stage{number - 1}/base_model.pth"
        commands.append(_stage_command(args, f"stage{number}" if len(stages) > 1 else "DIR"))
    return commands


def recipe_text(stages: Sequence[Dict[str, Any]]) -> str:
    """A card's `recipe`: its stages' build commands chained."""
    return " && ".join(recipe_commands(stages))


def card_stages(card: Dict[str, Any]) -> list:
    """A card's stages; a card written before stages existed is one stage."""
    return card.get("stages") or [{"recipe_args": card.get("recipe_args", {}), "train": card.get("train", {})}]


def _previous_stages(init: Optional[str]) -> list:
    """The stages of the packed file a build continues from (from its card), after checking it is a base model."""
    if init is None:
        return []
    if not Path(init).is_file():
        raise FileNotFoundError(f"--init {init}: no such file; give a base_model.pth written by an earlier build")
    card = read_card(init)
    if card.get("model") != MODEL:
        raise ValueError(f"--init {init}: its card describes another architecture than this recipe's MODEL; "
                         "continue only from a file this recipe built")
    return card_stages(card)


def _epoch_drop_step(spec: Dict[str, Any], packer) -> Optional[int]:
    """The step at which the MultiStep schedule of an epoch-bounded run dropped the learning rate (None: never)."""
    drop_epoch = spec["train"]["optim"]["lr_steps"][0]
    return drop_epoch * (packer.steps // packer.epochs) if drop_epoch < packer.epochs else None


def build(out: str | os.PathLike, *, minutes: Optional[float] = None, epochs: Optional[int] = None,
          batch_size: Optional[int] = None, num_train: int = 6000, device: str = "auto",
          workers: Optional[int] = None, lr: float = LR, text_layers: int = 0, init: Optional[str] = None,
          colors: Optional[str] = None, shapes: Optional[str] = None, holdout: Optional[str] = None) -> Path:
    """Train the base model (from scratch, or from the earlier build `init`) and pack it to `out/base_model.pth`
    with a card (no metrics yet). colors/shapes/holdout: comma-separated; the vocabulary of this stage's data
    (default COLORS x SHAPES), without the held-out names (which its val set keeps: the card scores them
    zero-shot)."""
    if not minutes and not epochs:
        raise ValueError("give --epochs, --minutes or both: the recipe needs to know when to stop")
    previous = _previous_stages(init)
    freeze = text_freeze(text_layers)  # before anything is written: a bad --text-layers stops here
    vocabulary = {"colors": _names(colors, COLORS), "shapes": _names(shapes, SHAPES), "holdout": _names(holdout, ())}
    from grounding_dino.data.synthetic import vocabulary as names_of

    names_of(vocabulary["colors"], vocabulary["shapes"])  # an unknown colour or shape stops here, with the choices
    stray = set(vocabulary["holdout"]) - set(names_of(vocabulary["colors"], vocabulary["shapes"]))
    if stray:
        raise ValueError(f"--holdout {', '.join(sorted(stray))}: not colour x shape names of this vocabulary")
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch looks for devices
    import torch

    from grounding_dino.actions import run_action

    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise ValueError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    batch_size = batch_size or (32 if cuda else 4)
    workers = workers if workers is not None else (min(8, os.cpu_count() or 1) if cuda else 0)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    paths = generate_data(out / "data", num_train, **vocabulary)
    count = len(vocabulary["colors"]) * len(vocabulary["shapes"]) - len(vocabulary["holdout"])
    print(f"[base] data: {num_train} train / {NUM_VAL} val images, {count} names, seed {SEED} "
          f"({time.time() - started:.0f} s)", flush=True)
    max_epochs = epochs or 100_000
    spec = train_spec(paths, str(out), epochs=max_epochs, batch_size=batch_size, cuda=cuda,
                      workers=workers, validation_interval=max(1, (epochs or 5) // 5), decay_by_epoch=not minutes,
                      lr=lr, freeze=freeze)
    if init:
        spec["train"]["pretrained_model_path"] = str(Path(init).resolve())
    callbacks, packer = _callbacks(out, minutes * 60 if minutes else None)
    train_start = time.time()
    run_action("train", spec, callbacks=callbacks)
    train_seconds = time.time() - train_start
    recipe = {"minutes": minutes, "epochs": epochs, "batch_size": batch_size, "num_train": num_train, "lr": lr,
              "text_layers": text_layers or None, "device": device,
              **{k: ",".join(v) for k, v in vocabulary.items() if v != _names(None, DEFAULT_VOCABULARY[k])}}
    train = {"epochs": packer.epochs, "steps": packer.steps, "batch_size": batch_size,
             "lr_drop_step": packer.lr_drop_step if minutes else _epoch_drop_step(spec, packer),
             "lr": lr, "precision": resolve(spec["train"]["precision"], "cuda" if cuda else "cpu")[0],
             "seconds": round(train_seconds, 1),
             "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.processor() or 'cpu'}, "
                                                                  f"{torch.get_num_threads()} threads)",
             "torch": torch.__version__}
    if init:
        train["init_sha256"] = sha256(init)
    stages = previous + [{"recipe_args": recipe, "train": train}]
    card = {
        "name": "grounding_dino_base_shapes",
        "file": "base_model.pth",
        "text_encoder": TEXT_ENCODER,
        "recipe": recipe_text(stages),
        "recipe_args": recipe,
        "data": {"generator": "grounding_dino.data.synthetic", "seed": SEED, "colors": list(vocabulary["colors"]),
                 "shapes": list(vocabulary["shapes"]), **({"holdout": list(vocabulary["holdout"])}
                                                          if vocabulary["holdout"] else {}),
                 "image_size": IMAGE_SIZE, "max_objects": MAX_OBJECTS, "num_train": num_train, "num_val": NUM_VAL},
        "model": spec["model"],
        "train": {"steps": sum(stage["train"]["steps"] for stage in stages),
                  "seconds": round(sum(stage["train"]["seconds"] for stage in stages), 1),
                  "stages": len(stages)},
        "stages": stages,
    }
    _write_card(out / "base_model.card.json", card)
    print(f"[base] packed {out / 'base_model.pth'} after {packer.steps} steps ({train_seconds / 60:.1f} min)",
          flush=True)
    return out / "base_model.pth"


# ---------------------------------------------------------------------------------------------------------------
# card


def regenerate_val(root: str | os.PathLike, data: Dict[str, Any]) -> Dict[str, str]:
    """The val set described by a card's `data` section, written under `root` (same card, same bytes)."""
    from grounding_dino.data.synthetic import generate

    return generate(str(root), num_train=0, num_val=data["num_val"], image_size=data["image_size"],
                    max_objects=data["max_objects"], seed=data["seed"], colors=data["colors"], shapes=data["shapes"],
                    holdout=data.get("holdout", ()))


def measure(model_path: str | os.PathLike, work_dir: Optional[str | os.PathLike] = None) -> Dict[str, float]:
    """COCO metrics of a packed file on the base val set regenerated from its card, through the evaluate action."""
    from grounding_dino.config import load_experiment
    from grounding_dino.actions import run_action

    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        paths = regenerate_val(Path(tmp) / "data", read_card(model_path)["data"])
        spec = eval_spec(paths["val_image_dir"], paths["val_json_file"], str(model_path), str(Path(tmp) / "eval"))
        run_action("evaluate", load_experiment(spec))
        return json.loads((Path(tmp) / "eval" / "evaluate" / "results.json").read_text())


def write_card(model_path: str | os.PathLike) -> Dict[str, Any]:
    """Evaluate the packed file and record val_mAP, val_mAP50, its size and sha256 in its card."""
    card = read_card(model_path)
    metrics = measure(model_path)
    card.update(val_mAP=metrics["mAP"], val_mAP50=metrics["mAP50"], size_bytes=Path(model_path).stat().st_size,
                sha256=sha256(model_path))
    if card.get("stages"):
        card["recipe"] = recipe_text(card["stages"])
    _write_card(card_path(model_path), card)
    print(f"[base] {card_path(model_path)}: val mAP50 {card['val_mAP50']:.4f}, mAP {card['val_mAP']:.4f}", flush=True)
    return card


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.base_model", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    b = commands.add_parser("build", help="generate the base data, train from scratch, pack the weights")
    b.add_argument("--out", required=True, help="folder for the data, the training run and the packed model")
    b.add_argument("--minutes", type=float, help="training time budget (stops at an epoch end)")
    b.add_argument("--epochs", type=int, help="training epochs")
    b.add_argument("--batch-size", type=int, help="default 32 on CUDA, 4 on CPU")
    b.add_argument("--num-train", type=int, default=6000, help="training images (default %(default)s)")
    b.add_argument("--workers", type=int, help="data-loader workers (default 8 on CUDA, 0 on CPU)")
    b.add_argument("--lr", type=float, default=LR, help="learning rate of every group (default %(default)s)")
    b.add_argument("--text-layers", type=int, default=0,
                   help="also train the text encoder's top N layers (default %(default)s: frozen)")
    b.add_argument("--colors", help=f"comma-separated colours of the data (default {','.join(COLORS)})")
    b.add_argument("--shapes", help=f"comma-separated shapes of the data (default {','.join(SHAPES)})")
    b.add_argument("--holdout", help="comma-separated names left out of training (the val set keeps them)")
    b.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    b.add_argument("--init", help="continue from this earlier build's base_model.pth instead of from scratch")
    c = commands.add_parser("card", help="evaluate a packed model on the base val set and write its card")
    c.add_argument("--model", default=str(BASE_MODEL), help="packed model file (default %(default)s)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        if args.command == "build":
            build(args.out, minutes=args.minutes, epochs=args.epochs, batch_size=args.batch_size,
                  num_train=args.num_train, device=args.device, workers=args.workers, lr=args.lr,
                  text_layers=args.text_layers, init=args.init, colors=args.colors, shapes=args.shapes,
                  holdout=args.holdout)
        else:
            write_card(args.model)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
