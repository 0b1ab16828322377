"""Tiny random transformers models for the dataset-building verbs, saved with their
processors so that the verbs load them through the real from_pretrained path: a BLIP
captioner, a DPT depth model, a SegFormer and a ViTPose (17 COCO keypoints)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as T

CAPTION_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "photo", "of", "red", "circle",
                 "with", "blue", "background"]


def tiny_blip(out: Path) -> Path:
    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.txt").write_text("\n".join(CAPTION_WORDS) + "\n")
    tokenizer = T.BertTokenizer(str(out / "vocab.txt"), bos_token="[DEC]")
    config = T.BlipConfig(
        text_config={"vocab_size": len(CAPTION_WORDS), "hidden_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "intermediate_size": 37, "encoder_hidden_size": 32,
                     "max_position_embeddings": 64, "bos_token_id": 5, "sep_token_id": 3, "pad_token_id": 0},
        vision_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "intermediate_size": 37, "image_size": 32, "patch_size": 8},
        projection_dim=32)
    T.BlipForConditionalGeneration(config).save_pretrained(out)
    image_processor = T.BlipImageProcessor(size={"height": 32, "width": 32})
    T.BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out


def tiny_depth(out: Path) -> Path:
    torch.manual_seed(0)
    config = T.DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37,
                         image_size=32, patch_size=8, neck_hidden_sizes=[8, 8, 16, 16], fusion_hidden_size=16,
                         backbone_out_indices=[0, 1, 2, 3], reassemble_factors=[4, 2, 1, 0.5], head_in_index=-1)
    T.DPTForDepthEstimation(config).save_pretrained(out)
    T.DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False).save_pretrained(out)
    return out


def tiny_segformer(out: Path, labels: int = 5) -> Path:
    torch.manual_seed(0)
    config = T.SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
                               patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2],
                               decoder_hidden_size=16, num_labels=labels)
    T.SegformerForSemanticSegmentation(config).save_pretrained(out)
    T.SegformerImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def tiny_vitpose(out: Path) -> Path:
    torch.manual_seed(0)
    backbone = T.VitPoseBackboneConfig(image_size=[32, 24], patch_size=[8, 8], hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=37, out_indices=[2])
    T.VitPoseForPoseEstimation(T.VitPoseConfig(backbone_config=backbone, num_labels=17)).save_pretrained(out)
    T.VitPoseImageProcessor(size={"height": 32, "width": 24}).save_pretrained(out)
    return out
