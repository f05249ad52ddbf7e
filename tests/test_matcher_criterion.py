"""Hungarian matcher and set criterion on hand-built tensors (no model)."""
import itertools
import math
import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from grounding_dino.config import ModelConfig  # noqa: E402
from grounding_dino.model.criterion import (  # noqa: E402
    SetCriterion, num_boxes_global, sigmoid_focal_loss, weighted_total,
)
from grounding_dino.model.matcher import HungarianMatcher  # noqa: E402

L = 8  # text length of these toy prompts


def _text_mask(batch, valid):
    mask = torch.zeros(batch, L, dtype=torch.bool)
    mask[:, :valid] = True
    return mask


def _masked(logits, text_mask):
    return logits.masked_fill(~text_mask[:, None, :], float("-inf"))


def _target(boxes, token_spans):
    positive_map = torch.zeros(len(token_spans), L)
    for row, (start, end) in enumerate(token_spans):
        positive_map[row, start:end] = 1.0
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.arange(len(token_spans)), "positive_map": positive_map}


def _random_boxes(*shape):
    centre = torch.rand(*shape, 2) * 0.6 + 0.2
    size = torch.rand(*shape, 2) * 0.3 + 0.05
    return torch.cat([centre, size], dim=-1)


def _pair_cost(prob, box, target_box, token_map, alpha=0.25, gamma=2.0):
    """Cost of one (query, box) pair written out term by term, independently of the batched code."""
    tokens = [t for t in range(L) if token_map[t] > 0]
    cls = 0.0
    for t in tokens:
        p = prob[t].item()
        cls += alpha * (1 - p) ** gamma * -math.log(p + 1e-8) - (1 - alpha) * p ** gamma * -math.log(1 - p + 1e-8)
    cls /= len(tokens)
    l1 = (box - target_box).abs().sum().item()

    def xyxy(b):
        cx, cy, w, h = b.tolist()
        return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2

    a, b = xyxy(box), xyxy(target_box)
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    giou = inter / union - (hull - union) / hull
    return 1.0 * cls + 5.0 * l1 - 2.0 * giou


