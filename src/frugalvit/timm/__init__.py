"""The timm glue: every contact of frugalvit's methods with timm's modules, private API included.

Eventful, DVT and EcoFormer change what happens inside timm's blocks; they
reach timm's internals only through these functions, so a change in timm is
met here once:

* `embed_tokens` / `embed_tokens_resampled` (`has_plain_patch_embed`): the tokens a ViT feeds its first block;
* `split_qkv`, `split_heads`, `attention_gate`, `merge_heads`: the two halves of timm's
  `Attention` around the softmax, with its q/k norms, gate, output norm and projection;
* `replace_modules` (with `Replacement.undo()`), `set_submodule`, `graft`: swapping layers in
  place and back, and building a new layer around an old layer's parts.

Named after the library it wraps; inside it `import timm` is the real timm (absolute imports).
"""

from frugalvit.timm.replace import Replacement, graft, replace_modules, set_submodule
from frugalvit.timm.vit import (attention_gate, embed_tokens, embed_tokens_resampled, has_plain_patch_embed,
                                merge_heads, split_heads, split_qkv)

__all__ = ["Replacement", "attention_gate", "embed_tokens", "embed_tokens_resampled", "graft",
           "has_plain_patch_embed", "merge_heads", "replace_modules", "set_submodule", "split_heads", "split_qkv"]
