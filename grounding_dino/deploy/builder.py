"""The TensorRT engine builder behind the gen_trt_engine action: an exported ONNX (the deploy contract) -> a
serialized TensorRT engine.

One optimization profile: the batch runs gen_trt_engine.tensorrt.min/opt/max_batch_size, every other axis is the
ONNX's own (image height/width, text length = model.max_text_len). FP32 or FP16; INT8 engines come from a QDQ ONNX
made by the quantize action, which builds strongly typed with the precisions it carries.

TensorRT 10 and 11 differ in how FP16 is asked for: 10.x has BuilderFlag.FP16; 11.x removed it and is always
strongly typed, so the ONNX is first converted to FP16 with its inputs and outputs kept FP32 (ModelOpt AutoCast).
A QDQ ONNX on 10.x is built strongly typed as well, which rules out the flag there too.

gen_trt_engine.tensorrt.layers_precision (TAO's "layer_name:precision" list) pins layers of an FP16 engine to a
precision with PREFER_PRECISION_CONSTRAINTS, as TAO does: the builder follows them where a kernel exists and still
builds where none does. A strongly typed network takes each layer's precision from the ONNX's types, so there the
list is refused.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple, Union

from grounding_dino.config import TensorRTConfig, parse_layers_precision
from grounding_dino.deploy import always_strongly_typed, tensorrt

log = logging.getLogger(__name__)

Shape = Tuple[int, ...]
ONNX_DIM = Union[int, str]


@dataclass(frozen=True)
class Profile:
    """(min, opt, max) shape per input name."""

    shapes: Dict[str, Tuple[Shape, Shape, Shape]]
    dynamic: bool


def onnx_inputs(path: Path) -> Dict[str, Tuple[ONNX_DIM, ...]]:
    """Input name -> shape (ints, or the symbol of a dynamic axis) of an ONNX file."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    return {v.name: tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim)
            for v in graph.input if v.name not in initializers}


def has_qdq(path: Path) -> bool:
    import onnx

    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear")
               for n in onnx.load(str(path), load_external_data=False).graph.node)


# TensorRT 10.14 and later (11.x included) can compile GridSample-based deformable attention wrongly, with no error:
# detections shift or vanish (NVIDIA/TensorRT#4813; 10.13 and ONNX Runtime are right).
GRIDSAMPLE_BROKEN_SINCE = (10, 14)


def gridsample_warning(path: Path, trt_version: str) -> str | None:
    """A warning when `path` samples with GridSample and this TensorRT is one that can get it wrong, else None."""
    import onnx

    release = tuple(int(part) for part in trt_version.split(".")[:2] if part.isdigit())
    if release < GRIDSAMPLE_BROKEN_SINCE:
        return None
    count = sum(n.op_type == "GridSample" for n in onnx.load(str(path), load_external_data=False).graph.node)
    if not count:
        return None
    return (f"{path} holds {count} GridSample op(s) and TensorRT {trt_version} can compute them wrongly without an "
            "error (NVIDIA/TensorRT#4813). Fix: export again with export.msda_impl=gather, which samples with "
            "Gather ops instead")


def engine_profile(inputs: Dict[str, Tuple[ONNX_DIM, ...]], options: TensorRTConfig, *, max_text_len: int,
                   width: int, height: int) -> Profile:
    """The optimization profile for an ONNX with these inputs; raises ValueError naming the spec key at fault."""
    image = inputs.get("inputs")
    fixed_vocabulary = set(inputs) == {"inputs"}  # export.fixed_captions: the text is inside the graph
    if image is None or len(image) != 4 or not ("input_ids" in inputs or fixed_vocabulary):
        raise ValueError(f"the ONNX inputs {sorted(inputs)} are not the export contract's; export it with the "
                         "export action")
    if tuple(image[2:]) != (height, width):
        raise ValueError(f"gen_trt_engine.input_width/input_height {width}x{height} differ from the ONNX's "
                         f"{image[3]}x{image[2]}; set them to the export size")
    if not fixed_vocabulary and inputs["input_ids"][1] != max_text_len:
        raise ValueError(f"model.max_text_len {max_text_len} differs from the ONNX's text length "
                         f"{inputs['input_ids'][1]}; set model.max_text_len to {inputs['input_ids'][1]}")
    batch = image[0]
    if isinstance(batch, int) and batch > 0:
        return Profile({name: (shape, shape, shape) for name, shape in inputs.items()}, dynamic=False)
    sizes = (options.min_batch_size, options.opt_batch_size, options.max_batch_size)
    if not sizes[0] <= sizes[1] <= sizes[2]:
        raise ValueError(f"gen_trt_engine.tensorrt: need min_batch_size <= opt_batch_size <= max_batch_size, got "
                         f"{sizes[0]}, {sizes[1]}, {sizes[2]}")
    shapes = {name: tuple((b,) + tuple(shape[1:]) for b in sizes) for name, shape in inputs.items()}
    return Profile(shapes, dynamic=True)


def fp16_onnx(source: Path, target: Path) -> Path:
    """`source` with its float math in FP16 and its inputs/outputs kept as they are (ModelOpt AutoCast)."""
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision
    except ImportError as err:
        raise RuntimeError(f"an FP16 engine on this TensorRT (strongly typed) needs the ONNX converted to FP16 first, "
                           f"which needs nvidia-modelopt ({err}): pip install 'grounding-dino-skillbank[quantize]'"
                           ) from None
    import onnx

    model = convert_to_mixed_precision(onnx_path=str(source), low_precision_type="fp16", keep_io_types=True)
    onnx.save_model(model, str(target), save_as_external_data=model.ByteSize() > 2**31 - 2**26)
    return target


