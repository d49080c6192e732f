"""The gin factories: the only module (with grpo/main.py) that imports gin.

Each factory is registered under the name users bind, e.g. `make_optimizer.name = 'adamw'`,
`make_lr_schedule.type = 'constant'`, `TrainConfig.num_steps = 3`. `build_experiment` calls
them all (gin supplies their arguments) and returns a plain `train.Experiment`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
from absl import logging

import gin
from grpo import knobs, optim, sharding, tools
from grpo.data import gsm8k
from grpo.experiment import (
    MAIN_SET,
    SOURCE,
    Experiment,
    TrainConfig,
    check_batch_layout,
    check_writable_dir,
)
from grpo.models import loading, presets, transformer
from grpo.models.config import LORA_TARGETS, LoraConfig, ModelConfig
from grpo.phases import reward, reward_model, rollout, update
from grpo.phases.stop_strings import StopStrings, token_bytes
from grpo.sampling import encode_questions
from grpo.train import check_state_fits

# The factories check their arguments' types (grpo/knobs.py); the config classes check theirs.
make_optimizer = gin.external_configurable(knobs.checked(optim.make_optimizer), "make_optimizer")
make_lr_schedule = gin.external_configurable(
    knobs.checked(optim.make_lr_schedule), "make_lr_schedule"
)
make_mesh = gin.external_configurable(knobs.checked(sharding.make_mesh), "make_mesh")
make_loss = gin.external_configurable(update.LossConfig, "make_loss")
make_rewards = gin.external_configurable(reward.RewardConfig, "make_rewards")
make_tools = gin.external_configurable(tools.ToolConfig, "make_tools")
TrainConfig = gin.external_configurable(TrainConfig, "TrainConfig")


@dataclasses.dataclass
class ModelBundle:
    config: ModelConfig
    read_params: Callable[[], Any]  # host numpy arrays, read (or initialised) when called
    tokenizer: Any


@gin.configurable
@knobs.checked
def make_model(
    source: str = "smollm2-135m-instruct",
    *,
    preset: str | None = None,
    tokenizer: str | None = None,
    dtype: str = "bfloat16",
    param_dtype: str = "float32",
    remat: str = "dots",
    attention_impl: str = "xla",
    seed: int = 0,
    lora_rank: int = 0,
    lora_alpha: float = 32.0,
    lora_targets: tuple[str, ...] = tuple(LORA_TARGETS),
    adapter: str | None = None,
) -> ModelBundle:
    """Real weights from `source` (a GGUF file, an HF folder, a hub id, or the offline
    `smollm2-135m-instruct`), or random weights of a named `preset` shape whose vocabulary is
    resized to the tokenizer loaded from `tokenizer` (default: `source`).

    `lora_rank` > 0 trains rank-`lora_rank` adapters on the `lora_targets` projections of a
    frozen base, scaled by lora_alpha / lora_rank; 0 trains every weight. `adapter`: a PEFT
    LoRA adapter folder merged into the weights first (e.g. an SFT adapter of `source`)."""
    if lora_rank < 0:
        raise ValueError(f"make_model.lora_rank must be >= 0 (0: no LoRA), got {lora_rank}")
    if not lora_rank and (lora_alpha != 32.0 or tuple(lora_targets) != tuple(LORA_TARGETS)):
        raise ValueError("make_model.lora_alpha and lora_targets need make_model.lora_rank > 0")
    if not lora_rank and param_dtype == "bfloat16":  # no fp32 master copy to carry small steps
        raise ValueError(
            "make_model.param_dtype='bfloat16' would train the weights in bf16, where a step "
            "under 1/256 of a weight rounds away (at lr 1e-6 a weight of 0.02 never moves); "
            "keep 'float32', or train LoRA adapters on a bf16 base (make_model.lora_rank > 0)"
        )
    overrides = dict(
        dtype=dtype,
        param_dtype=param_dtype,
        remat=remat,
        attention_impl=attention_impl,
        lora=LoraConfig(lora_rank, lora_alpha, tuple(lora_targets)) if lora_rank else None,
    )
    if adapter is not None:
        loading.read_adapter_config(adapter)  # a missing or unsupported adapter fails first
    if preset is None and (tokenizer not in (None, source) or seed):
        raise ValueError(
            "make_model.tokenizer and seed are a preset's (random weights); real weights bring "
            f"their own tokenizer and values: set make_model.preset, or drop them for {source}"
        )
    if preset is None:
        config, read_params, tok = loading.open_model(source, **overrides)
    else:
        tok = loading.load_tokenizer(tokenizer or source)
        eos = () if tok.eos_token_id is None else (tok.eos_token_id,)
        config = presets.preset(preset, vocab_size=len(tok), eos_token_ids=eos, **overrides)
        read_params = functools.partial(_random_params, config, seed)
    if adapter is not None:
        read_params = functools.partial(_with_adapter, read_params, config, adapter)
    return ModelBundle(config, read_params, tok)


@gin.configurable(denylist=["named", "attention_impl"])
@knobs.checked
def make_reward_model(
    source: str | None = None,
    *,
    dtype: str = "bfloat16",
    named: bool = False,
    attention_impl: str = "xla",
) -> reward_model.RewardModel | None:
    """A learned reward model, for the `make_rewards.names` entry 'reward_model' (`named`, which
    needs `source`, and only it; 'reward_model/<scope>' for one bound in a gin scope): a Hugging
    Face `*ForSequenceClassification` folder or hub id with one label, its weights and compute
    in `dtype` (bf16: half the memory, scores rounded as transformers' bf16 rounds them), on the
    policy's `attention_impl` (`xla` where that is cuDNN's and `dtype` fp32, which cuDNN's
    kernel does not take); None: no reward model."""
    if named != (source is not None):
        raise ValueError(
            f"make_rewards.names holds {reward.REWARD_MODEL!r}: set make_reward_model.source"
            if named
            else f"make_reward_model.source is set, but make_rewards.names has no "
            f"{reward.REWARD_MODEL!r} to give it a weight"
        )
    if source is None:
        if dtype != "bfloat16":
            raise ValueError("make_reward_model.dtype needs make_reward_model.source")
        return None
    if attention_impl == "cudnn" and dtype != "bfloat16":
        attention_impl = "xla"
    config, read_params, tokenizer, pad_id = loading.open_reward_model(
        source, dtype=dtype, param_dtype=dtype, remat="none", attention_impl=attention_impl
    )
    return reward_model.RewardModel(source, config, read_params, tokenizer, pad_id)


def _random_params(config: ModelConfig, seed: int) -> Any:
    # One compile for the whole tree, not one per leaf.
    init = jax.jit(functools.partial(transformer.init_params, config))
    return jax.device_get(init(jax.random.key(seed)))


def _with_adapter(read_params: Callable[[], Any], config: ModelConfig, adapter: str) -> Any:
    return loading.merge_peft_adapter(read_params(), config, adapter)


@gin.configurable
@knobs.checked
def make_dataset(
    source: str = "synthetic",
    *,
    config: str | None = "main",
    train_split: str | None = "train",
    test_split: str | None = "test",
    num_train: int | None = None,
    num_test: int | None = None,
    question_field: str = "question",
    answer_field: str = "answer",
    answer_format: str = "gsm8k",
    keep_fields: tuple[str, ...] = (),
    row_filter: dict[str, tuple[Any, ...]] | None = None,
    difficulty: int = 1,
    templates: tuple[str, ...] | None = None,
    seed: int = 0,
) -> tuple[list[dict], list[dict]]:
    """(train, test) GSM8K-format examples: a hub id (with its `config`), a local file or
    folder, or `synthetic`. The fields and `answer_format` (gsm8k, boxed, final) say where a
    row keeps its problem and answer, and `keep_fields` what else each example carries for the
    reward functions (`gsm8k.Columns`); `row_filter` keeps the rows whose fields hold one of the
    listed values (`{'level': ('Level 4', 'Level 5')}`). `train_split=None` loads no train
    examples (an extra eval set, in a gin scope); `test_split=None` no test examples (a dataset
    without a test split, in a run that does not evaluate)."""
    columns = gsm8k.Columns(question_field, answer_field, answer_format, keep_fields)
    load = lambda split, n: (
        []
        if split is None
        else gsm8k.load_examples(
            source,
            split,
            num_examples=n,
            config=config,
            seed=seed,
            difficulty=difficulty,
            templates=templates,
            columns=columns,
            row_filter=row_filter,
        )
    )
    return load(train_split, num_train), load(test_split, num_test)


@gin.configurable(denylist=["token_bytes", "tool_stops"])
@knobs.checked
def make_sampling(
    *,
    end_ids: tuple[int, ...],
    pad_id: int,
    max_new_tokens: int = 1024,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    decode_segments: int = 1,
    stop_strings: tuple[str, ...] = (),
    shared_prompt_decode: bool = False,
    compact_rows: bool = False,
    keep_sampling_mask: bool = False,
    token_bytes: Callable[[], list[bytes]] | None = None,
    tool_stops: tuple[str, ...] = (),
) -> rollout.SamplingConfig:
    """`token_bytes` (the run's, not a gin knob): each token id's bytes in a reply's text, for
    the stop strings' automata. `tool_stops` (the tools', not a gin knob): where a round stops
    for a tool call, stop strings too."""
    stop = None
    strings = tuple(dict.fromkeys((*stop_strings, *tool_stops)))
    if strings:
        if token_bytes is None:
            raise ValueError("make_sampling.stop_strings needs the tokenizer's token bytes")
        stop = StopStrings.build(strings, token_bytes())
    return rollout.SamplingConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        end_ids=end_ids,
        pad_id=pad_id,
        decode_segments=decode_segments,
        stop=stop,
        shared_prompt_decode=shared_prompt_decode,
        compact_rows=compact_rows,
        keep_sampling_mask=keep_sampling_mask,
    )


def _end_and_pad_ids(bundle: ModelBundle) -> tuple[tuple[int, ...], int]:
    """End-of-turn ids from the model config and the tokenizer (chat models end with e.g.
    `<|im_end|>`); pad with the tokenizer's pad id, else the first end id."""
    tok = bundle.tokenizer
    ids = list(bundle.config.eos_token_ids)
    for token in (tok.eos_token, "<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
        token_id = tok.convert_tokens_to_ids(token) if token else None
        if isinstance(token_id, int) and token_id != tok.unk_token_id and token_id not in ids:
            ids.append(token_id)
    pad = tok.pad_token_id if tok.pad_token_id is not None else ids[0]
    return tuple(ids), pad


def _datasets(
    train: TrainConfig,
    rewards: reward.RewardConfig,
    tokenizer: Any,
    tool_config: tools.ToolConfig | None,
    eval_only: bool,
) -> tuple[list[dict], list[dict], dict[str, list[dict]]]:
    """(train examples, the extra train sets' joined in; test examples; the extra eval sets'
    test examples by name), each checked against the answer settings and without prompts over
    the length limit."""
    train_examples, test_examples = make_dataset()
    if train.extra_train_sets:  # each example names its set, for the per-set metrics
        train_examples = [{**e, SOURCE: MAIN_SET} for e in train_examples]
    for name in train.extra_train_sets:
        with gin.config_scope(_scope(name, "TrainConfig.extra_train_sets", "make_dataset")):
            more = make_dataset(test_split=None)[0]
        train_examples += [{**e, SOURCE: name} for e in more]
    extra = {}
    for name in train.extra_eval_sets:
        with gin.config_scope(_scope(name, "TrainConfig.extra_eval_sets", "make_dataset")):
            extra[name] = make_dataset(train_split=None)[1]
    sets = [("train", train_examples), ("test", test_examples), *extra.items()]
    if train.answer_match == "numeric" or set(rewards.names) & set(reward.NUMERIC_REWARDS):
        for where, examples in sets:
            reward.check_numeric_references(examples, where)
    kept = [
        _drop_long_prompts(examples, where, tokenizer, train, tool_config)
        for where, examples in sets
    ]
    if len(kept[0]) < train.prompts_per_step:
        raise ValueError(
            f"{len(kept[0])} train examples are fewer than one step's "
            f"TrainConfig.prompts_per_step={train.prompts_per_step}"
        )
    if not kept[1] and eval_only:
        raise ValueError("--eval_only needs test examples; make_dataset.test_split gives none")
    if not kept[1] and (train.eval_every_steps or train.eval_at_start):
        raise ValueError(
            "no test examples (make_dataset.test_split=None) but the run evaluates; set "
            "TrainConfig.eval_every_steps=0 (or name a test split, e.g. 'train[:500]' on the hub)"
        )
    return kept[0], kept[1], dict(zip(extra, kept[2:], strict=True))


def _reward_models(
    rewards: reward.RewardConfig, attention_impl: str
) -> dict[str, reward_model.RewardModel]:
    """The learned reward models `rewards` names, by name: 'reward_model' is gin's
    make_reward_model, 'reward_model/<scope>' its <scope>/make_reward_model. An unscoped source
    no name uses fails, as does a named scope gin binds no source for."""
    scopes = {name: reward.reward_model_scope(name) for name in rewards.names}
    scoped = [name for name, scope in scopes.items() if scope]
    models = {}
    if reward.REWARD_MODEL in rewards.names or not scoped:
        unscoped = make_reward_model(
            named=reward.REWARD_MODEL in rewards.names, attention_impl=attention_impl
        )
        if unscoped is not None:
            models[reward.REWARD_MODEL] = unscoped
    elif _bound("make_reward_model.source") is not None:
        raise ValueError(
            f"make_reward_model.source is set, but make_rewards.names has no "
            f"{reward.REWARD_MODEL!r} (its scoped ones read <scope>/make_reward_model.source)"
        )
    for name in scoped:
        with gin.config_scope(
            _scope(scopes[name], f"make_rewards.names' {name!r}", "make_reward_model")
        ):
            models[name] = make_reward_model(named=True, attention_impl=attention_impl)
    return models


def _bound(parameter: str) -> Any:
    """What gin binds `parameter` to (None when unbound)."""
    try:
        return gin.query_parameter(parameter)
    except ValueError:
        return None


def _read_chat_template(path: str | None) -> str | None:
    """The Jinja text of TrainConfig.chat_template_path (None: the tokenizer's own)."""
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"TrainConfig.chat_template_path: {e}") from None


