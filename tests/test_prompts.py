"""Prompt-embeddings files (issue 21): the format check, the model check, the digest, and the
``python -m vq4dit.prompts encode`` command's error path when ``transformers`` is missing (CPU, offline)."""

import pytest
import torch
from safetensors.torch import save_file

from tests.test_families import CAPTION, TOKENS, tiny_pixart
from vq4dit.models import load_dit
from vq4dit.prompts import KEYS, check_prompts_fit, file_digest, load_prompt_embeds


def embeddings(count: int = 3, tokens: int = TOKENS, channels: int = CAPTION, seed: int = 0) -> dict[str, torch.Tensor]:
    """A valid prompt-embeddings dict: ``count`` prompts with padded masks and a negative prompt."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(count, tokens, dtype=torch.long)
    mask[:, tokens // 2:] = 0
    return {"prompt_embeds": torch.randn(count, tokens, channels, generator=g), "prompt_attention_mask": mask,
            "negative_prompt_embeds": torch.randn(1, tokens, channels, generator=g),
            "negative_prompt_attention_mask": torch.tensor([[1] + [0] * (tokens - 1)])}


def write_embeddings(path, tensors=None, **changes):
    """``tensors`` (default :func:`embeddings`) with ``changes`` (None removes a key) written to ``path``."""
    tensors = dict(embeddings() if tensors is None else tensors)
    for key, value in changes.items():
        tensors.pop(key) if value is None else tensors.__setitem__(key, value)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def test_a_valid_file_loads_as_float32_embeddings_and_int64_masks(tmp_path):
    source = embeddings()
    path = write_embeddings(tmp_path / "e.safetensors", {**source, "prompt_embeds": source["prompt_embeds"].half(),
                                                          "prompt_attention_mask": source["prompt_attention_mask"].int()})
    loaded = load_prompt_embeds(path)
    assert tuple(loaded) == KEYS
    assert loaded["prompt_embeds"].dtype == torch.float32 and loaded["prompt_attention_mask"].dtype == torch.int64
    assert torch.equal(loaded["prompt_embeds"], source["prompt_embeds"].half().float())
    assert torch.equal(loaded["negative_prompt_attention_mask"], source["negative_prompt_attention_mask"])
    check_prompts_fit(tiny_pixart(), loaded, str(path))  # C = caption_channels: fits


BAD = {
    "missing key": (dict(negative_prompt_attention_mask=None), "lacks negative_prompt_attention_mask"),
    "extra key": (dict(pooled=torch.zeros(1)), "has extra pooled"),
    "rank": (dict(prompt_embeds=torch.zeros(3, TOKENS * CAPTION)), "prompt_embeds is (3, 60), expected [N, T, C]"),
    "mask dtype": (dict(prompt_attention_mask=torch.ones(3, TOKENS)), "prompt_attention_mask is torch.float32"),
    "embeds dtype": (dict(negative_prompt_embeds=torch.ones(1, TOKENS, CAPTION, dtype=torch.long)),
                     "negative_prompt_embeds is torch.int64, expected a floating dtype"),
    "no prompts": (dict(prompt_embeds=torch.zeros(0, TOKENS, CAPTION), prompt_attention_mask=torch.zeros(0, TOKENS, dtype=torch.long)),
                   "no prompts"),
    "mask tokens": (dict(prompt_attention_mask=torch.ones(3, TOKENS + 1, dtype=torch.long)), "expected [N, T] = [3, 5]"),
    "negative tokens": (dict(negative_prompt_embeds=torch.zeros(1, TOKENS - 1, CAPTION)), "expected [1, T, C] = [1, 5, 12]"),
    "negative count": (dict(negative_prompt_attention_mask=torch.ones(2, TOKENS, dtype=torch.long)), "[1, T] = [1, 5]"),
    "nan": (dict(prompt_embeds=torch.full((3, TOKENS, CAPTION), float("nan"))), "prompt_embeds holds NaN/Inf"),
    "mask values": (dict(prompt_attention_mask=torch.full((3, TOKENS), 2, dtype=torch.long)), "values other than 0 and 1"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_every_malformed_file_is_one_named_value_error(tmp_path, case):
    changes, message = BAD[case]
    path = write_embeddings(tmp_path / "e.safetensors", **changes)
    with pytest.raises(ValueError, match="prompt embeddings .*e.safetensors") as raised:
        load_prompt_embeds(path)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_missing_and_unreadable_files_are_named(tmp_path):
    with pytest.raises(ValueError, match="do not exist"):
        load_prompt_embeds(tmp_path / "none.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_prompt_embeds(tmp_path / "bad.safetensors")


def test_the_model_check_wants_text_for_text_models_only_and_the_caption_width(tmp_path):
    prompts = load_prompt_embeds(write_embeddings(tmp_path / "e.safetensors"))
    with pytest.raises(ValueError, match="caption_channels is 12"):
        check_prompts_fit(tiny_pixart(), load_prompt_embeds(write_embeddings(tmp_path / "c.safetensors", embeddings(channels=8))), "c")
    with pytest.raises(ValueError, match="text-conditioned: give its calibration prompts with --data.prompt_embeds"):
        check_prompts_fit(tiny_pixart(), None)
    with pytest.raises(ValueError, match="DiT model, which is conditioned on class labels"):
        check_prompts_fit(load_dit("tiny"), prompts, "e.safetensors")
    check_prompts_fit(load_dit("tiny"), None)


def test_the_digest_is_the_files_content(tmp_path):
    first = file_digest(write_embeddings(tmp_path / "a.safetensors"))
    assert first == file_digest(write_embeddings(tmp_path / "b.safetensors"))  # the name does not count
    assert first != file_digest(write_embeddings(tmp_path / "c.safetensors", embeddings(seed=1)))
