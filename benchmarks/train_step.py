"""Median forward+backward time per batch: our Grounding DINO vs Hugging Face's, same small config and inputs.

The two models are timed alternately (ours, HF, ours, HF, ...) in one process so machine noise hits both alike.
Both run a full training step's compute: forward with targets, loss (matcher included), backward. The text encoder
is frozen in both. Prints both medians and the ratio ours/HF (goal: <= 0.7).

    .venv/bin/python benchmarks/train_step.py [--steps 10] [--batch 4] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

import small_config as sc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model (after 2 warm-up steps)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", default=None, help="synthetic data folder (generated if missing)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from grounding_dino.data import build_dataset, collate_fn

    data_root = Path(args.data or tempfile.mkdtemp(prefix="gdino_bench_"))
    paths = sc.synthetic_data(data_root, num_train=16, num_val=args.batch)
    spec = sc.experiment_spec(paths, str(data_root / "results"))
    cfg, ours, criterion = sc.build_ours(spec)
    hf = sc.build_hf()
    ours.train()
    hf.train()

    dataset = build_dataset(cfg, "val", tokenizer=ours.tokenizer)
    images, pixel_mask, targets = collate_fn([dataset[i] for i in range(args.batch)])
    sc.attach_positive_maps(ours.tokenizer, targets)
    text = ours.tokenizer([t["caption"] for t in targets])
    labels = sc.hf_labels(targets)
    print(f"inputs: images {tuple(images.shape)}, text {tuple(text['input_ids'].shape)}, "
          f"{sum(len(t['labels']) for t in targets)} boxes, threads {args.threads}")

    def step_ours():
        outputs = ours(images, pixel_mask, text)
        losses = criterion(outputs, targets)
        total = sum(losses[k] * criterion.weight_dict[k] for k in losses)
        total.backward()
        ours.zero_grad(set_to_none=True)

    def step_hf():
        out = hf(pixel_values=images, pixel_mask=(~pixel_mask).long(), input_ids=text["input_ids"],
                 attention_mask=text["attention_mask"].long(), token_type_ids=text["token_type_ids"], labels=labels)
        out.loss.backward()
        hf.zero_grad(set_to_none=True)

    times = {"ours": [], "hf": []}
    for i in range(args.steps + 2):
        for name, step in (("ours", step_ours), ("hf", step_hf)):
            start = time.perf_counter()
            step()
            if i >= 2:
                times[name].append(time.perf_counter() - start)
    ours_median, hf_median = statistics.median(times["ours"]), statistics.median(times["hf"])
    print(f"ours: median {ours_median:.3f} s/step  ({args.steps} steps)")
    print(f"HF:   median {hf_median:.3f} s/step  ({args.steps} steps)")
    print(f"ratio ours/HF: {ours_median / hf_median:.2f}  (goal <= 0.70)")


if __name__ == "__main__":
    main()
