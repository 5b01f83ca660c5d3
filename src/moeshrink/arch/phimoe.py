"""PhiMoE: sparsemixer routing, which always selects exactly two experts."""

from moeshrink.arch.adapter import FamilyAdapter
from moeshrink.arch.routing import phimoe_sparsemixer, softmax_probabilities

ADAPTER = FamilyAdapter(
    model_type="phimoe",
    moe_block="mlp",
    router="router",
    scoring=phimoe_sparsemixer,
    probabilities=softmax_probabilities,
    expert_count_keys=("num_local_experts",),
    fixed_top_k=2,
)
