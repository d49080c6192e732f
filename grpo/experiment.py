"""What a run is made of, before anything runs: the loop's knobs (`TrainConfig`, validated when
built) and the assembled `Experiment` the gin factories return (grpo/configurables.py), with the
checks and the batch accounting that need both.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import jax
import optax
from jax.sharding import Mesh

from grpo import knobs, sharding
from grpo.data.prompts import QUESTION, SYSTEM_PROMPT, check_question_template
from grpo.models.config import ModelConfig
from grpo.phases import reward as reward_phase
from grpo.phases.advantage import AGGREGATIONS as REWARD_AGGREGATIONS
from grpo.phases.advantage import SCALES as ADVANTAGE_SCALES
from grpo.phases.reward_model import RewardModel
from grpo.phases.rollout import SamplingConfig
from grpo.phases.update import LossConfig
from grpo.tools import ToolConfig

# With extra train sets, each train example names its set under this key ("main": the
# make_dataset one), and the step reports reward_mean/<set> and accuracy/<set>.
SOURCE, MAIN_SET = "source_set", "main"
REF_SYNC_ALPHA = 0.6  # TRL's ref_model_mixup_alpha


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Loop knobs. Batch knobs count prompts or completions, as their names say (global)."""

    num_steps: int = 100
    prompts_per_step: int = 16
    num_generations: int = 8  # completions per prompt: the GRPO group size
    # Passes over each step's batch (old policy = the rollout's, so clipping acts after the first)
    num_iterations: int = 1
    # Prompts (whole groups) per optimizer update: each pass splits the step's batch into
    # prompts_per_step / prompts_per_update mini-batches, one update each (verl's
    # ppo_mini_batch_size; TRL's steps_per_generation); None: one update on the whole batch.
    prompts_per_update: int | None = None
    # > 0 (with make_loss.beta > 0): every N steps the KL reference moves toward the policy,
    # ref <- alpha * policy + (1 - alpha) * ref (TRL's sync_ref_model); checkpoints keep it.
    ref_sync_every_steps: int = 0
    ref_sync_alpha: float = REF_SYNC_ALPHA
    # > 1: DAPO's dynamic sampling, up to this many rollout rounds per step to fill it with
    # groups whose rewards differ (grpo/phases/dynamic_sampling.py); 1: one round, every group.
    max_sampling_rounds: int = 1
    # True: a prompt whose every completion in a round was right leaves the train set from the
    # next epoch on (Polaris, Skywork-OR1), as checkpoints record; metric `retired_prompts`.
    retire_solved_prompts: bool = False
    # At most this many completions per forward/backward pass (gradient accumulation over an
    # update's micro-batches; memory); None: the whole update's batch at once.
    completions_per_micro_batch: int | None = None
    # K > 1: the update and the KL reference pass sort an update's completions by length and run
    # each micro-batch at the narrowest of K widths (C/K, 2C/K, ..., C for a step's completion
    # width C) that holds it, instead of all at C; one compiled program with K branches, so
    # compile time grows with K. Same loss up to float summation order; pays with micro-batches.
    micro_batch_width_buckets: int = 1
    # True: the update and the KL reference pass run each prompt's forward once for its whole
    # group, not once per completion (its gradient summed over the group): fewer tokens per
    # pass, most where prompts are long against completions. Micro-batches then hold whole
    # groups (width buckets sort whole groups, by their longest completion); einsum or splash
    # attention (make_model.attention_impl not 'cudnn'). Same loss up to float summation order.
    shared_prompt_forward: bool = False
    advantage_scale: str = "group"  # group | batch | none | rloo
    # sum_then_normalize: the advantage of the weighted reward total (GRPO); normalize_then_sum:
    # each reward normalised within its group, then summed (GDPO; needs advantage_scale='group').
    reward_aggregation: str = "sum_then_normalize"
    eval_every_steps: int = 10  # 0: no periodic eval (and none at the end)
    eval_at_start: bool = False  # also evaluate the starting policy (written as step 0)
    eval_examples: int | None = None  # None: the whole test split
    eval_prompts_per_batch: int = 64  # prompts per eval rollout (x eval_samples rows)
    eval_samples: int = 0  # k > 0: also k sampled replies per example (mean and pass@k)
    eval_temperature: float | None = None  # of those k replies; None: the training sampler's
    # k values for unbiased pass@k estimates from those n = eval_samples replies (each k <= n):
    # eval_pass_at_<k>, e.g. (1, 4, 16) beside eval_samples=16.
    eval_pass_at: tuple[int, ...] = ()
    # Also score the greedy replies with the run's reward functions (and reward models):
    # eval_reward_mean (their weighted sum) and eval_reward/<name>; and the eval_samples ones:
    # eval_reward_mean_at_k and eval_reward_at_k/<name>.
    eval_rewards: bool = False
    # More test sets, each a gin scope of make_dataset (`gsm8k/make_dataset.source = ...`),
    # evaluated beside the main one as eval_accuracy/<name> (and the other eval metrics).
    extra_eval_sets: tuple[str, ...] = ()
    # More training data, each a gin scope of make_dataset whose train split joins the main
    # one's (`math/make_dataset.source = ...`); every epoch shuffles them together.
    extra_train_sets: tuple[str, ...] = ()
    checkpoint_every_steps: int = 10
    checkpoints_to_keep: int = 2
    # Every N steps: print two completions and write all of the step's to completions.jsonl.
    show_completions_every_steps: int = 10
    # Every eval also writes each greedy reply (per set) to eval_completions.jsonl.
    write_eval_completions: bool = False
    system_prompt: str | None = SYSTEM_PROMPT  # None: the chat template's own default
    # The user turn: the question where it says {question}, e.g. an instruction after it.
    question_template: str = QUESTION
    # Variables for the chat template, e.g. {'enable_thinking': False} for Qwen3.
    chat_template_kwargs: dict[str, Any] | None = None
    # False: the question template alone is the prompt (no chat template, no system turn).
    use_chat_template: bool = True
    # A Jinja file that replaces the tokenizer's chat template (exports carry it too), e.g.
    # gin/templates/chatml_tools.jinja: ChatML with tools, for make_tools.call_format='hermes'.
    chat_template_path: str | None = None
    prompt_buckets: tuple[int, ...] = (64, 128, 256, 512, 1024)
    # Examples whose prompt (chat template included) is longer are dropped from both splits at
    # start, so every prompt fits a bucket; None: the largest bucket.
    max_prompt_tokens: int | None = None
    completion_buckets: tuple[int, ...] = (32, 64, 128, 256, 512)
    reward_timeout_s: float = 5.0
    # accuracy and eval: also accept the reply's last number when it has no explicit answer
    answer_last_number_fallback: bool = False
    # accuracy and eval: compare answers as numbers, or as math ('math_verify', MATH-style data)
    answer_match: str = "numeric"
    seed: int = 0
    export_dir: str | None = None  # write a transformers-loadable folder at the end
    # Export the policy here whenever `best_export_metric` beats every earlier eval of the run
    # (its step and value in grpo_export.json): RL runs can get worse late.
    best_export_dir: str | None = None
    # What "best" means: eval_accuracy, or with eval_samples eval_mean_at_k, eval_pass_at_k or
    # eval_maj_at_k; each optionally of an extra eval set (`eval_accuracy/gsm8k`).
    best_export_metric: str = "eval_accuracy"
    wandb_project: str | None = None  # log to W&B too (when `wandb` is installed)
    # (first, last): a jax.profiler trace of steps first..last (inclusive; step 1 compiles) to
    # <workdir>/tensorboard, for TensorBoard's Profile tab; process 0 only. None: no trace.
    profile_steps: tuple[int, int] | None = None

    def __post_init__(self):
        knobs.check_fields(self, "TrainConfig")
        for name in (
            "num_steps",
            "prompts_per_step",
            "num_generations",
            "num_iterations",
            "max_sampling_rounds",
            "micro_batch_width_buckets",
            "checkpoints_to_keep",
            "eval_prompts_per_batch",
        ):
            if (value := getattr(self, name)) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {value}")
        if self.num_generations == 1:  # the baseline is the group's mean, under every scale
            raise ValueError(
                "TrainConfig.num_generations must be >= 2: a completion's advantage is its "
                "reward against the other completions of its prompt, and with 1 every "
                "advantage is 0"
            )
        for name in ("eval_every_steps", "checkpoint_every_steps", "show_completions_every_steps"):
            if (value := getattr(self, name)) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0 (0: never), got {value}")
        for name in ("eval_examples", "completions_per_micro_batch"):
            if (value := getattr(self, name)) is not None and value < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1 or None (all), got {value}")
        for name in ("prompt_buckets", "completion_buckets"):
            buckets = tuple(getattr(self, name))
            object.__setattr__(self, name, buckets)  # gin hands over lists
            if not buckets or min(buckets) < 1:
                raise ValueError(f"TrainConfig.{name} must be token counts >= 1, got {buckets}")
        if self.seed < 0:  # numpy's shuffles of the prompt order take no negative seed
            raise ValueError(f"TrainConfig.seed must be >= 0, got {self.seed}")
        if not self.reward_timeout_s > 0:
            raise ValueError(
                f"TrainConfig.reward_timeout_s must be > 0, got {self.reward_timeout_s}"
            )
        if self.prompts_per_update is not None and not (
            1 <= self.prompts_per_update <= self.prompts_per_step
            and self.prompts_per_step % self.prompts_per_update == 0
        ):
            raise ValueError(
                f"TrainConfig.prompts_per_update={self.prompts_per_update} must divide "
                f"prompts_per_step={self.prompts_per_step} (or be None: one update per pass)"
            )
        if self.eval_samples < 0:
            raise ValueError(f"TrainConfig.eval_samples must be >= 0, got {self.eval_samples}")
        if self.eval_temperature is not None and self.eval_temperature <= 0:
            raise ValueError(
                f"TrainConfig.eval_temperature must be > 0 (greedy is eval_accuracy), "
                f"got {self.eval_temperature}"
            )
        if self.eval_temperature is not None and not self.eval_samples:
            raise ValueError(
                "TrainConfig.eval_temperature is the temperature of the eval's sampled replies: "
                "it needs TrainConfig.eval_samples > 0"
            )
        self._check_eval_pass_at()
        reward_phase.check_answer_match(self.answer_match)
        if self.ref_sync_every_steps < 0 or not 0 < self.ref_sync_alpha <= 1:
            raise ValueError(
                f"TrainConfig.ref_sync_every_steps must be >= 0 and ref_sync_alpha in (0, 1], "
                f"got {self.ref_sync_every_steps} and {self.ref_sync_alpha}"
            )
        if not self.ref_sync_every_steps and self.ref_sync_alpha != REF_SYNC_ALPHA:
            raise ValueError(
                "TrainConfig.ref_sync_alpha needs ref_sync_every_steps > 0 (else unused)"
            )
        for setting in ("extra_eval_sets", "extra_train_sets"):
            names = tuple(getattr(self, setting))
            object.__setattr__(self, setting, names)  # gin hands over lists
            if len(set(names)) != len(names) or not all(n.isidentifier() for n in names):
                raise ValueError(
                    f"TrainConfig.{setting} must be distinct gin scope names, got {names}"
                )
        check_question_template(self.question_template)
        if self.best_export_metric not in self.best_metrics:
            raise ValueError(
                f"TrainConfig.best_export_metric={self.best_export_metric!r} is not a metric the "
                f"eval reports; valid: {', '.join(self.best_metrics)}"
            )
        for name in ("system_prompt", "question_template"):
            _refuse_escape_slips(f"TrainConfig.{name}", getattr(self, name) or "")
        if not self.use_chat_template and (
            self.system_prompt is not None
            or self.chat_template_kwargs
            or self.chat_template_path is not None
        ):
            raise ValueError(
                "TrainConfig.use_chat_template=False: the question template is the whole prompt; "
                "set system_prompt=None and no chat_template_kwargs or chat_template_path"
            )
        if self.max_prompt_tokens is not None and not (
            1 <= self.max_prompt_tokens <= max(self.prompt_buckets)
        ):
            raise ValueError(
                f"TrainConfig.max_prompt_tokens must be in [1, {max(self.prompt_buckets)}] (the "
                f"largest prompt bucket), got {self.max_prompt_tokens}"
            )
        if self.shared_prompt_forward:
            self._check_shared_prompt_forward()
        if self.profile_steps is not None:
            first, last = self.profile_steps
            object.__setattr__(self, "profile_steps", (first, last))  # gin hands over lists
            if not 1 <= first <= last <= self.num_steps:
                raise ValueError(
                    f"TrainConfig.profile_steps=({first}, {last}) must be (first, last) steps "
                    f"with 1 <= first <= last <= num_steps={self.num_steps}"
                )
        if self.advantage_scale not in ADVANTAGE_SCALES:
            raise ValueError(
                f"advantage_scale must be one of {'|'.join(ADVANTAGE_SCALES)}, "
                f"got {self.advantage_scale}"
            )
        if self.reward_aggregation not in REWARD_AGGREGATIONS:
            raise ValueError(
                f"TrainConfig.reward_aggregation must be one of {'|'.join(REWARD_AGGREGATIONS)}, "
                f"got {self.reward_aggregation!r}"
            )
        if self.reward_aggregation == "normalize_then_sum" and self.advantage_scale != "group":
            raise ValueError(
                "TrainConfig.reward_aggregation='normalize_then_sum' normalises each reward within "
                f"its group: it needs advantage_scale='group', not {self.advantage_scale!r}"
            )

    def _check_shared_prompt_forward(self) -> None:
        per_micro = self.completions_per_update // self.num_micro_batches
        if per_micro % self.num_generations:
            raise ValueError(
                f"TrainConfig.shared_prompt_forward needs whole groups in a micro-batch: "
                f"{per_micro} completions per micro-batch are not a multiple of "
                f"num_generations={self.num_generations} (completions_per_micro_batch)"
            )

    def _check_eval_pass_at(self) -> None:
        ks = self.eval_pass_at
        if ks and not self.eval_samples:
            raise ValueError(
                "TrainConfig.eval_pass_at estimates pass@k from the eval's sampled replies: it "
                "needs TrainConfig.eval_samples > 0"
            )
        if len(set(ks)) != len(ks) or any(not 1 <= k <= self.eval_samples for k in ks):
            raise ValueError(
                f"TrainConfig.eval_pass_at must be distinct k in [1, eval_samples="
                f"{self.eval_samples}], got {ks}"
            )

    @property
    def best_metrics(self) -> list[str]:
        """The eval metrics where higher is better, for `best_export_metric`."""
        names = ["eval_accuracy"] + (
            ["eval_mean_at_k", "eval_pass_at_k", "eval_maj_at_k"] if self.eval_samples else []
        )
        names += [f"eval_pass_at_{k}" for k in self.eval_pass_at]
        names += ["eval_reward_mean"] if self.eval_rewards else []
        names += ["eval_reward_mean_at_k"] if self.eval_rewards and self.eval_samples else []
        return names + [f"{name}/{s}" for s in self.extra_eval_sets for name in names]

    @property
    def prompt_group(self) -> int:
        """Completion rows per prompt run in the update and reference passes: the group with
        `shared_prompt_forward`, else 1 (every row runs its prompt)."""
        return self.num_generations if self.shared_prompt_forward else 1

    @property
    def prompt_token_limit(self) -> int:
        return self.max_prompt_tokens or max(self.prompt_buckets)

    @property
    def completions_per_step(self) -> int:
        return self.prompts_per_step * self.num_generations

    @property
    def updates_per_pass(self) -> int:
        """Optimizer updates per pass over a step's batch: its mini-batches."""
        return self.prompts_per_step // (self.prompts_per_update or self.prompts_per_step)

    @property
    def updates_per_step(self) -> int:
        """Optimizer updates per GRPO step (what TrainState.step and the lr schedule count)."""
        return self.num_iterations * self.updates_per_pass

    @property
    def completions_per_update(self) -> int:
        return self.completions_per_step // self.updates_per_pass

    @property
    def num_micro_batches(self) -> int:
        """Micro-batches per optimizer update (gradient accumulation)."""
        per_update = self.completions_per_update
        per_micro = min(self.completions_per_micro_batch or per_update, per_update)
        if per_update % per_micro:
            noun = "an update" if self.prompts_per_update else "a step"
            raise ValueError(
                f"completions_per_micro_batch={per_micro} must divide the {per_update} "
                f"completions of {noun}"
            )
        return per_update // per_micro