def _scope(name: str, setting: str, configurable: str) -> str:
    """`name`, once gin is known to bind `name/<configurable>.source` (else a one-line error
    that names the `setting` asking for it)."""
    if _bound(f"{name}/{configurable}.source") is None:
        raise ValueError(f"{setting} names {name!r}, but gin binds no {name}/{configurable}.source")
    return name


def _drop_long_prompts(
    examples: list[dict],
    split: str,
    tokenizer: Any,
    train: TrainConfig,
    tool_config: tools.ToolConfig | None,
) -> list[dict]:
    """The examples whose prompt fits `train.prompt_token_limit` tokens, in order; says how many
    it dropped."""
    limit = train.prompt_token_limit
    ids = encode_questions(train, tokenizer, examples, tool_config)
    kept = [e for e, p in zip(examples, ids, strict=True) if len(p) <= limit]
    if examples and not kept:
        raise ValueError(
            f"every {split} prompt is longer than {limit} tokens; raise TrainConfig."
            "max_prompt_tokens (and prompt_buckets)"
        )
    if len(kept) < len(examples):
        logging.warning(
            "dropped %d of %d %s examples: prompts over %d tokens (TrainConfig.max_prompt_tokens)",
            len(examples) - len(kept),
            len(examples),
            split,
            limit,
        )
    return kept