def check_data_type(options: TensorRTConfig) -> None:
    if options.data_type not in ("FP32", "FP16"):
        raise ValueError(f"gen_trt_engine.tensorrt.data_type {options.data_type!r}: engines are FP32 or FP16; for "
                         "INT8 quantize the model (quantize action, INT8 QDQ ONNX) and build that ONNX with FP32")


def _keeps_own_type(trt, layer) -> bool:
    """Layers a '*' entry leaves alone, as TAO does: integer/bool math, constants (INT32 weights) and shape
    computations, whose types a float precision would break."""
    if layer.precision in (trt.int32, trt.bool) or layer.type == trt.LayerType.CONSTANT:
        return True
    first_in = layer.get_input(0) if layer.num_inputs >= 1 else None
    first_out = layer.get_output(0) if layer.num_outputs >= 1 else None
    if first_in is not None and first_in.is_shape_tensor:
        return True
    return (first_in is not None and first_out is not None and first_in.dtype == trt.int32
            and first_out.dtype == trt.int32)


def apply_layer_precisions(trt, network, config, precisions: Dict[str, str]) -> List[str]:
    """Set the precision (and the float output types) of the layers named in `precisions` ('*': every other layer
    but those _keeps_own_type), with PREFER_PRECISION_CONSTRAINTS on `config`; returns the names of the layers set.
    A name that is no layer of the network raises ValueError naming it."""
    dtypes = {"fp32": trt.float32, "fp16": trt.float16, "int32": trt.int32, "int8": trt.int8}
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    unknown = sorted(set(precisions) - {layer.name for layer in layers} - {"*"})
    if unknown:
        example = layers[len(layers) // 2].name if layers else "?"
        raise ValueError(f"gen_trt_engine.tensorrt.layers_precision names {', '.join(map(repr, unknown))}, which "
                         f"{'is' if len(unknown) == 1 else 'are'} no layer of the network; layer names are the ONNX "
                         f"node names (e.g. {example!r})")
    applied = []
    for layer in layers:
        wanted = precisions.get(layer.name)
        if wanted is None:
            if "*" not in precisions or _keeps_own_type(trt, layer):
                continue
            wanted = precisions["*"]
        dtype = dtypes[wanted]
        layer.precision = dtype
        if dtype in (trt.float32, trt.float16):
            # Without the output type the builder may still hand the next layer a tensor in another precision.
            for j in range(layer.num_outputs):
                if layer.get_output(j).dtype in (trt.float32, trt.float16):
                    layer.set_output_type(j, dtype)
        applied.append(layer.name)
    config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
    return applied


def layer_precisions_for(options: TensorRTConfig, strongly_typed: bool) -> Dict[str, str]:
    """The parsed layers_precision to apply to this build ({} when there is nothing to apply); raises ValueError
    when the network cannot take them."""
    precisions = parse_layers_precision(options.layers_precision)
    if not precisions:
        return {}
    if strongly_typed:
        raise ValueError("gen_trt_engine.tensorrt.layers_precision cannot be applied: this network is strongly typed "
                         "(a QDQ ONNX, or TensorRT 11+, which builds only strongly typed networks), so each layer "
                         "runs in the type the ONNX gives it; remove layers_precision")
    if options.data_type == "FP32":
        log.warning("gen_trt_engine.tensorrt.layers_precision has no effect on an FP32 engine (every layer runs in "
                    "FP32, as in TAO); set data_type FP16 to use it")
        return {}
    return precisions


def build_engine(onnx_path: Path, engine_path: Path, options: TensorRTConfig, *, max_text_len: int, width: int,
                 height: int, gpu_id: int = 0, timing_cache: Path | None = None, verbose: bool = False) -> Path:
    """Build and write the engine; returns its path. Raises with the parser's or builder's reason on failure."""
    check_data_type(options)
    trt = tensorrt(gpu_id)
    import torch

    torch.cuda.set_device(gpu_id)
    profile = engine_profile(onnx_inputs(onnx_path), options, max_text_len=max_text_len, width=width, height=height)
    qdq = has_qdq(onnx_path)
    typed_only = always_strongly_typed(trt)
    precisions = layer_precisions_for(options, strongly_typed=typed_only or qdq)
    source = onnx_path
    if options.data_type == "FP16" and (typed_only or qdq):
        source = fp16_onnx(onnx_path, engine_path.with_suffix(".fp16.onnx"))
    warning = gridsample_warning(onnx_path, trt.__version__)
    if warning:
        log.warning(warning)
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if qdq and not typed_only:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {source}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_size << 20)
    if options.data_type == "FP16" and source is onnx_path:
        config.set_flag(trt.BuilderFlag.FP16)
    if precisions:
        applied = apply_layer_precisions(trt, network, config, precisions)
        log.info("layers_precision set %d layers", len(applied))
    if profile.dynamic:
        trt_profile = builder.create_optimization_profile()
        for name, (low, opt, high) in profile.shapes.items():
            trt_profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(trt_profile)
    cache = None
    if timing_cache is not None:
        data = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = config.create_timing_cache(data)
        config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT could not build an engine from {source}; rerun with gen_trt_engine.verbose "
                           "true for the builder's log")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    if cache is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    log.info("built %s (%s, TensorRT %s, batch %s)", engine_path, options.data_type, trt.__version__,
             "/".join(str(s[0]) for s in profile.shapes["inputs"]))
    return engine_path
