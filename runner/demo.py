"""`skillbank demo`: fine-tune the packaged base model on a new vocabulary, end to end, through SDK jobs.

1. Data (written once under `<workspace>/data/`, reused on later runs) in TAO's data-source layout:
   train_datasets/{images.tar.gz, annotations_odvg.jsonl, annotations_odvg_labelmap.json},
   eval_dataset/{images.tar.gz, annotations.json} (val), test_dataset/{images.tar.gz, annotations.json} and
   inference_dataset/{images.tar.gz, annotations.json}. The vocabulary mixes names the base model knows with a colour
   new to it (purple); the combinations in HOLDOUT appear neither in the base model's training nor in the demo's
   training or val, only in the test and inference images, which show them (and the inference prompts) more often
   than the other names.
2. The workflow `examples/demo_workflow.py` (generated from `examples/demo_workflow.yaml` by `skillbank runner
   generate`): AutoML fine-tuning from the base model -> evaluate -> inference with text prompts (the inference
   action, which predicts through grounding_dino.Detector) -> ONNX export -> evaluate of the ONNX model on ONNX
   Runtime.
3. A summary: time per step, the best trial's parameters and val mAP50, test mAP50 in PyTorch and ONNX Runtime,
   and per prompt how many of the inference images' objects were found (the held-out phrase included).

`skillbank demo --build-base` first rebuilds the base model with its recipe (runner/base_model.py) and
installs it into grounding_dino/assets/.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from grounding_dino.layout import BEST_AUTOML, read_job_spec
from sdk.skill_info import BANK_ROOT

WORKFLOW = BANK_ROOT / "examples" / "demo_workflow.py"
SEED = 7
IMAGE_SIZE = 256
MAX_OBJECTS = 6
COLORS = ("red", "blue", "green", "orange", "purple")       # purple is new to the base model
SHAPES = ("circle", "square", "triangle", "hexagon")
HOLDOUT = ("orange hexagon",)  # words the base model knows, a pair nobody trained on; asked for at inference
PROMPT_WEIGHT = 4  # the inference images draw the workflow's prompts this many times as often as other names
MATCH_IOU = 0.5
REPLAY_IMAGES = 160  # images in the base model's vocabulary, mixed into fine-tuning (the workflow's sampling_weight)


# ---------------------------------------------------------------------------------------------------------------
# data


def _write_weighted(folder: Path, prefix: str, code: int, count: int, names: Sequence[str],
                    vocabulary: Sequence[str]) -> None:
    """`count` images drawing from `names` (repeats make a name more frequent) as COCO over `vocabulary`."""
    from grounding_dino.data.synthetic import write_coco, write_images

    write_coco(folder, write_images(folder, prefix, count, names, IMAGE_SIZE, MAX_OBJECTS, (SEED, code)), vocabulary)


def make_data(root: Path, num_train: int, num_val: int, num_infer: int, prompts: Sequence[str] = (),
              num_test: Optional[int] = None) -> Dict[str, Any]:
    """Write the demo data under `root` unless the same settings were written before; returns its manifest.

    prompts: names the inference images show more often (PROMPT_WEIGHT), so each prompt has objects to find.
    num_test: test images (default num_val), every name including the held-out ones, those PROMPT_WEIGHT times as
    often, so their AP50 rests on enough objects."""
    num_test = num_val if num_test is None else num_test
    from runner.base_model import read_card

    base = read_card()["data"]
    settings = {"seed": SEED, "image_size": IMAGE_SIZE, "max_objects": MAX_OBJECTS, "colors": list(COLORS),
                "shapes": list(SHAPES), "holdout": list(HOLDOUT), "num_train": num_train, "num_val": num_val,
                "num_test": num_test, "num_infer": num_infer, "prompts": list(prompts), "replay": REPLAY_IMAGES,
                "base_vocabulary": [base["colors"], base["shapes"], base.get("holdout", [])]}
    manifest = root / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()) == settings:
        print(f"[demo] reusing the dataset in {root}", flush=True)
        return settings
    from grounding_dino.data.synthetic import pack_images, vocabulary, write_coco, write_odvg, write_split

    everything = vocabulary(COLORS, SHAPES)
    unknown = sorted(set(prompts) - set(everything))
    if unknown:
        raise ValueError(f"inference prompts {unknown} are not names of the demo vocabulary ({', '.join(everything)})")
    shutil.rmtree(root, ignore_errors=True)
    names = vocabulary(COLORS, SHAPES, exclude=HOLDOUT)
    train, val, test, infer = (root / f for f in ("train_datasets", "eval_dataset", "test_dataset",
                                                  "inference_dataset"))
    write_odvg(train, write_split(train, "train", num_train, names, IMAGE_SIZE, MAX_OBJECTS, SEED), names)
    # What the base model was trained on (its card's vocabulary), for fine-tuning to replay: the held-out pairs
    # stay out of it too.
    replay = root / "base_datasets"
    base_names = vocabulary(base["colors"], base["shapes"], exclude=set(base.get("holdout", [])) | set(HOLDOUT))
    write_odvg(replay, write_split(replay, "train", REPLAY_IMAGES, base_names, IMAGE_SIZE, MAX_OBJECTS, SEED + 1),
               base_names)
    write_coco(val, write_split(val, "val", num_val, names, IMAGE_SIZE, MAX_OBJECTS, SEED), names)
    _write_weighted(test, "test", 3, num_test, everything + [n for n in HOLDOUT for _ in range(PROMPT_WEIGHT - 1)],
                    everything)
    _write_weighted(infer, "infer", 2, num_infer,
                    everything + [n for n in prompts for _ in range(PROMPT_WEIGHT - 1)], everything)
    for folder in (train, replay, val, test, infer):
        pack_images(str(folder / "images"))
        shutil.rmtree(folder / "images")  # the layout holds only the archive; jobs extract it into their cache
    manifest.write_text(json.dumps(settings, indent=1, allow_nan=False) + "\n")
    print(f"[demo] dataset written to {root}: {num_train} train, {num_val} val, {num_test} test, {num_infer} "
          "inference images; "
          f"{len(names)} training names, held out {', '.join(HOLDOUT)}", flush=True)
    return settings


# ---------------------------------------------------------------------------------------------------------------
# the summary


def _seconds(record: dict) -> float:
    start, end = record.get("started_at"), record.get("finished_at")
    if not start or not end:
        return float("nan")
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def _one(folder: Path, pattern: str) -> Path:
    found = sorted(folder.rglob(pattern))
    if not found:
        raise FileNotFoundError(f"no {pattern} under {folder}")
    return found[0]


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two [x, y, w, h] boxes."""
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    inter = max(w, 0) * max(h, 0)
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def found_per_phrase(detections: List[dict], truth: dict) -> Dict[str, Dict[str, int]]:
    """Per phrase: ground-truth objects, how many a detection of that phrase found (IoU >= MATCH_IOU, each object
    and detection used once, best scores first), and detections that found nothing."""
    image_of = {Path(i["file_name"]).name: i["id"] for i in truth["images"]}
    name_of = {c["id"]: c["name"] for c in truth["categories"]}
    out: Dict[str, Dict[str, int]] = {}
    for phrase in sorted({d["category_name"] for d in detections} | set(name_of.values())):
        objects = [(a["image_id"], a["bbox"]) for a in truth["annotations"] if name_of[a["category_id"]] == phrase]
        mine = sorted((d for d in detections if d["category_name"] == phrase), key=lambda d: -d["score"])
        used, hits = set(), 0
        for d in mine:
            image = image_of[Path(d["file_name"]).name]
            best = max((k for k, (img, _) in enumerate(objects) if img == image and k not in used),
                       key=lambda k: _iou(d["bbox"], objects[k][1]), default=None)
            if best is not None and _iou(d["bbox"], objects[best][1]) >= MATCH_IOU:
                used.add(best)
                hits += 1
        out[phrase] = {"objects": len(objects), "found": hits, "false": len(mine) - hits}
    return out


