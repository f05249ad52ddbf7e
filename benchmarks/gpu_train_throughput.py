"""Training throughput on a GPU: our Grounding DINO vs Hugging Face's, Swin-T + BERT-base sized, random init.

960x544 images, batch 2, bf16 autocast, AdamW, full training steps (forward with targets, loss, backward, step).
Both models sit on the GPU together and are timed alternately, in rounds of a few steps each, so a change of clock
or host load during the run hits both alike; images/s comes from each model's median round. Prints one JSON line.

    python benchmarks/gpu_train_throughput.py [--steps 20] [--batch 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Callable, Dict, List

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

CAPTION_NAMES = ["person", "red car", "traffic light", "dog", "bicycle", "stop sign"]


def bert_base_folder(vocab_folder: str | None) -> str:
    """A BERT-base-sized config with the bert-base uncased vocab (the packaged MiniLM's, or `vocab_folder`'s);
    random weights."""
    import shutil
    from pathlib import Path

    from transformers import BertConfig

    from grounding_dino.model.text import MINILM, resolve_text_encoder

    folder = Path(tempfile.mkdtemp(prefix="bert_base_random_"))
    source = Path(vocab_folder or resolve_text_encoder(MINILM))
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(source / name, folder / name)
    BertConfig().save_pretrained(folder)
    return str(folder)


def make_batch(tokenizer, batch: int, device):
    from grounding_dino.model.text import build_caption

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, 544, 960, generator=generator).to(device)
    pixel_mask = torch.zeros(batch, 544, 960, dtype=torch.bool, device=device)
    caption, spans = build_caption(CAPTION_NAMES)
    text = {k: v.to(device) for k, v in tokenizer([caption] * batch).items()}
    phrase_maps = tokenizer.positive_map(caption, spans).to(device)
    targets = []
    for _ in range(batch):
        n = 8
        centers = torch.rand(n, 2, generator=generator) * 0.6 + 0.2
        sizes = torch.rand(n, 2, generator=generator) * 0.2 + 0.05
        labels = torch.randint(0, len(CAPTION_NAMES), (n,), generator=generator)
        targets.append({"boxes": torch.cat([centers, sizes], 1).to(device), "labels": labels.to(device),
                        "positive_map": phrase_maps[labels.to(device)]})
    return images, pixel_mask, text, targets


def ours_step(folder, args, device):
    from grounding_dino.config import ModelConfig
    from grounding_dino.model import build_model
    from grounding_dino.model.criterion import SetCriterion, weighted_total

    cfg = ModelConfig(text_encoder_type=folder)  # defaults: Swin-T, hidden 256, 6+6 layers, 900 queries
    model = build_model(cfg, activation_checkpoint=False).to(device).train()
    criterion = SetCriterion.from_config(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images, pixel_mask, text, targets = make_batch(model.tokenizer, args.batch, device)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outputs = model(images, pixel_mask, text)
        losses = criterion({k: _float(v) for k, v in outputs.items()}, targets)
        weighted_total(losses, criterion.weight_dict).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _float(value):
    """Losses in fp32: the criterion gets float logits and boxes whatever autocast produced."""
    if torch.is_tensor(value):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: _float(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_float(v) for v in value]
    return value


def hf_step(folder, args, device, tokenizer):
    from transformers import BertConfig, GroundingDinoConfig, GroundingDinoForObjectDetection

    config = GroundingDinoConfig(text_config=BertConfig.from_pretrained(folder), auxiliary_loss=True,
                                 disable_custom_kernels=True)
    model = GroundingDinoForObjectDetection(config).to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    images, pixel_mask, text, targets = make_batch(tokenizer, args.batch, device)
    labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(pixel_values=images, pixel_mask=(~pixel_mask).long(), input_ids=text["input_ids"],
                        attention_mask=text["attention_mask"].long(), token_type_ids=text["token_type_ids"],
                        labels=labels)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def step_memory(step) -> float:
    """GiB a training step allocates on top of what is already resident (both models' weights and states)."""
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - resident) / 2**30


def alternate(steps: Dict[str, Callable[[], None]], total: int, per_round: int) -> Dict[str, List[float]]:
    """Seconds per step of each round, the models taking turns (the first one alternating too)."""
    times: Dict[str, List[float]] = {name: [] for name in steps}
    order = list(steps)
    for round_index in range(max(1, total // per_round)):
        for name in order if round_index % 2 == 0 else order[::-1]:
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(per_round):
                steps[name]()
            torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) / per_round)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--per-round", type=int, default=4, help="steps per model per round")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--vocab", default=None, help="folder with vocab.txt/tokenizer files (default: packaged MiniLM)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_train_throughput.py needs a CUDA GPU")
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    folder = bert_base_folder(args.vocab)

    from grounding_dino.model.text import CaptionTokenizer

    steps = {"ours": ours_step(folder, args, device),
             "hf": hf_step(folder, args, device, CaptionTokenizer(folder, 256))}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    memory = {name: step_memory(step) for name, step in steps.items()}
    times = alternate(steps, args.steps, args.per_round)
    rate = {name: args.batch / statistics.median(t) for name, t in times.items()}
    print(json.dumps({
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": args.batch,
        "steps": len(times["ours"]) * args.per_round, "size": "960x544", "precision": "bf16-autocast",
        "ours_images_per_s": round(rate["ours"], 2), "hf_images_per_s": round(rate["hf"], 2),
        "ours_over_hf": round(rate["ours"] / rate["hf"], 2),
        "ours_step_gib": round(memory["ours"], 1), "hf_step_gib": round(memory["hf"], 1),
    }))


if __name__ == "__main__":
    main()
