"""Post-processing (top-k over queries x phrases, pixel boxes) and the COCO evaluator, on hand-built tensors."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from grounding_dino.evaluation import METRIC_NAMES, CocoEvaluator, load_coco, to_coco_results  # noqa: E402
from grounding_dino.model.postprocess import post_process  # noqa: E402

L = 8


def _maps(*spans):
    positive_map = torch.zeros(len(spans), L)
    for row, (start, end) in enumerate(spans):
        positive_map[row, start:end] = 1.0
    return positive_map


def test_topk_is_clamped_to_queries_times_phrases():
    logits, boxes = torch.randn(2, 5, L), torch.rand(2, 5, 4) * 0.5 + 0.25
    results = post_process(logits, boxes, _maps((0, 1), (2, 4)), torch.tensor([[100, 200], [50, 60]]), num_select=300)
    assert [len(r["scores"]) for r in results] == [10, 10]
    assert results[0]["labels"].tolist().count(0) == 5 and results[0]["labels"].tolist().count(1) == 5
    assert torch.all(results[0]["scores"][:-1] >= results[0]["scores"][1:])
    assert [len(r["scores"]) for r in post_process(logits, boxes, _maps((0, 1)), [[9, 9], [9, 9]], num_select=3)] \
        == [3, 3]


def test_scores_labels_and_pixel_boxes():
    logits = torch.full((1, 3, L), float("-inf"))
    logits[0, :, :5] = -6.0
    logits[0, 2, 2:4] = torch.tensor([1.0, 3.0])  # query 2 fires on phrase 1 (tokens 2-3)
    boxes = torch.tensor([[[0.5, 0.5, 0.1, 0.1], [0.5, 0.5, 0.1, 0.1], [0.5, 0.5, 0.2, 0.4]]])
    (result,) = post_process(logits, boxes, _maps((0, 2), (2, 4)), torch.tensor([[100, 200]]), num_select=2)
    mean_sigmoid = (torch.sigmoid(torch.tensor(1.0)) + torch.sigmoid(torch.tensor(3.0))) / 2
    assert result["labels"][0].item() == 1
    assert result["scores"][0].item() == pytest.approx(mean_sigmoid.item(), rel=1e-6)
    assert result["boxes"][0].tolist() == pytest.approx([80.0, 30.0, 120.0, 70.0], abs=1e-4)


def test_one_label_per_query_keeps_each_boxs_best_phrase():
    logits = torch.full((1, 3, L), -6.0)
    logits[0, 0, 0:2] = 2.0   # query 0: phrase 0 strongly ...
    logits[0, 0, 2:4] = 0.5   # ... and phrase 1 as well (a blue hexagon also read as "orange hexagon")
    logits[0, 1, 2:4] = 1.0   # query 1: phrase 1
    boxes = torch.tensor([[[0.3, 0.3, 0.1, 0.1], [0.7, 0.7, 0.1, 0.1], [0.5, 0.5, 0.1, 0.1]]])
    maps, size = _maps((0, 2), (2, 4)), torch.tensor([[100, 100]])
    (every,) = post_process(logits, boxes, maps, size, num_select=3)
    (one,) = post_process(logits, boxes, maps, size, num_select=3, one_label_per_query=True)
    assert every["labels"].tolist() == [0, 1, 1] and every["boxes"][0].tolist() == every["boxes"][2].tolist()
    assert one["labels"].tolist() == [0, 1, 0]  # query 2 fires on nothing: its (equal) best is the first
    assert one["scores"].tolist() == pytest.approx([torch.sigmoid(torch.tensor(2.0)).item(),
                                                    torch.sigmoid(torch.tensor(1.0)).item(),
                                                    torch.sigmoid(torch.tensor(-6.0)).item()])
    assert len({tuple(b) for b in one["boxes"].tolist()}) == 3  # no box twice
    (clamped,) = post_process(logits, boxes, maps, size, num_select=300, one_label_per_query=True)
    assert len(clamped["scores"]) == 3  # at most one detection per query


def test_boxes_are_clipped_to_the_image():
    logits = torch.zeros(1, 1, L)
    boxes = torch.tensor([[[0.95, 0.05, 0.3, 0.3]]])  # spills over the right and top edges
    (result,) = post_process(logits, boxes, _maps((0, 1)), torch.tensor([[50, 100]]))
    assert result["boxes"][0].tolist() == pytest.approx([80.0, 0.0, 100.0, 10.0], abs=1e-4)


def test_one_positive_map_per_image():
    logits, boxes = torch.randn(2, 4, L), torch.rand(2, 4, 4) * 0.5 + 0.25
    maps = [_maps((0, 1)), _maps((0, 1), (1, 2), (2, 3))]
    results = post_process(logits, boxes, maps, torch.tensor([[10, 10], [10, 10]]))
    assert [len(r["scores"]) for r in results] == [4, 12]
    assert results[1]["labels"].max().item() <= 2
    with pytest.raises(ValueError, match="one per image"):
        post_process(logits, boxes, maps[:1], torch.tensor([[10, 10], [10, 10]]))
    with pytest.raises(ValueError, match="max_text_len"):
        post_process(logits, boxes, torch.ones(1, 4), torch.tensor([[10, 10], [10, 10]]))


# ---------------------------------------------------------------------------------------------------------------
# COCO evaluation

def _ground_truth():
    """Two images, two categories, boxes of every COCO size bucket."""
    images = [{"id": 1, "width": 400, "height": 300, "file_name": "a.jpg"},
              {"id": 2, "width": 400, "height": 300, "file_name": "b.jpg"}]
    boxes = [(1, 0, [10, 10, 20, 20]), (1, 1, [100, 50, 60, 60]), (2, 0, [50, 60, 150, 200]),
             (2, 1, [300, 10, 30, 25])]
    annotations = [{"id": i, "image_id": img, "category_id": cat, "bbox": box, "area": box[2] * box[3],
                    "iscrowd": 0} for i, (img, cat, box) in enumerate(boxes, start=1)]
    categories = [{"id": 0, "name": "cat"}, {"id": 1, "name": "dog"}]
    return {"images": images, "annotations": annotations, "categories": categories}


def _detections(gt, shift=0.0):
    """post_process-style outputs reproducing the ground truth, optionally moved right by `shift` box widths."""
    per_image = {}
    for ann in gt["annotations"]:
        x, y, w, h = ann["bbox"]
        entry = per_image.setdefault(ann["image_id"], {"boxes": [], "labels": [], "scores": []})
        entry["boxes"].append([x + shift * w, y, x + shift * w + w, y + h])
        entry["labels"].append(ann["category_id"])
        entry["scores"].append(0.9)
    ids = sorted(per_image)
    return ids, [{"boxes": torch.tensor(per_image[i]["boxes"]), "labels": torch.tensor(per_image[i]["labels"]),
                  "scores": torch.tensor(per_image[i]["scores"])} for i in ids]


def test_perfect_detections_score_one_and_results_json_is_coco_xywh(tmp_path):
    gt = _ground_truth()
    evaluator = CocoEvaluator(gt)
    evaluator.update(*_detections(gt))
    metrics = evaluator.summarize(results_json=tmp_path / "out" / "results.json")
    assert list(metrics) == list(METRIC_NAMES)
    for name in ("mAP", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large", "AR100"):
        assert metrics[name] == pytest.approx(1.0), name
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    first = next(r for r in saved if r["image_id"] == 1 and r["category_id"] == 0)
    assert first["bbox"] == pytest.approx([10, 10, 20, 20]) and first["score"] == pytest.approx(0.9)


def test_shifted_detections_score_lower():
    gt = _ground_truth()
    perfect, shifted = CocoEvaluator(gt), CocoEvaluator(gt)
    perfect.update(*_detections(gt))
    shifted.update(*_detections(gt, shift=0.2))
    good, worse = perfect.summarize(), shifted.summarize()
    assert worse["mAP50"] == pytest.approx(1.0)  # IoU 0.67 still counts at 0.5
    assert 0.0 < worse["mAP"] < good["mAP"] and worse["mAP75"] == pytest.approx(0.0)


def test_per_class_ap_separates_a_found_class_from_a_missed_one():
    gt = _ground_truth()
    ids, detections = _detections(gt)
    only_cats = [{k: v[d["labels"] == 0] for k, v in d.items()} for d in detections]
    evaluator = CocoEvaluator(gt)
    evaluator.update(ids, only_cats)
    metrics = evaluator.summarize()
    rows = {r["name"]: r for r in evaluator.class_metrics}
    assert rows["cat"]["AP50"] == pytest.approx(1.0) and rows["cat"]["AP"] == pytest.approx(1.0)
    assert rows["dog"]["AP50"] == 0.0 and rows["dog"]["objects"] == 2 and rows["cat"]["id"] == 0
    assert metrics["mAP50"] == pytest.approx((rows["cat"]["AP50"] + rows["dog"]["AP50"]) / 2)


def test_empty_detections_score_zero():
    gt = _ground_truth()
    evaluator = CocoEvaluator(gt)
    assert evaluator.summarize()["mAP"] == 0.0
    evaluator.update([1, 2], [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
                               "scores": torch.zeros(0)}] * 2)
    metrics = evaluator.summarize()
    assert metrics["mAP"] == 0.0 and metrics["AR100"] == 0.0


def test_only_updated_images_are_scored_and_repeats_replace():
    gt = _ground_truth()
    ids, dets = _detections(gt)
    evaluator = CocoEvaluator(gt)
    evaluator.update(ids[:1], dets[:1])
    evaluator.update(ids[:1], dets[:1])  # a distributed sampler's padding repeats an image
    assert len(evaluator.results()) == 2
    assert evaluator.summarize()["mAP"] == pytest.approx(1.0)


def test_eval_class_ids_and_score_threshold():
    gt = _ground_truth()
    ids, dets = _detections(gt)
    # Image 1's dog detected as a cat, ranked below every true cat: only category 1 loses.
    dets[0]["labels"], dets[0]["scores"] = torch.tensor([0, 0]), torch.tensor([0.9, 0.5])
    only_cats = CocoEvaluator(gt, eval_class_ids=[0])
    both = CocoEvaluator(gt)
    for evaluator in (only_cats, both):
        evaluator.update(ids, dets)
    assert only_cats.summarize()["mAP50"] == pytest.approx(1.0)
    assert both.summarize()["mAP50"] < 1.0
    strict = CocoEvaluator(gt, score_threshold=0.95)
    strict.update(ids, dets)
    assert strict.results() == [] and strict.summarize()["mAP"] == 0.0


def test_bad_ground_truth_and_inputs_fail_clearly(tmp_path):
    gt = _ground_truth()
    gt["categories"][1]["id"] = 5
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(gt))
    with pytest.raises(ValueError, match="bad.json.*0-based and contiguous"):
        load_coco(path)
    with pytest.raises(ValueError, match="eval_class_ids"):
        CocoEvaluator(_ground_truth(), eval_class_ids=[3])
    with pytest.raises(KeyError, match="image id 7"):
        CocoEvaluator(_ground_truth()).update([7], [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0),
                                                      "scores": torch.zeros(0)}])


def test_to_coco_results_converts_xyxy_to_xywh():
    records = to_coco_results(3, {"boxes": torch.tensor([[10.0, 20.0, 40.0, 60.0]]), "labels": torch.tensor([1]),
                                  "scores": torch.tensor([0.5])})
    assert records == [{"image_id": 3, "category_id": 1, "bbox": [10.0, 20.0, 30.0, 40.0], "score": 0.5}]


def test_post_process_feeds_the_evaluator_end_to_end():
    gt = _ground_truth()
    positive_map = _maps((0, 1), (2, 3))  # caption "cat . dog ." -> phrase order = category id order
    evaluator = CocoEvaluator(gt)
    for image in gt["images"]:
        anns = [a for a in gt["annotations"] if a["image_id"] == image["id"]]
        logits = torch.full((1, 10, L), -8.0)
        boxes = torch.full((1, 10, 4), 0.05)
        for query, ann in enumerate(anns):
            x, y, w, h = ann["bbox"]
            boxes[0, query] = torch.tensor([(x + w / 2) / image["width"], (y + h / 2) / image["height"],
                                            w / image["width"], h / image["height"]])
            logits[0, query] = positive_map[ann["category_id"]] * 16.0 - 8.0
        sizes = torch.tensor([[image["height"], image["width"]]])
        evaluator.update([image["id"]], post_process(logits, boxes, positive_map, sizes, num_select=300))
    assert evaluator.summarize()["mAP"] == pytest.approx(1.0)


def _gather_rank(rank, init_file, gt, out_file):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    ids, dets = _detections(gt)
    evaluator = CocoEvaluator(gt)
    # Rank 0 sees image 1, rank 1 sees image 2 and (sampler padding) image 1 again.
    picks = [0] if rank == 0 else [1, 0]
    evaluator.update([ids[i] for i in picks], [dets[i] for i in picks])
    evaluator.gather()
    with open(f"{out_file}.{rank}", "w") as f:
        json.dump({"records": len(evaluator.results()), **evaluator.summarize()}, f)
    torch.distributed.destroy_process_group()


def test_gather_merges_ranks_without_double_counting(tmp_path):
    torch.multiprocessing.spawn(_gather_rank, args=(str(tmp_path / "init"), _ground_truth(), str(tmp_path / "m")),
                                nprocs=2)
    for rank in range(2):
        metrics = json.loads((tmp_path / f"m.{rank}").read_text())
        assert metrics["records"] == 4  # both images, image 1 once
        assert metrics["mAP"] == pytest.approx(1.0) and metrics["AR100"] == pytest.approx(1.0)
