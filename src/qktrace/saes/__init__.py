"""Residual-stream sparse autoencoders: load them, encode a prompt's residual, split it into features.

A *checkpoint* c in 0..n_layers is the residual stream at the input of layer c; checkpoint n_layers is the
final residual before the last norm. SAELens hooks `blocks.L.hook_resid_pre` map to checkpoint L and
`blocks.L.hook_resid_post` to L + 1; other hooks are refused.

Sources: SAELens folders (`cfg.json` + `sae_weights.safetensors`, v6 or pre-6 config), Gemma Scope
`params.npz` files under a `layer_N` folder, Llama Scope folders (`hyperparams.json` +
`checkpoints/final.safetensors`), or `"saelens:RELEASE"` with `sae_ids`, fetched through the Hugging Face
cache by qktrace's release registry (`releases.json`; sae-lens's own `pretrained_saes.yaml` when installed).

Release conventions are data in that registry and are folded into the weights at load, so every `SAE`
reads the model's raw Hugging Face residual and `encode` gives the activations the release's own code gives:

- centring (TransformerLens `center_writing_weights`, e.g. gpt2-small-res-jb): W_enc <- P W_enc with
  P = I - 11^T/d_model, plus a b_enc shift when b_dec is subtracted from the input. Decoding stays in
  residual space and `FeatureActs.error` carries the residual's mean component, so features + b_dec + error
  sum to the raw residual exactly; LayerNorm removes that component at every read, so QK terms and graph
  edges stay exact. RMSNorm models are not centred (TransformerLens does not centre them either).
- constant activation scales (`normalize_activations: expected_average_only_in`, Llama Scope's dataset norm):
  encode sees s x, decode divides by s. Per-token normalisations are refused at load with one line.
- BOS and context: `SAE.prepend_bos`, `SAE.context_size`, and `SAESet.prepend_bos` / `SAESet.context_size`.

Transcoders (`load_transcoders`: circuit-tracer sets and CLTs, Gemma Scope, Llama Scope LXTC, SAELens
transcoders) and attention-output SAEs (`load_attention_saes`: hook_z or attn_out) are in `transcoder`,
`attention` and their loaders; see those modules.

Labels: `labels.json` beside an SAE, or Neuronpedia explanation exports (`read_neuronpedia_labels`,
`load_saes(..., labels=...)`).
"""

from .attention import ATTENTION_SITES, AttentionSAE, AttentionSAESet
from .conventions import FileConfig
from .formats import sae_lens_config, save_sae_lens
from .labels import neuronpedia_labels, read_neuronpedia_labels
from .load import ModelLike, build_sae, load_saes
from .releases import Release, find_release, known_releases
from .sae import ARCHITECTURES, SAE, FeatureActs, SAESet, hook_checkpoint, hook_layer, require_saes, sae_at
from .transcoder import INPUT_SITES, OUTPUT_SITES, CrossLayerTranscoder, Transcoder, TranscoderSet, site_input
from .transcoder_load import load_attention_saes, load_transcoders

__all__ = [
    "ARCHITECTURES",
    "ATTENTION_SITES",
    "INPUT_SITES",
    "OUTPUT_SITES",
    "SAE",
    "AttentionSAE",
    "AttentionSAESet",
    "CrossLayerTranscoder",
    "FeatureActs",
    "FileConfig",
    "ModelLike",
    "Release",
    "SAESet",
    "Transcoder",
    "TranscoderSet",
    "build_sae",
    "find_release",
    "hook_checkpoint",
    "hook_layer",
    "known_releases",
    "load_attention_saes",
    "load_saes",
    "load_transcoders",
    "neuronpedia_labels",
    "read_neuronpedia_labels",
    "require_saes",
    "sae_at",
    "sae_lens_config",
    "save_sae_lens",
    "site_input",
]
