"""How fast each model learns: our Grounding DINO vs Hugging Face's, same small config, same CPU wall time.

Both train on the same synthetic shapes (256 px, 16 colour x shape classes, 600 train / 100 val), the same
augmented batches (our data pipeline, batch 4, seeded), AdamW at the same learning rate, with the frozen packaged
MiniLM text encoder and a random-init resnet18 whose normalisation trains. Every `--eval-every` seconds of training
time the clock stops and val mAP50 is measured the same way for both (our post-processing and COCO evaluator: both
models emit [B, Q, 256] token logits and normalised cxcywh boxes). Prints both curves and the final ratio.

    .venv/bin/python benchmarks/learn_shapes.py [--minutes 10] [--eval-every 120] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

import small_config as sc


def evaluate(predict, cfg, tokenizer, loader) -> float:
    from grounding_dino.evaluation import CocoEvaluator
    from grounding_dino.model.postprocess import post_process

    evaluator = CocoEvaluator(loader.dataset.coco_gt)
    with torch.no_grad():
        for images, pixel_mask, targets in loader:
            text = tokenizer([t["caption"] for t in targets])
            logits, boxes = predict(images, pixel_mask, text)
            maps = [tokenizer.positive_map(t["caption"], t["spans"]) for t in targets]
            sizes = torch.stack([t["orig_size"] for t in targets])
            detections = post_process(logits, boxes, maps, sizes, num_select=cfg.model.num_select)
            evaluator.update([t["image_id"] for t in targets], detections)
    return evaluator.summarize()["mAP50"]


def train_for(name, step, predict, set_mode, cfg, tokenizer, train_loader, val_loader, seconds, eval_every):
    """Train until `seconds` of training time are spent; evaluate every `eval_every` seconds (clock stopped)."""
    curve, spent, steps, next_eval = [], 0.0, 0, eval_every
    batches = iter(train_loader)
    while spent < seconds:
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(train_loader)
            batch = next(batches)
        set_mode(True)
        start = time.perf_counter()
        loss = step(*batch)
        spent += time.perf_counter() - start
        steps += 1
        if spent >= next_eval or spent >= seconds:
            set_mode(False)
            mAP50 = evaluate(predict, cfg, tokenizer, val_loader)
            curve.append({"train_s": round(spent), "steps": steps, "mAP50": round(mAP50, 4), "loss": round(loss, 3)})
            print(f"[{name}] {spent:6.0f} s  step {steps:5d}  loss {loss:8.3f}  val mAP50 {mAP50:.4f}", flush=True)
            next_eval += eval_every
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="training wall time per model")
    parser.add_argument("--eval-every", type=float, default=120.0, help="seconds of training between evaluations")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--data", default=None, help="synthetic data folder (generated if missing)")
    parser.add_argument("--only", choices=("ours", "hf"), default=None, help="run one model only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from grounding_dino.data import build_dataloader
    from grounding_dino.lightning_module import param_groups
    from grounding_dino.model.criterion import weighted_total

    data_root = Path(args.data or tempfile.mkdtemp(prefix="gdino_learn_"))
    paths = sc.synthetic_data(data_root, num_train=600, num_val=100)
    spec = sc.experiment_spec(paths, str(data_root / "results"))
    spec["train"]["optim"].update(lr=args.lr, lr_backbone=args.lr)
    results = {}

    def loaders(cfg, tokenizer):
        torch.manual_seed(0)
        return (build_dataloader(cfg, "train", tokenizer=tokenizer, shuffle=True),
                build_dataloader(cfg, "val", tokenizer=tokenizer, shuffle=False))

    if args.only in (None, "ours"):
        torch.manual_seed(0)
        cfg, model, criterion = sc.build_ours(spec)
        optimizer = torch.optim.AdamW(param_groups(model, cfg.model, cfg.train.optim), lr=args.lr, weight_decay=1e-4)
        tokenizer = model.tokenizer

        def step(images, pixel_mask, targets):
            sc.attach_positive_maps(tokenizer, targets)
            outputs = model(images, pixel_mask, tokenizer([t["caption"] for t in targets]))
            total = weighted_total(criterion(outputs, targets), criterion.weight_dict)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            optimizer.step()
            return total.item()

        def predict(images, pixel_mask, text):
            out = model(images, pixel_mask, text)
            return out["pred_logits"], out["pred_boxes"]

        train_loader, val_loader = loaders(cfg, tokenizer)
        results["ours"] = train_for("ours", step, predict, model.train, cfg, tokenizer, train_loader, val_loader,
                                    args.minutes * 60, args.eval_every)

    if args.only in (None, "hf"):
        cfg, ours_for_tokenizer, _ = sc.build_ours(spec)
        tokenizer = ours_for_tokenizer.tokenizer
        del ours_for_tokenizer
        model = sc.build_hf(seed=0)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                      weight_decay=1e-4)

        def hf_inputs(images, pixel_mask, text):
            return dict(pixel_values=images, pixel_mask=(~pixel_mask).long(), input_ids=text["input_ids"],
                        attention_mask=text["attention_mask"].long(), token_type_ids=text["token_type_ids"])

        def step(images, pixel_mask, targets):
            text = tokenizer([t["caption"] for t in targets])
            out = model(**hf_inputs(images, pixel_mask, text), labels=sc.hf_labels(targets))
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            optimizer.step()
            return out.loss.item()

        def predict(images, pixel_mask, text):
            out = model(**hf_inputs(images, pixel_mask, text))
            return out.logits, out.pred_boxes

        train_loader, val_loader = loaders(cfg, tokenizer)
        results["hf"] = train_for("hf", step, predict, model.train, cfg, tokenizer, train_loader, val_loader,
                                  args.minutes * 60, args.eval_every)

    print(json.dumps(results))
    if "ours" in results and "hf" in results:
        ours, hf = results["ours"][-1]["mAP50"], results["hf"][-1]["mAP50"]
        ratio = ours / hf if hf > 0 else float("inf")
        print(f"final val mAP50: ours {ours:.4f}, HF {hf:.4f}, ratio {ratio:.1f}x (goal >= 5x)")


if __name__ == "__main__":
    main()