def ap50_by_vocabulary(per_class: List[dict]) -> Dict[str, float]:
    """Mean test AP50 of the names made only of words the base model was trained on, and of the names with a new
    word (what fine-tuning had to teach); None for a group without ground truth."""
    from runner.base_model import read_card

    base = read_card()["data"]
    known = set(base["colors"]) | set(base["shapes"])
    groups: Dict[str, List[float]] = {"known_words": [], "new_words": []}
    for row in per_class:
        if row["objects"]:
            groups["known_words" if set(row["name"].split()) <= known else "new_words"].append(row["AP50"])
    return {k: sum(v) / len(v) if v else None for k, v in groups.items()}


FINETUNING_GROUPS = {"seen": "seen in fine-tuning", "unseen_combination": "unseen pairs of seen words",
                     "unseen_word": "with a word fine-tuning never showed"}


def summarize(bank, jobs: Dict[str, str], data: Path, seconds: Dict[str, float]) -> Dict[str, Any]:
    """The demo's results from the finished jobs' folders."""
    record = {name: bank.status(job_id) for name, job_id in jobs.items()}
    train = record["train"].results_dir
    best = json.loads(_one(train, BEST_AUTOML).read_text())
    torch_eval = json.loads(_one(record["evaluate"].results_dir, "results.json").read_text())
    onnx_eval = json.loads(_one(record["evaluate_onnx"].results_dir, "results.json").read_text())
    infer_dir = _one(record["inference"].results_dir, "images_annotated").parent
    detections = json.loads((infer_dir / "results.json").read_text())
    infer_spec = read_job_spec(record["inference"].path)
    truth = json.loads((data / "inference_dataset" / "annotations.json").read_text())
    prompts = [p.strip().lower() for p in infer_spec["dataset"]["infer_data_sources"]["captions"]]
    found = {p: v for p, v in found_per_phrase(detections, truth).items() if p in prompts}
    per_class = json.loads(_one(record["evaluate"].results_dir, "per_class.json").read_text())
    return {
        "jobs": jobs,
        "seconds": {**seconds, **{name: round(_seconds(r.record), 1) for name, r in record.items()}},
        "best_trial": {"trial": best["trial"], "val_mAP50": best["value"], "params": best["params"]},
        "test_mAP50": torch_eval["mAP50"],
        "test_AP50_by_vocabulary": ap50_by_vocabulary(per_class),
        # evaluate's own split against the fine-tuning label map (evaluate.train_vocabulary, from the train parent)
        "test_mAP50_by_finetuning": {group: torch_eval.get(f"mAP50_{group}") for group in FINETUNING_GROUPS},
        "held_out_test_AP50": {row["name"]: row["AP50"] for row in per_class if row["name"] in HOLDOUT},
        "onnx_test_mAP50": onnx_eval["mAP50"],
        "onnx_minus_torch_mAP50": onnx_eval["mAP50"] - torch_eval["mAP50"],
        "prompts": prompts,
        "held_out": list(HOLDOUT),
        "found": found,
        "conf_threshold": infer_spec["inference"]["conf_threshold"],
        "annotated_images": str(infer_dir / "images_annotated"),
        "automl_report": str(_one(train, "automl_report.md")),
        "onnx_model": str(_one(record["export"].results_dir, "*.onnx")),
        "precision": {step: ran_in(record[step].results_dir) for step in ("train", "evaluate", "inference")},
    }


