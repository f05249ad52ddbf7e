"""Weights from where users keep them: Hugging Face hub ids (served here by a loopback server in the hub's URL
layout), transformers GroundingDino folders, official IDEA and TAO files, and the refusal of pickled objects.

huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE when it is imported, so each hub scenario runs in a
fresh interpreter (this file run as a script) with those variables set, the way a user's job process gets them.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

if __name__ != "__main__":  # the scenarios below get their hub variables from the test that starts them
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from grounding_dino.config import ModelConfig, load_experiment
from grounding_dino.model import build_model
from grounding_dino.model.checkpoint import (hf_settings, read_checkpoint, settle_model_config, shape_settings,
                                             to_official, to_tao)
from grounding_dino.model.text import write_small_text_encoder

COMMIT = "0123456789abcdef0123456789abcdef01234567"
BERT_ID = "tiny-org/tiny-bert"
GDINO_ID = "tiny-org/tiny-grounding-dino"
OFFICIAL_FILE = "tiny-org/tiny-release/groundingdino_tiny_ogc.pth"
UNCACHED_ID = "tiny-org/never-downloaded"
TOL = 1e-4
D_MODEL, FFN, QUERIES, TEXT_LEN = 64, 128, 20, 32
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------
# the tiny models


def _tiny_hf_config(text_folder):
    from transformers import BertConfig, GroundingDinoConfig
    from transformers.models.timm_backbone import TimmBackboneConfig

    return GroundingDinoConfig(
        backbone_config=TimmBackboneConfig(backbone="resnet18", out_indices=[2, 3, 4]),
        text_config=BertConfig.from_pretrained(text_folder),
        d_model=D_MODEL, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN,
        encoder_attention_heads=8, decoder_attention_heads=8, num_queries=QUERIES, max_text_len=TEXT_LEN,
        num_feature_levels=4, dropout=0.0, fusion_droppath=0.0, disable_custom_kernels=True,
    )


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    """Local folders of the repositories the server serves: a tiny BERT and a tiny transformers GroundingDino."""
    from transformers import AutoConfig, BertModel, GroundingDinoForObjectDetection

    root = tmp_path_factory.mktemp("repos")
    bert_folder = write_small_text_encoder(root / "tiny-bert", hidden_size=32, num_layers=2)
    torch.manual_seed(0)
    BertModel(AutoConfig.from_pretrained(bert_folder)).save_pretrained(bert_folder)  # random init, now with weights
    # A file the text encoder does not need: fetching it would mean the download is not filtered.
    (Path(bert_folder) / "tf_model.h5").write_bytes(b"not for us")
    gdino_folder = root / "tiny-grounding-dino"
    torch.manual_seed(0)
    model = GroundingDinoForObjectDetection(_tiny_hf_config(bert_folder)).eval()
    # Zero-initialised heads would hide mapping mistakes: move every weight off its init.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(gdino_folder)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(Path(bert_folder) / name, gdino_folder / name)
    return {BERT_ID: Path(bert_folder), GDINO_ID: gdino_folder}


@pytest.fixture(scope="module")
def official_file(repos, tmp_path_factory):
    """The tiny HF model as an official IDEA release file: official names, 'module.'-prefixed, under 'model'."""
    cfg = _settled(repos[GDINO_ID])
    model = build_model(cfg).eval()
    from grounding_dino.model.checkpoint import load_weights

    load_weights(model, read_checkpoint(repos[GDINO_ID]))
    official = to_official(model.state_dict(), cfg.backbone)
    path = tmp_path_factory.mktemp("release") / "groundingdino_tiny_ogc.pth"
    torch.save({"model": {"module." + k: v for k, v in official.items()}}, path)
    return path


def _settled(folder) -> ModelConfig:
    return settle_model_config(ModelConfig(), read_checkpoint(folder, "train.pretrained_model_path"))


# ---------------------------------------------------------------------------------------------------------------
# the hub, on 127.0.0.1


class _Hub(BaseHTTPRequestHandler):
    """The part of the Hub API huggingface_hub uses to fetch a model: repo info, the file tree, and file
    downloads (HEAD for metadata, GET for content) carrying X-Repo-Commit, ETag and Content-Length."""

    repos: dict = {}
    requests: list = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _files(self, repo_id):
        folder = self.repos.get(repo_id)
        return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()} \
            if folder else None

    def _send(self, status, body=b"", headers=None, head=False):
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, payload):
        self._send(200, json.dumps(payload).encode(), {"Content-Type": "application/json"})

    def _not_found(self, code, head=False):
        self._send(404, b'{"error": "not found"}', {"X-Error-Code": code, "Content-Type": "application/json"}, head)

    def _route(self, head):
        path = unquote(urlparse(self.path).path)
        self.requests.append(("HEAD" if head else "GET", path))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            repo_id, kind = "/".join(parts[2:4]), parts[4]
            files = self._files(repo_id)
            if files is None:
                return self._not_found("RepoNotFound", head)
            if kind == "revision":
                return self._json({"id": repo_id, "sha": COMMIT, "siblings": [{"rfilename": f} for f in files]})
            return self._json([{"type": "file", "path": f, "size": p.stat().st_size,
                                "oid": hashlib.sha1(p.read_bytes()).hexdigest()} for f, p in files.items()])
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id, filename = "/".join(parts[:2]), "/".join(parts[4:])
            files = self._files(repo_id)
            if files is None:
                return self._not_found("RepoNotFound", head)
            if filename not in files:
                return self._not_found("EntryNotFound", head)
            body = files[filename].read_bytes()
            return self._send(200, body, {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(body).hexdigest()}"',
                                          "Content-Type": "application/octet-stream"}, head)
        return self._not_found("RepoNotFound", head)

    def do_GET(self):
        self._route(head=False)

    def do_HEAD(self):
        self._route(head=True)


@pytest.fixture(scope="module")
def hub(repos, official_file, tmp_path_factory):
    release = tmp_path_factory.mktemp("tiny-release")
    shutil.copy(official_file, release / Path(OFFICIAL_FILE).name)
    handler = type("Hub", (_Hub,), {"repos": {**repos, "tiny-org/tiny-release": release}, "requests": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    env = {k: v for k, v in os.environ.items()
           if k.upper() not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HF_TOKEN", "HTTP_PROXY",
                                "HTTPS_PROXY", "ALL_PROXY")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}", HF_HOME=str(tmp_path_factory.mktemp("hf_home")),
               NO_PROXY="127.0.0.1,localhost", HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=str(ROOT))
    yield {"env": env, "requests": handler.requests, "repos": repos}
    server.shutdown()
    server.server_close()


def _scenario(hub, name, offline=False):
    env = dict(hub["env"], **({"HF_HUB_OFFLINE": "1"} if offline else {}))
    done = subprocess.run([sys.executable, __file__, name, "--repos", json.dumps({k: str(v) for k, v in
                                                                                    hub["repos"].items()})],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------
# hub tests (one online run, then one offline run on the cache it filled)


@pytest.fixture(scope="module")
def online(hub):
    return _scenario(hub, "online")


def test_text_encoder_id_downloads_only_what_it_needs_and_runs(online, hub):
    assert online["bert_equal"] and online["bert_in_cache"]
    assert online["detector_finite"] and online["tokens"] > 2
    fetched = [path for method, path in hub["requests"] if method == "GET" and "/resolve/" in path]
    assert any(path.endswith(f"{BERT_ID}/resolve/{COMMIT}/model.safetensors") for path in fetched)
    assert not [path for path in fetched if path.endswith("tf_model.h5")]


def test_pretrained_model_id_loads_an_hf_grounding_dino_with_its_outputs(online):
    # the spec set nothing structural: backbone, widths, layers, queries and text encoder came from config.json
    assert online["settled"] == {"backbone": "resnet_18", "hidden_dim": D_MODEL, "enc_layers": 2, "dec_layers": 2,
                                 "num_queries": QUERIES, "max_text_len": TEXT_LEN, "dim_feedforward": FFN,
                                 "return_interm_indices": [1, 2, 3, 4], "text_encoder_type": GDINO_ID}
    assert online["format"] == "hf" and online["loaded"] > 0
    assert online["train_logits"] <= TOL and online["train_boxes"] <= TOL
    assert online["predictor_logits"] <= TOL and online["predictor_boxes"] <= TOL


def test_an_official_file_on_the_hub_loads(online):
    assert online["official_format"] == "official"
    assert online["official_logits"] <= TOL and online["official_boxes"] <= TOL


def test_unknown_id_names_the_key_and_the_id(online):
    message = online["unknown_repo"]
    assert "train.pretrained_model_path 'tiny-org/no-such-model': no such model on http://127.0.0.1" in message


def test_offline_uses_the_cache_and_names_what_is_missing(online, hub):
    before = len(hub["requests"])
    offline = _scenario(hub, "offline", offline=True)
    assert len(hub["requests"]) == before  # HF_HUB_OFFLINE: not one request
    assert offline["bert_equal"] and offline["hf_loaded"] > 0
    for key in ("train.pretrained_model_path", "model.text_encoder_type"):
        message = offline[key]
        assert f"{key} '{UNCACHED_ID}' is not in the Hugging Face cache (HF_HOME={hub['env']['HF_HOME']}" in message
        assert "HF_HUB_OFFLINE=1 forbids downloading it: unset HF_HUB_OFFLINE" in message


def test_a_hub_id_runs_through_the_grounding_dino_cli(hub, tmp_path):
    """evaluate.checkpoint=<hub id> through the CLI a user runs: the SDK's preflight lets the id pass, the pre-check
    fetches it and takes its model settings (the spec sets none), and evaluate scores it."""
    import yaml

    from grounding_dino.data.synthetic import generate

    paths = generate(str(tmp_path / "data"), num_train=0, num_val=2, image_size=96, max_objects=2, seed=0,
                     colors=("red",), shapes=("circle", "square"))
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"dataset": {"test_data_sources": {"image_dir": paths["val_image_dir"],
                                                                      "json_file": paths["val_json_file"]},
                                                "workers": 0}}))
    cli = Path(sys.executable).with_name("grounding_dino")
    done = subprocess.run([str(cli), "evaluate", "-e", str(spec), f"evaluate.checkpoint={GDINO_ID}",
                           f"results_dir={tmp_path / 'results'}", "dataset.augmentation.test_random_resize=96",
                           "dataset.augmentation.random_resize_max_size=128"],
                          env=hub["env"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((tmp_path / "results" / "evaluate" / "results.json").read_text())
    assert 0.0 <= results["mAP50"] <= 1.0
    fetched = [path for method, path in hub["requests"] if method == "GET" and "/resolve/" in path]
    assert any(path.endswith(f"{GDINO_ID}/resolve/{COMMIT}/model.safetensors") for path in fetched)
    unknown = subprocess.run([str(cli), "evaluate", "-e", str(spec), "evaluate.checkpoint=tiny-org/no-such-model",
                              f"results_dir={tmp_path / 'unknown'}"],
                             env=hub["env"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr, unknown.stderr
    assert "evaluate.checkpoint 'tiny-org/no-such-model': no such model on http://127.0.0.1" in unknown.stderr
    assert not (tmp_path / "unknown").exists()


def test_a_hub_id_loads_in_the_python_api(hub, tmp_path):
    """Detector.load(<hub id>) goes through the same hub loading as evaluate.checkpoint."""
    code = ("import numpy as np; from grounding_dino import Detector; "
            f"d = Detector.load({GDINO_ID!r}, resize=96, max_size=128, threshold=0.0, num_select=5); "
            "r = d.predict(np.zeros((96, 80, 3), np.uint8), 'red circle'); "
            "print(len(r), r.phrases[0], r.image_size, d.predictor.name)")
    done = subprocess.run([sys.executable, "-c", code], env=hub["env"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.split() == ["5", "red", "circle", "(80,", "96)", "torch"]


# ---------------------------------------------------------------------------------------------------------------
# local files and folders (no hub)


def _outputs(model):
    torch.manual_seed(1)
    images = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        return model(images, None, model.tokenizer(["cat . remote control ."]))


def test_official_and_tao_files_load_with_settings_read_off_their_shapes(repos, official_file, tmp_path):
    from grounding_dino.predictor import load_predictor

    reference = build_model(_settled(repos[GDINO_ID])).eval()
    from grounding_dino.model.checkpoint import load_weights

    load_weights(reference, read_checkpoint(repos[GDINO_ID]))
    expected = _outputs(reference)
    tao = tmp_path / "tao_model.pth"
    torch.save({"state_dict": to_tao(reference.state_dict(), reference.cfg.backbone), "tao_model": "grounding_dino"},
               tao)
    inferred = shape_settings(torch.load(official_file, weights_only=True)["model"])
    assert inferred == {"backbone": "resnet_18", "hidden_dim": D_MODEL, "num_feature_levels": 4, "enc_layers": 2,
                        "dec_layers": 2, "num_queries": QUERIES, "dim_feedforward": FFN, "class_embed_bias": False,
                        "return_interm_indices": [1, 2, 3, 4]}
    # Official and TAO files carry no text encoder nor text length: the spec names them, the rest comes from shapes.
    spec = {"model": {"text_encoder_type": str(repos[BERT_ID]), "max_text_len": TEXT_LEN}}
    for path in (official_file, tao):
        cfg = load_experiment({**spec, "evaluate": {"checkpoint": str(path)}})
        predictor = load_predictor(str(path), cfg, "evaluate")
        got = _outputs(predictor.model)
        assert (got["pred_boxes"] - expected["pred_boxes"]).abs().max() <= TOL, path


def test_hf_folder_settings_conflicting_with_the_spec_are_listed(repos):
    checkpoint = read_checkpoint(repos[GDINO_ID], "train.pretrained_model_path")
    with pytest.raises(ValueError) as err:
        settle_model_config(ModelConfig(hidden_dim=128, num_queries=50, backbone="resnet_50"), checkpoint)
    message = str(err.value)
    assert f"train.pretrained_model_path {repos[GDINO_ID]} was trained with other model settings" in message
    for line in ("model.backbone: checkpoint 'resnet_18', spec 'resnet_50'",
                 f"model.hidden_dim: checkpoint {D_MODEL}, spec 128", f"model.num_queries: checkpoint {QUERIES}, spec 50"):
        assert line in message


def test_hf_swin_configs_map_to_our_backbones(tmp_path):
    from transformers import GroundingDinoConfig, SwinConfig

    base = SwinConfig(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=12, image_size=384,
                      out_indices=[2, 3, 4])
    GroundingDinoConfig(backbone_config=base).save_pretrained(tmp_path / "base")
    GroundingDinoConfig().save_pretrained(tmp_path / "tiny")  # transformers' defaults are grounding-dino-tiny's
    assert hf_settings(tmp_path / "base", "b")["backbone"] == "swin_base_384_22k"
    tiny = hf_settings(tmp_path / "tiny", "t")
    assert tiny["backbone"] == "swin_tiny_224_1k" and tiny["return_interm_indices"] == [1, 2, 3, 4]
    assert {k: v for k, v in tiny.items() if k != "text_encoder_type"} == {
        k: v for k, v in ModelConfig().__dict__.items() if k in tiny and k != "text_encoder_type"}
    odd = SwinConfig(embed_dim=64, depths=[2, 2, 2, 2], window_size=7, out_indices=[2, 3, 4])
    GroundingDinoConfig(backbone_config=odd).save_pretrained(tmp_path / "odd")
    with pytest.raises(ValueError, match="no model.backbone has Swin embed_dim 64, depths \\[2, 2, 2, 2\\]"):
        hf_settings(tmp_path / "odd", "o")


def test_a_pickle_with_python_objects_is_refused_in_one_line(repos, tmp_path):
    from grounding_dino.predictor import load_predictor

    path = tmp_path / "groundingdino_with_args.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "args": argparse.Namespace(lr=1e-4)}, path)
    expected = (f"{path}: refused: the file holds Python objects, not tensors (torch.load weights_only); re-save "
                "its state_dict with torch.save(model.state_dict(), path)")
    with pytest.raises(ValueError) as err:
        read_checkpoint(path, "train.pretrained_model_path")
    assert str(err.value) == f"train.pretrained_model_path: {expected}"
    cfg = load_experiment({"model": {"text_encoder_type": str(repos[BERT_ID])}, "evaluate": {"checkpoint": str(path)}})
    with pytest.raises(ValueError) as err:
        load_predictor(str(path), cfg, "evaluate")
    assert str(err.value) == f"evaluate.checkpoint: {expected}" and err.value.__cause__ is None


def test_a_missing_path_that_is_no_id_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.pretrained_model_path: /nowhere/model.pth does not exist here "
                                                "and is not a Hugging Face model id"):
        read_checkpoint("/nowhere/model.pth", "train.pretrained_model_path")


# ---------------------------------------------------------------------------------------------------------------
# the scenarios, run in a fresh interpreter with HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE set by the test


def _max_diffs(ours, logits, boxes):
    finite = torch.isfinite(logits)
    assert torch.equal(finite, torch.isfinite(ours["pred_logits"]))
    return (float((ours["pred_logits"][finite] - logits[finite]).abs().max()),
            float((ours["pred_boxes"] - boxes).abs().max()))


def _hf_reference(folder, model):
    """transformers' own outputs for the input _outputs feeds our model."""
    from transformers import GroundingDinoForObjectDetection

    hf = GroundingDinoForObjectDetection.from_pretrained(folder).eval()
    torch.manual_seed(1)
    images = torch.randn(1, 3, 96, 128)
    text = model.tokenizer(["cat . remote control ."])
    with torch.no_grad():
        out = hf(pixel_values=images, input_ids=text["input_ids"], attention_mask=text["attention_mask"].long(),
                 token_type_ids=text["token_type_ids"])
    return out.logits, out.pred_boxes


