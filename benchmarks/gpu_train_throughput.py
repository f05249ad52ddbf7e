"""Training throughput on a GPU: our Grounding DINO vs Hugging Face's, Swin-T + BERT-base sized, random init.

960x544 images, batch 2, bf16 autocast, AdamW, full training steps (forward with targets, loss, backward, step).
Each model runs warm-up steps, then `--steps` timed steps; prints images/s for both and the ratio, as one JSON line.

    python benchmarks/gpu_train_throughput.py [--steps 20] [--batch 2]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

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


def timed(step, steps: int, warmup: int, batch: int) -> float:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def run_ours(folder, args, device):
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

    rate = timed(step, args.steps, args.warmup, args.batch)
    memory = torch.cuda.max_memory_allocated() / 2**30
    del model, optimizer
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return rate, memory


def _float(value):
    """Losses in fp32: the criterion gets float logits and boxes whatever autocast produced."""
    if torch.is_tensor(value):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: _float(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_float(v) for v in value]
    return value


def run_hf(folder, args, device, tokenizer):
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

    rate = timed(step, args.steps, args.warmup, args.batch)
    return rate, torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--vocab", default=None, help="folder with vocab.txt/tokenizer files (default: packaged MiniLM)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_train_throughput.py needs a CUDA GPU")
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    folder = bert_base_folder(args.vocab)

    ours_rate, ours_mem = run_ours(folder, args, device)
    from grounding_dino.model.text import CaptionTokenizer

    hf_rate, hf_mem = run_hf(folder, args, device, CaptionTokenizer(folder, 256))
    print(json.dumps({
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": args.batch, "steps": args.steps,
        "size": "960x544", "precision": "bf16-autocast",
        "ours_images_per_s": round(ours_rate, 2), "hf_images_per_s": round(hf_rate, 2),
        "ours_over_hf": round(ours_rate / hf_rate, 2),
        "ours_peak_gib": round(ours_mem, 1), "hf_peak_gib": round(hf_mem, 1),
    }))


if __name__ == "__main__":
    main()
