"""The custom socket types every Troupe node shares (documented in the README)."""
from comfy_api.latest import io

# One subject: reference image(s), optional mask, label (concept word) and weight (models.layout.subject.Subject).
Subject = io.Custom("TROUPE_SUBJECT")
# An ordered tuple of subjects; subject i belongs to layout region i.
Subjects = io.Custom("TROUPE_SUBJECTS")
# Canvas size plus one region (box and/or mask) per subject (models.layout.layout.Layout).
Layout = io.Custom("TROUPE_LAYOUT")
# HMoE fusion weights (models.encoding.hmoe.HMoE), loaded from models/troupe.
Fusion = io.Custom("TROUPE_FUSION")
# Per-subject hierarchical CLIP features, with fusion weights and fused tokens when fused
# (models.encoding.reference_features.ClipFeatures).
ClipFeatures = io.Custom("TROUPE_CLIP_FEATURES")
# Per-subject DINO CLS/register/patch tokens of the subject crops, and of a whole image (models.encoding.dino.DinoFeatures).
DinoFeatures = io.Custom("TROUPE_DINO_FEATURES")
# A loaded adapter file: family ('sdxl' | 'flux'), format found, modules (models.adapter_file.Adapter).
Adapter = io.Custom("TROUPE_ADAPTER")
# Fidelity metrics' model: image tower (CLIP-I), optional text tower (CLIP-T) (evaluation.backbones.ImageTextModel).
ImageText = io.Custom("TROUPE_IMAGE_TEXT")
# TroupeAttentionMaps' handle: record settings and the latest finished run's recorder (models.attention_record.Recording).
AttentionRecording = io.Custom("TROUPE_ATTENTION_RECORDING")
