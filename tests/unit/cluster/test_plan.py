"""The plan section: validation, and the check that names every piece Miles lacks."""

import pytest

from miles.cluster.plan import unsupported_features
from miles.config.loader import load_config
from miles.errors import ConfigError


def test_glm5_names_each_missing_piece():
    missing = unsupported_features(load_config("glm5"))
    text = "\n".join(missing)
    for piece in ("model architecture 'glm_moe_dsa'", "MLA (multi-head latent attention)", "DSA sparse attention",
                  "pipeline parallelism (plan.pipeline_parallel=4)", "context parallelism (plan.context_parallel=2)",
                  "expert parallelism (plan.expert_parallel=32)"):
        assert piece in text
    assert len(missing) == 6
    assert any("MTP" in m for m in unsupported_features(load_config("glm5", ["plan.mtp_num_layers=1"])))


def test_runnable_recipes_have_nothing_missing():
    assert unsupported_features(load_config("quickstart")) == []  # no plan declared
    assert unsupported_features(load_config("qwen3-small")) == []


def test_a_declared_plan_must_be_complete():
    with pytest.raises(ConfigError, match=r"plan declares 4 layers but lacks plan.hidden_size, plan.num_attention_heads"):
        load_config("quickstart", ["plan.num_layers=4"])
    with pytest.raises(ConfigError, match=r"lacks plan.kv_lora_rank"):
        load_config("glm5", ["plan.kv_lora_rank=0"])
    with pytest.raises(ConfigError, match=r"plan.attention='mha' is not one of"):
        load_config("quickstart", ["plan.attention=mha"])
