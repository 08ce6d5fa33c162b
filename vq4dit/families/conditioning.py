"""How calibration items are conditioned: class labels (DiT), text prompts (PixArt), text prompts
with pooled embeddings (SD3) or those of a guidance-distilled model, without a negative prompt (Flux).

A set of calibration items is a dict of tensors. Its *item* keys hold one row per item (``x [M, C,
H, W]``, ``t [M]`` and the conditioning: a class label or a prompt index); its *shared* keys hold
what the data source keeps once (a prompt table, the conditioning of the unconditional branch of
classifier-free guidance). A *batch* holds the conditioning of B items plus the unconditional
branch's; doubled with its unconditional copy it is a model
batch of 2B (:meth:`guided`; a guidance-distilled model's batch stays B and carries the guidance
scale instead). Class-label batches are the tuple ``(x, t, y)`` (a dict with those keys works too);
text batches are dicts. Nothing here knows a model class: :mod:`vq4dit.families` maps a batch to
a model call.
"""

from __future__ import annotations

from typing import Mapping, Union

import torch

from ..sampling import NULL_CLASS

Batch = Union[tuple[torch.Tensor, ...], Mapping[str, torch.Tensor]]


def batch_size(batch: Batch) -> int:
    """B, the items of ``batch`` (its ``x [B, C, H, W]``)."""
    return int((batch["x"] if isinstance(batch, Mapping) else batch[0]).shape[0])


def batch_to(batch: Batch, device: torch.device | str) -> Batch:
    """``batch`` with every tensor on ``device`` (the same container type)."""
    if isinstance(batch, Mapping):
        return {key: value.to(device) for key, value in batch.items()}
    return tuple(value.to(device) for value in batch)


class ClassLabels:
    """One class id per item (``y [M]``); the unconditional branch is the null class (row
    ``NULL_CLASS`` of DiT's label table, as ``DiTPipeline`` uses it)."""

    name = "class labels"
    item_keys = ("x", "t", "y")
    shared_keys: tuple[str, ...] = ()
    batch_keys = item_keys

    def batch(self, items: Mapping[str, torch.Tensor], index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(x [B, C, H, W], t [B], y [B])`` of the items ``index [B]``."""
        return tuple(items[key][index] for key in self.item_keys)

    def unpack(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x, t, y)`` of a tuple or dict batch."""
        x, t, y = (batch[key] for key in self.item_keys) if isinstance(batch, Mapping) else batch
        return x, t, y

    def with_unconditional(self, batch: Batch) -> Batch:
        """B items -> 2B: the items again with the null label (same container type)."""
        x, t, y = self.unpack(batch)
        doubled = (torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, NULL_CLASS)]))
        return dict(zip(self.item_keys, doubled)) if isinstance(batch, Mapping) else doubled

    def guided(self, batch: Batch, guidance_scale: float) -> Batch:
        """The model batch of guided sampling: :meth:`with_unconditional` when ``guidance_scale > 1``."""
        return self.with_unconditional(batch) if guidance_scale > 1.0 else batch