def ran_in(results_dir: Path) -> Optional[str]:
    """The precision a job ran in (precision auto resolved), from the status.json lines that record it (an AutoML
    train job's trials each write their own)."""
    from grounding_dino.status import read_status

    found = {record["precision"] for path in sorted(Path(results_dir).rglob("status.json"))
             for record in read_status(path) if "precision" in record}
    return "/".join(sorted(found)) or None


def print_summary(summary: Dict[str, Any]) -> None:
    seconds = summary["seconds"]
    print("\n==================== demo summary ====================")
    for step, value in seconds.items():
        print(f"  {step:<14} {value:7.1f} s")
    best = summary["best_trial"]
    params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["params"].items())
    print(f"  best AutoML trial {best['trial']}: val mAP50 {best['val_mAP50']:.3f} ({params})")
    print("  precision: " + ", ".join(f"{step} {ran}" for step, ran in summary["precision"].items()))
    print(f"  evaluate: test mAP50 {summary['test_mAP50']:.3f} (PyTorch), {summary['onnx_test_mAP50']:.3f} "
          f"(ONNX Runtime; difference {summary['onnx_minus_torch_mAP50']:+.4f})")
    vocabulary = summary["test_AP50_by_vocabulary"]
    print("            AP50 " + ", ".join(f"{'-' if vocabulary[k] is None else format(vocabulary[k], '.3f')} on {text}"
                                        for k, text in (("known_words", "names the base model knew"),
                                                        ("new_words", "names with a new word"))))
    split = summary["test_mAP50_by_finetuning"]
    print("            mAP50 " + ", ".join(f"{'-' if split[k] is None else format(split[k], '.3f')} {text}"
                                         for k, text in FINETUNING_GROUPS.items()))
    held_out = summary["held_out_test_AP50"]
    print("            AP50 " + ", ".join(f"{ap:.3f} {name} (held out)" for name, ap in held_out.items()))
    print(f"  inference prompts (score >= {summary['conf_threshold']}), objects found in the inference images:")
    for phrase in summary["prompts"]:
        counts = summary["found"].get(phrase, {"objects": 0, "found": 0, "false": 0})
        tag = "  <- held out of training" if phrase in summary["held_out"] else ""
        print(f"    {phrase:<18} {counts['found']}/{counts['objects']} found, {counts['false']} false{tag}")
    print(f"  annotated images: {summary['annotated_images']}")
    print(f"  AutoML report:    {summary['automl_report']}")
    print(f"  ONNX model:       {summary['onnx_model']}")
    print(f"  total:            {seconds['total']:.0f} s")