# Control characters no prompt means to hold: what `\boxed`, `\frac`, `\vec` or `\approx`
# become when written with one backslash in a gin or Python string.
_ESCAPE_SLIPS = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\v": "\\v"}


def _refuse_escape_slips(name: str, text: str) -> None:
    for char, escape in _ESCAPE_SLIPS.items():
        if char in text:
            raise ValueError(
                f"{name} holds the control character {escape} (a LaTeX command written with one "
                f"backslash? in gin write \\\\ for \\): {text!r}"
            )


def check_writable_dir(path: str, knob: str) -> None:
    """ValueError unless `path` is a directory this process can write in, or can create: found
    at start, not when the run first saves (or exports, after the last step). Probed by making
    and removing an empty directory in it (or in its nearest existing ancestor), since
    permission bits do not bind root. A URL (gs://...) is refused: the metrics, configs and
    exports are written with plain file calls, which would make a local `gs:` folder."""
    if "://" in path:
        raise ValueError(
            f"{knob}={path}: a URL; give a local path, or a bucket mounted as one (gcsfuse)"
        )
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{knob}={path}: {existing} is a file, not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(dir=existing))
    except OSError as err:
        raise ValueError(f"{knob}={path}: cannot write in {existing} ({err.strerror})") from err


@dataclasses.dataclass
class Experiment:
    """What the factories build: model, data, phase configs, optimizer, mesh."""

    model: ModelConfig
    params: Any  # host (numpy) params, as loaded; None in a dry run
    tokenizer: Any
    train_examples: Sequence[dict]
    test_examples: Sequence[dict]
    sampling: SamplingConfig
    loss: LossConfig
    rewards: reward_phase.RewardConfig
    tx: optax.GradientTransformation
    lr_schedule: optax.Schedule  # over optimizer updates: num_steps x train.updates_per_step
    mesh: Mesh
    train: TrainConfig
    # name -> test examples, evaluated beside test_examples (TrainConfig.extra_eval_sets)
    extra_eval_sets: dict[str, Sequence[dict]] = dataclasses.field(default_factory=dict)
    tools: ToolConfig | None = None  # what completions may call (grpo.tools); None: no tools
    # name in rewards.names -> the learned reward model scoring replies under it
    reward_models: dict[str, RewardModel] = dataclasses.field(default_factory=dict)