class TextPrompts:
    """A prompt index per item (``prompt_index [M]`` long) into a table held once: ``prompt_embeds
    [N, T, C]``, ``prompt_attention_mask [N, T]``; the unconditional branch is the negative prompt,
    held once too (``negative_prompt_embeds [1, T, C]``, ``negative_prompt_attention_mask [1, T]``).
    Items never copy embeddings: M items cost ``8 M`` bytes of conditioning, not ``4 M T C``."""

    name = "text prompts"
    item_keys = ("x", "t", "prompt_index")
    shared_keys = ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask")
    batch_keys = ("x", "t", *shared_keys)

    def batch(self, items: Mapping[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{x [B, C, H, W], t [B], prompt_embeds [B, T, C'], prompt_attention_mask [B, T]}`` of the
        items ``index [B]`` (their prompts gathered from the table) plus the shared negative prompt."""
        prompts = items["prompt_index"][index]
        return {
            "x": items["x"][index], "t": items["t"][index],
            "prompt_embeds": items["prompt_embeds"][prompts], "prompt_attention_mask": items["prompt_attention_mask"][prompts],
            "negative_prompt_embeds": items["negative_prompt_embeds"],
            "negative_prompt_attention_mask": items["negative_prompt_attention_mask"],
        }

    def with_unconditional(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """B items -> 2B: the items again with the negative prompt's embeddings and mask."""
        size = batch_size(batch)
        embeds, negative = batch["prompt_embeds"], batch["negative_prompt_embeds"]
        if negative.shape[1:] != embeds.shape[1:]:
            raise ValueError(f"the negative prompt embeddings {tuple(negative.shape)} do not match the prompt "
                             f"embeddings {tuple(embeds.shape)} in tokens and channels ([1, T, C] vs [N, T, C])")
        mask, negative_mask = batch["prompt_attention_mask"], batch["negative_prompt_attention_mask"]
        return {
            **batch,
            "x": torch.cat([batch["x"], batch["x"]]),
            "t": torch.cat([batch["t"], batch["t"]]),
            "prompt_embeds": torch.cat([embeds, negative.to(embeds.dtype).expand(size, -1, -1)]),
            "prompt_attention_mask": torch.cat([mask, negative_mask.to(mask.dtype).expand(size, -1)]),
        }

    guided = ClassLabels.guided


class PooledTextPrompts(TextPrompts):
    """:class:`TextPrompts` plus one pooled embedding per prompt (SD3's CLIP pooled outputs): the
    table gains ``pooled_prompt_embeds [N, P]``, the negative prompt ``negative_pooled_prompt_embeds
    [1, P]``."""

    name = "pooled text prompts"
    shared_keys = (*TextPrompts.shared_keys, "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    batch_keys = ("x", "t", *shared_keys)

    def batch(self, items: Mapping[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`TextPrompts.batch` with ``pooled_prompt_embeds [B, P]`` and the negative ``[1, P]``."""
        return {**super().batch(items, index), "pooled_prompt_embeds": items["pooled_prompt_embeds"][items["prompt_index"][index]],
                "negative_pooled_prompt_embeds": items["negative_pooled_prompt_embeds"]}

    def with_unconditional(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """B items -> 2B: :meth:`TextPrompts.with_unconditional` with the negative pooled embedding."""
        pooled, negative = batch["pooled_prompt_embeds"], batch["negative_pooled_prompt_embeds"]
        if negative.shape[1:] != pooled.shape[1:]:
            raise ValueError(f"the negative pooled embedding {tuple(negative.shape)} does not match the pooled "
                             f"embeddings {tuple(pooled.shape)} ([1, P] vs [N, P])")
        doubled = torch.cat([pooled, negative.to(pooled.dtype).expand(batch_size(batch), -1)])
        return {**super().with_unconditional(batch), "pooled_prompt_embeds": doubled}


class DistilledTextPrompts(PooledTextPrompts):
    """The pooled prompts of a guidance-distilled model (FLUX.1): ``prompt_embeds [N, T, C]``,
    ``prompt_attention_mask [N, T]``, ``pooled_prompt_embeds [N, P]`` and no negative prompt: there
    is no unconditional branch; the guidance scale goes into the model batch as ``guidance [B]``."""

    name = "pooled text prompts, embedded guidance"
    shared_keys = ("prompt_embeds", "prompt_attention_mask", "pooled_prompt_embeds")
    batch_keys = ("x", "t", *shared_keys)

    def batch(self, items: Mapping[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{x [B, C, H, W], t [B], prompt_embeds [B, T, C'], prompt_attention_mask [B, T],
        pooled_prompt_embeds [B, P]}`` of the items ``index [B]``."""
        prompts = items["prompt_index"][index]
        return {"x": items["x"][index], "t": items["t"][index],
                **{key: items[key][prompts] for key in self.shared_keys}}

    def with_unconditional(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise ValueError("a guidance-distilled model has no unconditional branch: its guidance scale is an input")

    def guided(self, batch: Mapping[str, torch.Tensor], guidance_scale: float) -> dict[str, torch.Tensor]:
        """The B items with ``guidance [B]`` float32 = ``guidance_scale`` (whatever its value, as
        ``FluxPipeline`` passes its ``guidance_scale``)."""
        scale = torch.full((batch_size(batch),), float(guidance_scale), device=batch["x"].device)
        return {**batch, "guidance": scale}


# the pooled conditioning first: its keys are a superset of the plain text prompts'
CONDITIONINGS: tuple[ClassLabels | TextPrompts, ...] = (ClassLabels(), PooledTextPrompts(), TextPrompts(),
                                                        DistilledTextPrompts())
Conditioning = Union[ClassLabels, TextPrompts, PooledTextPrompts, DistilledTextPrompts]


def conditioning_of(source: Batch) -> Conditioning:
    """The conditioning of a set of items or a batch, from its keys (a tuple: class labels)."""
    if not isinstance(source, Mapping):
        return CONDITIONINGS[0]
    for conditioning in CONDITIONINGS:
        if all(key in source for key in (*conditioning.item_keys, *conditioning.shared_keys)):
            return conditioning
    for conditioning in CONDITIONINGS:
        if all(key in source for key in conditioning.batch_keys):
            return conditioning
    wanted = "; ".join(f"{c.name}: {', '.join(c.item_keys + c.shared_keys)}" for c in CONDITIONINGS)
    raise ValueError(f"calibration items with keys {sorted(source)} fit no conditioning; expected ({wanted})")
