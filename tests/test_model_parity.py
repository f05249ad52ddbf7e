"""Our Grounding DINO against Hugging Face's GroundingDinoForObjectDetection, weights moved by our key maps."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from grounding_dino.config import ModelConfig
from grounding_dino.model import build_model
from grounding_dino.model.checkpoint import load_weights, to_official
from grounding_dino.model.text import write_small_text_encoder

TOL = 1e-4
D_MODEL, HEADS, FFN, QUERIES, TEXT_LEN = 64, 4, 128, 20, 32


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    return write_small_text_encoder(tmp_path_factory.mktemp("bert"), hidden_size=32, num_layers=2)


@pytest.fixture(scope="module")
def hf_model(text_folder):
    from transformers import BertConfig, GroundingDinoConfig, GroundingDinoForObjectDetection
    from transformers.models.timm_backbone import TimmBackboneConfig

    torch.manual_seed(0)
    config = GroundingDinoConfig(
        backbone_config=TimmBackboneConfig(backbone="resnet18", out_indices=[2, 3, 4]),
        text_config=BertConfig.from_pretrained(text_folder),
        d_model=D_MODEL, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN,
        encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, num_queries=QUERIES, max_text_len=TEXT_LEN,
        num_feature_levels=4, dropout=0.0, fusion_droppath=0.0, disable_custom_kernels=True,
    )
    model = GroundingDinoForObjectDetection(config).eval()
    # Zero-initialised heads would hide mapping mistakes: move every weight off its init.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def small_config(text_folder, **overrides):
    values = dict(backbone="resnet_18", return_interm_indices=[1, 2, 3], num_feature_levels=4, hidden_dim=D_MODEL,
                  nheads=HEADS, enc_layers=2, dec_layers=2, dim_feedforward=FFN, num_queries=QUERIES,
                  max_text_len=TEXT_LEN, text_encoder_type=text_folder, fusion_droppath=0.0, backbone_norm="frozen")
    values.update(overrides)
    return ModelConfig(**values)


def inputs(model):
    torch.manual_seed(1)
    images = torch.randn(2, 3, 96, 128)
    pixel_mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    pixel_mask[1, :, 112:] = True  # the second image is padded on the right
    text = model.tokenizer(["cat . remote control .", "a dog"])
    return images, pixel_mask, text


def assert_close(ours, ref_logits, ref_boxes):
    finite = torch.isfinite(ref_logits)
    assert torch.equal(finite, torch.isfinite(ours["pred_logits"]))
    assert (ours["pred_logits"][finite] - ref_logits[finite]).abs().max() <= TOL
    assert (ours["pred_boxes"] - ref_boxes).abs().max() <= TOL


def test_hf_weights_give_hf_outputs(hf_model, text_folder):
    ours = build_model(small_config(text_folder)).eval()
    report = load_weights(ours, hf_model.state_dict())
    assert report.format == "hf" and report.ok and report.loaded > 0
    images, pixel_mask, text = inputs(ours)
    with torch.no_grad():
        ref = hf_model(pixel_values=images, pixel_mask=(~pixel_mask).long(), input_ids=text["input_ids"],
                       attention_mask=text["attention_mask"].long(), token_type_ids=text["token_type_ids"])
        out = ours(images, pixel_mask, text)
    assert out["pred_logits"].shape == (2, QUERIES, TEXT_LEN) == ref.logits.shape
    assert_close(out, ref.logits, ref.pred_boxes)


def test_official_round_trip_keeps_outputs(hf_model, text_folder):
    cfg = small_config(text_folder)
    source = build_model(cfg).eval()
    load_weights(source, hf_model.state_dict())
    official = to_official(source.state_dict(), cfg.backbone)
    target = build_model(cfg).eval()
    report = load_weights(target, {"model": official})
    assert report.format == "official" and report.ok
    images, pixel_mask, text = inputs(source)
    with torch.no_grad():
        expected = source(images, pixel_mask, text)
        got = target(images, pixel_mask, text)
    assert_close(got, expected["pred_logits"], expected["pred_boxes"])


def test_hf_swin_backbone_maps_to_timm(text_folder):
    """HF's Swin (split q/k/v, downsample at the end of a stage) loads into timm's Swin-T and agrees with it."""
    from transformers import BertConfig, GroundingDinoConfig, GroundingDinoForObjectDetection, SwinConfig

    torch.manual_seed(0)
    swin = SwinConfig(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7, out_indices=[2, 3, 4])
    config = GroundingDinoConfig(
        backbone_config=swin, text_config=BertConfig.from_pretrained(text_folder), d_model=D_MODEL, encoder_layers=1,
        decoder_layers=2, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN, encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS, num_queries=QUERIES, max_text_len=TEXT_LEN, dropout=0.0, fusion_droppath=0.0,
    )
    hf = GroundingDinoForObjectDetection(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours = build_model(small_config(text_folder, backbone="swin_tiny_224_1k", enc_layers=1)).eval()
    report = load_weights(ours, hf.state_dict())
    assert report.ok and report.ignored == ["backbone.0.norm.bias", "backbone.0.norm.weight"]
    # 224 px keeps every stage a multiple of the 7-pixel window, where timm and the official Swin pad alike.
    images = torch.randn(1, 3, 224, 224)
    text = ours.tokenizer(["cat . dog ."])
    with torch.no_grad():
        ref = hf(pixel_values=images, input_ids=text["input_ids"], attention_mask=text["attention_mask"].long(),
                 token_type_ids=text["token_type_ids"])
        out = ours(images, None, text)
    assert_close(out, ref.logits, ref.pred_boxes)
