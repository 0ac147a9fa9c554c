"""The kernel module: pure tensor functions that turn saved activations into attributions.

Every function here takes tensors and returns tensors, imports only ``torch``, ``einops``,
``math`` and ``typing``, and never touches nnsight or transformers, so the same code runs on
tensors a user saved and inside a trace on a remote NDIF server (where nnattr is not
installed: recipes ship this package by value with ``nnsight.register``).

Most kernels are what the recipes call inside their traces. Some are library functions no recipe
calls yet, for tensors you saved yourself: ``attention_flow`` and ``rollout`` (every layer's
patterns stacked) and ``norm_based_layer`` (Kobayashi et al. 2020, all heads together). The row
metrics ``attention_entropy``, ``attention_concentration``, ``rollout_entropy``, ``rollout_max``
work on any saved pattern; ``attention_summary`` averages them (and the mean and largest weight)
over each prompt's real positions, in the order of ``SUMMARY_FIELDS``, and the
``attention_summary`` recipe calls it on the server, one layer at a time.
"""

from .attention import (
    SUMMARY_FIELDS,
    attention_concentration,
    attention_entropy,
    attention_flow,
    attention_summary,
    flow_step,
    norm_based,
    norm_based_layer,
    rollout,
    rollout_entropy,
    rollout_max,
    rollout_step,
    value_weighted,
)
from .dla import (
    bias_term,
    direct_logit,
    head_direct_logit,
    head_position_direct_logit,
    logit_direction,
    norm_scale,
    residual_direction,
)
from .heads import expand_kv, first, o_proj_per_head, read_at, split_heads, split_values
from .lens import inverse_softcap, lens_summary, softcap, topk_flat
from .patching import (
    attribution_scores,
    gradients,
    head_attribution_scores,
    interpolate,
    logit_diff,
    normalised_recovery,
    overlap_mask,
    pair_delta,
    patched_rows,
    path_gradient,
)
from .circulation import position_direct_logit, token_logit_rank
from .tuned import kl_to_final, translate
from .features import ACTIVATIONS, feature_direct_logit, feature_patching_scores, sae_decode, sae_encode, top_features
from .tokens import ig_path, integrated_gradients, riemann_mean, source_direct_logit, token_scores
from .ablation import (ablate, ablation_forwards, ablation_masks, ablation_node, ablation_nodes, ablation_sets,
                       reference_mean, resample_draws)
from .atp_star import attention_scores, dropped_gradients, edge_grad_drop, qk_edges, qk_fix
from .edges import (ablated_streams, apply_norm, edges_into, head_deltas, layer_readers, norm_vjp, path_mean,
                    qkv_weights, reader_gradients, reader_projections, split_qkv, top_edges, writer_deltas)
