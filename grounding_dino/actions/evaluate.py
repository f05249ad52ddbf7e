"""The evaluate action: COCO box mAP of a checkpoint (.pth), an exported model (.onnx) or a TensorRT engine
(evaluate.trt_engine, with the deploy backend) on dataset.test_data_sources.

It runs the pieces training validation runs, so a checkpoint scores here what it scored as val_mAP50 on the same
data: the loader of build_dataloader (eval transforms, batch size, fixed padding), the caption of all category names
in id order, post_process with model.num_select, and CocoEvaluator with dataset.eval_class_ids. The only addition is
for long category lists: they are split into several prompts of at most max_text_len tokens and the detections
merged (Predictor.detect), so 80+ classes are all scored instead of being cut off.

Writes `results.json` (every COCO metric), `detections.json` (the COCO results list), `per_class.json` (AP and
AP50 of each category, also printed weakest first) and `status.json` (KPIs test_mAP, test_mAP50) into
evaluate.results_dir, else <results_dir>/evaluate. With evaluate.train_vocabulary the categories are also scored in
three groups, seen in fine-tuning, unseen combinations of seen words and holding an unseen word
(grounding_dino.evaluation.vocabulary): mAP_seen, mAP50_seen, ... in results.json and the KPIs, the groups'
categories in `vocabulary.json`.

With evaluate.num_gpus > 1 the test images are split by whole batches across that many worker processes (one per GPU
under CUDA, sharing the cores on CPU; grounding_dino.actions.sharding) and their detections scored here once, so
the files hold what a one-process run writes.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from tqdm import tqdm

from grounding_dino.actions import ActionRun
from grounding_dino.actions.sharding import check_processes, run_sharded, shard_loader
from grounding_dino.config import ExperimentConfig
from grounding_dino.data import build_dataloader
from grounding_dino.evaluation import CocoEvaluator, vocabulary
from grounding_dino.precision import resolve
from grounding_dino.predictor import Predictor, load_predictor, model_path, split_prompt

log = logging.getLogger(__name__)


def evaluate(cfg: ExperimentConfig, predictor: Predictor, detections_json: Optional[Path] = None,
             per_class_json: Optional[Path] = None) -> Dict[str, Any]:
    """COCO metrics (evaluation.METRIC_NAMES) of `predictor` on the test split; optionally saves the detections
    and the per-category AP / AP50. A metric the set cannot score is None, and `null_reasons` says why."""
    return score(detect(cfg, predictor), detections_json, per_class_json)


def detect(cfg: ExperimentConfig, predictor: Predictor, rank: int = 0, world: int = 1) -> CocoEvaluator:
    """An evaluator holding the detections of the test images of shard `rank` of `world` (sharding.ShardBatches;
    all of them when world is 1), not yet scored."""
    options = cfg.evaluate
    size = predictor.image_size(options.input_width, options.input_height, "evaluate")
    loader = build_dataloader(cfg, "test", input_size=size,
                              batch_size=options.batch_size if options.batch_size > 0 else None)
    dataset = loader.dataset
    chunks = split_prompt(dataset.phrases, predictor.tokenizer)
    log.info("evaluating %d images, %d categories in %d prompt(s)", len(dataset), len(dataset.phrases), len(chunks))
    evaluator = CocoEvaluator(dataset.coco_gt, eval_class_ids=cfg.dataset.eval_class_ids,
                              score_threshold=options.conf_threshold)
    batches = shard_loader(loader, rank, world)
    for images, pixel_mask, targets in tqdm(batches, desc="evaluate", unit="batch", dynamic_ncols=True,
                                            disable=rank > 0):  # rank 0's bar is the progress of all of them
        orig_sizes = torch.stack([t["orig_size"] for t in targets])
        detections = predictor.detect(images, pixel_mask, orig_sizes, chunks, cfg.model.num_select)
        evaluator.update([t["image_id"] for t in targets], detections)
    return evaluator


def score(evaluator: CocoEvaluator, detections_json: Optional[Path] = None,
          per_class_json: Optional[Path] = None) -> Dict[str, Any]:
    """The metrics of `evaluator`'s detections (see `evaluate`), writing the optional files."""
    metrics: Dict[str, Any] = evaluator.summarize(detections_json)
    if evaluator.null_reasons:
        metrics["null_reasons"] = dict(evaluator.null_reasons)
    if per_class_json is not None:
        per_class_json.write_text(json.dumps(evaluator.class_metrics, indent=1, allow_nan=False) + "\n")
    return metrics


