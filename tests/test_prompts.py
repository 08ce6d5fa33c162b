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


class WordTokenizer:
    """A tokenizer double with the call PixArt's pipelines make: word ids (hashed), padded and
    truncated to ``max_length``, an attention mask of ones over the words (and the end token)."""

    def __call__(self, texts, padding, max_length, truncation, add_special_tokens, return_tensors):
        assert padding == "max_length" and truncation and add_special_tokens and return_tensors == "pt"
        ids = torch.zeros(len(texts), max_length, dtype=torch.long)
        mask = torch.zeros(len(texts), max_length, dtype=torch.long)
        for row, text in enumerate(texts):
            words = [3 + sum(map(ord, word)) % 90 for word in text.split()][: max_length - 1] + [1]  # 1: end token
            ids[row, : len(words)], mask[row, : len(words)] = torch.tensor(words), 1
        return {"input_ids": ids, "attention_mask": mask}


class TinyEncoder(torch.nn.Module):
    """An encoder double: embedding + a masked mean mixed in, ``(last_hidden_state [B, T, C],)``."""

    def __init__(self, channels: int = CAPTION) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.mix = torch.nn.Embedding(100, channels), torch.nn.Linear(channels, channels)

    def forward(self, input_ids, attention_mask):
        hidden = self.embed(input_ids)
        mean = (hidden * attention_mask[..., None]).sum(1, keepdim=True) / attention_mask.sum(1)[:, None, None]
        return (self.mix(hidden + mean),)


def test_encode_writes_a_valid_file_once_per_key_and_again_when_anything_changes(tmp_path):
    from vq4dit.prompts.encode import encode_file, encode_prompts

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\n  a blue square on grass  \nthree digits\n", encoding="utf-8")
    loads = []

    def loader(pipeline, device, dtype):
        loads.append((pipeline, device, dtype))
        return WordTokenizer(), TinyEncoder()

    out = tmp_path / "embeds.safetensors"
    assert encode_file("pipe", prompts, out, max_length=6, batch_size=2, loader=loader, progress=False)
    loaded = load_prompt_embeds(out)  # the file passes the --data.prompt_embeds check
    assert loaded["prompt_embeds"].shape == (3, 6, CAPTION) and loaded["negative_prompt_embeds"].shape == (1, 6, CAPTION)
    assert loaded["prompt_attention_mask"].sum(1).tolist() == [4, 6, 3]  # words + end token, truncated to 6
    assert loaded["negative_prompt_attention_mask"].tolist() == [[1, 0, 0, 0, 0, 0]]  # "" is the end token only
    direct = encode_prompts(WordTokenizer(), TinyEncoder(), ["a blue square on grass"], max_length=6, progress=False)
    assert torch.equal(loaded["prompt_embeds"][1], direct["prompt_embeds"][0])  # batching changes nothing
    assert not encode_file("pipe", prompts, out, max_length=6, batch_size=2, loader=loader, progress=False)
    assert len(loads) == 1  # the second run found its key: no encoder loaded
    assert encode_file("pipe", prompts, out, max_length=7, loader=loader, progress=False)  # another setting
    assert encode_file("pipe", prompts, out, max_length=7, negative="blurry", loader=loader, progress=False)
    prompts.write_text("a red circle\n", encoding="utf-8")
    assert encode_file("pipe", prompts, out, max_length=7, negative="blurry", loader=loader, progress=False)
    assert len(loads) == 4 and load_prompt_embeds(out)["prompt_embeds"].shape == (1, 7, CAPTION)


def test_the_encode_command_says_each_mistake_in_one_error_line(tmp_path, capsys):
    import importlib.util

    from vq4dit.prompts.__main__ import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n", encoding="utf-8")
    base = ["encode", "--pipeline", str(tmp_path / "pipe"), "--out", str(tmp_path / "e.safetensors")]
    cases = [([*base, "--prompts", str(tmp_path / "none.txt")], "cannot read the prompts"),
             ([*base, "--prompts", str(prompts), "--max-length", "0"], "--max-length and --batch-size must be >= 1"),
             ([*base, "--prompts", str(prompts), "--dtype", "int8"], "--dtype must be float32")]
    if importlib.util.find_spec("transformers") is None:  # this environment: the extra is not installed
        cases.append(([*base, "--prompts", str(prompts)], "needs the transformers package"))
    else:
        cases.append(([*base, "--prompts", str(prompts)], "cannot load the tokenizer / text encoder"))
    (tmp_path / "empty.txt").write_text("\n \n", encoding="utf-8")
    cases.append(([*base, "--prompts", str(tmp_path / "empty.txt")], "holds no prompt"))
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "e.safetensors").exists()


def test_prompt_classes_come_from_the_files_metadata_and_are_checked(tmp_path):
    from safetensors.torch import load_file

    from vq4dit.prompts import CLASSES_FIELD, prompt_classes
    from vq4dit.prompts.encode import encode_file

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\ntwo\nthree\n", encoding="utf-8")
    loader = lambda pipeline, device, dtype: (WordTokenizer(), TinyEncoder())  # noqa: E731
    out = tmp_path / "e.safetensors"
    encode_file("pipe", prompts, out, max_length=4, loader=loader, progress=False)
    assert prompt_classes(out) is None  # no classes given: none stored
    assert encode_file("pipe", prompts, out, max_length=4, loader=loader, progress=False, classes=[1, 2, 3])
    assert prompt_classes(out).tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="3 classes for 2 prompts"):
        prompts.write_text("one\ntwo\n", encoding="utf-8")
        encode_file("pipe", prompts, out, max_length=4, loader=loader, progress=False, classes=[1, 2, 3])
    tensors = load_file(str(out))
    for bad in ("[1, 2]", "[1, -2, 3]", "[1.5, 2, 3]", "not json"):
        save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={CLASSES_FIELD: bad})
        with pytest.raises(ValueError, match="must list one class"):
            prompt_classes(tmp_path / "bad.safetensors")


def test_the_encode_command_encodes_for_the_shipped_reference_without_transformers(tmp_path, capsys):
    from vq4dit.prompts.__main__ import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten seven\nthe number 3\n", encoding="utf-8")
    out = tmp_path / "e.safetensors"
    assert main(["encode", "--pipeline", "pixart_reference", "--prompts", str(prompts), "--out", str(out)]) == 0
    loaded = load_prompt_embeds(out)
    assert loaded["prompt_embeds"].shape == (2, 8, 32) and loaded["prompt_attention_mask"].sum(1).tolist() == [4, 4]
    check_prompts_fit(load_dit("pixart_reference"), loaded, str(out))  # the reference's own width
    prompts.write_text("a purple seven\n", encoding="utf-8")
    assert main(["encode", "--pipeline", "pixart_reference", "--prompts", str(prompts), "--out", str(out)]) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert "'purple'" in line and "vocabulary" in line