def effective_batch_lines(exp: Experiment) -> list[str]:
    """How many prompts, completions and tokens a step holds, globally and per unit."""
    cfg = exp.train
    procs = jax.process_count()
    max_tokens = max(cfg.prompt_buckets) + exp.sampling.max_new_tokens
    per_update = cfg.completions_per_update
    per_micro = per_update // cfg.num_micro_batches
    return [
        f"batch per step: {cfg.prompts_per_step} prompts x {cfg.num_generations} samples = "
        f"{cfg.completions_per_step} completions, <= {cfg.completions_per_step * max_tokens} "
        f"tokens; {cfg.updates_per_step} update(s) per step ({cfg.num_iterations} pass(es) x "
        f"{cfg.updates_per_pass} mini-batch(es))",
        f"batch per process ({procs}): {cfg.prompts_per_step // procs} prompts, "
        f"{cfg.completions_per_step // procs} completions",
        f"batch per update: {per_update // cfg.num_generations} prompts, {per_update} completions",
        f"batch per micro-batch ({cfg.num_micro_batches} per update): {per_micro} completions, "
        f"<= {_micro_batch_tokens(cfg, per_micro, exp.sampling.max_new_tokens)} tokens"
        + (
            f"; sorted by length, each at the narrowest of {cfg.micro_batch_width_buckets} "
            "widths that holds it"
            if cfg.micro_batch_width_buckets > 1
            else ""
        )
        + (
            f"; each of its {per_micro // cfg.num_generations} prompts run once for its group"
            if cfg.shared_prompt_forward
            else ""
        ),
    ]


def _micro_batch_tokens(cfg: TrainConfig, completions: int, max_new_tokens: int) -> int:
    """The most token slots a forward pass over `completions` rows runs."""
    prompts = completions // cfg.prompt_group
    return prompts * max(cfg.prompt_buckets) + completions * max_new_tokens


def check_batch_layout(exp: Experiment) -> None:
    """Fails before anything compiles when the batch cannot be laid out on the mesh."""
    cfg = exp.train
    divisor = sharding.batch_divisor(exp.mesh)
    per_micro = cfg.completions_per_update // cfg.num_micro_batches
    if per_micro % divisor:
        raise ValueError(
            f"{per_micro} completions per micro-batch do not split over dp x fsdp = {divisor} "
            "devices; change prompts_per_step, prompts_per_update, num_generations or "
            "completions_per_micro_batch"
        )
    if cfg.prompts_per_step % jax.process_count():
        raise ValueError(
            f"prompts_per_step={cfg.prompts_per_step} must be a multiple of the "
            f"{jax.process_count()} processes"
        )