def evaluate_sharded(cfg: ExperimentConfig, processes: int, detections_json: Optional[Path] = None,
                     per_class_json: Optional[Path] = None) -> Dict[str, Any]:
    """`evaluate` of evaluate.checkpoint on `processes` worker processes (grounding_dino.actions.sharding): each
    detects its shard of the test images, and the detections are scored here, once, as one process would."""
    parts = run_sharded(_detect_shard, cfg, "evaluate", processes)
    log.info("evaluated %d images on %d processes", sum(len(detections) for detections, _ in parts), processes)
    evaluator = CocoEvaluator(cfg.dataset.test_data_sources.json_file, eval_class_ids=cfg.dataset.eval_class_ids,
                              score_threshold=cfg.evaluate.conf_threshold)
    for detections, nonfinite in parts:  # the shards are disjoint: no image comes twice
        evaluator.detections.update(detections)
        evaluator.nonfinite += nonfinite
    return score(evaluator, detections_json, per_class_json)


def _detect_shard(cfg: ExperimentConfig, rank: int, world: int) -> Tuple[Dict[int, List[dict]], int]:
    """Runs in worker process `rank`: that shard's detections per image id, and how many were not finite."""
    evaluator = detect(cfg, load_predictor(model_path(cfg, "evaluate"), cfg, "evaluate"), rank, world)
    return evaluator.detections, evaluator.nonfinite


def announce_precision(predictor: Predictor, action: str) -> str:
    """Print the precision `predictor` computes in (the spec's `auto` resolved) and return it for status.json."""
    why = getattr(predictor, "why", f"a {predictor.name} model")
    print(f"{action}: precision {predictor.precision} ({why})")
    return predictor.precision


def print_per_class(rows: List[dict]) -> None:
    """The per-category table, weakest AP50 first (what to look at when the mean disappoints)."""
    print(f"{'AP50':>8} {'AP':>7} {'objects':>8}  category")
    for row in sorted(rows, key=lambda r: (r["AP50"] is not None, r["AP50"] or 0.0, r["name"])):
        print(f"{_number(row['AP50']):>8} {_number(row['AP']):>7} {row['objects']:8d}  {row['name']}")


def _number(value: Optional[float]) -> str:
    return "null" if value is None else f"{value:.4f}"


def run_evaluate(cfg: ExperimentConfig, run: ActionRun) -> None:
    """The `evaluate` action: evaluate.checkpoint (or trt_engine) on dataset.test_data_sources."""
    results_dir = run.results_dir
    path = model_path(cfg, "evaluate")
    files = results_dir / "detections.json", results_dir / "per_class.json"
    processes = check_processes(cfg, "evaluate", path)
    if processes > 1:
        metrics = evaluate_sharded(cfg, processes, *files)
        precision = resolve(cfg.evaluate.precision, "cuda" if torch.cuda.is_available() else "cpu")[0]
    else:
        predictor = load_predictor(path, cfg, "evaluate")
        precision = announce_precision(predictor, "evaluate")
        metrics = evaluate(cfg, predictor, *files)
    per_class = json.loads((results_dir / "per_class.json").read_text())
    groups = None
    if cfg.evaluate.train_vocabulary:
        groups = vocabulary.split(per_class, vocabulary.training_phrases(cfg.evaluate.train_vocabulary))
        values, why = vocabulary.metrics(groups)
        metrics.update(values)
        if why:
            metrics["null_reasons"] = {**metrics.get("null_reasons", {}), **why}
        (results_dir / "vocabulary.json").write_text(json.dumps(groups, indent=1, allow_nan=False) + "\n")
    (results_dir / "results.json").write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    reasons = metrics.pop("null_reasons", {})
    for name, value in metrics.items():
        print(f"{name:>10}: {_number(value)}" + (f" ({reasons[name]})" if name in reasons else ""))
    print_per_class(per_class)
    if groups is not None:
        vocabulary.print_table(groups)
    extra = {"null_reasons": {f"test_{name}": why for name, why in reasons.items()}} if reasons else {}
    run.report.succeed("Evaluation finished.", kpi={f"test_{name}": value for name, value in metrics.items()},
                       precision=precision, **extra)