# ---------------------------------------------------------------------------------------------------------------
# running


def load_workflow_runner(path: Path = WORKFLOW):
    """The generated runner module (examples/demo_workflow.py)."""
    spec = importlib.util.spec_from_file_location("demo_workflow", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def base_build_commands(card: Dict[str, Any], out: Path, minutes: Optional[float] = None,
                        epochs: Optional[int] = None, num_train: Optional[int] = None) -> List[List[str]]:
    """The commands that rebuild a base model from scratch after `card`: every stage in order, each for the number
    of epochs it ran (its time budget was for its own device; epochs are the same work on any), each continuing from
    the one before. A one-stage card's settings can be overridden."""
    from runner.base_model import RECIPE_OPTIONS, card_stages

    stages = card_stages(card)
    given = {"minutes": minutes, "epochs": epochs, "num_train": num_train}
    overridden = any(v is not None for v in given.values())
    if len(stages) > 1 and overridden:
        raise ValueError("the shipped base model was built in several stages; rebuild it with the card's recipe "
                         "as is, or run `python -m runner.base_model build` yourself with your settings")
    commands, previous = [], None
    for number, stage in enumerate(stages, 1):
        args = dict(stage["recipe_args"])
        if not overridden and stage["train"].get("epochs"):
            args.update(minutes=None, epochs=stage["train"]["epochs"])
        args.update({k: v for k, v in given.items() if v is not None})
        folder = out / f"stage{number}"
        command = [sys.executable, "-m", "runner.base_model", "build", "--out", str(folder)]
        command += [x for k in RECIPE_OPTIONS if k not in ("device", "init") and args.get(k) is not None
                    for x in (f"--{k.replace('_', '-')}", str(args[k]))]
        if previous is not None:
            command += ["--init", str(previous / "base_model.pth")]
        commands.append(command)
        previous = folder
    return commands


def build_base(workspace: Path, minutes: Optional[float], epochs: Optional[int], num_train: Optional[int]) -> None:
    """Rebuild the base model with the shipped card's recipe (base_build_commands), evaluate it, install it."""
    import subprocess

    from runner import base_model

    shipped = json.loads(base_model.BASE_CARD.read_text()) if base_model.BASE_CARD.is_file() else {}
    commands = base_build_commands(shipped, workspace / "base_model_build", minutes, epochs, num_train)
    for number, command in enumerate(commands, 1):
        print(f"[demo] building the base model, stage {number}/{len(commands)}: {' '.join(command[1:])}", flush=True)
        subprocess.run(command, check=True)
    packed = Path(commands[-1][commands[-1].index("--out") + 1]) / "base_model.pth"
    subprocess.run([sys.executable, "-m", "runner.base_model", "card", "--model", str(packed)], check=True)
    base_model.ASSETS.mkdir(exist_ok=True)
    for name in ("base_model.pth", "base_model.card.json"):
        shutil.copyfile(packed.parent / name, base_model.ASSETS / name)
    print(f"[demo] installed the new base model into {base_model.ASSETS}", flush=True)


def run_demo(workspace: str | os.PathLike = "demo_workspace", *, fresh: bool = False, num_train: int = 240,
             num_val: int = 60, num_infer: int = 12, max_trials: int = 2, num_epochs: int = 1,
             num_test: Optional[int] = None) -> Dict[str, Any]:
    """Run the whole demo; returns (and writes to <workspace>/demo_summary.json) the summary."""
    from runner.base_model import BASE_MODEL
    from sdk import SkillBank

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    workspace = Path(workspace).resolve()
    if fresh:
        shutil.rmtree(workspace, ignore_errors=True)
    if not BASE_MODEL.is_file():
        raise FileNotFoundError(f"the base model {BASE_MODEL} is missing; build it with `skillbank demo --build-base`")
    runner = load_workflow_runner()
    data = workspace / "data"
    make_data(data, num_train, num_val, num_infer, runner.PARAMS["captions"], num_test)
    seconds = {"data": round(time.monotonic() - started, 1)}
    print(f"[demo] running {WORKFLOW.relative_to(BANK_ROOT)} in {workspace}", flush=True)
    jobs = runner.run(SkillBank(workspace), {"data": str(data), "base_model": str(BASE_MODEL),
                                             "max_trials": max_trials, "num_epochs": num_epochs})
    seconds["total"] = round(time.monotonic() - started, 1)
    summary = summarize(SkillBank(workspace), jobs, data, seconds)
    (workspace / "demo_summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    print_summary(summary)
    print(f"  summary file:     {workspace / 'demo_summary.json'}")
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options (shared by `skillbank demo` and `python -m runner.demo`)."""
    parser.add_argument("--workspace", dest="demo_workspace", default="demo_workspace",
                        help="demo folder: data, jobs, summary (default %(default)s)")
    parser.add_argument("--fresh", action="store_true", help="delete the workspace first (data and jobs)")
    parser.add_argument("--num-train", type=int, default=240, help="fine-tuning images (default %(default)s)")
    parser.add_argument("--num-val", type=int, default=60, help="val images (default %(default)s)")
    parser.add_argument("--num-test", type=int, help="test images (default: as many as val)")
    parser.add_argument("--num-infer", type=int, default=12, help="inference images (default %(default)s)")
    parser.add_argument("--max-trials", type=int, default=2, help="AutoML trials (default %(default)s)")
    parser.add_argument("--num-epochs", type=int, default=1, help="epochs per trial (default %(default)s)")
    parser.add_argument("--build-base", action="store_true",
                        help="first rebuild the base model with its recipe and install it (hours on a CPU)")
    parser.add_argument("--base-minutes", type=float, help="--build-base: training time budget")
    parser.add_argument("--base-epochs", type=int, help="--build-base: training epochs")
    parser.add_argument("--base-num-train", type=int, help="--build-base: training images")


def run_from_args(args: argparse.Namespace) -> int:
    workspace = Path(args.demo_workspace)
    if args.build_base:
        try:
            build_base(workspace, args.base_minutes, args.base_epochs, args.base_num_train)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    run_demo(workspace, fresh=args.fresh, num_train=args.num_train, num_val=args.num_val,
             num_infer=args.num_infer, max_trials=args.max_trials, num_epochs=args.num_epochs, num_test=args.num_test)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.demo", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
