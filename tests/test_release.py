"""Loading the authors' release layout and real backbone folders, at tiny width and offline.

`build_release` writes a folder exactly as the release's training script saves one (see docs/release.md):
``args/config.json`` (and the same config at the top, next to the LLM tokenizer), ``llm/`` and
``vision2d_model/`` as ``config.json`` + ``pytorch_model.bin`` of ``named_parameters()`` (SigLIP under its
transformers-4 ``vision_model.`` names, head included), ``vision3d_model/`` holding an M3D-CLIP (MONAI ViT,
BERT with pooler, contrastive projections), and the two connector ``pytorch_model.bin`` files.
"""

from __future__ import annotations

import io
import json
import math
import shutil
from importlib import resources
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
from monai.networks.nets import ViT
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertModel,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedTokenizerFast,
    SiglipConfig,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from med2e3.data.processor import Med2E3Processor, build_question_tokenizer
from med2e3.errors import InputError
from med2e3.model import Med2E3ForConditionalGeneration
from med2e3.release import (
    IGNORED_RELEASE_TENSORS,
    RELEASE_IMAGE3D_TOKEN_ID,
    ReleaseError,
    add_image_token,
    config_from_components,
    convert_release,
    expand_release_placeholder,
    load_release,
    model_from_components,
    read_state_dict,
)
from package_helpers import TOKENS, write_gguf

LLM_VOCAB = 320  # padded embedding, like Phi-3's 32064 rows for a 32011-token tokenizer
LLM_TOKENIZER_VOCAB = 300
QUESTION_VOCAB = 512
DL = 128  # LLM width
V3, V2, BERT = 64, 64, 64  # ViT3D, SigLIP and BERT widths
VOLUME = (32, 64, 64)
PATCH3D = (4, 16, 16)
QUESTIONS = ["What abnormality is seen in the left kidney?", "Which plane is this image in?"]


# ---- the tiny release -------------------------------------------------------------------------------------
def llm_tokenizer() -> PreTrainedTokenizerFast:
    """A stand-in for Phi-3's tokenizer: byte-level BPE with <|endoftext|>, and no <image3d>."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=LLM_TOKENIZER_VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = resources.files("med2e3").joinpath("assets/corpus.txt").read_text(encoding="utf-8").splitlines()
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def phi3_config() -> Phi3Config:
    return Phi3Config(
        vocab_size=LLM_VOCAB,
        hidden_size=DL,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        original_max_position_embeddings=1024,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=0,
    )


def siglip_config() -> SiglipVisionConfig:
    return SiglipVisionConfig(
        hidden_size=V2,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=64,
        patch_size=16,
    )


M3D_CLIP_CONFIG = {
    "architectures": ["M3DCLIP"],
    "model_type": "m3d_clip",
    "language_model_name_or_path": "./LaMed/pretrained_model/bert_base_uncased/",
    "local_loss": False,
    "gather_loss": True,
    "in_channels": 1,
    "img_size": list(VOLUME),
    "patch_size": list(PATCH3D),
    "hidden_size": V3,
    "mlp_dim": 128,
    "num_layers": 2,
    "num_heads": 4,
    "pos_embed": "perceptron",
    "dropout_rate": 0,
    "spatial_dims": 3,
    "max_text_len": 128,
    "vocab_size": QUESTION_VOCAB,
    "torch_dtype": "float32",
    "transformers_version": "4.44.2",
}


def bert_config() -> BertConfig:
    # M3D-CLIP keeps no BERT config; the loader reads sizes off the weights (heads = width / 64)
    return BertConfig(
        vocab_size=QUESTION_VOCAB,
        hidden_size=BERT,
        num_hidden_layers=2,
        num_attention_heads=1,
        intermediate_size=128,
        max_position_embeddings=128,
    )


def monai_vit() -> ViT:
    return ViT(
        in_channels=1,
        img_size=VOLUME,
        patch_size=PATCH3D,
        hidden_size=V3,
        mlp_dim=128,
        num_layers=2,
        num_heads=4,
        proj_type="perceptron",
        classification=True,
        qkv_bias=False,
    )


def jitter(module: nn.Module, seed: int) -> nn.Module:
    """Move every parameter off its (often zero or one) init so that each mapping matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module


