#!/usr/bin/env python3
"""Runner for the workflow `grounding_dino_demo`.

Fine-tune the packaged base Grounding DINO (pretrained on synthetic shapes) on a vocabulary with a new colour,
searching the learning rates with AutoML; evaluate the best trial; detect text prompts, one of them a colour x shape
combination never seen in any training; export to ONNX and evaluate the ONNX model on ONNX Runtime.

Steps: train (train, automl on) -> evaluate (evaluate, parent train) -> inference (inference, parent train) -> export
(export, parent train) -> evaluate_onnx (evaluate, parent export).

Generated from demo_workflow.yaml by `skillbank runner generate`: a plain script that uses only the skill bank
SDK's public API (`sdk.SkillBank`); copy it and edit it freely. "${name}" in a spec value or override is replaced
by the param `name` (its command-line option).

    python demo_workflow.py [--workspace DIR] [--PARAM VALUE ...]

Params: --data, --base-model, --max-trials, --num-epochs, --captions.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time

from sdk import SkillBank

WORKSPACE = "demo_workspace"
PARAMS = {
    "data": "demo_workspace/data",
    "base_model": "grounding_dino/assets/base_model.pth",
    "max_trials": 2,
    "num_epochs": 1,
    "captions": ["orange hexagon", "orange circle", "blue hexagon", "purple square", "red hexagon"],
}
# Log lines worth echoing while a job runs: the SDK's and AutoML's tagged lines, and evaluation metrics.
PROGRESS = re.compile(r"^(\[(skillbank|automl)\]|\s*mAP(50)?: )")


def expand(value, params):
    """`value` with every "${name}" replaced by params[name]; a string that is only "${name}" becomes the value."""
    if isinstance(value, dict):
        return {k: expand(v, params) for k, v in value.items()}
    if isinstance(value, list):
        return [expand(v, params) for v in value]
    if isinstance(value, str):
        whole = re.fullmatch(r"\$\{(\w+)\}", value)
        if whole:
            return params[whole.group(1)]
        return re.sub(r"\$\{(\w+)\}", lambda m: str(params[m.group(1)]), value)
    return value


def follow(bank, job_id, poll_s=1.0):
    """Wait for a job, echoing its progress lines; return its final record."""
    shown = 0
    while True:
        job = bank.status(job_id)
        lines = bank.logs(job_id).splitlines()
        for line in lines[shown:]:
            if PROGRESS.match(line):
                print(f"    {line.strip()}", flush=True)
        shown = len(lines)
        if job.status in ("done", "error", "canceled"):
            return job
        time.sleep(poll_s)


def submit(bank, params, action, parent=None, automl_policy=None, spec=None, overrides=None):
    """Create one job, follow it to the end and return its id; stop the workflow if it does not end done."""
    started = time.monotonic()
    job = bank.create_job(action, spec=expand(spec, params), overrides=expand(overrides or {}, params),
                          parent_job_id=parent, automl_policy=automl_policy)
    print(f"[workflow] {action} job {job.id} started" + (f" (parent {parent})" if parent else ""), flush=True)
    job = follow(bank, job.id)
    print(f"[workflow] {action} job {job.id}: {job.status} in {time.monotonic() - started:.0f} s", flush=True)
    if job.status != "done":
        print(bank.logs(job.id, tail=20), file=sys.stderr)
        raise SystemExit(f"{action} job {job.id} ended {job.status}: {job.error}")
    return job.id


def run(bank, params):
    """Run the steps in order; returns {step name: job id}."""
    params = {**PARAMS, **params}
    jobs = {}
    jobs["train"] = submit(bank, params, "train",
        automl_policy="on",
        spec={
            "model": {
                "backbone": "resnet_10t",
                "return_interm_indices": [1, 2, 3, 4],
                "num_feature_levels": 4,
                "hidden_dim": 128,
                "nheads": 8,
                "enc_layers": 2,
                "dec_layers": 2,
                "dim_feedforward": 512,
                "num_queries": 100,
                "num_select": 100,
                "max_text_len": 256,
                "text_encoder_type": "minilm",
                "log_scale": "auto",
                "class_embed_bias": True,
            },
            "dataset": {
                "train_data_sources": [
                    {
                        "image_dir": "${data}/train_datasets/images.tar.gz",
                        "json_file": "${data}/train_datasets/annotations_odvg.jsonl",
                        "label_map": "${data}/train_datasets/annotations_odvg_labelmap.json",
                    },
                    {
                        "image_dir": "${data}/base_datasets/images.tar.gz",
                        "json_file": "${data}/base_datasets/annotations_odvg.jsonl",
                        "label_map": "${data}/base_datasets/annotations_odvg_labelmap.json",
                        "sampling_weight": 0.5,
                    },
                ],
                "val_data_sources": {
                    "image_dir": "${data}/eval_dataset/images.tar.gz",
                    "json_file": "${data}/eval_dataset/annotations.json",
                },
                "batch_size": 2,
                "workers": 0,
                "augmentation": {
                    "scales": [224, 240, 256, 272, 288],
                    "train_random_resize": [256],
                    "train_random_crop_min": 192,
                    "train_random_crop_max": 256,
                    "random_resize_max_size": 320,
                    "test_random_resize": 256,
                    "fixed_padding": False,
                },
            },
            "train": {
                "pretrained_model_path": "${base_model}",
                "num_epochs": "${num_epochs}",
                "freeze": [],
                "activation_checkpoint": False,
                "precision": "auto",
                "optim": {"lr": 8e-05, "lr_backbone": 6e-05},
            },
            "automl": {
                "algorithm": "tpe",
                "max_trials": "${max_trials}",
                "automl_hyperparameters": ["train.optim.lr", "train.optim.lr_backbone"],
                "ranges": {"train.optim.lr": [3e-05, 0.0003], "train.optim.lr_backbone": [1e-05, 0.0002]},
                "seed": 0,
            },
        },
    )
    jobs["evaluate"] = submit(bank, params, "evaluate",
        parent=jobs["train"],
        spec={
            "dataset": {
                "test_data_sources": {
                    "image_dir": "${data}/test_dataset/images.tar.gz",
                    "json_file": "${data}/test_dataset/annotations.json",
                },
                "batch_size": 4,
                "workers": 0,
                "augmentation": {"test_random_resize": 256, "random_resize_max_size": 320},
            },
            "evaluate": {"precision": "auto"},
        },
    )
    jobs["inference"] = submit(bank, params, "inference",
        parent=jobs["train"],
        spec={
            "dataset": {
                "infer_data_sources": {
                    "image_dir": ["${data}/inference_dataset/images.tar.gz"],
                    "captions": "${captions}",
                },
                "batch_size": 4,
                "workers": 0,
                "augmentation": {"test_random_resize": 256, "random_resize_max_size": 320},
            },
            "inference": {"conf_threshold": 0.2, "one_label_per_box": True, "precision": "auto"},
        },
    )
    jobs["export"] = submit(bank, params, "export",
        parent=jobs["train"],
        overrides={"export.input_width": 256, "export.input_height": 256},
    )
    jobs["evaluate_onnx"] = submit(bank, params, "evaluate",
        parent=jobs["export"],
        spec={
            "dataset": {
                "test_data_sources": {
                    "image_dir": "${data}/test_dataset/images.tar.gz",
                    "json_file": "${data}/test_dataset/annotations.json",
                },
                "batch_size": 4,
                "workers": 0,
                "augmentation": {"test_random_resize": 256, "random_resize_max_size": 320},
            },
        },
    )
    return jobs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workspace", default=WORKSPACE, help="SDK workspace (default: %(default)s)")
    parser.add_argument("--data", dest="data", type=str, default=PARAMS["data"],
                        help="default: %(default)s")
    parser.add_argument("--base-model", dest="base_model", type=str, default=PARAMS["base_model"],
                        help="default: %(default)s")
    parser.add_argument("--max-trials", dest="max_trials", type=int, default=PARAMS["max_trials"],
                        help="default: %(default)s")
    parser.add_argument("--num-epochs", dest="num_epochs", type=int, default=PARAMS["num_epochs"],
                        help="default: %(default)s")
    parser.add_argument("--captions", dest="captions", type=str, nargs="+", default=PARAMS["captions"],
                        help="default: %(default)s")
    args = vars(parser.parse_args(argv))
    jobs = run(SkillBank(args.pop("workspace")), args)
    print(json.dumps(jobs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