def test_cost_matrix_matches_pairwise_formula():
    torch.manual_seed(0)
    text_mask = _text_mask(2, 6)
    logits = _masked(torch.randn(2, 3, L) * 2, text_mask)
    boxes = _random_boxes(2, 3)
    targets = [_target(_random_boxes(2).tolist(), [(1, 3), (4, 5)]), _target(_random_boxes(1).tolist(), [(0, 2)])]
    cost = HungarianMatcher().cost_matrix({"pred_logits": logits, "pred_boxes": boxes}, targets)
    all_boxes = torch.cat([t["boxes"] for t in targets])
    all_maps = torch.cat([t["positive_map"] for t in targets])
    assert cost.shape == (2, 3, 3)
    for b, q, j in itertools.product(range(2), range(3), range(3)):
        expected = _pair_cost(logits[b, q].sigmoid(), boxes[b, q], all_boxes[j], all_maps[j])
        assert cost[b, q, j].item() == pytest.approx(expected, rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("seed", range(5))
def test_matcher_finds_the_brute_force_optimum(seed):
    torch.manual_seed(seed)
    num_queries, sizes = 5, [3, 1, 0]
    text_mask = _text_mask(3, 7)
    outputs = {"pred_logits": _masked(torch.randn(3, num_queries, L) * 3, text_mask),
               "pred_boxes": _random_boxes(3, num_queries)}
    spans = [(0, 2), (2, 3), (3, 6)]
    targets = [_target(_random_boxes(n).tolist(), spans[:n]) for n in sizes]
    matcher = HungarianMatcher()
    cost = matcher.cost_matrix(outputs, targets)
    offsets = [0, 3, 4]
    for image, ((queries, boxes), n) in enumerate(zip(matcher(outputs, targets), sizes)):
        assert len(queries) == len(boxes) == n and queries.dtype == torch.int64
        block = cost[image, :, offsets[image]:offsets[image] + n]
        best = min((sum(block[q, j].item() for j, q in enumerate(perm)) for perm in
                    itertools.permutations(range(num_queries), n)), default=0.0)
        assert block[queries, boxes].sum().item() == pytest.approx(best, abs=1e-5)


def test_matcher_survives_nan_boxes_and_more_boxes_than_queries():
    text_mask = _text_mask(1, 4)
    boxes = _random_boxes(1, 2)
    boxes[0, 0] = float("nan")
    outputs = {"pred_logits": _masked(torch.randn(1, 2, L), text_mask), "pred_boxes": boxes}
    targets = [_target(_random_boxes(3).tolist(), [(0, 1), (1, 2), (2, 3)])]
    queries, matched = HungarianMatcher()(outputs, targets)[0]
    assert sorted(queries.tolist()) == [0, 1] and len(set(matched.tolist())) == 2


def test_matcher_rejects_wrong_positive_map_width():
    outputs = {"pred_logits": torch.randn(1, 2, L), "pred_boxes": _random_boxes(1, 2)}
    target = _target([[0.5, 0.5, 0.2, 0.2]], [(0, 1)])
    target["positive_map"] = target["positive_map"][:, :4]
    with pytest.raises(ValueError, match="max_text_len"):
        HungarianMatcher()(outputs, [target])


def _criterion(**overrides):
    return SetCriterion.from_config(ModelConfig(dec_layers=3, **overrides))


def _perfect_outputs(targets, num_queries, text_mask, placement):
    """Each target box answered exactly by the query `placement[image][box]`, confident on its phrase tokens."""
    batch = len(targets)
    logits = torch.full((batch, num_queries, L), -9.0)
    boxes = _random_boxes(batch, num_queries)
    for image, target in enumerate(targets):
        for box, query in enumerate(placement[image]):
            boxes[image, query] = target["boxes"][box]
            logits[image, query] = torch.where(target["positive_map"][box] > 0, 9.0, -9.0)
    return {"pred_logits": _masked(logits, text_mask), "pred_boxes": boxes, "text_mask": text_mask}


def test_perfect_predictions_match_identity_and_zero_box_losses():
    torch.manual_seed(1)
    targets = [_target([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.1, 0.2]], [(1, 3), (4, 5)]),
               _target([[0.5, 0.5, 0.4, 0.4]], [(0, 2)])]
    placement = [[4, 1], [2]]
    outputs = _perfect_outputs(targets, 6, _text_mask(2, 6), placement)
    indices = HungarianMatcher()(outputs, targets)
    for (queries, boxes), expected in zip(indices, placement):
        assert dict(zip(boxes.tolist(), queries.tolist())) == dict(enumerate(expected))
    losses = _criterion(aux_loss=False, two_stage_type="no")(outputs, targets)
    assert set(losses) == {"loss_ce", "loss_bbox", "loss_giou"}
    assert losses["loss_bbox"].item() < 1e-6 and losses["loss_giou"].item() < 1e-5
    assert 0 < losses["loss_ce"].item() < 1e-3


def test_focal_loss_against_hand_computed_value():
    alpha, gamma = 0.25, 2.0
    x_pos, x_neg, x_other = 0.4, -1.2, 2.0
    text_mask = torch.tensor([[True, True, False] + [False] * (L - 3)])
    logits = torch.full((1, 2, L), float("-inf"))
    logits[0, 0, :2] = torch.tensor([x_pos, x_neg])
    logits[0, 1, :2] = torch.tensor([x_other, x_other])
    box = [0.5, 0.5, 0.2, 0.2]
    boxes = torch.tensor([[box, [0.1, 0.1, 0.05, 0.05]]])
    targets = [_target([box], [(0, 1)])]
    outputs = {"pred_logits": logits, "pred_boxes": boxes, "text_mask": text_mask}
    loss = _criterion(aux_loss=False, two_stage_type="no")(outputs, targets)["loss_ce"].item()

    def sig(x):
        return 1 / (1 + math.exp(-x))

    def pos(x):
        return alpha * (1 - sig(x)) ** gamma * -math.log(sig(x))

    def neg(x):
        return (1 - alpha) * sig(x) ** gamma * -math.log(1 - sig(x))

    # Query 0 matches the box (token 0 positive, token 1 negative); query 1 is unmatched (both negative).
    expected = (pos(x_pos) + neg(x_neg) + 2 * neg(x_other)) / 1
    assert loss == pytest.approx(expected, rel=1e-5)
    element = sigmoid_focal_loss(torch.tensor([x_pos]), torch.tensor([1.0]), alpha, gamma)
    assert element.item() == pytest.approx(pos(x_pos), rel=1e-5)


