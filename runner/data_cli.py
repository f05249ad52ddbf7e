"""`skillbank data coco2odvg|odvg2coco|contiguous|stats|autolabel`: dataset conversion (sdk.data_convert),
statistics (sdk.data_stats) and auto-labelling with a model (grounding_dino.autolabel, which loads torch).

Exit codes: 0 success, 2 a file the tools cannot read (the message names it and the fix).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from sdk.data_convert import coco_to_odvg, make_contiguous, odvg_to_coco
from sdk.data_stats import dataset_stats
from sdk.errors import SkillBankError, run_command


def _coco2odvg(args) -> int:
    jsonl, label_map = coco_to_odvg(args.coco_file, args.out_dir, args.name)
    print(jsonl)
    print(label_map)
    return 0


def _odvg2coco(args) -> int:
    print(odvg_to_coco(args.odvg_file, args.label_map, args.out))
    return 0


def _contiguous(args) -> int:
    coco, mapping = make_contiguous(args.coco_file, args.out)
    print(coco)
    print(mapping)
    return 0


def _stats(args) -> int:
    stats = dataset_stats(args.annotation_file, args.label_map, args.text_encoder)
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    for key, value in stats.items():
        print(f"{key:>22}: {value}")
    print(f"model.num_queries must exceed {stats['boxes_per_image_max']}; model.max_text_len must be at least "
          f"{stats['tokens_per_caption_max']} (captions of all {stats['classes']} classes need "
          f"{stats['tokens_all_classes']} tokens; evaluation splits longer ones into several prompts)")
    return 0


def _autolabel(args) -> int:
    from grounding_dino.autolabel import autolabel
    from grounding_dino.errors import UserError

    options = {key: value for key, value in (("batch_size", args.batch_size), ("resize", args.resize),
                                             ("max_size", args.max_size), ("text_encoder_type", args.text_encoder))
               if value is not None}
    try:
        done = autolabel(args.images, args.prompts, args.checkpoint, args.out, threshold=args.threshold,
                         name=args.name, spec=args.spec, **options)
    except (UserError, ValueError, OSError) as err:  # a model, folder or prompt the user can fix
        raise SkillBankError(str(err)) from None
    counts = ", ".join(f"{phrase} {count}" for phrase, count in done["per_phrase"].items())
    print(f"{done['images']} images, {done['boxes']} boxes at score >= {args.threshold} ({counts})")
    for key in ("odvg", "label_map", "coco"):
        print(done[key])
    print(f"train on them: dataset.train_data_sources=[{{image_dir: {args.images}, json_file: {done['odvg']}, "
          f"label_map: {done['label_map']}}}]")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="skillbank data", description="Dataset tools: COCO <-> ODVG, contiguous "
                                                                        "category ids, statistics, auto-labelling.")
    tools = parser.add_subparsers(dest="tool", required=True, metavar="TOOL")

    sub = tools.add_parser("coco2odvg", help="COCO -> <name>_odvg.jsonl + <name>_odvg_labelmap.json")
    sub.add_argument("coco_file")
    sub.add_argument("--out-dir", help="output folder (default: the COCO file's folder)")
    sub.add_argument("--name", help="output name prefix (default: the COCO file's stem)")
    sub.set_defaults(func=_coco2odvg)

    sub = tools.add_parser("odvg2coco", help="ODVG JSONL (+ label map) -> COCO JSON")
    sub.add_argument("odvg_file")
    sub.add_argument("--label-map", help="<name>_odvg_labelmap.json of detection records")
    sub.add_argument("--out", help="output COCO file (default <odvg stem>_coco.json)")
    sub.set_defaults(func=_odvg2coco)

    sub = tools.add_parser("contiguous", help="renumber COCO category ids 0..N-1 and write the old->new map")
    sub.add_argument("coco_file")
    sub.add_argument("--out", help="output COCO file (default <stem>_contiguous.json)")
    sub.set_defaults(func=_contiguous)

    sub = tools.add_parser("stats", help="images, boxes, most boxes per image, classes, caption tokens")
    sub.add_argument("annotation_file", help="COCO .json or ODVG .jsonl")
    sub.add_argument("--label-map", help="label map of a detection ODVG file")
    sub.add_argument("--text-encoder", help="text-encoder folder with vocab.txt, or 'minilm', for exact token "
                                            "counts (default: an estimate)")
    sub.add_argument("--json", action="store_true", help="print the numbers as JSON")
    sub.set_defaults(func=_stats)

    sub = tools.add_parser("autolabel", help="label a folder of images with a model: <name>_odvg.jsonl + "
                                             "<name>_odvg_labelmap.json + <name>_coco.json")
    sub.add_argument("images", help="folder of images (searched recursively)")
    sub.add_argument("--prompts", required=True, help='comma-separated phrases, e.g. "person, helmet"')
    sub.add_argument("--checkpoint", required=True, help=".pth checkpoint, .onnx model, GroundingDino folder or "
                                                         "Hugging Face id")
    sub.add_argument("--out", required=True, help="output folder")
    sub.add_argument("--threshold", type=float, default=0.3, help="lowest score kept (default %(default)s)")
    sub.add_argument("--name", default="autolabel", help="output file prefix (default %(default)s)")
    sub.add_argument("--spec", help="spec YAML for settings the model does not carry (test-time resize, ...)")
    sub.add_argument("--resize", type=int, help="shorter image side the model sees "
                                                "(dataset.augmentation.test_random_resize)")
    sub.add_argument("--max-size", type=int, help="longest side (dataset.augmentation.random_resize_max_size)")
    sub.add_argument("--batch-size", type=int, help="images per batch")
    sub.add_argument("--text-encoder", help="model.text_encoder_type, which an .onnx model needs")
    sub.set_defaults(func=_autolabel)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    return run_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
