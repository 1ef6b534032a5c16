"""SAM 3's detection head on cached image features, with no work for queries that cannot be kept.

``Sam3Model.forward`` runs the mask decoder for all 200 queries of every prompt, and boxes and
scores for all six decoder layers, although only the last layer's are used and only queries above
the score threshold are kept. Here the same sub-modules run in the same order on the same inputs
(so kept queries get the same numbers, within float tolerance), but:

* boxes and scores are computed for the last decoder layer only;
* scores come first; the mask decoder runs only when some query of the batch passes the
  threshold, and only for those queries (its pixel decoder is shared by all queries, so a prompt
  that finds nothing skips about a quarter of the per-prompt work).

The caller (`Sam3Backend.decode`) has checked the transformers version range this follows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from promptseg.backends.protocol import Detections

if TYPE_CHECKING:
    import torch


def detect(
    model,
    levels: list[torch.Tensor],
    positions: list[torch.Tensor],
    prompt: torch.Tensor,
    prompt_mask: torch.Tensor,
    threshold: float,
    boxes: torch.Tensor | None = None,
    box_labels: torch.Tensor | None = None,
) -> list[Detections]:
    """One `Detections` per prompt of the batch, keeping scores above `threshold`.

    `levels`/`positions` are the FPN levels and their position encodings, batch-expanded;
    `prompt` ``(B, L, C)`` the text features with their `prompt_mask` ``(B, L)``; `boxes`
    ``(B, G, 4)`` exemplar boxes in normalised cxcywh with `box_labels` ``(B, G)``.
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
    encoder = model.detr_encoder(
        vision_features=[levels[-1]], text_features=prompt, vision_pos_embeds=[positions[-1]], text_mask=prompt_mask,
    )
    decoder = model.detr_decoder(
        vision_features=encoder.last_hidden_state, text_features=encoder.text_features,
        vision_pos_encoding=encoder.pos_embeds_flattened, text_mask=prompt_mask, spatial_shapes=encoder.spatial_shapes,
    )
    queries = decoder.intermediate_hidden_states[-1]
    offsets = model.detr_decoder.box_head(queries)
    pred_boxes = box_cxcywh_to_xyxy((inverse_sigmoid(decoder.reference_boxes[-1]) + offsets).sigmoid())
    logits = model.dot_product_scoring(
        decoder_hidden_states=queries[None], text_features=encoder.text_features, text_mask=prompt_mask,
    )[0, ..., 0]
    scores = logits.float().sigmoid() * decoder.presence_logits[-1].float().sigmoid()
    keep = scores > threshold
    finite = all(bool(torch.isfinite(t).all()) for t in (logits, offsets, decoder.presence_logits[-1]))
    wanted = torch.nonzero(keep.any(dim=0)).flatten()  # queries some prompt keeps
    masks = None
    if len(wanted):
        masks = model.mask_decoder(
            decoder_queries=queries[:, wanted], backbone_features=list(levels),
            encoder_hidden_states=encoder.last_hidden_state, prompt_features=prompt, prompt_mask=prompt_mask,
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