def _full_outputs(batch=2, num_queries=6, aux_layers=2):
    text_mask = _text_mask(batch, 6)

    def head():
        logits = torch.randn(batch, num_queries, L, requires_grad=True)
        raw = torch.randn(batch, num_queries, 4, requires_grad=True)
        return logits, raw, {"pred_logits": _masked(logits, text_mask), "pred_boxes": raw.sigmoid()}

    main_logits, main_raw, main = head()
    aux = [head()[2] for _ in range(aux_layers)]
    enc_logits, enc_raw, enc = head()
    outputs = dict(main, text_mask=text_mask, aux_outputs=aux, enc_outputs=enc)
    return outputs, (main_logits, main_raw), (enc_logits, enc_raw)


def test_all_loss_names_and_gradient_reaches_encoder_outputs():
    torch.manual_seed(2)
    outputs, _, (enc_logits, enc_raw) = _full_outputs()
    targets = [_target([[0.3, 0.4, 0.2, 0.3]], [(1, 3)]), _target([[0.5, 0.5, 0.4, 0.4]], [(0, 2)])]
    criterion = _criterion()
    losses = criterion(outputs, targets)
    assert set(losses) == set(criterion.weight_dict)
    assert {"loss_ce_0", "loss_giou_1", "loss_bbox_interm"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    (losses["loss_ce_interm"] + losses["loss_bbox_interm"]).backward()
    assert enc_logits.grad.abs().sum() > 0 and enc_raw.grad.abs().sum() > 0


def test_no_interm_box_loss_keeps_only_the_class_term():
    torch.manual_seed(3)
    outputs, _, (enc_logits, enc_raw) = _full_outputs()
    targets = [_target([[0.3, 0.4, 0.2, 0.3]], [(1, 3)]), _target([[0.5, 0.5, 0.4, 0.4]], [(0, 2)])]
    criterion = _criterion(no_interm_box_loss=True, interm_loss_coef=0.5)
    losses = criterion(outputs, targets)
    interm = {k for k in losses if k.endswith("_interm")}
    assert interm == {"loss_ce_interm"} and criterion.weight_dict["loss_ce_interm"] == pytest.approx(1.0)
    weighted_total(losses, criterion.weight_dict).backward()
    assert enc_logits.grad.abs().sum() > 0 and enc_raw.grad is None


def test_zero_box_images_give_finite_losses_and_gradients():
    torch.manual_seed(4)
    outputs, (logits, raw), _ = _full_outputs()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "positive_map": torch.zeros(0, L)}
    criterion = _criterion()
    losses = criterion(outputs, [empty, dict(empty)])
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_giou"].item() == 0.0
    assert losses["loss_ce"].item() > 0  # every query is pushed towards "no token"
    total = weighted_total(losses, criterion.weight_dict)
    total.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_weight_dict_follows_the_config():
    weights = _criterion(cls_loss_coef=3.0, interm_loss_coef=0.5).weight_dict
    assert weights["loss_ce"] == 3.0 and weights["loss_ce_1"] == 3.0 and weights["loss_bbox_interm"] == 2.5
    assert "loss_ce_2" not in weights
    assert set(_criterion(aux_loss=False, two_stage_type="no").weight_dict) == {"loss_ce", "loss_bbox", "loss_giou"}
    assert set(_criterion(loss_types=["labels"], aux_loss=False).weight_dict) == {"loss_ce", "loss_ce_interm"}


def test_bad_configs_and_unweighted_losses_fail_clearly():
    with pytest.raises(ValueError, match="dn_number"):
        _criterion(dn_number=100)
    with pytest.raises(ValueError, match="loss_types"):
        _criterion(loss_types=["labels", "masks"])
    with pytest.raises(KeyError, match="loss_ce_5"):
        weighted_total({"loss_ce_5": torch.tensor(1.0)}, {"loss_ce": 1.0})


def _num_boxes_rank(rank, init_file, counts, result_file):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    targets = [{"boxes": torch.zeros(counts[rank], 4)}]
    value = num_boxes_global(targets, torch.device("cpu"))
    with open(f"{result_file}.{rank}", "w") as f:
        f.write(str(value))
    torch.distributed.destroy_process_group()


def test_num_boxes_is_averaged_across_ranks(tmp_path):
    assert num_boxes_global([{"boxes": torch.zeros(0, 4)}], torch.device("cpu")) == 1.0
    result = tmp_path / "num_boxes"
    torch.multiprocessing.spawn(_num_boxes_rank, args=(str(tmp_path / "init"), [1, 4], str(result)), nprocs=2)
    assert [float((tmp_path / f"num_boxes.{r}").read_text()) for r in range(2)] == [2.5, 2.5]
