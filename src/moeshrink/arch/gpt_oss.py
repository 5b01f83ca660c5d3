"""GPT-OSS: transposed expert tensors with interleaved gate/up columns and biases; router with bias.

gate_up_proj [E, H, 2I] (gate0, up0, gate1, ...), gate_up_proj_bias [E, 2I], down_proj [E, I, H],
down_proj_bias [E, H]. Routing: top-k of the (biased) logits, softmax over the chosen.
"""

from moeshrink.arch.adapter import FamilyAdapter
from moeshrink.arch.base import ExpertTensor
from moeshrink.arch.routing import softmax_probabilities, topk_softmax

ADAPTER = FamilyAdapter(
    model_type="gpt_oss",
    moe_block="mlp",
    router="router",
    scoring=topk_softmax,
    probabilities=softmax_probabilities,
    expert_count_keys=("num_local_experts", "num_experts"),
    expert_tensors=(
        ExpertTensor("gate_up_proj", neuron_dim=1, layout="interleaved"),
        ExpertTensor("gate_up_proj_bias", neuron_dim=0, layout="interleaved"),
        ExpertTensor("down_proj", neuron_dim=0, layout="plain"),
        ExpertTensor("down_proj_bias", neuron_dim=None, layout="none"),
    ),
)