def _check_attention_platform(model: ModelConfig, platform: str) -> None:
    """Each attention kernel runs where it was written for (splash also runs interpreted on a
    CPU, as the tests run it); otherwise the first update fails, after a rollout."""
    impl = model.attention_impl
    if impl == "cudnn" and (platform != "gpu" or model.dtype != "bfloat16"):
        raise ValueError(
            "make_model.attention_impl='cudnn' needs an NVIDIA GPU and make_model.dtype="
            f"'bfloat16' (this run: {platform}, {model.dtype}); use 'xla' or 'auto'"
        )
    if impl == "splash" and platform == "gpu":
        raise ValueError("make_model.attention_impl='splash' is a TPU kernel: on a GPU use 'cudnn'")


def build_experiment(
    *, read_params: bool = True, eval_only: bool = False, trains: bool = True
) -> Experiment:
    """Calls every factory (gin binds their arguments) and assembles the experiment. The
    weights are read (or initialised, which compiles) last, once the whole configuration has
    passed its checks; `read_params=False` (a dry run) leaves `params` None. `eval_only`: the
    experiment only evaluates (main's --eval_only), so it needs test examples. `trains`: it
    will train (not --eval_only or --export_only), so its state must fit the devices."""
    train = TrainConfig()
    if train.best_export_dir and not train.eval_every_steps and not eval_only:
        raise ValueError(
            "TrainConfig.best_export_dir exports the best of the run's evals, and "
            "eval_every_steps=0 makes none (or bind it for a follower alone: --eval_only --follow)"
        )
    for knob, folder in (
        ("export_dir", train.export_dir),
        ("best_export_dir", train.best_export_dir),
    ):
        if folder is not None:
            check_writable_dir(folder, f"TrainConfig.{knob}")
    mesh = make_mesh()
    # Optimizer first: a misspelled name fails before any model is loaded or compiled.
    lr_schedule = make_lr_schedule(train.num_steps * train.updates_per_step)
    tx = make_optimizer(lr_schedule)
    rewards = make_rewards()
    tool_config = make_tools()
    chat_template = _read_chat_template(train.chat_template_path)
    bundle = make_model()
    _check_attention_platform(bundle.config, mesh.devices.flat[0].platform)
    scorers = _reward_models(rewards, bundle.config.attention_impl)
    if train.shared_prompt_forward:
        transformer.check_shared_prompt_attention(bundle.config)
    if chat_template is not None:
        bundle.tokenizer.chat_template = chat_template
    if train.chat_template_kwargs and not getattr(bundle.tokenizer, "chat_template", None):
        raise ValueError(
            f"TrainConfig.chat_template_kwargs={train.chat_template_kwargs} needs a tokenizer "
            "with a chat template"
        )
    end_ids, pad_id = _end_and_pad_ids(bundle)
    tool_config = tool_config.for_chat_template(
        bundle.tokenizer,
        end_tokens=bundle.tokenizer.convert_ids_to_tokens(list(end_ids)),
        use_chat_template=train.use_chat_template,
        system_prompt=train.system_prompt,
        template_kwargs=train.chat_template_kwargs,
    )
    tools_or_none = tool_config if tool_config.names else None
    train_examples, test_examples, extra_eval_sets = _datasets(
        train, rewards, bundle.tokenizer, tools_or_none, eval_only
    )
    sampling = make_sampling(
        end_ids=end_ids,
        pad_id=pad_id,
        token_bytes=lambda: token_bytes(bundle.tokenizer, bundle.config.vocab_size),
        tool_stops=tool_config.round_stops,
    )
    if rewards.overlong_buffer > sampling.max_new_tokens:
        raise ValueError(
            f"make_rewards.overlong_buffer={rewards.overlong_buffer} exceeds the token budget "
            f"make_sampling.max_new_tokens={sampling.max_new_tokens}"
        )
    loss = make_loss()
    if loss.max_completion_length is not None and loss.aggregation != "seq_mean_token_sum_norm":
        raise ValueError(
            "make_loss.max_completion_length is Dr. GRPO's constant L: it needs "
            "make_loss.aggregation='seq_mean_token_sum_norm'"
        )
    if train.ref_sync_every_steps and (loss.beta <= 0 or bundle.config.lora is not None):
        raise ValueError(
            "TrainConfig.ref_sync_every_steps needs a reference of its own to move: "
            "make_loss.beta > 0, and no LoRA (whose reference is the frozen base itself)"
        )
    # The loss must score tokens under the distribution they were sampled from.
    loss = dataclasses.replace(
        loss,
        temperature=sampling.logp_temperature,
        max_completion_length=loss.max_completion_length or sampling.max_new_tokens,
    )
    stops = f", stop strings {sampling.stop.strings}" if sampling.stop else ""
    logging.info("end ids %s, pad id %d%s", end_ids, pad_id, stops)
    for name, scorer in scorers.items():
        logging.info(
            "%s %s: %s, %d layers, %s, pad id %s",
            name,
            scorer.source,
            scorer.config.model_type,
            scorer.config.num_layers,
            scorer.config.dtype,
            scorer.pad_id,
        )
    if tool_config.names:
        logging.info(
            "tools %s (%s calls), up to %d per completion",
            tool_config.names,
            tool_config.call_format,
            tool_config.max_calls,
        )
    experiment = Experiment(
        model=bundle.config,
        params=None,
        tokenizer=bundle.tokenizer,
        train_examples=train_examples,
        test_examples=test_examples,
        sampling=sampling,
        loss=loss,
        rewards=rewards,
        tx=tx,
        lr_schedule=lr_schedule,
        mesh=mesh,
        train=train,
        extra_eval_sets=extra_eval_sets,
        tools=tools_or_none,
        reward_models=scorers,
    )
    check_batch_layout(experiment)
    if trains and not eval_only:
        check_state_fits(experiment)
    if read_params:
        experiment.params = bundle.read_params()
    return experiment