def params(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """What the release's save() writes: named_parameters, detached."""
    return {prefix + k: v.detach().clone() for k, v in module.named_parameters()}


def linear_pair(n_in: int, n_out: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "_connector.0.weight": torch.randn(n_out, n_in, generator=g) * 0.1,
        "_connector.0.bias": torch.randn(n_out, generator=g) * 0.1,
        "_connector.2.weight": torch.randn(n_out, n_out, generator=g) * 0.1,
        "_connector.2.bias": torch.randn(n_out, generator=g) * 0.1,
    }


def m3d_clip_state(seed: int = 3) -> dict[str, torch.Tensor]:
    """M3D-CLIP's named_parameters: MONAI ViT (no classification head), BERT with pooler, projections."""
    torch.manual_seed(seed)
    vit = jitter(monai_vit(), seed)
    bert = jitter(BertModel(bert_config(), add_pooling_layer=True), seed + 1)
    state = {k: v for k, v in params(vit, "vision_encoder.").items() if "classification_head" not in k}
    state |= params(bert, "language_encoder.")
    state |= params(nn.Linear(V3, V3), "mm_vision_proj.") | params(nn.Linear(BERT, BERT), "mm_language_proj.")
    state["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    return state


def args_config(llm: Phi3Config, siglip: SiglipVisionConfig) -> dict:
    """args/config.json as the release's MedMLLMConfig.save_pretrained writes it."""
    return {
        "cache_dir_hf": "path/to/cache_dir_hf",
        "exp_id": 4,
        "tokenizer_name_or_path": "microsoft/Phi-3-mini-128k-instruct",
        "tokenizer_use_fast": False,
        "llm_type": "phi3",
        "llm_max_length": 768,
        "llm_padding_side": "right",
        "llm_attn_implementation": "flash_attention_2",
        "vision2d_model_type": "siglip",
        "vision2d_model_select_layer": -1,
        "vision2d_model_select_feature": "cls_patch",
        "vision2d_connector_type": "mlp2x_gelu",
        "vision3d_model_type": "m3d",
        "vision3d_model_select_layer": -1,
        "vision3d_model_select_feature": "patch",
        "vision3d_connector_type": "spatial_pooling_score15_mlp2x_gelu",
        "llm_config": llm.to_dict(),
        "vision2d_model_config": siglip.to_dict(),
        "vision2d_connector_config": {
            "input_dim": V2,
            "output_dim": DL,
            "connector_type": "mlp2x_gelu",
            "img_size": [64, 64],
            "patch_size": [16, 16],
        },
        "vision3d_model_config": M3D_CLIP_CONFIG,
        "vision3d_connector_config": {
            "input_dim": V3,
            "output_dim": DL,
            "connector_type": "spatial_pooling_score15_mlp2x_gelu",
            "img_size": list(VOLUME),
            "patch_size": list(PATCH3D),
        },
        "hidden_size": DL,
        "transformers_version": "4.44.2",
    }


def build_release(root: Path, modern: bool = False) -> Path:
    """The release layout at tiny width. ``modern``: llm/ and vision2d_model/ via save_pretrained (safetensors,
    transformers-5 names) and the tokenizer in llm/, instead of the training script's torch.save files."""
    torch.manual_seed(0)
    llm = Phi3ForCausalLM(phi3_config())
    siglip = jitter(SiglipVisionModel(siglip_config()), 1)
    for sub in (
        "args",
        "llm",
        "vision2d_model",
        "vision2d_connector",
        "vision3d_model",
        "vision3d_connector",
    ):
        (root / sub).mkdir(parents=True)
    config = json.dumps(args_config(llm.config, siglip.config), indent=2)
    (root / "args" / "config.json").write_text(config)
    (root / "config.json").write_text(config)
    if modern:
        llm.save_pretrained(root / "llm")
        llm_tokenizer().save_pretrained(root / "llm")
        siglip.save_pretrained(root / "vision2d_model")
    else:
        llm.config.save_pretrained(root / "llm")
        torch.save(params(llm), root / "llm" / "pytorch_model.bin")
        llm_tokenizer().save_pretrained(root)
        siglip.config.save_pretrained(root / "vision2d_model")
        torch.save(params(siglip, "vision_model."), root / "vision2d_model" / "pytorch_model.bin")
    torch.save(linear_pair(V2, DL, 2), root / "vision2d_connector" / "pytorch_model.bin")
    (root / "vision3d_model" / "config.json").write_text(json.dumps(M3D_CLIP_CONFIG, indent=2))
    torch.save(m3d_clip_state(), root / "vision3d_model" / "pytorch_model.bin")
    build_question_tokenizer(QUESTION_VOCAB).save_pretrained(root / "vision3d_model")
    g = torch.Generator().manual_seed(4)
    text_mlp = {
        "text_mlp.weight": torch.randn(DL, BERT, generator=g) * 0.1,
        "text_mlp.bias": torch.randn(DL, generator=g),
    }
    torch.save(linear_pair(V3, DL, 5) | text_mlp, root / "vision3d_connector" / "pytorch_model.bin")
    return root


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    return build_release(tmp_path_factory.mktemp("release") / "Med-2E3-M3D")


@pytest.fixture(scope="module")
def loaded(release):
    return load_release(release)


@pytest.fixture
def release_copy(release, tmp_path) -> Path:
    return Path(shutil.copytree(release, tmp_path / "copy"))


def volumes(n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, *VOLUME, generator=torch.Generator().manual_seed(seed))


# ---- the mapping, written out independently of the loader -----------------------------------------------
CONNECTOR_NAMES = {
    "vision2d_connector": {
        "_connector.0.": "projector2d.linear_1.",
        "_connector.2.": "projector2d.linear_2.",
    },
    "vision3d_connector": {
        "_connector.0.": "projector3d.mlp.linear_1.",
        "_connector.2.": "projector3d.mlp.linear_2.",
        "text_mlp.": "tgis.text_proj.",
    },
}


def our_name(folder: str, name: str) -> str | None:
    """Where a release tensor lives in our model (None: deliberately not loaded)."""
    if folder == "llm":
        return "language_model." + name
    if folder == "vision2d_model":
        return (
            None
            if name.startswith("vision_model.head.")
            else "vision2d." + name.removeprefix("vision_model.")
        )
    if folder == "vision3d_model":
        if (
            name.startswith(("mm_vision_proj.", "mm_language_proj.", "logit_scale"))
            or ".norm_cross_attn." in name
        ):
            return None
        if name.startswith("vision_encoder."):
            return "vision3d." + name.removeprefix("vision_encoder.")
        return "question_encoder." + name.removeprefix("language_encoder.")
    prefix = next(p for p in CONNECTOR_NAMES[folder] if name.startswith(p))
    return CONNECTOR_NAMES[folder][prefix] + name.removeprefix(prefix)


def test_every_release_tensor_is_mapped_and_loaded(release, loaded):
    model, _ = loaded
    ours = model.state_dict()
    covered, ignored = set(), set()
    for folder in ("llm", "vision2d_model", "vision2d_connector", "vision3d_model", "vision3d_connector"):
        for name, tensor in torch.load(release / folder / "pytorch_model.bin", weights_only=True).items():
            target = our_name(folder, name)
            if target is None:
                ignored.add(name)
                continue
            assert target not in covered
            covered.add(target)
            assert torch.equal(ours[target], tensor), f"{folder}:{name} -> {target}"
    assert covered == set(ours)  # nothing of ours left random, nothing of the release left over
    assert {n.split(".")[0] for n in ignored} == {
        "vision_model",
        "mm_vision_proj",
        "mm_language_proj",
        "logit_scale",
        "vision_encoder",
    }
    assert all(".head." in n or ".norm_cross_attn." in n or not n.startswith("vision") for n in ignored)
    assert "mm_vision_proj.*" in IGNORED_RELEASE_TENSORS["vision3d_model"]
    assert (
        "tgis.text_proj.weight" in covered
    )  # the question projection is restored (the release's loader drops it)


def test_config_follows_the_release(loaded):
    model, processor = loaded
    config = model.config
    assert (config.slice_aggregation, config.pool_size, config.tgis_temperature) == ("tgis", 2, 5.0)
    assert (config.tgis_score_dropout, config.vision2d_normalize) == (0.1, False)
    assert (config.vision3d_feature_layer, config.vision2d_feature_layer) == (-1, -1)
    assert config.vision2d_config.vision_use_head is False and not hasattr(model.vision2d, "head")
    assert config.vision3d_config.grid_size == (8, 4, 4) and config.vision3d_config.qkv_bias is False
    q = config.question_encoder_config
    assert (q.vocab_size, q.hidden_size, q.num_hidden_layers, q.max_position_embeddings) == (
        QUESTION_VOCAB,
        BERT,
        2,
        128,
    )
    assert config.num_image_tokens == 16 + 16
    assert not model.training
    # <image3d> was added to the stand-in Phi-3 tokenizer right after its last token, inside the padded vocab
    assert config.image_token_id == len(llm_tokenizer()) < LLM_VOCAB
    assert processor.image_token_id == config.image_token_id and processor.max_length == 768
    assert processor.question_max_length == 128  # 512 capped by the tiny BERT's positions
    assert processor.tokenizer.convert_ids_to_tokens(config.image_token_id) == "<image3d>"


# ---- outputs equal an independent computation ----------------------------------------------------------
def mlp(x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    h = F.gelu(F.linear(x, w["_connector.0.weight"], w["_connector.0.bias"]))
    return F.linear(h, w["_connector.2.weight"], w["_connector.2.bias"])


class Reference:
    """The release's computation from its own files: MONAI ViT, HF SigLIP/BERT/Phi-3, torch ops for the rest."""

    def __init__(self, root: Path):
        load = lambda sub: torch.load(root / sub / "pytorch_model.bin", weights_only=True)  # noqa: E731
        m3d = load("vision3d_model")
        self.vit = monai_vit().eval()
        vit_state = {
            k.removeprefix("vision_encoder."): v for k, v in m3d.items() if k.startswith("vision_encoder.")
        }
        missing, unexpected = self.vit.load_state_dict(vit_state, strict=False)
        assert all(k.startswith("classification_head.") for k in missing) and not unexpected
        self.bert = BertModel(bert_config()).eval()
        self.bert.load_state_dict(
            {
                k.removeprefix("language_encoder."): v
                for k, v in m3d.items()
                if k.startswith("language_encoder.")
            }
        )
        self.siglip = SiglipVisionModel(SiglipVisionConfig.from_pretrained(root / "vision2d_model")).eval()
        self.siglip.load_state_dict(
            {k.removeprefix("vision_model."): v for k, v in load("vision2d_model").items()}
        )
        self.llm = Phi3ForCausalLM(Phi3Config.from_pretrained(root / "llm")).eval()
        self.llm.load_state_dict(load("llm"))
        self.c2, self.c3 = load("vision2d_connector"), load("vision3d_connector")

    @torch.no_grad()
    def __call__(self, volume, input_ids, question_ids, image_token_id):
        """One example (no padding): logits 1 x T x V and slice scores 1 x 32."""
        _, blocks = self.vit(volume)  # 1 x 1 x 32 x 64 x 64 -> block outputs, before the final norm
        grid = blocks[-1][:, 1:].transpose(1, 2).reshape(1, V3, 8, 4, 4)  # CLS dropped
        v3 = mlp(F.avg_pool3d(grid, 2).flatten(2).transpose(1, 2), self.c3)  # 1 x 16 x Dl, depth-major
        slices = volume[0, 0][:, None].expand(-1, 3, -1, -1)  # 32 x 3 x 64 x 64, no normalisation
        feats = self.siglip(pixel_values=slices, output_hidden_states=True).hidden_states[-1]
        v2 = mlp(feats, self.c2)[None]  # 1 x 32 x 16 x Dl
        text = self.bert(input_ids=question_ids).pooler_output
        t = F.linear(text, self.c3["text_mlp.weight"], self.c3["text_mlp.bias"])  # 1 x Dl
        z = torch.cat([v3.reshape(1, 4, 4, DL).repeat_interleave(8, dim=1), v2], dim=2).mean(2)  # 1 x 32 x Dl
        scores = (torch.bmm(z, t[:, :, None])[..., 0] / 5).softmax(dim=1)
        visual = torch.cat([v3, (scores[:, :, None, None] * v2).sum(1)], dim=1)  # 1 x 32 x Dl
        embeds = self.llm.get_input_embeddings()(input_ids).clone()
        embeds[input_ids == image_token_id] = visual[0]
        return self.llm(inputs_embeds=embeds).logits, scores


def test_logits_and_scores_equal_an_independent_computation(release, loaded):
    model, processor = loaded
    batch = processor(QUESTIONS, volumes=volumes(2))
    with torch.no_grad():
        out = model(**batch)
    reference = Reference(release)
    for row in range(2):
        keep = batch["attention_mask"][row].bool()
        qkeep = batch["question_attention_mask"][row].bool()
        logits, scores = reference(
            batch["pixel_values"][row : row + 1],
            batch["input_ids"][row, keep][None],
            batch["question_input_ids"][row, qkeep][None],
            model.config.image_token_id,
        )
        torch.testing.assert_close(out.slice_scores[row], scores[0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(out.logits[row, keep], logits[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out.slice_scores, torch.full_like(out.slice_scores, 1 / 32))


def test_convert_release_reloads_to_identical_logits(release, loaded, tmp_path):
    model, processor = loaded
    dst = convert_release(release, tmp_path / "converted")
    assert any(dst.glob("*.safetensors"))
    reloaded = Med2E3ForConditionalGeneration.from_pretrained(dst).eval()
    reprocessor = Med2E3Processor.from_pretrained(dst)
    batch = processor(QUESTIONS, volumes=volumes(2))
    rebatch = reprocessor(QUESTIONS, volumes=volumes(2))
    for key in ("input_ids", "question_input_ids"):
        assert torch.equal(batch[key], rebatch[key])
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded(**rebatch).logits)
    with pytest.raises(ReleaseError, match="another folder"):
        convert_release(release, release)


def test_modern_layout_and_dtype(tmp_path, loaded):
    root = build_release(tmp_path / "modern", modern=True)
    model, processor = load_release(root, dtype="bfloat16")
    assert processor is not None and model.config.image_token_id == loaded[0].config.image_token_id
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    reference = loaded[0].state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reference[name].to(torch.bfloat16)), name


def test_release_placeholder_replays_with_our_token(loaded):
    model, processor = loaded
    prompt = processor.tokenizer(processor.prompt(QUESTIONS[0]), add_special_tokens=False)["input_ids"]
    at = prompt.index(model.config.image_token_id)
    release_ids = prompt[:at] + [RELEASE_IMAGE3D_TOKEN_ID] + prompt[at + 1 :]  # as the release encodes it
    replayed = expand_release_placeholder(release_ids, model.config)
    assert torch.equal(replayed, processor([QUESTIONS[0]])["input_ids"][0])
    with pytest.raises(InputError, match="once"):
        expand_release_placeholder(prompt, model.config)


def test_release_without_tokenizer_files(release_copy):
    for path in [*release_copy.glob("tokenizer*"), *release_copy.glob("vision3d_model/*.txt")]:
        path.unlink()
    for path in [*release_copy.glob("special_tokens_map.json"), *release_copy.glob("vision3d_model/tok*")]:
        path.unlink()
    with pytest.raises(ReleaseError, match="tokenizer="):
        load_release(release_copy)
    model, processor = load_release(release_copy, image_token_id=300)
    assert processor is None and model.config.image_token_id == 300
    tokenizer = llm_tokenizer()
    model, processor = load_release(
        release_copy, tokenizer=tokenizer, question_tokenizer=build_question_tokenizer(QUESTION_VOCAB)
    )
    assert processor is not None and model.config.image_token_id == len(tokenizer) - 1 == 300


def write_sentencepiece_tokenizer(folder: Path, vocab_size: int = 120) -> None:
    """A Phi-3-style tokenizer folder as the release saves it: ``tokenizer.model`` only, no ``tokenizer.json``."""
    corpus = resources.files("med2e3").joinpath("assets/corpus.txt").read_text(encoding="utf-8")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus.splitlines()),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=0.99,
        minloglevel=2,
    )
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    end = {"content": "<|endoftext|>", "special": True, "normalized": False}
    end |= {"lstrip": False, "rstrip": False, "single_word": False}
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "added_tokens_decoder": {str(vocab_size): end},  # as in Phi-3's tokenizer_config.json
        "unk_token": "<unk>",
        "bos_token": "<s>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def test_sentencepiece_only_tokenizer_loads(release_copy):
    """The release's Phi-3 tokenizer is SentencePiece only; converting it needs protobuf (a dependency)."""
    for path in [*release_copy.glob("tokenizer*"), *release_copy.glob("special_tokens_map.json")]:
        path.unlink()
    write_sentencepiece_tokenizer(release_copy)
    assert not (release_copy / "tokenizer.json").exists()
    model, processor = load_release(release_copy)
    assert processor is not None
    tokenizer = processor.tokenizer
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<image3d>") == 121
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 120
    ids = tokenizer("Which organ has a lesion?", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == "Which organ has a lesion?"


def test_no_free_row_for_the_image_token():
    tokenizer = llm_tokenizer()
    with pytest.raises(ReleaseError, match="no free row"):
        add_image_token(tokenizer, vocab_size=len(tokenizer))
    assert add_image_token(tokenizer, vocab_size=len(tokenizer) + 1) == len(tokenizer) - 1
    assert add_image_token(tokenizer, vocab_size=len(tokenizer)) == len(tokenizer) - 1  # already there


# ---- bad input: one clear error naming the file and the problem -----------------------------------------
def _edit_bin(path: Path, edit) -> None:
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


def _edit_json(path: Path, **fields) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | fields))


BAD_RELEASES = {
    "missing component": (
        lambda r: shutil.rmtree(r / "vision3d_connector"),
        r"missing vision3d_connector/",
    ),
    "connector with wrong keys": (
        lambda r: _edit_bin(
            r / "vision3d_connector/pytorch_model.bin", lambda s: s.update(text_proj=s.pop("text_mlp.weight"))
        ),
        r"no mapping \(1\): vision3d_connector/pytorch_model.bin:text_proj(.|\n)*nothing provides \(1\): tgis.text_proj.weight",
    ),
    "shape mismatch": (
        lambda r: _edit_bin(
            r / "vision2d_connector/pytorch_model.bin",
            lambda s: s.update({"_connector.0.weight": torch.zeros(DL, V2 + 1)}),
        ),
        r"shape mismatches \(1\): vision2d_connector/pytorch_model.bin:_connector.0.weight \[128, 65\] -> projector2d.linear_1.weight \[128, 64\]",
    ),
    "missing llm tensor": (
        lambda r: _edit_bin(r / "llm/pytorch_model.bin", lambda s: s.pop("model.norm.weight")),
        r"nothing provides \(1\): language_model.model.norm.weight",
    ),
    "unknown m3d tensor": (
        lambda r: _edit_bin(
            r / "vision3d_model/pytorch_model.bin", lambda s: s.update(extra_head=torch.zeros(2))
        ),
        r"no mapping \(1\): vision3d_model/pytorch_model.bin:extra_head",
    ),
    "unsupported connector type": (
        lambda r: _edit_json(
            r / "args/config.json", vision3d_connector_type="spatial_pooling_score3_mlp2x_gelu"
        ),
        r"args/config.json: unsupported vision3d_connector_type='spatial_pooling_score3_mlp2x_gelu'",
    ),
    "unsupported llm type": (
        lambda r: _edit_json(r / "llm/config.json", model_type="siglip"),
        r"llm/config.json: unsupported LLM type 'siglip'",
    ),
    "pickled list": (
        lambda r: torch.save([torch.zeros(2)], r / "vision2d_connector/pytorch_model.bin"),
        r"vision2d_connector/pytorch_model.bin: not a state dict .* it holds a list",
    ),
    "pickled module": (
        lambda r: torch.save(nn.Linear(2, 2), r / "vision2d_connector/pytorch_model.bin"),
        r"vision2d_connector/pytorch_model.bin: not a plain state dict; torch.load\(weights_only=True\) refused it: "
        r".*Unsupported global: GLOBAL torch.nn.modules.linear.Linear",
    ),
}


@pytest.mark.parametrize("case", list(BAD_RELEASES))
def test_bad_release_fails_clearly(release_copy, case):
    corrupt, message = BAD_RELEASES[case]
    corrupt(release_copy)
    with pytest.raises(ReleaseError, match=message):
        load_release(release_copy)


def test_phi3_legacy_su_rope_name_loads(release_copy):
    rope = {"type": "su", "long_factor": [1.0] * 16, "short_factor": [1.0] * 16}
    _edit_json(release_copy / "llm/config.json", rope_scaling=rope, original_max_position_embeddings=512)
    model, _ = load_release(release_copy)
    assert model.config.text_config.rope_parameters["rope_type"] == "longrope"


def test_read_state_dict_errors(tmp_path):
    with pytest.raises(ReleaseError, match="no weights file"):
        read_state_dict(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(ReleaseError, match="pytorch_model.bin"):
        read_state_dict(tmp_path)


# ---- components -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def components(tmp_path_factory, release) -> dict[str, Path]:
    """Local folders as one would download them: Phi-3, a full SiglipModel and M3D-CLIP (safetensors)."""
    root = tmp_path_factory.mktemp("components")
    torch.manual_seed(10)
    Phi3ForCausalLM(phi3_config()).save_pretrained(root / "llm")
    llm_tokenizer().save_pretrained(root / "llm")
    siglip = SiglipConfig(
        vision_config=siglip_config().to_dict(),
        text_config={
            "vocab_size": 64,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
        },
    )
    jitter(SiglipModel(siglip), 11).save_pretrained(root / "siglip")
    (root / "m3d").mkdir()
    (root / "m3d" / "config.json").write_text(json.dumps(M3D_CLIP_CONFIG))
    save_file(m3d_clip_state(seed=12), root / "m3d" / "model.safetensors")
    build_question_tokenizer(QUESTION_VOCAB).save_pretrained(root / "m3d")
    return {"llm": root / "llm", "vision2d": root / "siglip", "vision3d": root / "m3d"}


def without_dtype(config: dict) -> dict:
    return {k: without_dtype(v) if isinstance(v, dict) else v for k, v in config.items() if k != "dtype"}


def test_model_from_components(components, loaded):
    model, processor = model_from_components(**components)
    ours = model.state_dict()
    llm = read_state_dict(components["llm"])
    siglip = read_state_dict(components["vision2d"])
    m3d = read_state_dict(components["vision3d"])
    expected = {"language_model." + k: v for k, v in llm.items()}
    expected |= {
        "vision2d." + k.removeprefix("vision_model."): v
        for k, v in siglip.items()
        if k.startswith("vision_model.") and not k.startswith("vision_model.head.")
    }
    expected |= {
        "vision3d." + k.removeprefix("vision_encoder."): v
        for k, v in m3d.items()
        if k.startswith("vision_encoder.")
    }
    expected |= {
        "question_encoder." + k.removeprefix("language_encoder."): v
        for k, v in m3d.items()
        if k.startswith("language_encoder.")
    }
    expected = {k: v for k, v in expected.items() if ".norm_cross_attn." not in k}
    fresh = {k for k in ours if k.startswith(("projector3d.", "projector2d.", "tgis."))}
    assert set(expected) | fresh == set(ours) and not set(expected) & fresh
    for name, tensor in expected.items():
        assert torch.equal(ours[name], tensor), name
    for name in fresh:  # freshly initialised like a new model: N(0, 0.02) weights, zero biases
        if name.endswith("bias"):
            assert torch.equal(ours[name], torch.zeros_like(ours[name]))
        else:
            assert 0.015 < ours[name].std() < 0.025, name
    assert without_dtype(model.config.to_dict()) == without_dtype(
        config_from_components(**components).to_dict()
    )
    assert model.config.image_token_id == loaded[0].config.image_token_id
    with torch.no_grad():
        out = model(**processor(QUESTIONS, volumes=volumes(2)))
    assert torch.isfinite(out.logits).all() and out.slice_scores.shape == (2, 32)


def test_components_accept_a_vision_model_folder_and_overrides(components, release):
    model, processor = model_from_components(
        components["llm"], release / "vision2d_model", release / "vision3d_model", slice_aggregation="mean"
    )
    assert not hasattr(model, "question_encoder") and processor.question_tokenizer is None
    assert torch.equal(
        model.vision2d.embeddings.patch_embedding.weight,
        torch.load(release / "vision2d_model/pytorch_model.bin", weights_only=True)[
            "vision_model.embeddings.patch_embedding.weight"
        ],
    )
    with pytest.raises(ReleaseError, match="unsupported 2D encoder type 'm3d_clip'"):
        model_from_components(components["llm"], components["vision3d"], components["vision3d"])


def test_components_without_2d_branch_and_bad_folders(components, tmp_path):
    model, processor = model_from_components(
        components["llm"], None, components["vision3d"], slice_aggregation="none"
    )
    assert not hasattr(model, "vision2d") and not hasattr(model, "question_encoder")
    assert processor.question_tokenizer is None and model.config.num_image_tokens == 16
    llm = Path(shutil.copytree(components["llm"], tmp_path / "llm"))
    state = read_state_dict(llm)
    del state["model.norm.weight"]
    save_file(state, llm / "model.safetensors")
    with pytest.raises(ReleaseError, match=r"llm: the weights do not match(.|\n)*model.norm.weight"):
        model_from_components(llm, components["vision2d"], components["vision3d"])
    m3d = Path(shutil.copytree(components["vision3d"], tmp_path / "m3d"))
    state = read_state_dict(m3d)
    del state["vision_encoder.norm.weight"]
    save_file(state, m3d / "model.safetensors")
    with pytest.raises(ReleaseError, match=r"nothing provides \(1\): vision3d.norm.weight"):
        model_from_components(components["llm"], components["vision2d"], m3d)
    with pytest.raises(ReleaseError, match="no such folder"):
        model_from_components(tmp_path / "nowhere", components["vision2d"], components["vision3d"])


def test_components_with_a_gguf_llm_grow_its_vocabulary_and_save(components, tmp_path):
    """An LLM whose tokenizer fills its embedding (as SmolLM2's GGUF does) gets a row for the image token, and
    the assembled model saves and reloads like any other (the dequantised GGUF model itself refuses to)."""
    folder = tmp_path / "llm_gguf"
    folder.mkdir()
    write_gguf(folder / "tiny.Q.gguf")
    model, processor = model_from_components(folder, components["vision2d"], components["vision3d"])
    assert model.config.text_config.vocab_size == 320  # 258 tokens + the image token, a multiple of 64
    assert model.config.image_token_id == processor.image_token_id == len(TOKENS)
    reference = AutoModelForCausalLM.from_pretrained(folder, gguf_file="tiny.Q.gguf").state_dict()
    ours = model.language_model.state_dict()
    for name, value in reference.items():  # the embedding (and the head tied to it) has one row more
        assert torch.equal(ours[name][: len(value)], value), name
    model.save_pretrained(tmp_path / "saved")
    reloaded = Med2E3ForConditionalGeneration.from_pretrained(tmp_path / "saved").eval()
    inputs = processor(QUESTIONS, volumes=volumes(2))
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reloaded(**inputs).logits)


def test_release_config_falls_back_to_the_top_level_copy(release_copy):
    shutil.rmtree(release_copy / "args")
    model, _ = load_release(release_copy)
    assert model.config.slice_aggregation == "tgis"
    (release_copy / "config.json").unlink()
    with pytest.raises(ReleaseError, match=r"args/config.json: file is missing"):
        load_release(release_copy)
