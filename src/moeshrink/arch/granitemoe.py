"""GraniteMoE: top-k of the logits, softmax over the chosen; block named ``block_sparse_moe``."""

from moeshrink.arch.adapter import FamilyAdapter
from moeshrink.arch.routing import softmax_probabilities, topk_softmax

ADAPTER = FamilyAdapter(
    model_type="granitemoe",
    moe_block="block_sparse_moe",
    router="router",
    scoring=topk_softmax,
    probabilities=softmax_probabilities,
    expert_count_keys=("num_local_experts",),
)
