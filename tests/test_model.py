"""Grounding DINO model: gradients everywhere, text masks, positive maps, checkpoint maps, head init, norm handling."""
import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from grounding_dino.config import ModelConfig
from grounding_dino.model import build_model
from grounding_dino.model.checkpoint import (config_conflicts, from_official, load_weights, native_checkpoint,
                                             to_official, to_tao)
from grounding_dino.model.criterion import SetCriterion, weighted_total
from grounding_dino.model.text import (build_caption, resolve_text_encoder, sub_sentence_masks,
                                       write_small_text_encoder)

DELIMS = (101, 102, 1012, 1029)


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    return write_small_text_encoder(tmp_path_factory.mktemp("bert"))


def small_config(text_folder, **overrides):
    values = dict(backbone="resnet_18", return_interm_indices=[1, 2, 3], num_feature_levels=4, hidden_dim=64,
                  nheads=4, enc_layers=2, dec_layers=2, dim_feedforward=128, num_queries=20, max_text_len=32,
                  text_encoder_type=text_folder, fusion_droppath=0.0)
    values.update(overrides)
    return ModelConfig(**values)


@pytest.fixture(scope="module")
def model(text_folder):
    torch.manual_seed(0)
    return build_model(small_config(text_folder)).eval()


# ---------------------------------------------------------------------------------------------------- gradients

