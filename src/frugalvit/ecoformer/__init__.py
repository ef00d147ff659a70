"""EcoFormer: binary kernelized-hash linear attention for pretrained timm ViTs (arXiv 2210.02871).

`ecoformer(model)` converts attention layers, `fit_hashes(model, images)`
learns the hash functions from the model's own attention, then the model is
fine-tuned briefly like any other. See docs/ecoformer.md.
"""

from frugalvit.ecoformer.attention import EcoFormerAttention, hashed_attention_reference, hashed_linear_attention
from frugalvit.ecoformer.convert import convertible_layers, ecoformer, ecoformer_layers, remove_ecoformer
from frugalvit.ecoformer.fitting import HashState, fit_hash_functions, fit_hashes, similarity_labels
from frugalvit.ecoformer.hashing import hash_codes, paper_bias, rbf_features, sign_ste

__all__ = ["EcoFormerAttention", "HashState", "convertible_layers", "ecoformer", "ecoformer_layers",
           "fit_hash_functions", "fit_hashes", "hash_codes", "hashed_attention_reference", "hashed_linear_attention",
           "paper_bias", "rbf_features", "remove_ecoformer", "sign_ste", "similarity_labels"]
