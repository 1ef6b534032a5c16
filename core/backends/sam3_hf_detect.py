"""SAM 3's detection head on cached image features, with no work for queries that cannot be kept.

``Sam3Model.forward`` runs the mask decoder for all 200 queries of every prompt, and boxes and
scores for all six decoder layers, although only the last layer's are used and only queries above
the score threshold are kept. Here the same sub-modules run in the same order on the same inputs
(so kept queries get the same numbers, within float tolerance), but:

* boxes and scores are computed for the last decoder layer only;
* scores come first; the mask decoder runs only when some query of the batch passes the
  threshold, and only for those queries (its pixel decoder is shared by all queries, so a prompt
  that finds nothing skips about a quarter of the per-prompt work).

* the DETR encoder's first self-attention block, the one part of it that does not read the
  prompt, comes from the image's embedding (`first_self_attention`, computed once per image with
  the image encoder and cached with it) instead of running again for every prompt: about a tenth
  of the DETR encoder, which is most of a prompt's cost.

The caller (`Sam3Backend.decode`) has checked the transformers version range this follows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from promptseg.backends.protocol import Detections

if TYPE_CHECKING:
    import torch


FIRST_SELF_ATTENTION = "detr_self_0"
"""The embedding entry holding `first_self_attention`'s output, ``(1, rows * cols, hidden)``."""


def first_self_attention(encoder, level: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """Layer 0's self-attention block of ``Sam3DetrEncoder`` (norm, attention, residual) on one
    image's coarsest FPN level ``(1, C, h, w)`` and its position encoding: ``(1, h * w, C)``."""
    layer = encoder.layers[0]
    features = level.flatten(2).transpose(1, 2)
    normed = layer.layer_norm1(features)
    with_position = normed + position.flatten(2).transpose(1, 2)
    attended, _ = layer.self_attn(query=with_position, key=with_position, value=normed)
    return attended + features  # the layer's dropout is the identity in eval mode


def encode_prompts(encoder, first: torch.Tensor, level: torch.Tensor, position: torch.Tensor,
                   prompt: torch.Tensor, prompt_mask: torch.Tensor):
    """``Sam3DetrEncoder.forward`` on one level, its layer 0 resumed after `first` (its self-attention
    block, batch 1): the fused image tokens ``(B, h * w, C)``, their position encodings, the level's
    spatial shape (as the DETR decoder takes them)."""
    import torch
    from transformers.masking_utils import create_bidirectional_mask

    batch = prompt.shape[0]
    positions = position.flatten(2).transpose(1, 2)
    mask = create_bidirectional_mask(
        config=encoder.config, inputs_embeds=first.expand(batch, -1, -1), attention_mask=prompt_mask,
        encoder_hidden_states=prompt,
    )
    layer = encoder.layers[0]
    hidden = first.expand(batch, -1, -1)
    attended, _ = layer.cross_attn(query=layer.layer_norm2(hidden), key=prompt, value=prompt, attention_mask=mask)
    hidden = hidden + attended
    hidden = hidden + layer.mlp(layer.layer_norm3(hidden))
    for layer in encoder.layers[1:]:
        hidden = layer(hidden, prompt_feats=prompt, vision_pos_encoding=positions, prompt_cross_attn_mask=mask)
    shape = torch.tensor([tuple(level.shape[-2:])], dtype=torch.long, device=hidden.device)
    return hidden, positions, shape


def detect(
    model,
    levels: list[torch.Tensor],
    positions: list[torch.Tensor],
    prompt: torch.Tensor,
    prompt_mask: torch.Tensor,
    threshold: float,
    boxes: torch.Tensor | None = None,
    box_labels: torch.Tensor | None = None,
    first: torch.Tensor | None = None,
) -> list[Detections]:
    """One `Detections` per prompt of the batch, keeping scores above `threshold`.

    `levels`/`positions` are the FPN levels and their position encodings, batch-expanded;
    `prompt` ``(B, L, C)`` the text features with their `prompt_mask` ``(B, L)``; `boxes`
    ``(B, G, 4)`` exemplar boxes in normalised cxcywh with `box_labels` ``(B, G)``; `first` the
    image's cached `first_self_attention` (computed here when None).
    """
    import torch
    from transformers.models.sam3.modeling_sam3 import box_cxcywh_to_xyxy, inverse_sigmoid

    prompt_mask = prompt_mask.bool()
    if boxes is not None:
        geometry = model.geometry_encoder(
            box_embeddings=boxes, box_mask=torch.ones_like(box_labels, dtype=torch.bool), box_labels=box_labels,
            img_feats=levels, img_pos_embeds=positions,
        )
        prompt = torch.cat([prompt, geometry.last_hidden_state], dim=1)
        prompt_mask = torch.cat([prompt_mask, geometry.attention_mask], dim=1)
    level, position = levels[-1][:1], positions[-1][:1]
    if first is None:
        first = first_self_attention(model.detr_encoder, level, position)
    fused, fused_positions, shape = encode_prompts(model.detr_encoder, first, level, position, prompt, prompt_mask)
    decoder = model.detr_decoder(
        vision_features=fused, text_features=prompt, vision_pos_encoding=fused_positions, text_mask=prompt_mask,
        spatial_shapes=shape,
    )
    queries = decoder.intermediate_hidden_states[-1]
    offsets = model.detr_decoder.box_head(queries)
    pred_boxes = box_cxcywh_to_xyxy((inverse_sigmoid(decoder.reference_boxes[-1]) + offsets).sigmoid())
    logits = model.dot_product_scoring(
        decoder_hidden_states=queries[None], text_features=prompt, text_mask=prompt_mask,
    )[0, ..., 0]
    scores = logits.float().sigmoid() * decoder.presence_logits[-1].float().sigmoid()
    keep = scores > threshold
    finite = all(bool(torch.isfinite(t).all()) for t in (logits, offsets, decoder.presence_logits[-1]))
    wanted = torch.nonzero(keep.any(dim=0)).flatten()  # queries some prompt keeps
    masks = None
    if len(wanted):
        masks = model.mask_decoder(
            decoder_queries=queries[:, wanted], backbone_features=list(levels),
            encoder_hidden_states=fused, prompt_features=prompt, prompt_mask=prompt_mask,
        ).pred_masks
    results = []
    for b in range(scores.shape[0]):
        rows = keep[b][wanted]
        probs = masks[b][rows].float().sigmoid() if masks is not None else _no_masks(levels[0], scores)
        results.append(Detections(
            mask_probs=probs, boxes=pred_boxes[b][keep[b]].float(), scores=scores[b][keep[b]], finite=finite
        ))
    return results


def _no_masks(finest: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """An empty ``(0, h, w)`` mask stack at the mask decoder's resolution (the finest FPN level)."""
    import torch

    return torch.zeros((0, *finest.shape[-2:]), dtype=torch.float32, device=scores.device)