def test_every_trainable_parameter_gets_a_gradient(text_folder):
    torch.manual_seed(0)
    cfg = small_config(text_folder, log_scale="auto", class_embed_bias=True)
    model = build_model(cfg, activation_checkpoint=True).train()
    # Zero-initialised last layers (box heads, timm's last BatchNorm of each block) pass no gradient to the
    # layers before them on the very first step; nudge every weight off its init to see every path.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    caption, spans = build_caption(["cat", "remote control"])
    text = model.tokenizer([caption, caption])
    pmap = model.tokenizer.positive_map(caption, spans)
    targets = [{"boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]]), "positive_map": pmap},
               {"boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]]), "positive_map": pmap[1:]}]
    outputs = model(torch.randn(2, 3, 64, 96), None, text)
    assert len(outputs["aux_outputs"]) == cfg.dec_layers - 1 and "enc_outputs" in outputs
    criterion = SetCriterion.from_config(cfg)
    loss = weighted_total(criterion(outputs, targets), criterion.weight_dict)
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert not dead, f"no gradient: {dead}"
    enc_head = [n for n, _ in model.named_parameters() if n.startswith(("transformer.enc_output", "transformer.enc_out"))]
    assert len(enc_head) >= 8  # enc_output, enc_output_norm, enc_out_bbox_embed, enc_out_class_embed.bias


def test_frozen_parts_stay_in_eval_mode_while_training(text_folder):
    from grounding_dino.lightning_module import freeze

    torch.manual_seed(0)
    model = build_model(small_config(text_folder, dropout_ratio=0.5))
    freeze(model, ["bert", "transformer.encoder.layers.0"])
    model.train()
    assert not model.bert.training and not model.transformer.encoder.layers[0].training
    assert model.training and model.transformer.training and model.transformer.encoder.layers[1].training
    assert model.backbone.training and model.bert.embeddings.dropout.p > 0
    text = model.tokenizer(["a red car . a dog"])
    features = [model.encode_text(text) for _ in range(2)]
    torch.testing.assert_close(features[0], features[1])  # no dropout in the frozen text encoder
    model.eval()
    assert not model.transformer.training
    model.train()
    assert model.transformer.encoder.layers[1].training and not model.bert.training


def test_unpadded_batches_skip_the_padding_masks_exactly(model, monkeypatch):
    text = model.tokenizer(["cat .", "a red car . a dog"])
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        skipped = model(images, torch.zeros(2, 64, 96, dtype=torch.bool), text)
        assert torch.equal(skipped["pred_boxes"], model(images, None, text)["pred_boxes"])
        forward = model.transformer.forward
        monkeypatch.setattr(model.transformer, "forward", lambda *args: forward(*args[:-1], True))
        masked = model(images, torch.zeros(2, 64, 96, dtype=torch.bool), text)
    torch.testing.assert_close(skipped["pred_logits"], masked["pred_logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(skipped["pred_boxes"], masked["pred_boxes"], atol=1e-5, rtol=1e-5)


def _official_bi_attention(attn, v, l, mask_v, mask_l):
    """The official BiMultiHeadAttention written out directly: project, split heads, attend both ways, merge."""
    batch, tokens, _ = v.shape
    heads, dim = attn.num_heads, attn.head_dim

    def split(x):
        return x.view(batch, x.shape[1], heads, dim).transpose(1, 2)

    query, key = split(attn.v_proj(v) * attn.scale), split(attn.l_proj(l))
    value_v, value_l = split(attn.values_v_proj(v)), split(attn.values_l_proj(l))
    logits = (query @ key.transpose(-1, -2)).clamp(-50000, 50000)  # [B, h, N, T]
    logits_t = logits.transpose(-1, -2)
    logits_t = (logits_t - logits_t.max(-1, keepdim=True)[0]).clamp(-50000, 50000)
    logits_t = logits_t.masked_fill(mask_v[:, None, None, :], float("-inf"))
    logits = logits.masked_fill(mask_l[:, None, None, :], float("-inf"))
    delta_v = (logits.softmax(-1) @ value_l).transpose(1, 2).flatten(2)
    delta_l = (logits_t.softmax(-1) @ value_v).transpose(1, 2).flatten(2)
    return attn.out_v_proj(delta_v), attn.out_l_proj(delta_l)


@pytest.mark.parametrize("heads,text_len", [(4, 9), (2, 40)])
def test_fusion_computes_the_official_bi_attention(heads, text_len):
    from grounding_dino.model.fusion import BiMultiHeadAttention

    torch.manual_seed(0)
    attn = BiMultiHeadAttention(v_dim=32, l_dim=48, embed_dim=64, num_heads=heads, dropout=0.0)
    for p in attn.parameters():
        nn.init.normal_(p, 0, 0.2)  # non-zero biases too: they take their own paths through the reordering
    v = torch.randn(2, 30, 32, requires_grad=True)
    l = torch.randn(2, text_len, 48, requires_grad=True)
    mask_v = torch.zeros(2, 30, dtype=torch.bool)
    mask_v[1, -7:] = True
    mask_l = torch.zeros(2, text_len, dtype=torch.bool)
    mask_l[0, -3:] = True
    ours = attn(v, l, mask_v, mask_l)
    official = _official_bi_attention(attn, v, l, mask_v, mask_l)
    # Padded text tokens' own updates differ (ours read the image evenly, fusion.py says why) and nothing reads
    # them: compared, and given gradient, on the real tokens only.
    real = ~mask_l[..., None]
    ours, official = (ours[0], ours[1] * real), (official[0], official[1] * real)
    upstream = [torch.randn_like(x) for x in ours]
    for a, b in zip(ours, official):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    wrt = [v, l, *attn.parameters()]
    for a, b in zip(torch.autograd.grad(ours, wrt, upstream), torch.autograd.grad(official, wrt, upstream)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_training_after_an_inference_mode_forward_keeps_its_gradients():
    """A model evaluated under torch.inference_mode and then trained (evaluate tests before training tests, or a
    predictor in the same process) must not reuse inference tensors cached by the first forward."""
    from grounding_dino.model.ms_deform_attn import MSDeformAttn

    attention = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2)
    shapes = [(4, 4), (2, 2)]
    query, value, reference = torch.randn(1, 5, 32), torch.randn(1, 20, 32), torch.rand(1, 5, 2, 2)
    with torch.inference_mode():
        attention(query, reference, value, shapes)
    attention(query, reference, value, shapes).sum().backward()
    assert attention.sampling_offsets.weight.grad is not None


def test_output_contract(model):
    text = model.tokenizer(["cat .", "a red car . a dog"])
    pixel_mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    pixel_mask[0, 48:] = True
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 96), pixel_mask, text)
    assert out["pred_logits"].shape == (2, 20, 32) and out["pred_boxes"].shape == (2, 20, 4)
    assert torch.equal(out["text_mask"][:, :text["attention_mask"].shape[1]], text["attention_mask"])
    assert not out["text_mask"][:, text["attention_mask"].shape[1]:].any()
    finite = torch.isfinite(out["pred_logits"])
    assert torch.equal(finite, out["text_mask"][:, None, :].expand_as(finite))
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()


def test_forward_export_matches_forward(model):
    text = model.tokenizer(["cat . dog ."], pad_to_max=True)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        logits, boxes = model.forward_export(images, text["input_ids"], text["attention_mask"], text["position_ids"],
                                             text["token_type_ids"], text["text_token_mask"])
        short = model(images, None, model.tokenizer(["cat . dog ."]))
    finite = torch.isfinite(short["pred_logits"])
    assert torch.equal(finite, torch.isfinite(logits))
    assert torch.allclose(logits[finite], short["pred_logits"][finite], atol=1e-4)
    assert torch.allclose(boxes, short["pred_boxes"], atol=1e-4)


# ---------------------------------------------------------------------------------------------------- text side

def test_sub_sentence_mask_blocks_and_positions():
    # [CLS] cat . red car . [SEP] [PAD] [PAD]
    ids = torch.tensor([[101, 4937, 1012, 2417, 2482, 1012, 102, 0, 0]])
    mask, pos = sub_sentence_masks(ids, DELIMS)
    assert pos.tolist() == [[0, 0, 1, 0, 1, 2, 0, 0, 0]]
    expected = torch.eye(9, dtype=torch.bool)
    expected[1:3, 1:3] = True   # "cat ." (the delimiter joins the phrase before it)
    expected[3:6, 3:6] = True   # "red car ."
    assert torch.equal(mask[0], expected)


def test_sub_sentence_mask_edges():
    # A delimiter at the last index stays alone, and the tokens it would close stay alone too.
    ids = torch.tensor([[101, 4937, 2417, 102]])
    mask, pos = sub_sentence_masks(ids, DELIMS)
    assert torch.equal(mask[0], torch.eye(4, dtype=torch.bool)) and pos.tolist() == [[0, 0, 0, 0]]
    # The same caption padded: [SEP] now closes "cat red [SEP]" (official behaviour).
    ids = torch.tensor([[101, 4937, 2417, 102, 0]])
    mask, pos = sub_sentence_masks(ids, DELIMS)
    assert pos.tolist() == [[0, 0, 1, 2, 0]] and mask[0, 1:4, 1:4].all() and not mask[0, 4, :4].any()
    # "?" delimits like "."; rows of a batch are independent.
    ids = torch.tensor([[101, 2054, 1029, 102], [101, 4937, 1012, 102]])
    mask, pos = sub_sentence_masks(ids, DELIMS)
    assert pos.tolist() == [[0, 0, 1, 0], [0, 0, 1, 0]] and torch.equal(mask[0], mask[1])


def test_tokenizer_caption_rules_and_padding(model):
    tok = model.tokenizer
    assert tok.delimiter_ids == DELIMS
    short = tok(["Cat . Dog"])
    assert tok.tokenizer.decode(short["input_ids"][0]) == "[CLS] cat. dog. [SEP]"
    padded = tok(["Cat . Dog"], pad_to_max=True)
    n = short["input_ids"].shape[1]
    assert padded["input_ids"].shape == (1, 32) and padded["text_token_mask"].shape == (1, 32, 32)
    assert torch.equal(padded["text_token_mask"][:, :n, :n], short["text_token_mask"])
    assert torch.equal(padded["position_ids"][:, :n], short["position_ids"])
    assert padded["attention_mask"].dtype == torch.bool and padded["attention_mask"].sum() == n
    long = tok([" . ".join(["word"] * 40)])
    assert long["input_ids"].shape == (1, 32) and long["input_ids"][0, -1] == 102


def test_positive_map(model):
    tok = model.tokenizer
    caption, spans = build_caption(["cat", "remote control", "traffic light"])
    assert caption == "cat . remote control . traffic light ." and caption[spans[1][0]:spans[1][1]] == "remote control"
    pmap = tok.positive_map(caption, spans)
    assert pmap.shape == (3, 32)
    assert pmap[0].nonzero().flatten().tolist() == [1]
    assert pmap[1].nonzero().flatten().tolist() == [3, 4]
    assert pmap[2].nonzero().flatten().tolist() == [6, 7]
    # Phrases past the truncation get empty rows.
    names = [f"thing{i}" for i in range(30)]
    caption, spans = build_caption(names)
    pmap = tok.positive_map(caption, spans)
    assert pmap[0].sum() > 0 and pmap[-1].sum() == 0


def test_unavailable_hub_id_says_to_use_a_local_folder():
    with pytest.raises(FileNotFoundError, match="local folder"):
        resolve_text_encoder("no-such-org/no-such-text-encoder")
    assert resolve_text_encoder("minilm").endswith("model")


# ---------------------------------------------------------------------------------------------------- checkpoints

def _outputs(model):
    torch.manual_seed(3)
    with torch.no_grad():
        return model(torch.randn(1, 3, 64, 64), None, model.tokenizer(["cat . dog ."]))


def test_native_and_tao_round_trips(model, text_folder, tmp_path):
    cfg = model.cfg
    expected = _outputs(model)
    ours = tmp_path / "ours.pth"
    torch.save(native_checkpoint(model), ours)
    tao = tmp_path / "tao.pth"
    torch.save({"state_dict": to_tao(model.state_dict(), cfg.backbone), "tao_model": "grounding_dino"}, tao)
    for path, fmt in ((ours, "ours"), (tao, "tao")):
        target = build_model(cfg).eval()
        report = load_weights(target, path)
        assert report.format == fmt and report.ok, report
        got = _outputs(target)
        assert torch.allclose(got["pred_boxes"], expected["pred_boxes"], atol=1e-5)
    tao_keys = to_tao(model.state_dict(), cfg.backbone)
    assert "model.model.backbone.0.body.body.conv1.weight" in tao_keys
    assert "model.model.transformer.encoder.fusion_layers.0.gamma_v" in tao_keys


def test_official_extras_are_ignored(model):
    sd = to_official(model.state_dict(), model.cfg.backbone)
    sd["bert.embeddings.position_ids"] = torch.arange(512)[None]
    sd["bert.pooler.dense.weight"] = torch.zeros(32, 32)
    sd["label_enc.weight"] = torch.zeros(2001, 64)
    report = load_weights(build_model(model.cfg), {"model": {"module." + k: v for k, v in sd.items()}})
    assert report.ok and report.format == "official"
    assert report.ignored == ["bert.embeddings.position_ids", "bert.pooler.dense.weight", "label_enc.weight"]


def test_swin_keys_map_to_official_names(text_folder):
    cfg = small_config(text_folder, backbone="swin_tiny_224_1k")
    model = build_model(cfg)
    native = model.state_dict()
    official = to_official(native, cfg.backbone)
    for key in ("backbone.0.patch_embed.proj.weight", "backbone.0.layers.0.downsample.reduction.weight",
                "backbone.0.layers.2.blocks.5.attn.qkv.weight", "backbone.0.norm3.weight"):
        assert key in official
    assert "backbone.0.layers.3.downsample.reduction.weight" not in official
    assert from_official(official, cfg.backbone).keys() == native.keys()
    report = load_weights(build_model(cfg), {"model": official})
    assert report.ok and report.format == "official"


def test_bad_checkpoint_names_offending_keys(model, tmp_path):
    sd = model.state_dict()
    sd.pop("transformer.decoder.norm.weight")
    sd["transformer.not_a_layer.weight"] = torch.zeros(3)
    sd["feat_map.weight"] = torch.zeros(64, 7)
    path = tmp_path / "bad.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(ValueError) as err:
        load_weights(build_model(model.cfg), path)
    message = str(err.value)
    for part in (str(path), "transformer.decoder.norm.weight", "transformer.not_a_layer.weight",
                 "feat_map.weight: checkpoint (64, 7) vs model (64, 32)"):
        assert part in message
    report = load_weights(build_model(model.cfg), path, strict=False)
    assert report.missing == ["transformer.decoder.norm.weight"] and report.loaded > 300


def test_config_conflicts(model, tmp_path):
    saved = dataclasses.asdict(model.cfg)
    assert config_conflicts(saved, model.cfg) == []
    saved.update(hidden_dim=256, log_scale="auto", num_select=100)
    lines = config_conflicts(saved, model.cfg)
    assert lines == ["model.hidden_dim: checkpoint 256, spec 64", "model.log_scale: checkpoint 'auto', spec None"]
    path = tmp_path / "other.pth"
    torch.save({"model": model.state_dict(), "model_config": saved}, path)
    with pytest.raises(ValueError, match="model.hidden_dim: checkpoint 256, spec 64"):
        load_weights(build_model(model.cfg), path)


def test_class_embed_bias_mismatch_is_reported(model):
    biased = build_model(dataclasses.replace(model.cfg, class_embed_bias=True))
    with pytest.raises(ValueError, match="class_embed.0.bias"):
        load_weights(biased, model.state_dict())


# ---------------------------------------------------------------------------------------------------- init

def test_scaled_head_starts_near_the_prior(text_folder):
    torch.manual_seed(0)
    stock = build_model(small_config(text_folder)).eval()
    torch.manual_seed(0)
    scaled = build_model(small_config(text_folder, log_scale="auto", class_embed_bias=True)).eval()
    stock_logits = _outputs(stock)["pred_logits"]
    scaled_logits = _outputs(scaled)["pred_logits"]
    stock_logits, scaled_logits = stock_logits[torch.isfinite(stock_logits)], scaled_logits[torch.isfinite(scaled_logits)]
    assert -6.0 < scaled_logits.mean() < -3.0 and scaled_logits.std() < 2.0
    assert stock_logits.std() > 3 * scaled_logits.std()
    learnable = build_model(small_config(text_folder, log_scale="0.0"))
    assert learnable.class_embed[0].log_scale.requires_grad
    with pytest.raises(ValueError, match="model.log_scale"):
        build_model(small_config(text_folder, log_scale="large"))


def test_backbone_norm_auto(text_folder, tmp_path):
    def norms(model):
        return {type(m) for m in model.backbone[0].body.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))}

    scratch = build_model(small_config(text_folder))
    assert norms(scratch) == {nn.BatchNorm2d}
    assert all(p.requires_grad for n, p in scratch.named_parameters() if ".bn" in n)
    path = tmp_path / "resnet18.pth"
    weights = {k[len("body."):]: v + 1 for k, v in scratch.backbone[0].state_dict().items()
               if k.startswith("body.") and "num_batches" not in k}
    torch.save({"state_dict": weights}, path)
    pretrained = build_model(small_config(text_folder, pretrained_backbone_path=str(path)))
    assert norms(pretrained) == {FrozenBatchNorm2d}
    assert torch.equal(pretrained.backbone[0].body.conv1.weight, weights["conv1.weight"])
    assert norms(build_model(small_config(text_folder), backbone_pretrained=True)) == {FrozenBatchNorm2d}
    assert norms(build_model(small_config(text_folder, backbone_norm="trainable"), backbone_pretrained=True)) == {
        nn.BatchNorm2d}
    frozen_backbone = build_model(small_config(text_folder, train_backbone=False))
    assert not any(p.requires_grad for n, p in frozen_backbone.named_parameters() if n.startswith("backbone.0"))
