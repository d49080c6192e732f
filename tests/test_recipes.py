"""The recipe overlays in gin/recipes/ parse on top of the reference run and build valid configs."""

import os

import pytest

import gin
from grpo import main as grpo_main
from grpo.data.gsm8k import Columns
from grpo.models.config import LoraConfig
from grpo.phases import reward, update

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(os.listdir(os.path.join(REPO, "gin", "recipes")))


@pytest.fixture
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_builds_valid_configs_on_the_reference_run(recipe, clean_gin):
    from grpo import configurables

    grpo_main.parse_gin(["gin/gsm8k.gin", f"gin/recipes/{recipe}"], [], [REPO])
    # Building each config runs its validation; gin already refused unknown names.
    loss, rewards = configurables.make_loss(), configurables.make_rewards()
    tools = configurables.make_tools()  # validated
    cfg = configurables.TrainConfig()  # the gin-bound class
    assert isinstance(loss, update.LossConfig) and isinstance(rewards, reward.RewardConfig)
    assert rewards.overlong_buffer <= gin.query_parameter("make_sampling.max_new_tokens")
    if "calculator" in recipe:  # the prompt tells the policy the tool's syntax, or the template
        assert tools.names == ("calculator",)
        assert ("<calculator>" in cfg.system_prompt) == (tools.call_format == "tags")
    if "lora" in recipe:  # make_model would load the 3B base; its LoRA settings are checked here
        query = lambda name: gin.query_parameter(f"make_model.{name}")
        assert LoraConfig(query("lora_rank"), query("lora_alpha")).rank > 0  # validated
    if "math" in recipe:  # make_dataset would download; its columns are checked here
        query = lambda name: gin.query_parameter(f"make_dataset.{name}")
        assert Columns(query("question_field"), query("answer_field"), query("answer_format"))
        assert cfg.answer_match == "math_verify" and "correctness_math_verify" in rewards.names
        assert cfg.system_prompt.endswith("<answer> \\frac{3}{2} </answer>")
    if "r1_zero" in recipe:  # a base model, a plain prompt that spells the format, a stop
        assert not cfg.use_chat_template and cfg.system_prompt is None
        assert cfg.question_template.endswith("User: {question}\nAssistant:")
        assert gin.query_parameter("make_sampling.stop_strings") == ("</answer>",)
        assert not gin.query_parameter("make_model.source").endswith("Instruct")
    assert cfg.prompts_per_step == 16  # the run file's, untouched by the overlay
    if "dr_grpo" in recipe:  # no per-completion length or group-std normalisation
        assert loss.aggregation == "seq_mean_token_sum_norm" and cfg.advantage_scale == "none"
    if "gspo" in recipe:  # the paper's four mini-batches per rollout
        assert cfg.updates_per_step == 4
    if "gdpo" in recipe:  # each reward normalised in its group, then summed
        assert cfg.reward_aggregation == "normalize_then_sum" and len(rewards.term_weights()) == 3
    if "cispo" in recipe:  # clipped, constant ratio weights; off-policy after the first update
        assert loss.objective == "cispo" and (loss.epsilon_low, loss.epsilon_high) == (1.0, 3.0)
        assert cfg.updates_per_step == 4
    if "sapo" in recipe:  # a soft gate in place of the clip; off-policy after the first update
        assert loss.objective == "sapo" and (loss.sapo_tau_pos, loss.sapo_tau_neg) == (1.0, 1.05)
        assert cfg.updates_per_step == 4
    if "vespo" in recipe:  # smooth sequence weights in place of the clip; off-policy likewise
        assert loss.objective == "vespo" and (loss.vespo_k_pos, loss.vespo_lambda_neg) == (2, 2)
        assert cfg.updates_per_step == 4
    if "luspo" in recipe:  # GSPO's ratios, each completion's token losses summed
        assert loss.aggregation == "seq_mean_token_sum"
        assert loss.importance_sampling_level == "sequence" and cfg.updates_per_step == 4