def _bert_equal(folder, source):
    from transformers import BertModel

    from grounding_dino.model.text import build_bert

    ours, theirs = build_bert(folder).state_dict(), BertModel.from_pretrained(source, add_pooling_layer=False)
    return all(torch.equal(v, theirs.state_dict()[k]) for k, v in ours.items())


def _error(call):
    try:
        call()
    except (FileNotFoundError, OSError, ValueError) as err:
        return str(err)
    return "no error"


def _online(repos):
    from huggingface_hub import constants

    from grounding_dino.actions.train import build_module, settled_config
    from grounding_dino.model.checkpoint import load_weights
    from grounding_dino.model.text import resolve_text_encoder
    from grounding_dino.predictor import TorchPredictor

    out = {}
    folder = resolve_text_encoder(BERT_ID)  # (a)
    out["bert_in_cache"] = folder.startswith(constants.HF_HUB_CACHE)
    out["bert_equal"] = _bert_equal(folder, repos[BERT_ID])
    small = ModelConfig(backbone="resnet_18", hidden_dim=D_MODEL, enc_layers=1, dec_layers=1, dim_feedforward=FFN,
                        num_queries=QUERIES, max_text_len=TEXT_LEN, text_encoder_type=BERT_ID)
    detector = build_model(small).eval()
    result = _outputs(detector)
    out["detector_finite"] = bool(torch.isfinite(result["pred_boxes"]).all())
    out["tokens"] = int(detector.tokenizer(["cat . dog ."])["attention_mask"].sum())

    cfg = load_experiment({"train": {"pretrained_model_path": GDINO_ID}, "evaluate": {"checkpoint": GDINO_ID}})  # (b)
    checkpoint = read_checkpoint(GDINO_ID, "train.pretrained_model_path")
    cfg = settled_config(cfg, checkpoint)
    out["settled"] = {k: getattr(cfg.model, k) for k in ("backbone", "hidden_dim", "enc_layers", "dec_layers",
                                                           "num_queries", "max_text_len", "dim_feedforward",
                                                           "return_interm_indices", "text_encoder_type")}
    model = build_module(cfg, pretrained=checkpoint).model.eval()
    out["format"] = load_weights(build_model(cfg.model), checkpoint).format
    out["loaded"] = load_weights(build_model(cfg.model), checkpoint).loaded
    logits, boxes = _hf_reference(repos[GDINO_ID], model)
    out["train_logits"], out["train_boxes"] = _max_diffs(_outputs(model), logits, boxes)
    predictor = TorchPredictor.load(GDINO_ID, load_experiment({"evaluate": {"checkpoint": GDINO_ID}}), "evaluate")
    out["predictor_logits"], out["predictor_boxes"] = _max_diffs(_outputs(predictor.model), logits, boxes)

    official = read_checkpoint(OFFICIAL_FILE, "evaluate.checkpoint")
    target = build_model(cfg.model).eval()
    out["official_format"] = load_weights(target, official).format
    out["official_logits"], out["official_boxes"] = _max_diffs(_outputs(target), logits, boxes)
    out["unknown_repo"] = _error(lambda: read_checkpoint("tiny-org/no-such-model", "train.pretrained_model_path"))
    return out


def _offline(repos):
    from grounding_dino.model.text import resolve_text_encoder

    out = {"bert_equal": _bert_equal(resolve_text_encoder(BERT_ID), repos[BERT_ID])}
    checkpoint = read_checkpoint(GDINO_ID, "train.pretrained_model_path")
    from grounding_dino.model.checkpoint import load_weights

    out["hf_loaded"] = load_weights(build_model(settle_model_config(ModelConfig(), checkpoint)), checkpoint).loaded
    out["train.pretrained_model_path"] = _error(lambda: read_checkpoint(UNCACHED_ID, "train.pretrained_model_path"))
    out["model.text_encoder_type"] = _error(lambda: resolve_text_encoder(UNCACHED_ID))
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=("online", "offline"))
    parser.add_argument("--repos", required=True)
    args = parser.parse_args()
    folders = {k: Path(v) for k, v in json.loads(args.repos).items()}
    print(json.dumps({"online": _online, "offline": _offline}[args.scenario](folders)))
